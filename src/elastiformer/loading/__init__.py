"""Getting a base model and its tokenizer: `models` resolves a short name of the bundled offline packages, a local
folder, a .gguf file or a hub id, and loads it with transformers (GGUF dequantised through gguf)."""

from .models import available_models, load_model, load_tokenizer

__all__ = ["available_models", "load_model", "load_tokenizer"]
