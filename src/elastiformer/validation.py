"""Checks shared by the public entry points (API and CLI): cheap, run before any heavy work, and each failing with a
one-line `ElastiformerError` that names the problem and the fix.

What lives here: option values (positive integers / floats), token batches against the model they feed (dtype,
shape, vocabulary, context length), output folders (writable, and never silently overwritten), and whether a
safetensors file is complete (an interrupted write or download leaves it truncated).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DataError, ElastiformerError, RouterFileError


# ---------------------------------------------------------------------------------------------------- option values
def parse_floats(text: Any, name: str) -> list[float]:
    """A CLI list option ("0.5,0.7", a number, or a YAML list) as floats; `name` is the option's name."""
    if isinstance(text, (int, float)):
        return [float(text)]
    if isinstance(text, (list, tuple)):
        return [float(x) for x in text]
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError as err:
        raise ConfigError(f"--{name.replace('_', '-')} {text!r}: pass numbers separated by commas, e.g. 0.5,0.7,0.9") from err


def parse_ints(text: Any, name: str) -> tuple[int, ...]:
    """A CLI list option ("0,-1", a YAML list; empty or "none": none) as integers."""
    if text in (None, "", "none"):
        return ()
    if isinstance(text, (list, tuple)):
        return tuple(int(x) for x in text)
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError as err:
        raise ConfigError(f"--{name.replace('_', '-')} {text!r}: pass integers separated by commas, e.g. 0,-1") from err


def allocation_path_options(floor: Any, levels: Any) -> dict[str, Any]:
    """--allocation-floor and --allocation-levels, checked before any work (a bad value found after training would
    throw the training away) -> the keyword `fit_allocation` takes for the levels ({} for its default)."""
    try:
        ok = not isinstance(floor, bool) and 0 < float(floor) < 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"--allocation-floor {floor}: pass a fraction of routed FLOPs in (0, 1), e.g. 0.5")
    values = parse_floats(levels or "", "allocation_levels")
    if any(not 0.0 <= v < 1.0 for v in values):
        raise ConfigError(f"--allocation-levels {levels}: pass capacities in [0, 1) a unit may be lowered to, e.g. "
                          "0.875,0.75,0.5,0.25,0")
    return {"levels": tuple(sorted(set(values), reverse=True))} if values else {}


def check_int(name: str, value: Any, minimum: int = 1, hint: str = "") -> int:
    """An integer (not a bool, not a float) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}: pass an integer >= {minimum}{f' ({hint})' if hint else ''}")
    return value


def check_positive(name: str, value: Any, hint: str = "") -> float:
    """A finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r}: pass a finite number > 0{f', e.g. {hint}' if hint else ''}")
    return float(value)


def check_device(device: Any) -> str | None:
    """None (a GPU when there is one), 'cpu', or 'cuda' / 'cuda:N' that torch can see here."""
    if device is None:
        return None
    text = str(device)
    if text == "cpu":
        return text
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={text!r} but torch sees no CUDA GPU here: pass device='cpu' (or leave it out)")
        if ":" in text and int(text[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"device={text!r} but torch sees {torch.cuda.device_count()} GPU(s): pick one of "
                              f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return text
    raise ConfigError(f"device={text!r} is not a device elastiformer runs on: pass 'cpu', 'cuda' or 'cuda:N'")


# ---------------------------------------------------------------------------------------------------- tokens vs model
def model_context(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover (max_position_embeddings / n_positions)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_token_ids(ids: Any, *, vocab_size: int | None = None, context: int | None = None, past: int = 0,
                    what: str = "input_ids") -> None:
    """`ids` must be integer token ids [T] or [B, T] with T >= 1, inside the vocabulary, and past + T tokens must fit
    the model's context (longer text must be cut into windows, e.g. `data.pack_sequences(seq_len=context)`)."""
    if not isinstance(ids, torch.Tensor):
        raise DataError(f"{what} is a {type(ids).__name__}, not a tensor: pass a torch.LongTensor of token ids "
                        "[batch, tokens] (a tokenizer's return_tensors='pt' output)")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise DataError(f"{what} has dtype {ids.dtype}, not integer token ids: pass a torch.LongTensor")
    if ids.dim() not in (1, 2):
        raise DataError(f"{what} has shape {tuple(ids.shape)}: pass token ids [tokens] or [batch, tokens]")
    if ids.numel() == 0:
        raise DataError(f"{what} of shape {tuple(ids.shape)} holds no tokens: pass at least one token per sequence")
    T = ids.shape[-1]
    if context is not None and past + T > context:
        where = f"{past} cached + {T} new tokens" if past else f"{T} tokens"
        raise DataError(f"{what} has {where}, more than the model's context of {context} (max_position_embeddings):"
                        f" pass at most {context} tokens per sequence, e.g. cut long text into windows with "
                        f"pack_sequences(seq_len={context}) / --seq-len {context}")
    if vocab_size is not None:
        lo, hi = (int(v) for v in torch.aminmax(ids))  # one op: this runs on every decoding step
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise DataError(f"{what} holds token id {bad}, outside the model's vocabulary [0, {vocab_size}): "
                            "tokenize with the model's own tokenizer (load_tokenizer(model))")


# ---------------------------------------------------------------------------------------------------- output folders
def check_output_dir(path: str | os.PathLike, overwrite: bool, what: str = "its results",
                     flag: str = "overwrite=True") -> Path:
    """Refuse a folder (or file) that already holds something unless `overwrite`; then prove it can be written."""
    from .cache import ensure_writable_dir

    path = Path(path)
    if path.is_file() and not overwrite:
        raise ConfigError(f"{path} already exists (a file): pass {flag} to replace {what}, or another output")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"{path} already exists: pass {flag} to replace {what}, or another output")
    if path.is_file():
        raise ConfigError(f"{path} is a file, not a folder: pass a folder for {what}")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    checked = ensure_writable_dir(path)
    _CREATED_OUTPUTS.extend(missing)  # (deepest first)
    return checked


_CREATED_OUTPUTS: list[Path] = []  # output folders check_output_dir created (for a command that fails to remove)


def remove_empty_created_outputs(failed: bool = True) -> None:
    """After a command: if it `failed`, remove the output folders `check_output_dir` created that stayed empty (a
    failed run's partial checkpoint stays, for --resume); either way start a fresh record."""
    for folder in _CREATED_OUTPUTS if failed else ():
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass
    _CREATED_OUTPUTS.clear()


def check_output_file(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> Path:
    """A result file: refused if it exists (unless `overwrite`), and its folder must be writable."""
    from .cache import ensure_writable_dir

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: pass a file name for the results")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists: pass {flag} to replace it, or another file name")
    ensure_writable_dir(path.parent)
    return path


# ---------------------------------------------------------------------------------------------------- complete files
def safetensors_complete(path: str | os.PathLike) -> bool:
    """True if `path` is a whole safetensors file: its header parses and its size is exactly header + data.

    Reads only the header, so it is cheap even for a model's weights; a file cut short by an interrupted write or
    download fails it (so the cache is rebuilt, or the user is told, instead of a deep error at load time).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return False
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                return False
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        return os.path.getsize(path) == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def check_finite_tensors(tensors: dict[str, torch.Tensor], where: str, fix: str,
                         error: type[ElastiformerError] = ElastiformerError) -> None:
    """Every floating tensor is finite (calibration buffers, NaN until fitted, aside): a NaN / inf router weight
    would silently route nothing."""
    for key, value in tensors.items():
        if value.is_floating_point() and "calib_" not in key and not torch.isfinite(value).all():
            raise error(f"{where} holds non-finite values in {key}: {fix}")


def project_readme() -> Path:
    """The README.md that `--readme` rewrites: the one of the elastiformer clone this package runs from (an editable
    install), wherever the command is run; never a README.md of the current folder."""
    readme = Path(__file__).resolve().parents[2] / "README.md"
    if not (readme.is_file() and (readme.parent / "pyproject.toml").is_file()
            and "<!-- results:" in readme.read_text(encoding="utf-8", errors="replace")):
        raise ConfigError("--readme rewrites the results sections of the elastiformer repository's README.md, and "
                          "this install has none (installed from a wheel?): run it from a clone installed with "
                          "pip install -e .")
    return readme


def read_saved_folder(path: str | Path, config_name: str, files: tuple[str, ...], what: str, writer: str,
                      thing: str) -> tuple[Path, Any]:
    """A folder written by `<writer>.save_pretrained`: it exists, holds `files`, and its `config_name` is JSON.
    -> (the folder, the parsed JSON, not yet checked). what: the folder's name in errors ("router folder");
    thing: what to save again ("routers")."""
    path = Path(path)
    if not path.is_dir():
        raise RouterFileError(f"no {what} at {path}: pass the folder that save_pretrained wrote")
    for name in files:
        if not (path / name).is_file():
            raise RouterFileError(f"{path} has no {name}: pass a folder written by {writer}.save_pretrained")
    try:
        return path, json.loads((path / config_name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RouterFileError(f"{path / config_name} is not valid JSON ({err}): save the {thing} again") from err
