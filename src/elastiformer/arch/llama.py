"""Llama family (Llama, Mistral, Qwen2, SmolLM): `model.layers[i].self_attn` with q/k/v/o_proj and rotary
embeddings; `model.layers[i].mlp` = down_proj(act(gate_proj(x)) * up_proj(x))."""

from torch import nn

from ..lora import linear_weight
from .spec import ArchSpec, AttentionWeights, MLPWeights, register_architecture


def _attention_weights(attn: nn.Module) -> AttentionWeights:
    return AttentionWeights(
        q_w=linear_weight(attn.q_proj), q_b=attn.q_proj.bias,
        k_w=linear_weight(attn.k_proj), k_b=attn.k_proj.bias,
        v_w=linear_weight(attn.v_proj), v_b=attn.v_proj.bias,
        o_w=linear_weight(attn.o_proj), o_b=attn.o_proj.bias,
    )


def _mlp_weights(mlp: nn.Module) -> MLPWeights:
    return MLPWeights(
        up_w=mlp.up_proj.weight, up_b=mlp.up_proj.bias,
        gate_w=mlp.gate_proj.weight, gate_b=mlp.gate_proj.bias,
        down_w=mlp.down_proj.weight, down_b=mlp.down_proj.bias,
        act=mlp.act_fn,
    )


LLAMA = register_architecture(
    ArchSpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        layers_path="model.layers",
        attn_name="self_attn",
        mlp_name="mlp",
        o_proj_name="o_proj",
        lora_targets=(("q_proj", False), ("k_proj", False), ("v_proj", False), ("o_proj", False)),
        rotary=True,
        attention_weights=_attention_weights,
        mlp_weights=_mlp_weights,
    )
)
