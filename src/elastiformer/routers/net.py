"""The scoring network shared by every router, and the straight-through gate."""

from __future__ import annotations

import torch
from torch import nn


def make_router_net(hidden: int, out: int, kind: str = "linear", router_hidden: int = 32) -> nn.Module:
    """`linear`: one Linear(C -> out). `mlp`: Linear(C -> h) -> GELU -> Linear(h -> out)."""
    if kind == "linear":
        net = nn.Linear(hidden, out)
        nn.init.normal_(net.weight, std=hidden**-0.5)
        nn.init.zeros_(net.bias)
        return net
    net = nn.Sequential(nn.Linear(hidden, router_hidden), nn.GELU(), nn.Linear(router_hidden, out))
    nn.init.normal_(net[0].weight, std=hidden**-0.5)
    nn.init.zeros_(net[0].bias)
    nn.init.normal_(net[2].weight, std=router_hidden**-0.5)
    nn.init.zeros_(net[2].bias)
    return net


def router_net_flops(net: nn.Module, n_tokens: int) -> int:
    """Multiply-adds x2 of the router's Linear layers over `n_tokens` tokens."""
    return sum(2 * n_tokens * m.in_features * m.out_features for m in net.modules() if isinstance(m, nn.Linear))


def straight_through_gate(p: torch.Tensor) -> torch.Tensor:
    """Forward value exactly 1 (outputs stay the base model's), backward the gradient of `p`.

    d loss / d p = <d loss / d output, output>: the router learns how much each selected unit's output helps.
    """
    return 1.0 + p - p.detach()
