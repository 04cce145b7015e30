"""Per-architecture specs: where a model family keeps its layers, attention, MLP and their weights.

Routers attach to the unmodified transformers modules; a spec only says where things are and how to read the
weights as plain `(out, in)` matrices. Add a family with `register_architecture(spec)`.
"""

from .registry import get_arch_spec, register_architecture, registered_spec, supported_model_types
from .spec import ArchSpec, AttentionWeights, MLPWeights, get_dotted, set_dotted
from . import bert, clip, gpt2, llama, llava, vit  # noqa: F401  (registers the built-in specs)

__all__ = [
    "ArchSpec",
    "AttentionWeights",
    "MLPWeights",
    "get_arch_spec",
    "get_dotted",
    "set_dotted",
    "register_architecture",
    "registered_spec",
    "supported_model_types",
]
