"""ViT family (ViTModel, and ViTForImageClassification with it under `vit`): pre-LN blocks like Llama's
(`ViTLayer` adds the residual around `attention` and `mlp`), q / k / v / o_proj with biases and no rotary, plain
MLP fc2(act(fc1(x))). Bidirectional; tokens are the [CLS] token and the image patches (inputs are
`pixel_values`). The default embedding is the final [CLS] state, the classifier's input."""

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
        up_w=mlp.fc1.weight, up_b=mlp.fc1.bias, gate_w=None, gate_b=None,
        down_w=mlp.fc2.weight, down_b=mlp.fc2.bias, act=mlp.activation_fn,
    )


VIT = register_architecture(
    ArchSpec(
        name="vit",
        model_types=("vit",),
        layers_path="layers",
        alt_layers_paths=("vit.layers",),
        layers_in_backbone="layers",
        attn_name="attention",
        mlp_name="mlp",
        o_proj_name="o_proj",
        lora_targets=(("q_proj", False), ("k_proj", False), ("v_proj", False), ("o_proj", False)),
        rotary=False,
        attention_weights=_attention_weights,
        mlp_weights=_mlp_weights,
        causal=False,
        auto_class="AutoModel",
        model_classes=("ViTModel", "ViTForImageClassification"),
        default_pooling="cls",
    )
)
