"""Token router (Mixture-of-Depths style): which tokens a sub-layer processes; the rest ride the residual.

Training: per sequence, the top-k scoring tokens at the capacity (k = round(capacity * valid tokens)); an auxiliary
BCE loss teaches each score, on its own, to say whether its token is in the top-k. That is what lets a causal model
decide at inference from one token's score alone: selected = score >= the threshold calibrated for the capacity
(a quantile of the scores seen on calibration text), so the decision never looks at later tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NotCalibratedError
from .net import make_router_net, router_net_flops, straight_through_gate

N_QUANTILES = 101  # thresholds for capacities 0.00, 0.01, ..., 1.00 (interpolated in between)


class TokenSelection(NamedTuple):
    selected: torch.Tensor  # (B, T) bool
    gate: torch.Tensor  # (B, T) float, forward value 1
    aux_loss: torch.Tensor | None  # BCE(score, in top-k), training only
    scores: torch.Tensor  # (B, T) raw logits


class TokenRouter(nn.Module):
    def __init__(self, hidden: int, kind: str = "linear", router_hidden: int = 32):
        super().__init__()
        self.net = make_router_net(hidden, 1, kind, router_hidden)
        # score_quantiles[i] = the (i / 100)-quantile of this router's scores on calibration text; NaN until calibrated
        self.register_buffer("score_quantiles", torch.full((N_QUANTILES,), float("nan")))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (B, T, C) -> (B, T)

    def flops(self, n_tokens: int) -> int:
        return router_net_flops(self.net, n_tokens)

    @property
    def is_calibrated(self) -> bool:
        return not torch.isnan(self.score_quantiles).any().item()

    def threshold(self, capacity: float) -> torch.Tensor:
        """Score above which a token is processed so that `capacity` of calibration tokens would be."""
        if not self.is_calibrated:
            raise NotCalibratedError(
                "token routers have no inference thresholds yet: call em.calibrate(data) (train_routers does it "
                "when it ends), or em.train() to route by top-k"
            )
        pos = (1.0 - capacity) * (N_QUANTILES - 1)
        lo = int(pos)
        hi = min(lo + 1, N_QUANTILES - 1)
        frac = pos - lo
        return self.score_quantiles[lo] * (1 - frac) + self.score_quantiles[hi] * frac

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C) the sub-layer's input
        capacity: float,
        valid: torch.Tensor,  # (B, T) bool: real (non-padding) tokens
        forced: torch.Tensor,  # (B, T) bool: always processed (e.g. the first token)
        topk: bool,
        random: bool = False,
    ) -> TokenSelection:
        if random:  # the random-routing baseline: uniform scores, so a threshold of 1 - capacity keeps `capacity`
            scores = torch.rand(x.shape[:2], device=x.device)
            if not topk:
                selected = ((scores >= 1.0 - capacity) | forced) & valid
                return TokenSelection(selected, torch.ones_like(scores), None, scores)
        else:
            scores = self.score(x)  # (B, T)
        p = torch.sigmoid(scores)
        aux = None
        if topk:
            # rank tokens within each sequence; forced tokens first, padding last
            ranked = scores.detach().masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
            order = ranked.argsort(dim=1, descending=True)  # (B, T)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1], device=x.device).expand_as(order))
            n_valid = valid.sum(dim=1, keepdim=True)  # (B, 1)
            k = (capacity * n_valid).round().clamp(min=1).minimum(n_valid)  # (B, 1)
            selected = (rank < k) & valid
            learn = valid & ~forced
            if learn.any() and not random:
                aux = F.binary_cross_entropy_with_logits(scores[learn], selected[learn].float())
        else:
            selected = ((scores >= self.threshold(capacity)) | forced) & valid
        gate = torch.ones_like(p) if random else straight_through_gate(p)
        return TokenSelection(selected, gate, aux, scores)
