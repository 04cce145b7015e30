"""The `ArchSpec` contract and its registry (keyed by `config.model_type`, like PEFT's constants)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError


@dataclass
class AttentionWeights:
    """Projection weights in `nn.Linear` convention (`y = x @ w.T + b`), views of the base model's tensors."""

    q_w: torch.Tensor  # (H*D, C)
    q_b: torch.Tensor | None
    k_w: torch.Tensor  # (KVH*D, C)
    k_b: torch.Tensor | None
    v_w: torch.Tensor  # (KVH*D, C)
    v_b: torch.Tensor | None
    o_w: torch.Tensor  # (C, H*D)
    o_b: torch.Tensor | None


@dataclass
class MLPWeights:
    """MLP weights in `nn.Linear` convention. `gate_w` is None for a plain (non-gated) MLP such as GPT-2's."""

    up_w: torch.Tensor  # (I, C)
    up_b: torch.Tensor | None
    gate_w: torch.Tensor | None  # (I, C)
    gate_b: torch.Tensor | None
    down_w: torch.Tensor  # (C, I)
    down_b: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # dotted path from the *ForCausalLM module to the ModuleList of blocks
    attn_name: str  # attribute of a block holding its self-attention
    mlp_name: str  # attribute of a block holding its MLP
    rotary: bool  # attention receives `position_embeddings=(cos, sin)` and rotates q / k
    o_proj_name: str  # attribute of the attention holding its output projection (input: heads side by side)
    lora_targets: tuple[tuple[str, bool], ...]  # attention projections that get LoRA, and whether each is a Conv1D
    attention_weights: Callable[[nn.Module], AttentionWeights]
    mlp_weights: Callable[[nn.Module], MLPWeights]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    @staticmethod
    def dims(config) -> dict[str, int]:
        """Hidden size C, heads H, KV heads KVH, head dim D, MLP width I, layers L, vocab V."""
        heads = config.num_attention_heads
        hidden = config.hidden_size
        return {
            "C": hidden,
            "H": heads,
            "KVH": getattr(config, "num_key_value_heads", None) or heads,
            "D": getattr(config, "head_dim", None) or hidden // heads,
            "I": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
            "L": config.num_hidden_layers,
            "V": config.vocab_size,
        }


_REGISTRY: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> ArchSpec:
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec
    return spec


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_arch_spec(model: nn.Module) -> ArchSpec:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported: elastiformer knows "
            f"{', '.join(supported_model_types())}; register a spec with elastiformer.arch.register_architecture"
        )
    spec = _REGISTRY[model_type]
    try:
        spec.layers(model)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no '{spec.layers_path}': elastiformer needs the *ForCausalLM model "
            f"(e.g. AutoModelForCausalLM), not a bare backbone or a head-less model"
        ) from err
    return spec
