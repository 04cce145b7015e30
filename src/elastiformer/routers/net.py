"""The scoring network shared by every router, and the straight-through gate."""

from __future__ import annotations

import torch
from torch import nn


def make_router_net(hidden: int, out: int, kind: str = "linear", router_hidden: int = 32) -> nn.Module:
    """`linear`: LayerNorm -> Linear(C -> out). `mlp`: LayerNorm -> Linear(C -> h) -> GELU -> Linear(h -> out).

    The parameter-free LayerNorm puts every model's hidden states on one scale (a sub-layer's input can have
    dimensions in the tens or hundreds), so one learning rate fits all; the last layer starts near zero, so the
    routers start with no opinion rather than a random one.
    """
    norm = nn.LayerNorm(hidden, elementwise_affine=False)
    if kind == "linear":
        last = nn.Linear(hidden, out)
        net = nn.Sequential(norm, last)
    else:
        first = nn.Linear(hidden, router_hidden)
        nn.init.normal_(first.weight, std=hidden**-0.5)
        nn.init.zeros_(first.bias)
        last = nn.Linear(router_hidden, out)
        net = nn.Sequential(norm, first, nn.GELU(), last)
    nn.init.normal_(last.weight, std=0.01 * last.in_features**-0.5)
    nn.init.zeros_(last.bias)
    return net


def router_net_flops(net: nn.Module, n_tokens: int) -> int:
    """Multiply-adds x2 of the router's Linear layers over `n_tokens` tokens."""
    return sum(2 * n_tokens * m.in_features * m.out_features for m in net.modules() if isinstance(m, nn.Linear))


def straight_through_gate(p: torch.Tensor) -> torch.Tensor:
    """Forward value exactly 1 (outputs stay the base model's), backward the gradient of `p`.

    d loss / d p = <d loss / d output, output>: the router learns how much each selected unit's output helps.
    """
    return 1.0 + p - p.detach()


def static_scores(importance: torch.Tensor | None, x: torch.Tensor, n_units: int) -> torch.Tensor:
    """The "static" baseline's scores: one importance per head / expert, the same for every token. -> (..., U)"""
    from ..errors import NotCalibratedError

    if importance is None:
        raise NotCalibratedError("the static baseline has no importances yet: call em.fit_static(data) first")
    return importance.to(x.device).expand(*x.shape[:-1], n_units)
