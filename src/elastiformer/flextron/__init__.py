"""Flextron (arXiv 2406.10260): one model, many widths.

Importance sorting (`sorting`), nested-elastic sub-layers whose narrower widths are leading slices of the same
weights (`nested`, `model`), elastic continued-training by distillation into sampled sub-networks (`training`) and
a per-layer latency table measured on this machine (`latency`). The routers that pick the widths from a budget or
a target latency live in `routing/` and build on this API.
"""

from .config import FlextronConfig
from .latency import (check_latency_prediction, latency_tensors, load_latency_table, measure_latency_table,
                      predict_latency, save_latency_table)
from .model import CONFIG_NAME, FlextronModel, get_flextron_model, read_flextron_config
from .nested import FlextronState, NestedAttention, NestedMLP
from .sorting import compute_importance, head_permutation, sort_by_importance_
from .training import frozen_teacher, sample_subnet, subnet_kl, train_flextron

__all__ = [
    "CONFIG_NAME",
    "check_latency_prediction",
    "frozen_teacher",
    "latency_tensors",
    "load_latency_table",
    "measure_latency_table",
    "predict_latency",
    "sample_subnet",
    "save_latency_table",
    "subnet_kl",
    "train_flextron",
    "FlextronConfig",
    "FlextronModel",
    "FlextronState",
    "NestedAttention",
    "NestedMLP",
    "compute_importance",
    "get_flextron_model",
    "head_permutation",
    "read_flextron_config",
    "sort_by_importance_",
]
