"""Options of every `elastiformer` command: the command line over a `--config` YAML file over the defaults.

Each command's typer signature declares its options once (name, type, help); YAML values are converted to those
types and checked as command-line values are; unknown keys get a "did you mean".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from ..validation import check_output_dir

def merge_options(config: Optional[Path], given: dict[str, Any], defaults: dict[str, Any], command=None) -> dict[str, Any]:
    """CLI options over YAML values over defaults. `command`: the typer function whose annotated option types the
    YAML values are converted to."""
    merged = dict(defaults)
    if config is not None:
        import yaml

        if not config.is_file():
            raise ConfigError(f"no config file at {config}: pass a YAML file of option: value lines")
        try:
            loaded = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{config} is not valid YAML ({str(err).splitlines()[0]}): fix the file") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config} must hold a mapping of option: value, not a {type(loaded).__name__}")
        loaded = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(defaults))
        if unknown:
            import difflib

            hints = [f" (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, list(defaults), n=1)) else ""
                     for k in unknown]
            raise ConfigError(f"{config} has unknown keys {unknown}{''.join(hints)}: the options here are "
                              f"{', '.join(sorted(defaults))}")
        kinds = declared_option_types(command) if command is not None else {}
        merged.update({k: declared_type(config, k, yaml_value(config, k, v, defaults[k]), kinds)
                       for k, v in loaded.items()})
    merged.update({k: v for k, v in given.items() if v is not None})
    return merged


def declared_type(config: Path, key: str, value: Any, kinds: dict[str, type]) -> Any:
    """A YAML value converted to the type its command-line option declares (the command's signature is the one
    declaration of each option: `steps: abc` fails as `--steps abc` would); keys with no option of their own (e.g. a
    bench's inner settings) keep the structural checks of `yaml_value`."""
    kind = kinds.get(key)
    if kind not in (int, float) or value is None:
        return value
    name = "an integer" if kind is int else "a number"
    try:
        converted = kind(value)
        if kind is int and isinstance(value, float) and converted != value:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{config}: {key} is {value!r}: pass {name}, as --{key.replace('_', '-')} takes") from None
    return converted


def declared_option_types(command) -> dict[str, type]:
    """{option name: int / float / str / bool / Path} from a typer command function's annotations (Optional[...]
    unwrapped)."""
    import types
    import typing

    kinds = {}
    for name, hint in typing.get_type_hints(command).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds[name] = args[0] if optional and args else hint
    return kinds


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_PATH_KEYS = ("output", "model", "data", "routers", "plot", "calibration_data", "checkpoint", "sorted_checkpoint")


def yaml_value(config: Path, key: str, value: Any, default: Any) -> Any:
    """A YAML value checked against its option's kind (the kind of its default) as the command line would check it:
    `overwrite: "false"` is false, not a truthy string; a list is a comma-separated option (`budgets: [0.5, 0.8]`)."""
    where = f"{config}: {key}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where} is {value!r}: pass true or false")
    if isinstance(value, bool):
        kind = type(default).__name__ if default is not None else "value"
        raise ConfigError(f"{where} is {value!r}: this option takes a {kind}, not true / false")
    if isinstance(value, dict):
        raise ConfigError(f"{where} is a mapping: pass a single value")
    if isinstance(value, list) and key in _PATH_KEYS:
        raise ConfigError(f"{where} is a list: pass one name or path")
    if isinstance(value, list):
        if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where} is {value!r}: a list here holds numbers only, e.g. [0.5, 0.8]")
        return ",".join(str(v) for v in value)
    if key in _PATH_KEYS and not isinstance(value, str):
        raise ConfigError(f"{where} is {value!r}: pass a name or path (text)")
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)  # (e.g. dense_layers: 0)
    return value


def check_output(path: Path, overwrite: bool, what: str) -> None:
    """An output folder: refused if it holds something (unless --overwrite), else created (removed again by the
    command line if the command fails and it stays empty)."""
    check_output_dir(path, overwrite, what, flag="--overwrite")


def check_numbers(o: dict[str, Any], ints: dict[str, int], floats: tuple[str, ...] = ()) -> None:
    """Integer options (name -> minimum; None values skipped) and positive float options, checked and converted in
    place before any model is loaded (a YAML file may give them as strings)."""
    from ..validation import check_int, check_positive

    for key, minimum in ints.items():
        value = o.get(key)
        if value is None:
            continue
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        o[key] = check_int(f"--{key.replace('_', '-')}", value, minimum)
    for key in floats:
        value = o.get(key)
        if value is None:
            continue
        try:
            value = float(value) if isinstance(value, str) else value
        except ValueError:
            pass
        o[key] = check_positive(f"--{key.replace('_', '-')}", value)
