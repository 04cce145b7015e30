"""Router artifacts on disk: what `ElasticModel.save_pretrained` writes and `from_pretrained` reads.

A routers folder holds `elastic_config.json` (format version, elastiformer version, the ElasticConfig, the base
model's identity and weight fingerprint, the fitted allocation, the trained budget range) and `routers.safetensors`
(router weights, calibration buffers, LoRA adapters; never base weights). Reading checks everything before any
tensor is copied: a truncated file, a newer format, another base model or non-finite values get a one-line error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocation import Allocation
from .cache import atomic_dir
from .config import ElasticConfig
from .errors import ConfigError, ElastiformerError, RouterFileError
from .validation import check_finite_tensors, read_saved_folder, safetensors_complete
from .version import __version__

CONFIG_NAME = "elastic_config.json"
WEIGHTS_NAME = "routers.safetensors"
FORMAT_VERSION = 2  # 2: per-layer allocation in the config, thresholds at up to N_CALIBRATION capacities


def write_routers(em, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `elastic_config.json` and `routers.safetensors` (routers and calibration only), atomically.
    A folder that already holds something is replaced only with `overwrite=True`."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"{path} already holds files: pass overwrite=True to replace them, or another folder")
    meta = {
        "format_version": FORMAT_VERSION,
        "elastiformer_version": __version__,
        "elastic_config": em.elastic_config.to_dict(),
        "base_model": em.base_identity(),
    }
    if em.state.allocation is not None:
        meta["allocation"] = em.state.allocation.to_dict()
    if em.trained_budgets is not None:
        meta["trained_budgets"] = list(em.trained_budgets)
    try:
        with atomic_dir(path) as tmp:
            save_file({k: v.cpu() for k, v in em.router_state_dict().items()}, str(tmp / WEIGHTS_NAME),
                      metadata={"format_version": str(FORMAT_VERSION)})
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    except OSError as err:
        raise ElastiformerError(f"cannot write routers to {path}: {err.strerror}; pass a writable folder") from err
    return path


def config_of(meta: dict[str, Any], path: str | Path) -> ElasticConfig:
    """The ElasticConfig a routers folder (its config, as `read_router_config` returns it) was saved with."""
    try:
        return ElasticConfig.from_dict(meta["elastic_config"])
    except (ConfigError, TypeError) as err:
        raise RouterFileError(f"{Path(path) / CONFIG_NAME} holds an invalid elastic_config ({err}): save the "
                              "routers again") from err


def load_routers(em, path: str | Path, meta: dict[str, Any], *, check_fingerprint: bool = True) -> None:
    """Copy the saved routers (and calibration, allocation, trained budget range) of folder `path` into `em`, an
    ElasticModel built with `config_of(meta)`; refuses routers trained for another base model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    saved, here = meta.get("base_model", {}), em.base_identity()
    if saved.get("model_type") != here["model_type"] or saved.get("dims") != here["dims"]:
        raise RouterFileError(
            f"routers in {path} were trained for a {saved.get('model_type')} model with {saved.get('dims')}, "
            f"not this {here['model_type']} model with {here['dims']}: load the base model they were trained for")
    if check_fingerprint and saved.get("fingerprint") != here["fingerprint"]:
        raise RouterFileError(
            f"routers in {path} were trained on other weights ({saved.get('name_or_path') or 'unknown'}) than this "
            f"model's: load that base model, or pass check_fingerprint=False if you know the weights match")
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as err:
        raise RouterFileError(f"{path / WEIGHTS_NAME} is corrupt or unreadable ({err}): save the routers "
                              "again") from err
    check_finite_tensors(tensors, str(path / WEIGHTS_NAME), "the routers diverged when they were trained; train "
                         "them again (with a lower learning rate)", RouterFileError)
    own = em.router_state_dict()
    for key, value in list(tensors.items()):  # format 1 kept 12 calibration points: pad to today's count
        if key.endswith((".calib_capacity", ".calib_threshold")) and key in own and value.shape != own[key].shape \
                and value.dim() == 1 and 0 < value.numel() < own[key].numel():
            tensors[key] = torch.cat([value, value[-1:].expand(own[key].numel() - value.numel())])
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    bad_shape = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        raise RouterFileError(f"{path / WEIGHTS_NAME} does not match its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]}): save the routers again")
    modules = dict(em.base_model.named_modules())
    with torch.no_grad():
        for key, value in tensors.items():
            owner, _, attr = key.rpartition(".")
            target = getattr(modules[owner], attr)
            target.copy_(value.to(target.device, target.dtype))
    if meta.get("allocation") is not None:
        components = em.elastic_config.components()
        em.state.set_allocation(Allocation.from_dict(meta["allocation"], em.state.n_layers, components,
                                                     where=str(path / CONFIG_NAME)))
    trained = meta.get("trained_budgets")
    if isinstance(trained, list) and len(trained) == 2 and all(isinstance(b, (int, float)) for b in trained):
        em.trained_budgets = (float(trained[0]), float(trained[1]))


def base_model_source(meta: dict[str, Any], path: str | Path) -> str:
    """Where the base model of a routers folder (its `elastic_config.json`, as `read_router_config` returns it) came
    from: the short name, folder or .gguf file that `load_model` takes."""
    base = meta.get("base_model") or {}
    name, gguf = base.get("name_or_path"), base.get("gguf_file")
    if not name:
        raise RouterFileError(f"{path} does not record its base model: pass the model explicitly (--model)")
    return str(Path(name) / gguf) if gguf and Path(name).is_dir() else str(name)


def read_router_config(path: str | Path) -> dict[str, Any]:
    path, meta = read_saved_folder(path, CONFIG_NAME, (CONFIG_NAME, WEIGHTS_NAME), "router folder", "ElasticModel",
                                   "routers")
    if not isinstance(meta, dict):
        raise RouterFileError(f"{path / CONFIG_NAME} is not an elastiformer router config: save the routers again")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not isinstance(meta.get("elastic_config"), dict):
        raise RouterFileError(f"{path / CONFIG_NAME} is not an elastiformer router config: save the routers again")
    if version > FORMAT_VERSION:
        raise RouterFileError(f"{path} was written in router format {version}, newer than this elastiformer "
                              f"understands ({FORMAT_VERSION}): upgrade elastiformer")
    if not safetensors_complete(path / WEIGHTS_NAME):
        raise RouterFileError(f"{path / WEIGHTS_NAME} is truncated or corrupt (an interrupted copy or save?): save "
                              "the routers again, or copy the complete folder")
    return meta


def weight_fingerprint(model: nn.Module) -> str:
    """A cheap, deterministic hash of the base weights: names, shapes and a strided sample of every tensor."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if any(tag in name for tag in ("token_router", "head_router", "expert_router", "stand_in.", "lora_")):
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]
