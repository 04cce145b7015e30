"""Wrappers that own an unmodified transformers sub-layer (`base_layer`) and its routers, and do the
gather -> compute -> scatter that makes skipped work really skipped."""

from .attention import ElasticAttention
from .mlp import ElasticMLP
from .state import RoutingState, SubLayerStats

__all__ = ["ElasticAttention", "ElasticMLP", "RoutingState", "SubLayerStats"]
