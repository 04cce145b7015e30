"""`RoutingState`: what every wrapped sub-layer of one elastic model shares.

The budget and mode (set by `ElasticModel`), the per-forward context that only the top-level model call sees
(padding mask, positions of the current tokens in the sequence), and what each sub-layer reports back (FLOPs,
auxiliary losses, calibration scores). One object per elastic model, referenced by each wrapper.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class SubLayerStats:
    layer: int
    sublayer: str  # "attn" | "mlp"
    dense_flops: int  # what the unmodified sub-layer would have executed on the same input
    executed_flops: int  # what ran, routers included
    router_flops: int = 0
    token_fraction: float = 1.0  # of valid tokens processed
    unit_fraction: float = 1.0  # of heads / experts active per processed token


@dataclass
class RoutingState:
    n_layers: int
    enabled: bool = True
    topk: bool = False  # training: top-k at the capacity; inference: calibrated thresholds
    method: str = "learned"  # or a baseline at the same capacity: "random", "norm" (training-free), "static"
    static_layer_order: dict[str, list[int]] = field(default_factory=dict)  # "static": layers, least important first
    importance_log: dict[int, list[torch.Tensor]] | None = None  # fit_static: mean head / expert output norms
    teacher_targets: bool = False  # teacher pass of training: measure importance, give routers their targets
    budget: dict[str, float] = field(default_factory=dict)  # global capacity per component
    dense_layers: dict[str, frozenset[int]] = field(default_factory=dict)
    keep_first_token: bool = True
    causal: bool = True  # False (encoders): no causal mask, and token routing may use top-k at inference
    generator: torch.Generator | None = None  # the random baseline draws from it when set (evaluate's own RNG)
    # ---- per-forward context, set by the forward pre-hook of whichever model entry point was called ----
    in_call: bool = False  # the context below belongs to a model call now running (False between calls: the
    # wrappers refuse to route rather than read a previous call's mask and positions)
    pad_mask: torch.Tensor | None = None  # (B, S) bool over every position so far (past + current)
    positions: torch.Tensor | None = None  # (T,) index of each current token in the sequence (None: the first
    # sub-layer fills it in, for inputs whose token count the model call does not show, e.g. pixel_values)
    past_len: int = 0
    batch_size: int = 0
    # ---- reported back by the sub-layers during a forward ----
    stats: list[SubLayerStats] = field(default_factory=list)
    aux_losses: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    def layer_capacity(self, component: str, layer: int) -> float:
        """Per-layer capacity that spends the global budget: dense layers run in full, the rest share the remainder."""
        if not self.enabled:
            return 1.0
        return self.budget_capacity(component, layer)

    def budget_capacity(self, component: str, layer: int) -> float:
        """The layer's capacity under the current budget, whether or not routing is on right now."""
        if component not in self.budget:
            return 1.0
        dense = self.dense_layers.get(component, frozenset())
        if layer in dense:
            return 1.0
        b = self.budget[component]
        n_routed = self.n_layers - len(dense)
        return min(1.0, max(0.0, (b * self.n_layers - len(dense)) / n_routed))

    @property
    def route_topk(self) -> bool:
        """Token routers pick the top-k of each sequence: always while training; at inference only for non-causal
        models (a causal model's decision for a token may not look at later tokens, so it uses thresholds)."""
        return self.topk or not self.causal

    @property
    def random(self) -> bool:
        return self.method == "random"

    def statically_dropped(self, component: str, layer: int) -> bool:
        """"static" baseline for token components: whole sub-layers are dropped, least important first, as many as
        the budget asks for (the token-work of the model falls by one layer's worth per dropped layer)."""
        if self.method != "static" or not self.enabled or component not in self.budget:
            return False
        order = self.static_layer_order.get(component, [])
        n_drop = round((1.0 - self.budget[component]) * self.n_layers)
        return layer in order[:n_drop]

    def min_budget(self, component: str) -> float:
        """The smallest global budget that still leaves the routed layers something to do."""
        return len(self.dense_layers.get(component, ())) / self.n_layers

    def check_in_call(self) -> None:
        """Routing needs this call's padding mask and positions, which only a call of the model (or of its inner
        model) captures: a bare decoder layer called on its own has neither."""
        if not self.in_call:
            raise ConfigError("a routed layer ran outside a call of the model, so this call's padding mask and "
                              "positions are unknown: call the model or its inner model (e.g. em.base_model.model), "
                              "not one of its layers on its own")

    def token_valid(self, B: int, T: int, device) -> torch.Tensor:
        """(B, T) bool: current tokens that are not padding."""
        self.check_in_call()
        if self.pad_mask is None or self.pad_mask.shape[0] != B or self.pad_mask.shape[1] < T:
            return torch.ones(B, T, dtype=torch.bool, device=device)
        return self.pad_mask[:, -T:]

    def forced_tokens(self, B: int, T: int, device) -> torch.Tensor:
        """(B, T) bool: tokens that token routing always processes (each sequence's first real token).

        With keep_first_token=False only top-k (training) may skip it, since top-k keeps at least one token per
        sequence anyway; a threshold (inference) could keep none, so there the first token is still processed: a
        rule that depends on position only, so routing stays causal and no sequence has an empty selection."""
        self.check_in_call()
        if not self.keep_first_token and self.topk:
            return torch.zeros(B, T, dtype=torch.bool, device=device)
        positions = self.current_positions(T, device)
        if self.pad_mask is None or self.pad_mask.shape[0] != B:
            first = torch.zeros(B, dtype=torch.long, device=device)
        else:
            first = self.pad_mask.long().argmax(dim=1)  # (B,) index of the first True
        return positions[None, :] == first[:, None]

    def current_positions(self, T: int, device) -> torch.Tensor:
        self.check_in_call()
        if self.positions is None:  # the call showed no token count (pixel_values): the first sub-layer sets it
            self.positions = torch.arange(T, device=device)
        if self.positions.shape[0] != T:
            return torch.arange(T, device=device)
        return self.positions

    def reset_forward(self) -> None:
        self.stats = []
        self.aux_losses = defaultdict(list)


class SubLayerWrapper(nn.Module):
    """What every wrapper of an attention or MLP shares (ElastiFormer's routed sub-layers and Flextron's nested
    ones): the unmodified sub-layer it owns, where it sits, and the model-wide state it reads its orders from."""

    def __init__(self, base_layer: nn.Module, layer_idx: int, spec, dims: dict[str, int], state):
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx = layer_idx
        self.spec = spec
        self.dims = dims
        self._state = [state]  # in a list so nn.Module does not register it

    @property
    def state(self):
        return self._state[0]


class ElasticSubLayer(SubLayerWrapper):
    """ElastiFormer's attention and MLP wrappers: a SubLayerWrapper over the RoutingState, plus what skipping means."""

    # ---- what "skipped" means for this sub-layer (spec.post_norm: the sub-layer adds the residual itself) ----
    def skipped_output(self, x: torch.Tensor) -> torch.Tensor:
        """The sub-layer's output for tokens that skip it: nothing added (pre-LN), or the input unchanged (post-LN)."""
        return x if self.spec.post_norm else x.new_zeros(x.shape)

    def finish(self, delta: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """From what the sub-layer adds (output projection, with bias) to what it returns: a post-LN sub-layer
        returns norm(x + delta), a pre-LN one the delta itself."""
        return norm(x + delta) if norm is not None else delta

    def apply_gate(self, y: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Apply a router's straight-through gate (forward value 1) to the output `y` of processed tokens `x`: on
        what the sub-layer changes, so the forward value is `y` itself and the gradient reaches the router."""
        return x + gate * (y - x) if self.spec.post_norm else y * gate

    def scatter(self, x_flat: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Put the processed tokens' outputs `y` (n, C) at `idx` (n,) among all tokens `x_flat` (N, C); the others
        get `skipped_output`."""
        return self.skipped_output(x_flat).index_copy(0, idx, y.to(x_flat.dtype))
