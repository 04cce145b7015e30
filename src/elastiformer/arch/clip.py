"""CLIP vision encoder (`CLIPVisionModel`, the vision tower of LLaVA-style models): pre-LN blocks at
`vision_model.encoder.layers[i]` with `self_attn` (q / k / v / out_proj, biases, no rotary) and `mlp` =
fc2(act(fc1(x))). Bidirectional; tokens are the [CLS] token and the image patches (inputs are `pixel_values`)."""

from functools import partial

from .registry import register_architecture
from .spec import ArchSpec, fc_mlp_weights, qkvo_attention_weights


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
        attention_weights=partial(qkvo_attention_weights, o_name="out_proj"),
        mlp_weights=fc_mlp_weights,
        causal=False,
        auto_class="AutoModel",
        model_classes=("CLIPVisionModel",),
        default_pooling="pooler",
    )
)
