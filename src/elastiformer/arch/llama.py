"""Llama (and SmolLM / SmolLM2, which are Llama): `model.layers[i].self_attn` with q/k/v/o_proj and rotary
embeddings; `model.layers[i].mlp` = down_proj(act(gate_proj(x)) * up_proj(x))."""

from torch import nn

from .registry import register_architecture
from .spec import ArchSpec, MLPWeights, qkvo_attention_weights


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
        model_types=("llama",),
        layers_path="model.layers",
        attn_name="self_attn",
        mlp_name="mlp",
        o_proj_name="o_proj",
        lora_targets=(("q_proj", False), ("k_proj", False), ("v_proj", False), ("o_proj", False)),
        rotary=True,
        attention_weights=qkvo_attention_weights,
        mlp_weights=_mlp_weights,
    )
)
