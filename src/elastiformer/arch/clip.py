"""CLIP vision encoder (`CLIPVisionModel`, the vision tower of LLaVA-style models): pre-LN blocks at
`vision_model.encoder.layers[i]` with `self_attn` (q / k / v / out_proj, biases, no rotary) and `mlp` =
fc2(act(fc1(x))). Bidirectional; tokens are the [CLS] token and the image patches (inputs are `pixel_values`)."""

from torch import nn

from ..lora import linear_weight
from .spec import ArchSpec, AttentionWeights, MLPWeights, register_architecture


def _attention_weights(attn: nn.Module) -> AttentionWeights:
    return AttentionWeights(
        q_w=linear_weight(attn.q_proj), q_b=attn.q_proj.bias,
        k_w=linear_weight(attn.k_proj), k_b=attn.k_proj.bias,
        v_w=linear_weight(attn.v_proj), v_b=attn.v_proj.bias,
        o_w=linear_weight(attn.out_proj), o_b=attn.out_proj.bias,
    )


def _mlp_weights(mlp: nn.Module) -> MLPWeights:
    return MLPWeights(
        up_w=mlp.fc1.weight, up_b=mlp.fc1.bias, gate_w=None, gate_b=None,
        down_w=mlp.fc2.weight, down_b=mlp.fc2.bias, act=mlp.activation_fn,
    )


CLIP_VISION = register_architecture(
    ArchSpec(
        name="clip_vision",
        model_types=("clip_vision_model",),
        layers_path="encoder.layers",
        alt_layers_paths=("vision_model.encoder.layers",),
        attn_name="self_attn",
        mlp_name="mlp",
        o_proj_name="out_proj",
        lora_targets=(("q_proj", False), ("k_proj", False), ("v_proj", False), ("out_proj", False)),
        rotary=False,
        attention_weights=_attention_weights,
        mlp_weights=_mlp_weights,
        causal=False,
        auto_class="AutoModel",
        model_classes=("CLIPVisionModel",),
        default_pooling="pooler",
    )
)
