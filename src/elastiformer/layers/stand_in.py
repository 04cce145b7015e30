"""`StandIn`: what a token that skips a routed MLP (or attention) gets instead of nothing.

Mixture-of-Depths and the paper add nothing for a skipped token. But an MLP's update is far from zero on the tokens
a router skips: on SmolLM2 it has a large mean and a part linear in the input, and skipping it costs most of the
loss. A stand-in is a rank-r linear estimate of the update from the sub-layer's input,

    stand_in(x) = ((x - mean_x) @ down) @ up + mean_y,        down: (C, r), up: (r, C)

fitted by reduced-rank ridge regression on calibration tokens (`fit_stand_ins`), on the tokens whose update is
smallest, the ones a router skips, then trained with the routers by the distillation loss (`train_routers`,
`stand_in_lr_scale`): the student's own output tells it what the skipped tokens should have got. It costs 4 C r
FLOPs per skipped token (rank 32 on SmolLM2: 1.4% of the MLP), counted in the executed FLOPs. Token-routed attention
gets one too (`attn_stand_in_rank`), an estimate of the attention's update from the token's own input. A post-LN
sub-layer (BERT) gives a skipped token LayerNorm(x + stand_in(x)), as it gives a processed one LayerNorm(x + MLP(x)).
Unfitted (all zeros), the skipped token gets nothing, as before.
"""

from __future__ import annotations

import torch
from torch import nn


class StandIn(nn.Module):
    def __init__(self, hidden: int, rank: int):
        super().__init__()
        # parameters, not buffers: they train with the routers, and DDP all-reduces their gradients
        self.down = nn.Parameter(torch.zeros(hidden, rank))  # (C, r)
        self.up = nn.Parameter(torch.zeros(rank, hidden))  # (r, C)
        self.bias = nn.Parameter(torch.zeros(hidden))  # (C,) mean_y - mean_x @ down @ up, once fitted
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def is_fitted(self) -> bool:
        """Read on the host once per fit or load (keyed by the flag's version), not on every call."""
        key = (self.fitted.data_ptr(), self.fitted._version)
        cached = self.__dict__.get("_fitted_cache")
        if cached is None or cached[0] != key:
            cached = (key, bool(self.fitted))
            self.__dict__["_fitted_cache"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> the estimated update (..., C)."""
        dt = x.dtype  # (the weights follow the model's dtype; a no-op cast then)
        low = x.reshape(-1, x.shape[-1]) @ self.down.to(dt)  # (N, C) @ (C, r) -> (N, r)
        return torch.addmm(self.bias.to(dt), low, self.up.to(dt)).view(x.shape)  # (N, r) @ (r, C) + (C,)

    def flops(self, n_tokens: int) -> int:
        """The two matmuls (the bias add is not counted, as no bias of the base layers is)."""
        C, r = self.down.shape
        return 2 * n_tokens * C * r * 2

    @torch.no_grad()
    def fit(self, stats: "RegressionStats", ridge: float = 1e-3) -> None:
        """Reduced-rank ridge regression of y on x from accumulated statistics: the ridge solution W (C, C), then
        its projection onto the top-r directions of the fitted values (the best rank-r map in squared error)."""
        C, r = self.down.shape
        n = max(stats.n, 1.0)
        mx, my = stats.sx / n, stats.sy / n  # (C,)
        cxx = stats.sxx / n - torch.outer(mx, mx)  # (C, C) input covariance
        cxy = stats.sxy / n - torch.outer(mx, my)  # (C, C) cross-covariance
        lam = ridge * torch.diagonal(cxx).mean().clamp(min=1e-12)
        W = torch.linalg.solve(cxx + lam * torch.eye(C, dtype=cxx.dtype, device=cxx.device), cxy)  # (C, C)
        fitted_cov = W.T @ cxx @ W  # (C, C) covariance of the fitted values x W
        _, vecs = torch.linalg.eigh(fitted_cov)  # ascending eigenvalues
        V = vecs[:, -r:]  # (C, r) top-r directions
        down, up = W @ V, V.T  # (C, r), (r, C)
        self.down.copy_(down.to(self.down))
        self.up.copy_(up.to(self.up))
        self.bias.copy_((my - mx @ down @ up).to(self.bias))
        self.fitted.fill_(True)


class RegressionStats:
    """Running sums for a least-squares fit of y (C,) on x (C,), in float64."""

    def __init__(self, hidden: int, device=None):
        kw = dict(dtype=torch.float64, device=device)
        self.n = 0.0
        self.sx, self.sy = torch.zeros(hidden, **kw), torch.zeros(hidden, **kw)
        self.sxx, self.sxy = torch.zeros(hidden, hidden, **kw), torch.zeros(hidden, hidden, **kw)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x, y: (n, C)."""
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ y
