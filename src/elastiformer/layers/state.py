"""`RoutingState`: what every wrapped sub-layer of one elastic model shares.

The budget, the per-layer allocation and the mode (set by `ElasticModel`), the per-call context captured where a
call enters (the model or its inner model) and cleared when it ends (padding mask, positions of the current tokens
in the sequence), and what each sub-layer reports back (FLOPs, auxiliary losses, router targets, calibration
scores). One object per elastic model, referenced by each wrapper.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..allocation import Allocation, uniform_capacity
from ..errors import ConfigError
from ..routers import joint_one_token_logits

# routing methods that spend the budget by the fitted allocation; the other baselines share it uniformly
ALLOCATED_METHODS = ("learned", "norm_allocated")


@dataclass
class SubLayerStats:
    layer: int
    sublayer: str  # "attn" | "mlp"
    dense_flops: int  # what the unmodified sub-layer would have executed on the same input
    executed_flops: int  # what ran, routers included
    router_flops: int = 0
    token_fraction: float = 1.0  # of valid tokens processed
    unit_fraction: float = 1.0  # of heads / experts active per processed token


class TokenTarget(NamedTuple):
    """A token router's target waiting for the teacher's backward (router_targets="sensitivity")."""
    router: nn.Module
    x: torch.Tensor  # (B, T, C) the sub-layer's input
    change: torch.Tensor  # (B, T, C) what skipping the sub-layer removes from each token's output
    valid: torch.Tensor  # (B, T) bool
    forced: torch.Tensor  # (B, T) bool
    probe: torch.Tensor  # (B, T, C) zeros added to the output; its gradient is d loss / d output


@dataclass
class RoutingState:
    n_layers: int
    enabled: bool = True
    topk: bool = False  # training: top-k at the capacity; inference: calibrated thresholds
    method: str = "learned"  # or a baseline at the same capacity: "random", "norm" (training-free), "static"
    static_layer_order: dict[str, list[int]] = field(default_factory=dict)  # "static": layers, least important first
    importance_log: dict[int, list[torch.Tensor]] | None = None  # fit_static: mean head / expert output norms
    teacher_targets: bool = False  # teacher pass of training: measure importance, give routers their targets
    # what the token routers learn to predict (see `ElasticSubLayer.teach_token_router`): None = the norm of the
    # token's update, computed at once; a list = sensitivity probes, collected for one backward of the teacher
    sensitivity_probes: list[TokenTarget] | None = None
    # attention-token targets also count what the token is worth to the other tokens as a key / value (see
    # `ElasticAttention.key_value_importance`), not only its own update
    key_value_targets: bool = False
    # {id(token router): (importance, valid, forced)} measured on the teacher, taught on the student's inputs
    student_targets: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    target_records: list[tuple[str, Callable[[], torch.Tensor | None]]] | None = None  # see add_target_loss
    budget: dict[str, float] = field(default_factory=dict)  # global capacity per component
    dense_layers: dict[str, frozenset[int]] = field(default_factory=dict)
    keep_first_token: bool = True
    allocation: Allocation | None = None  # fitted per-layer capacities (set with set_allocation)
    capacity_override: dict[str, list[float]] | None = None  # fit_allocation: the candidate being measured
    pin_override: dict[str, dict[int, torch.Tensor]] | None = None  # and its pinned units' scores
    _capacity_cache: dict = field(default_factory=dict)  # (component, budget) -> per-layer capacities; and the
    # pinned units' scores, as tensors (see `pinned_scores`)
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
    # values every layer of one call would compute alike (see `per_call`), and the context they belong to
    _per_call: dict = field(default_factory=dict)
    _per_call_owner: tuple = (None, None)
    # ---- reported back by the sub-layers during a forward ----
    stats: list[SubLayerStats] = field(default_factory=list)
    aux_losses: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    def layer_capacity(self, component: str, layer: int) -> float:
        """The capacity this layer runs at now: 1 with routing disabled, else `budget_capacity`."""
        if not self.enabled:
            return 1.0
        return self.budget_capacity(component, layer)

    def budget_capacity(self, component: str, layer: int) -> float:
        """The layer's capacity under the current budget, whether or not routing is on right now: from the fitted
        allocation (learned routing and the "norm_allocated" baseline), else shared uniformly by the routed layers
        (the other baselines, and a model whose allocation is not fitted yet)."""
        if component not in self.budget:
            return 1.0
        if self.capacity_override is not None:  # fit_allocation measuring a candidate allocation
            return self.capacity_override[component][layer]
        if self.allocation is not None and self.method in ALLOCATED_METHODS:
            key = (component, self.budget[component])
            caps = self._capacity_cache.get(key)
            if caps is None:
                caps = self._capacity_cache[key] = self.allocation.capacities(*key)
            return caps[layer]
        return uniform_capacity(self.budget[component], self.n_layers, self.dense_layers.get(component, frozenset()))

    def pinned_scores(self, component: str, layer: int) -> torch.Tensor | None:
        """(U,) the calibration importances a pinned unit chooses its heads / experts by, the same for every token
        (see `allocation`); None: the learned router chooses per token (or a baseline runs)."""
        scores = self._pinned(component, layer)
        if scores is None or isinstance(scores, torch.Tensor):
            return scores
        key = ("pinned", component, layer)
        if key not in self._capacity_cache:
            self._capacity_cache[key] = torch.tensor(scores)
        return self._capacity_cache[key]

    def pinned_host_scores(self, component: str, layer: int) -> list[float] | None:
        """`pinned_scores` as a list on the host: what a pinned unit chooses by in place of router logits
        (`one_token_units`), with no tensor op (the allocation's own list, except while `fit_allocation` measures)."""
        scores = self._pinned(component, layer)
        return scores.tolist() if isinstance(scores, torch.Tensor) else scores

    def _pinned(self, component: str, layer: int) -> torch.Tensor | list[float] | None:
        """A pinned unit's scores as held: the candidate's tensor while `fit_allocation` measures, else the fitted
        allocation's list; None: not pinned (or not learned routing)."""
        if self.method != "learned":
            return None
        if self.capacity_override is not None:
            return (self.pin_override or {}).get(component, {}).get(layer)
        if self.allocation is None:
            return None
        return self.allocation.pinned.get(component, {}).get(layer)

    def capacities(self) -> dict[str, list[float]]:
        """{component: per-layer capacities} under the current budget, method and mode (1.0 with routing off)."""
        return {k: [self.layer_capacity(k, i) for i in range(self.n_layers)] for k in self.budget}

    def set_allocation(self, allocation) -> None:
        self.allocation = allocation
        self._capacity_cache = {}

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
        """The smallest budget: what the dense layers alone spend (a fitted allocation may take the rest to 0)."""
        return len(self.dense_layers.get(component, ())) / self.n_layers

    def check_in_call(self) -> None:
        """Routing needs this call's padding mask and positions, which only a call of the model (or of its inner
        model) captures: a bare decoder layer called on its own has neither."""
        if not self.in_call:
            raise ConfigError("a routed layer ran outside a call of the model, so this call's padding mask and "
                              "positions are unknown: call the model or its inner model (e.g. em.base_model.model), "
                              "not one of its layers on its own")

    def per_call(self, key: tuple, make: Callable[[], object]):
        """`make()`, computed once per model call and reused by every layer (a decode step runs each routed layer on
        the same padding mask and positions: recomputing these per layer costs more small ops than the routers).
        Dropped as soon as the call's context (padding mask, positions) is another one."""
        owner = self._per_call_owner
        if owner[0] is not self.pad_mask or owner[1] is not self.positions:
            self._per_call, self._per_call_owner = {}, (self.pad_mask, self.positions)
        if key not in self._per_call:
            self._per_call[key] = make()
        return self._per_call[key]

    def token_valid(self, B: int, T: int, device) -> torch.Tensor:
        """(B, T) bool: current tokens that are not padding."""
        self.check_in_call()
        return self.per_call(("valid", B, T, device), lambda: self._token_valid(B, T, device))

    def _token_valid(self, B: int, T: int, device) -> torch.Tensor:
        if self.pad_mask is None or self.pad_mask.shape[0] != B or self.pad_mask.shape[1] < T:
            return torch.ones(B, T, dtype=torch.bool, device=device)
        return self.pad_mask[:, -T:]

    def n_valid(self, B: int, T: int, device) -> int:
        """How many of the current tokens are not padding (read on the host once per call)."""
        return self.per_call(("n_valid", B, T, device), lambda: int(self.token_valid(B, T, device).sum()))

    def skips_padding(self, B: int, T: int, device) -> bool:
        """Whether every wrapped sub-layer of this call, the ones held at full capacity included, runs on the real
        tokens only: a non-causal model (no KV cache, padding masked as keys, so no real token's output changes),
        routing on at a budget below 1 (at budget 1 the model is the base model, padding rows included), and
        padding in the batch. Routed sub-layers never compute padding; without this, a layer the allocation holds
        dense would, and the learned allocation could not reach what uniform baselines get from padding alone."""
        if self.causal or not self.enabled or not any(b < 1.0 for b in self.budget.values()):
            return False
        return self.n_valid(B, T, device) < B * T

    def forced_tokens(self, B: int, T: int, device) -> torch.Tensor:
        """(B, T) bool: tokens that token routing always processes (each sequence's first real token).

        With keep_first_token=False only top-k (training) may skip it, since top-k keeps at least one token per
        sequence anyway; a threshold (inference) could keep none, so there the first token is still processed: a
        rule that depends on position only, so routing stays causal and no sequence has an empty selection."""
        self.check_in_call()
        return self.per_call(("forced", B, T, device, self.keep_first_token, self.topk),
                             lambda: self._forced_tokens(B, T, device))

    def _forced_tokens(self, B: int, T: int, device) -> torch.Tensor:
        if not self.keep_first_token and self.topk:
            return torch.zeros(B, T, dtype=torch.bool, device=device)
        positions = self.current_positions(T, device)
        if self.pad_mask is None or self.pad_mask.shape[0] != B:
            first = torch.zeros(B, dtype=torch.long, device=device)
        else:
            first = self.pad_mask.long().argmax(dim=1)  # (B,) index of the first True
        return positions[None, :] == first[:, None]

    def one_token_rule(self, device) -> bool | None:
        """Decoding one token (batch 1): True if token routing must process it (forced), False if it is padding,
        None if its score decides. Read on the host once per call, not in every layer."""
        return self.per_call(("one_token_rule", device), lambda: False if not bool(self.token_valid(1, 1, device))
                             else True if bool(self.forced_tokens(1, 1, device)) else None)

    def current_positions(self, T: int, device) -> torch.Tensor:
        self.check_in_call()
        if self.positions is None:  # the call showed no token count (pixel_values): the first sub-layer sets it
            self.positions = torch.arange(T, device=device)
        if self.positions.shape[0] != T:
            return torch.arange(T, device=device)
        return self.positions

    def real_positions(self, index: torch.Tensor) -> torch.Tensor:
        """Sequence indices (B, m) -> each token's place among its row's real tokens (left padding not counted):
        what position-based choices (fractional head / expert counts) key on, so padding never changes them."""
        if self.pad_mask is None or self.pad_mask.shape[0] != index.shape[0]:
            return index
        real = self.pad_mask.long().cumsum(dim=1) - 1  # (B, S)
        return real.gather(1, index.clamp(min=0, max=real.shape[1] - 1))

    def add_target_loss(self, kind: str, router: nn.Module, *args) -> None:
        """A router's supervised loss towards a target measured on the teacher: computed now into `aux_losses`, or,
        while `target_records` collects them (`train_routers`' target phase), kept as a closure that recomputes it,
        so several router updates can reuse one teacher forward."""
        if self.target_records is not None:
            self.target_records.append((kind, functools.partial(router.importance_loss, *args)))
            return
        with torch.enable_grad():
            loss = router.importance_loss(*args)
        if loss is not None:
            self.aux_losses[kind].append(loss)

    def reset_forward(self) -> None:
        """At the start of each model call: its stats, auxiliary losses and per-call values start empty."""
        self.stats = []
        self.aux_losses = defaultdict(list)
        self._per_call, self._per_call_owner = {}, (None, None)


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

    # (each subclass sets `self.stand_in`: a `StandIn`, what a token that skips it gets, or None: nothing. Not a class
    # attribute: one would shadow the submodule nn.Module keeps in _modules)

    def unit_router_flops(self, component: str, router: nn.Module, n_tokens: int) -> int:
        """What this layer's head / expert router costs on `n_tokens` tokens: nothing for a baseline or a pinned
        unit (no router runs)."""
        st = self.state
        if st.method != "learned" or st.pinned_scores(component, self.layer_idx) is not None:
            return 0
        return router.flops(n_tokens)

    def one_token_choice(self, x: torch.Tensor, capacity: float, unit_component: str, unit_router: nn.Module | None,
                         unit_capacity: float) -> tuple[bool, list[float] | None]:
        """Decoding one token at batch 1: whether the token router processes `x` at `capacity`, and, when the layer
        routes its heads / experts too (`unit_component` at `unit_capacity` < 1) with a learned router that is not
        pinned, that router's logits, from the same norm and matmul as the token's score
        (`joint_one_token_logits`). x: (1, 1, C) -> (selected, the unit router's logits on the host, or None: the
        unit router scores the token itself, if it runs)."""
        st = self.state
        rule = st.one_token_rule(x.device)
        joint = None
        if rule is None and st.method == "learned" and unit_capacity < 1.0 and not st.topk \
                and self.token_router.norm_weight is None \
                and st.pinned_scores(unit_component, self.layer_idx) is None:
            joint = joint_one_token_logits(self, x, (self.token_router.net, unit_router.net))
        if joint is None:
            return self.token_router.one_token_selected(x, capacity, rule, method=st.method,
                                                        generator=st.generator), None
        return joint[0] >= self.token_router.threshold(capacity), joint[1:]

    # ---- what "skipped" means for this sub-layer (spec.post_norm: the sub-layer adds the residual itself) ----
    def output_norm(self) -> nn.Module | None:
        """The norm a post-LN sub-layer applies to x + its update (None: pre-LN)."""
        raise NotImplementedError

    def stands_in(self) -> bool:
        return self.stand_in is not None and self.stand_in.is_fitted

    def passthrough(self, x: torch.Tensor) -> torch.Tensor:
        """What a token gets that nothing is computed for (padding, or any skipped token without a stand-in):
        nothing added (pre-LN), or the input unchanged (post-LN)."""
        return x if self.spec.post_norm else x.new_zeros(x.shape)

    def skipped_output(self, x: torch.Tensor) -> torch.Tensor:
        """The sub-layer's output for real tokens that skip it: the stand-in's estimate of its update (through the
        post-LN of a post-LN sub-layer), once fitted; else `passthrough`."""
        if not self.stands_in():
            return self.passthrough(x)
        return self.finish(self.stand_in(x), x, self.output_norm())

    def skip_flops(self, n_tokens: int) -> int:
        """FLOPs of what `n_tokens` skipped tokens get (the stand-in's, or none)."""
        return self.stand_in.flops(n_tokens) if self.stands_in() else 0

    def finish(self, delta: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """From what the sub-layer adds (output projection, with bias) to what it returns: a post-LN sub-layer
        returns norm(x + delta), a pre-LN one the delta itself."""
        return norm(x + delta) if norm is not None else delta

    def apply_gate(self, y: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Apply a router's straight-through gate (forward value 1) to the output `y` of processed tokens `x`: on
        what the sub-layer changes, so the forward value is `y` itself and the gradient reaches the router."""
        return x + gate * (y - x) if self.spec.post_norm else y * gate

    def teach_token_router(self, x: torch.Tensor, out: torch.Tensor, change: torch.Tensor,
                           extra: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher pass of training: give this sub-layer's token router its target, the importance of each token's
        update (`change`, (B, T, C), what skipping the token would remove), plus `extra` (B, T) where skipping it
        also costs the other tokens something (an attention token's role as key / value). Returns `out`, the
        sub-layer's output (with a zero probe added when sensitivities are measured, so the teacher's backward
        reaches it).

        By default the target is the update's norm, and the loss is computed now on the teacher's inputs. With
        `state.sensitivity_probes`, the target waits for the teacher's backward (`ElasticModel.sensitivity_losses`);
        with `state.student_targets`, the loss waits for the student's forward, on the inputs the router sees at
        inference."""
        st = self.state
        router = getattr(self, "token_router", None)
        if router is None or st.importance_log is not None:
            return out
        B, T = x.shape[:2]
        valid, forced = st.token_valid(B, T, x.device), st.forced_tokens(B, T, x.device)
        if st.sensitivity_probes is not None:
            probe = torch.zeros_like(out, requires_grad=True)
            st.sensitivity_probes.append(TokenTarget(router, x.detach(), change.detach(), valid, forced, probe))
            return out + probe
        importance = change.detach().norm(dim=-1)  # (B, T)
        if extra is not None:
            importance = importance + extra.to(importance.dtype)
        if st.student_targets is not None:
            st.student_targets[id(router)] = (importance, valid, forced)
            return out
        st.add_target_loss("token_importance", router, x.detach(), importance, 1.0, valid, forced)
        return out

    def learn_on_student(self, x: torch.Tensor) -> None:
        """Student pass (router_inputs="student"): regress this layer's token router, on its own input, onto the
        importance measured on the teacher."""
        st = self.state
        router = getattr(self, "token_router", None)
        if router is None or st.student_targets is None or id(router) not in st.student_targets:
            return
        importance, valid, forced = st.student_targets[id(router)]
        loss = router.importance_loss(x.detach(), importance, 1.0, valid, forced)
        if loss is not None:
            st.aux_losses["token_importance"].append(loss)

    def scatter(self, x_flat: torch.Tensor, idx: torch.Tensor, y: torch.Tensor,
                skipped: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Put the processed tokens' outputs `y` (n, C) at `idx` (n,) among all tokens `x_flat` (N, C): the skipped
        real tokens (`skipped`, a bool mask of N tokens, any shape) get `skipped_output`, the rest (padding)
        `passthrough`. Returns the (N, C) output and the FLOPs of the stand-in, which runs on the skipped real tokens
        only."""
        out, flops = self.passthrough(x_flat), 0
        if skipped is not None and self.stands_in():
            where = skipped.flatten().nonzero().squeeze(1)  # (N - n,) flat indices
            out = out.index_copy(0, where, self.skipped_output(x_flat.index_select(0, where)))
            flops = self.skip_flops(where.numel())
        return out.index_copy(0, idx, y.to(x_flat.dtype)), flops


MAX_VIEW_SETS = 512  # unit sets (heads, experts) whose weight views a layer keeps for decoding (2^9 for 9 heads)


def views_per_weights(module: nn.Module, weights: tuple[torch.Tensor, ...], key: tuple, make: Callable[[], object]):
    """`make()` (views of `weights` for one set of heads or experts), made once per `key` and kept on `module`.
    Views read the weights as they are now, so they stay right while the weights change in place; all are dropped
    when a weight moves to another storage (`.to()`, a new Parameter), or when `MAX_VIEW_SETS` sets are kept."""
    ptrs = tuple(w.data_ptr() for w in weights)
    kept = module.__dict__.get("_views_per_weights")
    if kept is None or kept[0] != ptrs or len(kept[1]) >= MAX_VIEW_SETS:
        kept = module.__dict__["_views_per_weights"] = (ptrs, {})
    if key not in kept[1]:
        kept[1][key] = make()
    return kept[1][key]
