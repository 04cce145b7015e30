"""Glue between width routers and a `FlextronModel`: menu sizes, index configurations -> `set_choices`, the units
each menu index keeps (for soft masks), the pooled input feature of the adaptive router, and the two cost models
(relative compute from the FLOPs predictor, milliseconds from the latency table)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .costs import Choices, CostModel, latency_tensors


def flextron_config(fm):
    return fm.flextron_config


def base_model(fm) -> nn.Module:
    return fm.base_model


def menu_sizes(fm) -> tuple[int, int, int]:
    """(layers L, MLP menu size Km, attention menu size Ka)."""
    cfg = flextron_config(fm)
    return fm.n_layers, cfg.n_mlp_choices, cfg.n_attn_choices


def full_choices(n_layers: int, batch: int | None = None) -> Choices:
    shape = (n_layers,) if batch is None else (batch, n_layers)
    return {"mlp": torch.zeros(shape, dtype=torch.long), "attn": torch.zeros(shape, dtype=torch.long)}


def set_index_choices(fm, choices: Choices) -> None:
    """`{"mlp": (L,) or (B, L), "attn": ...}` -> `fm.set_choices` (ints per layer, or a LongTensor (B,) per layer)."""
    args = {}
    for key in ("mlp", "attn"):
        c = choices[key]
        if c.dim() == 1:
            args[key] = [int(v) for v in c]
        else:  # (B, L): one configuration per sequence
            device = _device(fm)
            args[key] = [c[:, layer].to(device) for layer in range(c.shape[1])]
    fm.set_choices(**args)


def unit_masks(fm) -> dict[str, torch.Tensor]:
    """Which units each menu index keeps, as float masks: {"mlp": (Km, I), "attn": (Ka, H)} (query heads in the
    o-projection's input order). Every choice is a leading slice (FlextronConfig), so row k is 1 on its first
    n_k units. A soft configuration p (.., Km) keeps unit j with weight (p @ masks)[j]: the output of a
    p-weighted mix of the nested slices, since each slice's output is the sum of its units' contributions."""
    out = {}
    for key, counts in (("mlp", fm.mlp_sizes), ("attn", fm.head_counts)):
        kept = torch.tensor(counts)  # (K,) units kept by each menu index
        n = int(kept[0])
        out[key] = (torch.arange(n)[None, :] < kept[:, None]).float()  # (K, N)
    return out


def pooled_features(fm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The adaptive router's view of an input: the mean of its token embeddings (B, T, C) -> (B, C), over real
    tokens only. Cheap (a lookup), known before the first layer runs, and the same at every decode step."""
    emb = base_model(fm).get_input_embeddings()(input_ids)  # (B, T, C)
    if attention_mask is None:
        return emb.mean(1)
    m = attention_mask.to(emb)[..., None]  # (B, T, 1)
    return (emb * m).sum(1) / m.sum(1).clamp(min=1)


def compute_cost_model(fm, seq_len: int = 128) -> CostModel:
    """Block FLOPs of a configuration as a fraction of the full width's (the model's FLOPs table)."""
    table = fm.flops_table(seq_len)
    dense = table["dense"]
    return CostModel("relative_compute", table["mlp"].double() / dense, table["attn"].double() / dense, 0.0)


def latency_cost_model(table: dict[str, Any]) -> CostModel:
    """Milliseconds of a configuration on the machine, batch size and sequence length the table was measured for
    (`latency.measure_latency_table`): the table's overhead plus its chosen cells, as `predict_latency` sums."""
    mlp_ms, attn_ms, overhead = latency_tensors(table)
    return CostModel("latency_ms", mlp_ms.double(), attn_ms.double(), overhead)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
