"""Head router: per token, which attention heads are active (top-k of the router logits, training and inference
alike: the choice depends on that token only, so it is causal as it stands).

Grouped-query aware: with `granularity="group"` the router scores whole KV groups, and a group's query heads are
on or off together.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .net import (fractional_top_units, make_router_net, one_token_units, router_net_flops, static_scores,
                  straight_through_gate)


class HeadSelection(NamedTuple):
    active: torch.Tensor  # (B, T, H) bool
    gate: torch.Tensor  # (B, T, H) float, forward value 1
    aux_loss: torch.Tensor | None


class HeadRouter(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, granularity: str = "query",
                 kind: str = "linear", router_hidden: int = 32):
        super().__init__()
        self.n_heads = n_heads
        self.n_rep = n_heads // n_kv_heads if granularity == "group" else 1
        self.n_units = n_heads // self.n_rep  # what the router chooses among: heads or KV groups
        self.net = make_router_net(hidden, self.n_units, kind, router_hidden)
        self.static_importance: torch.Tensor | None = None  # (U,) set by ElasticModel.fit_static (baseline)

    def flops(self, n_tokens: int) -> int:
        return router_net_flops(self.net, n_tokens)

    def n_active(self, capacity: float) -> int:
        """Units in the supervised target (at least one): the rounded count at this capacity."""
        return max(1, min(self.n_units, round(capacity * self.n_units)))

    def forward(self, x: torch.Tensor, capacity: float, method: str = "learned",
                generator: torch.Generator | None = None, positions: torch.Tensor | None = None,
                layer: int = 0, pinned: torch.Tensor | None = None) -> HeadSelection:
        """x: (B, T, C), positions: (B, T) sequence index of each token. A fractional count of heads per token (see
        `fractional_top_units`): capacity 0.6 of 4 heads gives 2 heads to 60% of the tokens and 3 to the rest.
        pinned: (U,) the scores of a unit the allocation pinned (the same heads for every token), else None."""
        logits = self.logits(x, method, generator, pinned)  # (B, T, U)
        top, kept = fractional_top_units(logits, capacity, positions, layer)  # (B, T, k)
        active = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, kept)  # (B, T, U)
        if method == "learned" and pinned is None and torch.is_grad_enabled():
            gate = straight_through_gate(torch.sigmoid(logits))
        else:  # forward value 1 either way: without a gradient to carry, no sigmoid
            gate = logits.new_ones(()).expand(logits.shape)
        if self.n_rep > 1:  # a group's query heads share its decision: (B, T, KVH) -> (B, T, H)
            active = active.repeat_interleave(self.n_rep, dim=-1)
            gate = gate.repeat_interleave(self.n_rep, dim=-1)
        return HeadSelection(active, gate, None)

    def logits(self, x: torch.Tensor, method: str, generator: torch.Generator | None,
               pinned: torch.Tensor | None = None) -> torch.Tensor:
        """(..., C) -> (..., U) the scores the units are chosen by."""
        if pinned is not None:  # a unit the allocation pinned: its calibration importances, for every token
            return static_scores(pinned, x, self.n_units)
        if method == "random":  # baseline: uniform scores (from `generator` when given, else torch's global RNG)
            return torch.rand(*x.shape[:-1], self.n_units, device=x.device, generator=generator)
        if method == "static":  # baseline: the same heads for every token, the most important on calibration text
            return static_scores(self.static_importance, x, self.n_units)
        return self.net(x)

    def one_token_heads(self, x: torch.Tensor, capacity: float, position: int, method: str = "learned",
                        generator: torch.Generator | None = None, layer: int = 0,
                        logits: list[float] | None = None, pinned: torch.Tensor | None = None) -> list[int]:
        """Decoding one token at batch 1: its active heads as a sorted list, the same choice as `forward` makes,
        without building the (B, T, H) mask. x: (1, 1, C); position: the token's place among its row's real
        tokens; logits: this router's logits already read to the host (`joint_one_token_logits`), else computed;
        pinned: as in `forward`."""
        if logits is None:
            logits = self.logits(x, method, generator, pinned)
        units = one_token_units(logits, capacity, position, layer)
        return [u * self.n_rep + r for u in units for r in range(self.n_rep)]

    def importance_loss(self, x: torch.Tensor, importance: torch.Tensor, capacity: float) -> torch.Tensor:
        """Cross-entropy of softmax(router logits) against the top-k heads (or KV groups) by `importance` (the norm of
        each head's share of the output projection, on the teacher). x: (B, T, C), importance: (B, T, H)."""
        if self.n_rep > 1:  # (B, T, H) -> (B, T, KVH): a group is as important as its heads together
            importance = importance.unflatten(-1, (self.n_units, self.n_rep)).sum(-1)
        k = self.n_active(capacity)
        target = torch.zeros_like(importance).scatter_(-1, importance.topk(k, dim=-1).indices, 1.0 / k)
        return -(target * self.net(x).log_softmax(dim=-1)).sum(dim=-1).mean()
