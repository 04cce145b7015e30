"""Options of every `elastiformer` command: the command line over a `--config` YAML file over the defaults.

Each command's options are declared once, in a table of `elastiformer.options.Option` (name, type, default, help);
`command` turns a table into the typer command's options (their defaults shown in --help), and `merge_options`
lays the command line over a YAML file over the defaults. YAML values are converted to the declared types and
checked as command-line values are; unknown keys get a "did you mean".
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ConfigError
from ..options import Option, defaults
from ..validation import check_output_dir


@dataclass(frozen=True)
class Given:
    """What one call of a command was given: the options set on its command line (None: not given), and
    `--config`. `merge()` lays them over the YAML file over the defaults of `options`."""

    values: dict[str, Any]
    config: Optional[Path]
    options: dict[str, Option]

    def merge(self, options: dict[str, Option] | None = None) -> dict[str, Any]:
        return merge_options(self.config, self.values, self.options if options is None else options)


def command(group, options: dict[str, Option], name: str | None = None, *, config: bool = True,
            **extra: tuple[Any, Any]) -> Callable:
    """Register `fn(given: Given, **extra)` as the command `name` of the typer app `group`, with one command-line
    option per entry of `options` (type, help and shown default from the table) and `--config FILE.yaml`. `extra`:
    parameters that are not options of the table (e.g. `--readme`), as name=(annotation, typer.Option(...))."""
    import typer

    def register(fn: Callable) -> Callable:
        params, hints = [], {}
        for key, opt in options.items():
            dash = key.replace("_", "-")
            if opt.switch and opt.default is False:  # --name, off unless given
                default = typer.Option(False, f"--{dash}", help=opt.help)
                hint: Any = bool
            else:  # None: not given on the command line, so a YAML file or the default decides (a switch whose
                # default is None, chosen by the library, takes --name / --no-name)
                flags = (f"--{dash}/--no-{dash}",) if opt.switch else ()
                shown = opt.default if opt.default not in (None, "") else False
                default = typer.Option(None, *flags, help=opt.help,
                                       show_default=False if shown is False else str(shown))
                hint = Optional[opt.type]
            params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint))
            hints[key] = hint
        for key, (hint, default) in extra.items():
            params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint))
            hints[key] = hint
        if config:
            params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                            default=typer.Option(None, help="YAML file of these options, option: "
                                                                 "value lines (the command line wins).")))
            hints["config"] = Optional[Path]

        @functools.wraps(fn)
        def run(**kwargs: Any) -> Any:
            more = {k: kwargs.pop(k) for k in extra}
            cfg = kwargs.pop("config", None)
            # (an off-by-default switch reads False when absent: not given, so a YAML file may still turn it on)
            given = {k: v for k, v in kwargs.items()
                     if v is not None and not (options[k].switch and options[k].default is False and v is False)}
            return fn(Given(given, cfg, options), **more)

        del run.__wrapped__  # (typer reads the signature below, not fn's)
        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = hints
        group.command(name)(run)
        return run

    return register


def merge_options(config: Optional[Path], given: dict[str, Any], options: dict[str, Option]) -> dict[str, Any]:
    """CLI options (`given`, None: not given) over YAML values over the defaults of `options`."""
    merged = defaults(options)
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
        unknown = sorted(set(loaded) - set(options))
        if unknown:
            import difflib

            hints = [f" (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, list(options), n=1)) else ""
                     for k in unknown]
            raise ConfigError(f"{config} has unknown keys {unknown}{''.join(hints)}: the options here are "
                              f"{', '.join(sorted(options))}")
        merged.update({k: declared_type(config, k, yaml_value(config, k, v, options[k]), options[k].type)
                       for k, v in loaded.items()})
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in unknown)}: not an option here (the "
                          f"options here are {', '.join(sorted(options))})")
    merged.update({k: v for k, v in given.items() if v is not None})
    return merged


def declared_type(config: Path, key: str, value: Any, kind: type) -> Any:
    """A YAML value converted to the type its option declares: `steps: abc` fails as `--steps abc` would."""
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


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_PATH_KEYS = ("output", "model", "data", "routers", "plot", "calibration_data", "checkpoint", "sorted_checkpoint")


def yaml_value(config: Path, key: str, value: Any, option: Option) -> Any:
    """A YAML value checked against its option's type as the command line would check it: `overwrite: "false"` is
    false, not a truthy string; a list is a comma-separated option (`budgets: [0.5, 0.8]`)."""
    where = f"{config}: {key}"
    kind = option.type
    path = kind is Path or key in _PATH_KEYS
    if option.switch:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where} is {value!r}: pass true or false")
    if isinstance(value, bool):
        name = {int: "int", float: "float", str: "str", Path: "path"}.get(kind, "value")
        raise ConfigError(f"{where} is {value!r}: this option takes a {name}, not true / false")
    if isinstance(value, dict):
        raise ConfigError(f"{where} is a mapping: pass a single value")
    if isinstance(value, list) and path:
        raise ConfigError(f"{where} is a list: pass one name or path")
    if isinstance(value, list):
        if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where} is {value!r}: a list here holds numbers only, e.g. [0.5, 0.8]")
        return ",".join(str(v) for v in value)
    if path and value is not None and not isinstance(value, str):
        raise ConfigError(f"{where} is {value!r}: pass a name or path (text)")
    if kind is str and value is not None and not isinstance(value, str):
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
