"""Discovering a decoder family's layout from its modules, for model types without a registered spec.

A decoder-only transformers model keeps its blocks in one `nn.ModuleList`; each block holds a self-attention and an
MLP under a few conventional names, and their projections are named after a handful of conventions too:

- attention: separate `q_proj / k_proj / v_proj` (Llama, Qwen, Gemma, Phi, OLMo 2, StarCoder 2, ...), a fused
  `qkv_proj` whose rows are [q | k | v] (Phi-3), or a fused `query_key_value` whose rows are per head [q_h, k_h, v_h]
  (GPT-NeoX); output `o_proj` or `dense`;
- MLP: gated `down(act(gate(x)) * up(x))` with separate `gate_proj / up_proj` or a fused `gate_up_proj` ([gate | up]
  rows, Phi-3), or plain `down(act(up(x)))` under up / fc1 / c_fc / dense_h_to_4h and down / fc2 / c_proj /
  dense_4h_to_h;
- attention variants are read from the attention module the way its own forward reads them: `scaling`,
  `attn_logit_softcapping`, `sliding_window` (else the config's, for families that window every layer), `use_rope`, `q_norm /
  k_norm` (or `q_layernorm / k_layernorm`) over each head's D features or over the whole projection (OLMo 2).

Head counts come from the config, head dim and KV heads from the projections' shapes (GPT-NeoX's config names KV
heads it does not have). A model whose blocks, attention or MLP cannot be found gets one `UnsupportedArchitectureError`
naming what is missing.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..layers.lora import linear_weight, low_rank, out_rows
from .spec import ArchSpec, AttentionWeights, MLPWeights

# the decoder families tests/arch/test_families.py runs through the whole contract (discovered, or registered:
# llama, gpt2)
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "phi", "olmo2",
                   "smollm3", "granite", "starcoder2", "gpt_neox", "stablelm", "gpt2")
ATTENTION_NAMES = ("self_attn", "attention", "attn")
MLP_NAMES = ("mlp", "feed_forward")
OUTPUT_NAMES = ("o_proj", "dense", "out_proj")
# fused q / k / v projections and how their output rows are laid out
FUSED_QKV = {"qkv_proj": "blocks", "query_key_value": "per_head"}
GATED_MLP = (("gate_proj", "up_proj", "down_proj"),)
FUSED_GATE_UP = ("gate_up_proj", "down_proj")  # rows [gate | up]
PLAIN_MLP = (("up_proj", "down_proj"), ("fc1", "fc2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"))
ACTIVATION_NAMES = ("act_fn", "activation_fn", "act")
QK_NORM_NAMES = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"))


def _child(module: nn.Module, names) -> tuple[str, nn.Module] | None:
    for name in names:
        sub = getattr(module, name, None)
        if isinstance(sub, nn.Module):
            return name, sub
    return None


def _weight(module) -> torch.Tensor | None:
    """A linear's weight, through a LoRA wrapper (`base_layer`) if there is one."""
    weight = getattr(getattr(module, "base_layer", module), "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _is_linear(module) -> bool:
    weight = _weight(module)
    return weight is not None and weight.dim() == 2


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The first ModuleList whose blocks each hold an attention and an MLP."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and \
                _child(module[0], ATTENTION_NAMES) and _child(module[0], MLP_NAMES):
            return path, module
    raise UnsupportedArchitectureError(
        f"found no stack of blocks (an nn.ModuleList whose blocks hold an attention named "
        f"{' / '.join(ATTENTION_NAMES)} and an MLP named {' / '.join(MLP_NAMES)})"
    )


class _Layout:
    """How one family's attention and MLP are built, found once on the first block."""

    def __init__(self, model: nn.Module, config, model_type: str):
        self.model_type = model_type
        self.layers_path, layers = _find_layers(model)
        block = layers[0]
        self.attn_name, attn = _child(block, ATTENTION_NAMES)
        self.mlp_name, mlp = _child(block, MLP_NAMES)
        # a copy of a model already wrapped (ElastiFormer / Flextron) is read through the wrappers
        attn, mlp = getattr(attn, "base_layer", attn), getattr(mlp, "base_layer", mlp)
        where = f"the attention {type(attn).__name__}"
        self.H = config.num_attention_heads
        # ---- attention projections ----
        if all(_is_linear(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj")):
            self.qkv, self.qkv_layout = ("q_proj", "k_proj", "v_proj"), "separate"
            q_rows, k_rows = _weight(attn.q_proj).shape[0], _weight(attn.k_proj).shape[0]
        else:
            fused = next((n for n in FUSED_QKV if _is_linear(getattr(attn, n, None))), None)
            if fused is None:
                raise UnsupportedArchitectureError(
                    f"{where} has no q_proj / k_proj / v_proj and no fused {' / '.join(FUSED_QKV)} linear")
            self.qkv, self.qkv_layout = (fused,), FUSED_QKV[fused]
            q_rows = None
        self.D = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or \
            getattr(config, "head_dim", None) or config.hidden_size // self.H
        if self.qkv_layout == "separate":
            self.KVH = k_rows // self.D
            if q_rows != self.H * self.D:
                raise UnsupportedArchitectureError(f"{where}: q_proj has {q_rows} rows, not heads x head_dim = "
                                                   f"{self.H} x {self.D}")
        elif self.qkv_layout == "blocks":
            rows = _weight(getattr(attn, self.qkv[0])).shape[0]
            self.KVH = (rows - self.H * self.D) // (2 * self.D)
        else:  # per-head [q_h, k_h, v_h]: every head has its own K and V
            self.KVH = self.H
        out = _child(attn, OUTPUT_NAMES)
        if out is None or not _is_linear(out[1]):
            raise UnsupportedArchitectureError(f"{where} has no output projection named {' / '.join(OUTPUT_NAMES)}")
        self.o_name = out[0]
        self.qk_norm = next((pair for pair in QK_NORM_NAMES if isinstance(getattr(attn, pair[0], None), nn.Module)),
                            None)
        # ---- MLP ----
        where = f"the MLP {type(mlp).__name__}"
        self.mlp_names = next((names for names in GATED_MLP if all(_is_linear(getattr(mlp, n, None)) for n in names)),
                              None)
        self.mlp_kind = "gated"
        if self.mlp_names is None and all(_is_linear(getattr(mlp, n, None)) for n in FUSED_GATE_UP):
            self.mlp_names, self.mlp_kind = FUSED_GATE_UP, "fused_gate_up"
        if self.mlp_names is None:
            self.mlp_names = next((names for names in PLAIN_MLP if all(_is_linear(getattr(mlp, n, None))
                                                                        for n in names)), None)
            self.mlp_kind = "plain"
        if self.mlp_names is None:
            raise UnsupportedArchitectureError(
                f"{where} has none of gate_proj + up_proj + down_proj, gate_up_proj + down_proj, or "
                f"{', '.join(' + '.join(p) for p in PLAIN_MLP)}")
        act = _child(mlp, ACTIVATION_NAMES)
        if act is None and not callable(getattr(mlp, "act_fn", None)):
            raise UnsupportedArchitectureError(f"{where} has no activation named {' / '.join(ACTIVATION_NAMES)}")
        self.act_name = act[0] if act is not None else "act_fn"
        self.I = _weight(getattr(mlp, self.mlp_names[-1])).shape[1]
        # every layer windows its attention when the config says so and the module keeps no per-layer window
        self.config_window = getattr(config, "sliding_window", None)
        self._check_post_norms(block, config.hidden_size)

    @staticmethod
    def _check_post_norms(block: nn.Module, hidden: int) -> None:
        """A norm around a sub-layer's output (Gemma 2 / 3 and OLMo 2: residual + norm(sublayer(x))) must map the
        zero a skipped sub-layer returns to zero, or skipping would not leave the residual stream alone. RMSNorm
        does; a LayerNorm with a bias would not, and is refused rather than routed wrongly. `post_attention_layernorm`
        is such a norm only where the block also has a pre-MLP norm of its own, or no input norm (in Llama-style
        blocks it is the MLP's input norm)."""
        names = ["post_feedforward_layernorm"]
        if hasattr(block, "pre_feedforward_layernorm") or not hasattr(block, "input_layernorm"):
            names.append("post_attention_layernorm")
        for name in names:
            norm = getattr(block, name, None)
            if not isinstance(norm, nn.Module):
                continue
            weight = next(norm.parameters(), None)
            probe = torch.zeros(1, hidden, dtype=weight.dtype if weight is not None else torch.float32,
                                device=weight.device if weight is not None else "cpu")
            with torch.no_grad():
                if norm(probe).abs().max() > 0:
                    raise UnsupportedArchitectureError(
                        f"the block's {name} ({type(norm).__name__}) wraps a sub-layer's output but maps zero to "
                        "nonzero, so a skipped sub-layer would still change the residual stream")

    # ---- weights, as views of the base tensors ----
    def attention_weights(self, attn: nn.Module) -> AttentionWeights:
        H, KVH, D = self.H, self.KVH, self.D
        o = getattr(attn, self.o_name)
        if self.qkv_layout == "separate":
            q, k, v = (getattr(attn, n) for n in self.qkv)
            w = AttentionWeights(
                q_w=linear_weight(q), q_b=q.bias, k_w=linear_weight(k), k_b=k.bias, v_w=linear_weight(v), v_b=v.bias,
                o_w=linear_weight(o), o_b=o.bias,
                q_lora=low_rank(q), k_lora=low_rank(k), v_lora=low_rank(v), o_lora=low_rank(o))
        else:
            fused = getattr(attn, self.qkv[0])
            weight, bias, update = linear_weight(fused), fused.bias, low_rank(fused)
            if self.qkv_layout == "blocks":  # rows [q (H*D) | k (KVH*D) | v (KVH*D)]
                parts = (slice(0, H * D), slice(H * D, (H + KVH) * D), slice((H + KVH) * D, (H + 2 * KVH) * D))
            else:  # rows (H, 3, D): head h's q, k, v side by side; each part gathered (a copy, not a view)
                rows = torch.arange(3 * H * D, device=weight.device).view(H, 3, D)
                parts = tuple(rows[:, j].reshape(H * D) for j in range(3))
            q_w, k_w, v_w = (weight[p] for p in parts)
            q_b, k_b, v_b = (None if bias is None else bias[p] for p in parts)
            q_l, k_l, v_l = (out_rows(update, p) for p in parts)
            w = AttentionWeights(q_w=q_w, q_b=q_b, k_w=k_w, k_b=k_b, v_w=v_w, v_b=v_b, o_w=linear_weight(o), o_b=o.bias,
                                 q_lora=q_l, k_lora=k_l, v_lora=v_l, o_lora=low_rank(o))
        if self.qk_norm is not None:
            w.q_norm, w.k_norm = getattr(attn, self.qk_norm[0]), getattr(attn, self.qk_norm[1])
            w.qk_norm_per_head = _norm_width(w.q_norm) in (None, D)  # else over the whole projection (OLMo 2)
        w.scaling = getattr(attn, "scaling", None)
        w.softcap = getattr(attn, "attn_logit_softcapping", None)
        w.sliding_window = getattr(attn, "sliding_window") if hasattr(attn, "sliding_window") else self.config_window
        w.rotary = bool(getattr(attn, "use_rope", True))
        return w

    def mlp_weights(self, mlp: nn.Module) -> MLPWeights:
        act = getattr(mlp, self.act_name)
        down = getattr(mlp, self.mlp_names[-1])
        if self.mlp_kind == "plain":
            up = getattr(mlp, self.mlp_names[0])
            return MLPWeights(up_w=linear_weight(up), up_b=up.bias, gate_w=None, gate_b=None,
                              down_w=linear_weight(down), down_b=down.bias, act=act)
        if self.mlp_kind == "fused_gate_up":  # rows [gate (I) | up (I)]
            fused, I = getattr(mlp, self.mlp_names[0]), self.I
            weight, bias = linear_weight(fused), fused.bias
            return MLPWeights(up_w=weight[I:], up_b=None if bias is None else bias[I:], gate_w=weight[:I],
                              gate_b=None if bias is None else bias[:I], down_w=linear_weight(down), down_b=down.bias,
                              act=act)
        gate, up = getattr(mlp, self.mlp_names[0]), getattr(mlp, self.mlp_names[1])
        return MLPWeights(up_w=linear_weight(up), up_b=up.bias, gate_w=linear_weight(gate), gate_b=gate.bias,
                          down_w=linear_weight(down), down_b=down.bias, act=act)

    def spec(self) -> ArchSpec:
        lora = tuple((n, False) for n in (*self.qkv, self.o_name))
        return ArchSpec(
            name=f"discovered:{self.model_type}",
            model_types=(self.model_type,),
            layers_path=self.layers_path,
            attn_name=self.attn_name,
            mlp_name=self.mlp_name,
            rotary=True,  # used when the block passes `position_embeddings` (absolute-position families do not)
            o_proj_name=self.o_name,
            lora_targets=lora,
            attention_weights=self.attention_weights,
            mlp_weights=self.mlp_weights,
            measured_dims=(("KVH", self.KVH), ("D", self.D), ("I", self.I)),
            permute_heads=self.permute_heads if self.qkv_layout == "per_head" else None,
        )

    def permute_heads(self, attn: nn.Module, head_order: torch.Tensor, group_order: torch.Tensor) -> None:
        """Reorder the heads of a per-head fused projection (each head's [q, k, v] rows move together; every head
        is its own KV group) and the output projection's columns, in place."""
        H, D = self.H, self.D
        fused, o = getattr(attn, self.qkv[0]), getattr(attn, self.o_name)
        weight = linear_weight(fused)
        order = head_order.to(weight.device)
        weight = weight.view(H, 3 * D, -1)  # (H, 3D, C)
        weight.copy_(weight.index_select(0, order))
        if fused.bias is not None:
            bias = fused.bias.view(H, 3 * D)
            bias.copy_(bias.index_select(0, order))
        o_w = linear_weight(o)
        o_w = o_w.view(o_w.shape[0], H, D)  # (C, H, D)
        o_w.copy_(o_w.index_select(1, order))


def _norm_width(norm: nn.Module) -> int | None:
    weight = getattr(norm, "weight", None)
    return weight.shape[-1] if isinstance(weight, torch.Tensor) else None


def is_decoder_lm(config) -> bool:
    """Whether transformers has a causal-LM class for this config's model type (what discovery understands)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and \
        not getattr(config, "is_encoder_decoder", False)


_DISCOVERED: "weakref.WeakKeyDictionary[nn.Module, ArchSpec]" = weakref.WeakKeyDictionary()


def discover_spec(model: nn.Module) -> ArchSpec:
    """The spec of a decoder model found from its modules, once per model object (the wrappers keep it)."""
    spec = _DISCOVERED.get(model)
    if spec is None:
        config = model.config
        spec = _DISCOVERED[model] = _Layout(model, config, getattr(config, "model_type", None)).spec()
    return spec
