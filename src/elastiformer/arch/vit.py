"""ViT family (ViTModel, and ViTForImageClassification with it under `vit`): pre-LN blocks like Llama's
(`ViTLayer` adds the residual around `attention` and `mlp`), q / k / v / o_proj with biases and no rotary, plain
MLP fc2(act(fc1(x))). Bidirectional; tokens are the [CLS] token and the image patches (inputs are
`pixel_values`). The default embedding is the final [CLS] state, the classifier's input."""

from .registry import register_architecture
from .spec import ArchSpec, fc_mlp_weights, qkvo_attention_weights


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
        attention_weights=qkvo_attention_weights,
        mlp_weights=fc_mlp_weights,
        causal=False,
        auto_class="AutoModel",
        model_classes=("ViTModel", "ViTForImageClassification"),
        default_pooling="cls",
    )
)
