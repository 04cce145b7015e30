"""The `ArchSpec` contract: where a family keeps its layers, attention, MLP and weights (the registry of specs is
arch/registry.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class AttentionWeights:
    """Projection weights in `nn.Linear` convention (`y = x @ w.T + b`), views of the base model's tensors.

    `norm` is the LayerNorm a post-LN sub-layer applies to `residual + output` (BERT's BertSelfOutput); None for
    pre-LN models, whose block adds the residual itself. `q_lora` ... `o_lora`: the active LoRA update of each
    projection (`elastiformer.lora.LowRank`, applied as thin matmuls beside the base weight), None without an
    adapter or while routing is off.
    """

    q_w: torch.Tensor  # (H*D, C)
    q_b: torch.Tensor | None
    k_w: torch.Tensor  # (KVH*D, C)
    k_b: torch.Tensor | None
    v_w: torch.Tensor  # (KVH*D, C)
    v_b: torch.Tensor | None
    o_w: torch.Tensor  # (C, H*D)
    o_b: torch.Tensor | None
    norm: nn.Module | None = None
    q_lora: Any = None  # LowRank | None
    k_lora: Any = None
    v_lora: Any = None
    o_lora: Any = None
    # ---- attention variants, as the module's own forward applies them (None: the plain case) ----
    q_norm: nn.Module | None = None  # QK-norm (Qwen3, Gemma 3, OLMo 2) applied to q / k before the rotary embedding
    k_norm: nn.Module | None = None
    qk_norm_per_head: bool = True  # the norms see each head's D features (else the whole projection: OLMo 2)
    scaling: float | None = None  # softmax scale (None: head_dim ** -0.5)
    softcap: float | None = None  # attention logits -> softcap * tanh(logits / softcap) (Gemma 2)
    sliding_window: int | None = None  # a query sees keys less than this many positions back (None: all)
    rotary: bool = True  # False: this layer ignores the rotary embedding it is given (SmolLM3's NoPE layers)


@dataclass
class MLPWeights:
    """MLP weights in `nn.Linear` convention. `gate_w` is None for a plain (non-gated) MLP such as GPT-2's; `norm`
    is the LayerNorm of a post-LN MLP (applied to `residual + output`), None for pre-LN models."""

    up_w: torch.Tensor  # (I, C)
    up_b: torch.Tensor | None
    gate_w: torch.Tensor | None  # (I, C)
    gate_b: torch.Tensor | None
    down_w: torch.Tensor  # (C, I)
    down_b: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    norm: nn.Module | None = None


def qkvo_attention_weights(attn: nn.Module, o_name: str = "o_proj") -> AttentionWeights:
    """The weights of an attention with separate `q_proj` / `k_proj` / `v_proj` linears and an output linear named
    `o_name` (Llama and ViT: o_proj; CLIP: out_proj)."""
    from ..layers.lora import linear_weight, low_rank  # a LoRA-wrapped linear gives its base weight and its update

    o = getattr(attn, o_name)
    return AttentionWeights(
        q_w=linear_weight(attn.q_proj), q_b=attn.q_proj.bias,
        k_w=linear_weight(attn.k_proj), k_b=attn.k_proj.bias,
        v_w=linear_weight(attn.v_proj), v_b=attn.v_proj.bias,
        o_w=linear_weight(o), o_b=o.bias,
        q_lora=low_rank(attn.q_proj), k_lora=low_rank(attn.k_proj), v_lora=low_rank(attn.v_proj), o_lora=low_rank(o),
    )


def fc_mlp_weights(mlp: nn.Module) -> MLPWeights:
    """The weights of a plain MLP `fc2(activation_fn(fc1(x)))` (ViT, CLIP)."""
    return MLPWeights(
        up_w=mlp.fc1.weight, up_b=mlp.fc1.bias, gate_w=None, gate_b=None,
        down_w=mlp.fc2.weight, down_b=mlp.fc2.bias, act=mlp.activation_fn,
    )


def get_dotted(module: nn.Module, path: str):
    """`module.a.b` for path "a.b" (the specs name nested modules, e.g. BERT's "output.dense")."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_dotted(module: nn.Module, path: str, value) -> None:
    owner, _, name = path.rpartition(".")
    setattr(get_dotted(module, owner) if owner else module, name, value)


@dataclass(frozen=True)
class ArchSpec:
    """Where a model family keeps its blocks and sub-layers.

    Causal LMs (`causal=True`) are loaded with `AutoModelForCausalLM` and route tokens at inference by calibrated
    per-token thresholds (a decision may not look at later tokens). Bidirectional encoders (`causal=False`: BERT,
    ViT) are loaded with `auto_class` (or the class their config names), attend without a causal mask, and may route
    by top-k over the whole sequence at inference, so they need no calibration.

    `post_norm`: the block's sub-layers add the residual and apply a LayerNorm themselves (post-LN, BERT), so a
    wrapper that skips a token passes its hidden state through unchanged; pre-LN blocks (Llama, GPT-2, ViT) add the
    residual outside the sub-layer, and a skipped token's sub-layer output is zero. Either way a skipped token leaves
    the residual stream exactly as if the sub-layer were absent.
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str  # dotted path from the loaded model (e.g. the *ForCausalLM module) to the ModuleList of blocks
    attn_name: str  # attribute of a block holding its self-attention
    mlp_name: str  # attribute of a block holding its MLP (the one the wrapper replaces)
    rotary: bool  # attention receives `position_embeddings=(cos, sin)` and rotates q / k
    o_proj_name: str  # (dotted) attribute of the attention holding its output projection (input: heads side by side)
    lora_targets: tuple[tuple[str, bool], ...]  # attention projections that get LoRA, and whether each is a Conv1D
    attention_weights: Callable[[nn.Module], AttentionWeights]
    mlp_weights: Callable[[nn.Module], MLPWeights]
    causal: bool = True
    auto_class: str = "AutoModelForCausalLM"  # the transformers Auto class load_model uses for a folder
    model_classes: tuple[str, ...] = ()  # classes a folder's config may name, loaded as that class (not auto_class)
    alt_layers_paths: tuple[str, ...] = ()  # where else the blocks may sit (inside a task model: "vit.layers")
    layers_in_backbone: str = ""  # tail of the layers path inside the backbone whose output has last_hidden_state
    post_norm: bool = False
    default_pooling: str = "mean"  # sentence / image embedding for cosine distillation: "mean" | "cls" | "pooler"
    towers: tuple[str, ...] = ()  # submodules that are layer stacks of their own, each with its own spec (LLaVA's
    # vision tower), made elastic beside this one under the same budget
    config_attr: str = ""  # attribute of the model's config holding this stack's config ("text_config": LLaVA)
    take_mlp: Callable[[nn.Module], nn.Module] | None = None  # block -> the MLP as one module (default: mlp_name)
    put_mlp: Callable[[nn.Module, nn.Module], None] | None = None  # put an MLP (or its wrapper) back into a block
    measured_dims: tuple[tuple[str, int], ...] = ()  # dims read from the weights' shapes, over the config's
    # (attention, head order (H,), KV group order (KVH,)) -> None: reorder heads in place, for attentions whose q / k
    # / v weights are not views `attention_weights` can permute through (GPT-NeoX's per-head fused rows)
    permute_heads: Callable[[nn.Module, torch.Tensor, torch.Tensor], None] | None = None

    def find_layers_path(self, model: nn.Module) -> str:
        """The first of `layers_path`, `alt_layers_paths` that exists in `model` (AttributeError if none does)."""
        for path in (self.layers_path, *self.alt_layers_paths):
            try:
                model.get_submodule(path)
                return path
            except AttributeError:
                continue
        raise AttributeError(f"{type(model).__name__} has none of {(self.layers_path, *self.alt_layers_paths)}")

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.find_layers_path(model))

    def backbone(self, model: nn.Module) -> nn.Module:
        """The module that owns the blocks and returns `last_hidden_state` (the model itself for BertModel /
        ViTModel, `model.vit` for ViTForImageClassification)."""
        path = self.find_layers_path(model)
        tail = self.layers_in_backbone or path
        prefix = path[: -len(tail)].rstrip(".") if path.endswith(tail) else ""
        return model.get_submodule(prefix) if prefix else model

    def get_mlp(self, block: nn.Module) -> nn.Module:
        return self.take_mlp(block) if self.take_mlp is not None else getattr(block, self.mlp_name)

    def set_mlp(self, block: nn.Module, module: nn.Module) -> None:
        if self.put_mlp is not None:
            self.put_mlp(block, module)
        else:
            setattr(block, self.mlp_name, module)

    def stack_config(self, config):
        """The config of this spec's layer stack (`config.text_config` for LLaVA's language model)."""
        return getattr(config, self.config_attr) if self.config_attr else config

    def dims(self, config) -> dict[str, int]:
        """Hidden size C, heads H, KV heads KVH, head dim D, MLP width I, layers L, vocab V (0 without one: ViT)."""
        heads = config.num_attention_heads
        hidden = config.hidden_size
        return dict({
            "C": hidden,
            "H": heads,
            "KVH": getattr(config, "num_key_value_heads", None) or heads,
            "D": getattr(config, "head_dim", None) or hidden // heads,
            "I": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
            "L": config.num_hidden_layers,
            "V": getattr(config, "vocab_size", None) or 0,
        }, **dict(self.measured_dims))
