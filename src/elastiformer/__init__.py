"""elastiformer: make a pretrained Transformer elastic.

Tiny routers, trained by self-distillation against the frozen original, choose per input which tokens each
attention / MLP sub-layer processes, which heads are active and which MLP experts run (ElastiFormer,
arXiv:2411.15281). The user picks the compute budget at inference time with `set_budget`, without retraining.
"""

from .version import __version__  # noqa: E402,F401

from .config import BUDGET_KEYS, ElasticConfig  # noqa: E402
from .errors import (  # noqa: E402
    BudgetError,
    ConfigError,
    DataError,
    ElastiformerError,
    ModelLoadError,
    NotCalibratedError,
    RouterFileError,
    UnsupportedArchitectureError,
)
from .model import ElasticModel, get_elastic_model  # noqa: E402


def load_model(*args, **kwargs):
    """Load a model by short name, local folder, .gguf file, or pass through a loaded one (see
    elastiformer.loading.models)."""
    from .loading.models import load_model as _load_model

    return _load_model(*args, **kwargs)


def train_routers(*args, **kwargs):
    """Train an ElasticModel's routers by self-distillation (see elastiformer.training.routers.train_routers)."""
    from .training.routers import train_routers as _train_routers

    return _train_routers(*args, **kwargs)


def __getattr__(name: str):
    """`ef.flextron` (the second system: nested elastic widths) loads on first use."""
    if name == "flextron":
        import importlib

        return importlib.import_module(".flextron", __name__)
    raise AttributeError(f"module 'elastiformer' has no attribute {name!r}")


__all__ = [
    "BUDGET_KEYS",
    "BudgetError",
    "ConfigError",
    "DataError",
    "ElasticConfig",
    "ElasticModel",
    "ElastiformerError",
    "ModelLoadError",
    "NotCalibratedError",
    "RouterFileError",
    "UnsupportedArchitectureError",
    "get_elastic_model",
    "load_model",
    "train_routers",
]
