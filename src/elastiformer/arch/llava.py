"""LLaVA-style vision-language models (`LlavaForConditionalGeneration`): a CLIP vision tower
(`model.vision_tower`, see clip.py), a projector, and a Llama-family language model (`model.language_model`, the
Llama spec's blocks). Routing applies to both towers: the language model is this spec's layer stack (causal:
calibrated thresholds at inference, KL distillation on the logits), and the vision tower is made elastic beside it
with its own spec (bidirectional: top-k at inference), at the same budget. The projector and the LM head are
untouched."""

import dataclasses

from .llama import LLAMA
from .registry import register_architecture

LLAVA = register_architecture(
    dataclasses.replace(
        LLAMA,
        name="llava",
        model_types=("llava",),
        layers_path="model.language_model.layers",
        alt_layers_paths=(),
        towers=("model.vision_tower",),
        config_attr="text_config",
        auto_class="AutoModelForImageTextToText",
        model_classes=("LlavaForConditionalGeneration",),
    )
)
