"""Token router (Mixture-of-Depths style): which tokens a sub-layer processes; the rest ride the residual.

Training: per sequence, the top-k scoring tokens at the capacity (k = round(capacity * valid tokens)). Each score is
taught, on its own, how important its token is: by default by regression onto the importance measured on the teacher
(`importance_loss`), else (`router_targets="self"`) by a BCE towards its own top-k. That is what lets a causal model
decide at inference from one token's score alone: selected = score >= the threshold calibrated for the capacity, so
the decision never looks at later tokens. Thresholds are fitted by `ElasticModel.calibrate` with routing on, at
points of the allocation path (or at uniform capacities): a layer's scores shift when earlier layers skip work, so
thresholds fitted on the dense model would spend less than the budget. Each calibration forward logs, for every
capacity of `CALIBRATION_CAPACITIES`, the score that keeps that fraction of the batch's tokens; each capacity's
threshold is then taken from the forwards where the layer ran nearest to it (`calibration_thresholds`), i.e. where
earlier layers skipped what they will skip then.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NotCalibratedError
from .net import make_router_net, router_net_flops, straight_through_gate

# capacities at which calibrate() keeps thresholds per router (interpolated in between): sixteenths, so the
# allocation's levels (0.25, 0.5, 0.75) are exact, and 0.99 for a layer part-way through its first move
CALIBRATION_CAPACITIES = tuple(k / 16 for k in range(1, 16)) + (0.99,)
N_CALIBRATION = len(CALIBRATION_CAPACITIES)


class TokenSelection(NamedTuple):
    selected: torch.Tensor  # (B, T) bool
    gate: torch.Tensor  # (B, T) float, forward value 1
    aux_loss: torch.Tensor | None  # BCE(score, in top-k), training only
    scores: torch.Tensor  # (B, T) raw logits


def topk_mask(ranking: torch.Tensor, capacity: float, valid: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Per sequence, the top `round(capacity * valid tokens)` tokens by `ranking` (forced ones first, padding never).

    ranking, valid, forced: (B, T) -> (B, T) bool.
    """
    ranked = ranking.detach().float().masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
    order = ranked.argsort(dim=1, descending=True)  # (B, T)
    positions = torch.arange(ranking.shape[1], device=ranking.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank[b, t] = place of token t in its sequence
    n_valid = valid.sum(dim=1, keepdim=True)  # (B, 1)
    k = (capacity * n_valid).round().clamp(min=1).minimum(n_valid)  # (B, 1)
    return (rank < k) & valid


class TokenRouter(nn.Module):
    def __init__(self, hidden: int, kind: str = "linear", router_hidden: int = 32, norm_feature: bool = False):
        super().__init__()
        self.net = make_router_net(hidden, 1, kind, router_hidden)
        if norm_feature:  # ElasticConfig.router_norm_feature: the score also sees log |x|, which the net's LayerNorm
            # removes; standardized by the mean / variance of the training tokens' log-norms, weight starting at 1,
            # so the router starts as the training-free norm score's ranking and learns what to add to it
            self.norm_weight = nn.Parameter(torch.ones(()))
            self.register_buffer("norm_stats", torch.tensor([0.0, 1.0, 0.0]))  # (mean, variance, tokens seen)
        else:
            self.norm_weight = None
        # calibrate() fills these: at this layer's capacity calib_capacity[i], process the tokens whose score is at
        # least calib_threshold[i] (ascending capacities; NaN until calibrated; artifacts of earlier versions hold
        # other capacities, the last repeated to fill)
        self.register_buffer("calib_capacity", torch.full((N_CALIBRATION,), float("nan")))
        self.register_buffer("calib_threshold", torch.full((N_CALIBRATION,), float("nan")))
        # while calibrating: per forward, (capacity it ran at, thresholds keeping each CALIBRATION_CAPACITIES)
        self.calibration_log: list[tuple[float, torch.Tensor]] | None = None
        self.baseline_calibration: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # method -> (caps, thresholds)

    def score(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T). `valid` (B, T): the real tokens, whose log-norms update the norm feature's statistics
        while training."""
        scores = self.net(x).squeeze(-1)
        if self.norm_weight is None:
            return scores
        log_norm = x.float().norm(dim=-1).clamp(min=1e-6).log()  # (B, T)
        if self.training and torch.is_grad_enabled():
            self._update_norm_stats(log_norm.detach()[valid] if valid is not None else log_norm.detach().flatten())
        mean, var, _ = self.norm_stats.float()
        feature = (log_norm - mean) / var.clamp(min=1e-4).sqrt()  # (std floor: inputs of near-constant norm)
        return scores + (self.norm_weight * feature).to(scores.dtype)

    def method_scores(self, x: torch.Tensor, method: str, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T) scores of a non-random method: the router's, or (training-free baselines) the norm of
        the sub-layer's input."""
        return x.float().norm(dim=-1) if method in ("norm", "norm_allocated") else self.score(x, valid)

    def one_token_selected(self, x: torch.Tensor, capacity: float, rule: bool | None, method: str = "learned",
                           generator: torch.Generator | None = None) -> bool:
        """Decoding one token: whether it is processed, by the rule of `forward` without its (1, 1) selection
        tensors. x: (1, 1, C); rule: `RoutingState.one_token_rule` (True forced, False padding, None: the score)."""
        if method == "random":  # the same draw as forward's, so the baseline's stream of choices is unchanged
            drawn = bool(torch.rand(x.shape[:2], device=x.device, generator=generator) >= 1.0 - capacity)
            return drawn if rule is None else rule
        if rule is not None:
            return rule
        return bool(self.method_scores(x, method) >= self.threshold(capacity, method))  # (1, 1) score

    def _update_norm_stats(self, values: torch.Tensor) -> None:
        """Running mean / variance of the log-norms of every training-mode call's tokens, updated before use, so the
        first batch is standardized by its own statistics. Each call counts: the target phase's reused teacher
        batches (`target_repeats`) count again each time, and a distillation step counts the teacher's inputs
        (importance regression) beside the student's (the routed forward). values: (n,)"""
        if values.numel() < 2:
            return
        mean, var, n = self.norm_stats.float().tolist()
        m, v, k = float(values.mean()), float(values.var()), values.numel()
        total = n + k
        new_mean = mean + (m - mean) * k / total
        new_var = (n * (var + (mean - new_mean) ** 2) + k * (v + (m - new_mean) ** 2)) / total
        self.norm_stats.copy_(torch.tensor([new_mean, new_var, total]))

    def flops(self, n_tokens: int) -> int:
        extra = 2 * n_tokens * self.net[0].normalized_shape[0] if self.norm_weight is not None else 0  # the norm
        return router_net_flops(self.net, n_tokens) + extra

    def importance_loss(self, x: torch.Tensor, importance: torch.Tensor, capacity: float, valid: torch.Tensor,
                        forced: torch.Tensor) -> torch.Tensor | None:
        """Regress each token's score onto its standardized log-importance, measured on the teacher (the norm of what
        the sub-layer adds to the residual stream). x: (B, T, C), importance: (B, T).

        A regression, not a top-k classification: every token carries information about the ranking (a BCE at the
        top-k boundary learns from few), and the inference thresholds are quantiles of the scores, so scores need to
        rank tokens, not be probabilities. On SmolLM2 this reaches the oracle's quality in ~30 steps; the BCE and the
        KL's straight-through gradient alone did not beat random routing in 80.
        """
        learn = valid & ~forced
        if learn.sum() < 2:
            return None
        z = importance[learn].float().clamp(min=1e-6).log()
        z = (z - z.mean()) / z.std().clamp(min=1e-6)  # standardized log-importance of this layer's tokens
        return F.mse_loss(self.score(x, valid)[learn], z)

    @property
    def is_calibrated(self) -> bool:
        return not torch.isnan(self.calib_threshold).any().item()

    def set_calibration(self, method: str, caps: torch.Tensor, thrs: torch.Tensor) -> None:
        self.__dict__.pop("_threshold_cache", None)
        if method == "learned":
            self.calib_capacity.copy_(caps)
            self.calib_threshold.copy_(thrs)
        else:  # baselines' thresholds are not part of the artifact
            self.baseline_calibration[method] = (caps.to(self.calib_capacity), thrs.to(self.calib_threshold))

    def threshold(self, capacity: float, method: str = "learned") -> torch.Tensor | float:
        """Score above which a token is processed so that `capacity` of calibration tokens would be: a float, looked
        up once per (capacity, method, calibration) and then reused, so decoding reads no tensor on the host for it
        (the lookup costs a dozen small tensor ops and a sync, in every layer of every step otherwise)."""
        caps, thrs = (self.calib_capacity, self.calib_threshold) if method == "learned" else \
            self.baseline_calibration.get(method, (None, None))
        key = (capacity, method, None if caps is None else (caps.data_ptr(), caps._version, thrs.data_ptr(),
                                                             thrs._version))
        cached = self.__dict__.get("_threshold_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        value = float(self._lookup_threshold(capacity, method))
        self.__dict__["_threshold_cache"] = (key, value)
        return value

    def _lookup_threshold(self, capacity: float, method: str) -> torch.Tensor:
        if method == "learned" and not self.is_calibrated or method != "learned" and method not in self.baseline_calibration:
            raise NotCalibratedError(
                f"token routers have no inference thresholds for {method!r} scores yet: call "
                f"em.calibrate(data{'' if method == 'learned' else f', method={method!r}'}) (train_routers does it "
                "when it ends), or em.train() to route by top-k"
            )
        caps, thrs = (self.calib_capacity, self.calib_threshold) if method == "learned" else self.baseline_calibration[method]
        if capacity <= caps[0]:
            return thrs[0]
        if capacity >= caps[-1]:
            return thrs[-1]
        hi = int(torch.searchsorted(caps, torch.tensor(capacity, dtype=caps.dtype, device=caps.device)))
        frac = (capacity - caps[hi - 1]) / (caps[hi] - caps[hi - 1])
        return thrs[hi - 1] + (thrs[hi] - thrs[hi - 1]) * frac  # linear in capacity between calibrated points

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C) the sub-layer's input
        capacity: float,
        valid: torch.Tensor,  # (B, T) bool: real (non-padding) tokens
        forced: torch.Tensor,  # (B, T) bool: always processed (e.g. the first token)
        topk: bool,
        method: str = "learned",
        self_target: bool = True,
        generator: torch.Generator | None = None,  # the random baseline draws from it (default: torch's global RNG)
    ) -> TokenSelection:
        random = method == "random"
        if random:  # the random-routing baseline: uniform scores, so a threshold of 1 - capacity keeps `capacity`
            scores = torch.rand(x.shape[:2], device=x.device, generator=generator)
            if not topk:
                selected = ((scores >= 1.0 - capacity) | forced) & valid
                return TokenSelection(selected, torch.ones_like(scores), None, scores)
        else:
            scores = self.method_scores(x, method, valid)  # (B, T)
        aux = None
        if topk:
            selected = topk_mask(scores, capacity, valid, forced)
            learn = valid & ~forced
            if self_target and learn.any() and method == "learned":
                aux = F.binary_cross_entropy_with_logits(scores[learn], selected[learn].float())
        elif self.calibration_log is not None:  # calibrating: keep `capacity` of this batch; log every grid capacity's
            eligible = valid & ~forced
            if eligible.any():
                keep = torch.tensor((capacity, *CALIBRATION_CAPACITIES), device=scores.device)  # (1 + N,)
                thrs = torch.quantile(scores[eligible].float(), 1.0 - keep)  # scores keeping each fraction
                self.calibration_log.append((capacity, thrs[1:].cpu()))
                selected = ((scores >= thrs[0]) | forced) & valid
            else:  # only forced tokens: nothing to learn from this batch
                selected = forced & valid
        else:
            selected = ((scores >= self.threshold(capacity, method)) | forced) & valid
        if method == "learned" and torch.is_grad_enabled():
            gate = straight_through_gate(torch.sigmoid(scores))
        else:  # forward value 1 either way: without a gradient to carry, no sigmoid
            gate = scores.new_ones(()).expand_as(scores)
        return TokenSelection(selected, gate, aux, scores)


def calibration_thresholds(log: list[tuple[float, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """What calibrate() logged for one router ((capacity it ran at, thresholds at CALIBRATION_CAPACITIES) per
    forward) -> (CALIBRATION_CAPACITIES, their thresholds): each capacity's threshold averaged over the forwards where
    the layer ran nearest to it, since a layer's scores depend on what earlier layers skipped at that point of the
    budget; then made non-increasing in the capacity, so more capacity never processes fewer tokens."""
    caps = torch.tensor(CALIBRATION_CAPACITIES)
    ran = torch.tensor([c for c, _ in log])  # (n_forwards,)
    thrs = torch.stack([t.float() for _, t in log])  # (n_forwards, N)
    dist = (ran[:, None] - caps[None, :]).abs()  # (n_forwards, N)
    nearest = (dist <= dist.min(dim=0).values + 1e-6).float()  # (n_forwards, N) the forwards each capacity uses
    merged = (thrs * nearest).sum(dim=0) / nearest.sum(dim=0)  # (N,)
    return caps, torch.cummin(merged, dim=0).values
