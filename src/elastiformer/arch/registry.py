"""The registry of architecture specs (keyed by `config.model_type`, like PEFT's constants), and the lookup that
falls back to discovering a decoder LM's layout from its modules (arch/discover.py)."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitectureError
from .discover import TESTED_FAMILIES, discover_spec, is_decoder_lm
from .spec import ArchSpec

_REGISTRY: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> ArchSpec:
    """Register `spec` for each of its model types (replacing an earlier spec of the same type)."""
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec
    return spec


def supported_model_types() -> list[str]:
    """Model types with a registered spec, and the decoder families whose discovered layout is tested."""
    return sorted(set(_REGISTRY) | set(TESTED_FAMILIES))


def get_arch_spec(model: nn.Module) -> ArchSpec:
    """The registered spec of the model's type, else one discovered from its modules (decoder LMs)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY and config is not None:
        if is_decoder_lm(config):
            try:
                return discover_spec(model)
            except UnsupportedArchitectureError as err:  # one line: which part of the model was not understood
                raise UnsupportedArchitectureError(
                    f"model type {model_type!r} ({type(model).__name__}) is not supported: {err}; register a spec "
                    "with elastiformer.arch.register_architecture"
                ) from None
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported: elastiformer has specs for "
            f"{', '.join(supported_model_types())} and discovers the layout of decoder LMs (transformers' causal-LM "
            "model types, e.g. mistral, qwen3, gemma3_text, phi3); register a spec with "
            "elastiformer.arch.register_architecture"
        )
    spec = _REGISTRY[model_type]
    try:
        spec.layers(model)
    except AttributeError as err:
        wanted = "the *ForCausalLM model (e.g. AutoModelForCausalLM)" if spec.causal else \
            f"a {' / '.join(spec.model_classes) or spec.auto_class} model"
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no '{spec.layers_path}': elastiformer needs {wanted} for model type "
            f"{model_type!r}"
        ) from err
    return spec


def registered_spec(model_type: str | None) -> ArchSpec | None:
    """The spec registered for `model_type`, or None (a discovered decoder LM has none)."""
    return _REGISTRY.get(model_type)
