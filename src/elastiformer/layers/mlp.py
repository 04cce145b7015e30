"""`ElasticMLP`: token routing (only selected tokens enter the MLP) and expert routing (the dense MLP split exactly
into `E` experts, each a contiguous slice of the hidden neurons or, with `expert_split="cluster"`, a cluster of
neurons that fire together; each token runs only its chosen experts).

A clustered split only regroups hidden neurons, which leaves the MLP's function unchanged: the base MLP's weights are
permuted once into the router's `neuron_order` (up / gate rows, down columns), so every expert is a contiguous slice
at run time, as in the contiguous split, and no step gathers scattered weight rows. A unit the allocation pinned (the
same most important experts for every token) also stores its experts' blocks most important first, so whatever it
runs is one slice, three matmuls as in a dense MLP of that width, and on many tokens it runs without a per-expert
gather / scatter (`_pinned_experts`). `weight_order` records the order the base weights hold now; `ElasticModel`
undoes it for its weight fingerprint and on `unload()`.

With every expert active the sum over experts is the dense MLP: down(act(gate(x)) * up(x)) splits over hidden
neurons because the activation is elementwise and `down` is linear. A post-LN MLP (BERT) returns
LayerNorm(x + MLP(x)): the experts' sum is normalized the same way, and a skipped token comes out unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchSpec
from ..flops import mlp_flops
from ..routers import ExpertRouter, TokenRouter
from ..routers.net import best_first, fractional_count, slot_phase
from .stand_in import StandIn
from .state import ElasticSubLayer, RoutingState, SubLayerStats, views_per_weights


class ElasticMLP(ElasticSubLayer):
    def __init__(self, base_layer: nn.Module, layer_idx: int, spec: ArchSpec, dims: dict[str, int],
                 state: RoutingState, token_router: TokenRouter | None, expert_router: ExpertRouter | None,
                 stand_in: StandIn | None = None):
        super().__init__(base_layer, layer_idx, spec, dims, state)
        self.token_router = token_router
        self.expert_router = expert_router
        self.stand_in = stand_in  # what a token that skips this MLP gets (None, or unfitted: nothing)
        self.gated = spec.mlp_weights(base_layer).gate_w is not None  # SwiGLU-style: 3 matmuls, else 2
        # (I,) the hidden-neuron order the base weights hold now, in the original numbering (None: the original)
        self.register_buffer("weight_order", None, persistent=False)
        # ((storage, version) of the neuron_order, pinned scores) of the layout last applied (see `align_weights`)
        self._order_applied: tuple | None = None
        self.expert_slot: list[int] | None = None  # where expert e's block sits in the weights (None: at e)

    # ---- the weights' layout: clustered experts, pinned units ----
    def align_weights(self) -> None:
        """Put the base weights in the layout expert routing reads, if it changed since the last call (a split
        fitted, routers loaded, a checkpoint resumed, an allocation fitted or loaded): the expert router's
        `neuron_order` (clustered experts), its experts' blocks ordered by importance when the allocation pinned
        this unit (`expert_layout`). Checked by the order tensor's version counter and the scores' identity, so the
        per-call cost is a tuple comparison."""
        router = self.expert_router
        if router is None:
            return
        order = router.neuron_order
        alloc = self.state.allocation
        scores = None if alloc is None else alloc.pinned.get("mlp_experts_active", {}).get(self.layer_idx)
        key = None if order is None else (order.data_ptr(), order._version)
        if self._order_applied is not None and self._order_applied[0] == key and self._order_applied[1] is scores:
            return
        target, self.expert_slot = expert_layout(order, scores, router.n_experts, self.dims["I"],
                                                 self.weights().up_w.device)
        self.set_weight_order(target)
        self._order_applied = (key, scores)

    @torch.no_grad()
    def set_weight_order(self, order: torch.Tensor | None) -> None:
        """Put the base MLP's hidden neurons in `order` ((I,) original neuron indices; None: the original order).
        The function is unchanged: the activation is elementwise and the down projection sums over the neurons."""
        current = self.weight_order
        if order is None or current is None:
            if order is None and current is None:
                return
            identity = torch.arange(self.dims["I"], device=(order if current is None else current).device)
            order = identity if order is None else order
            current = identity if current is None else current
        if torch.equal(order, current):
            return
        # row r of the new weights is row `perm[r]` of the current ones: current[perm] == order
        perm = torch.argsort(current)[order]  # (I,)
        w = self.weights()
        for rows in (w.up_w, w.up_b, w.gate_w, w.gate_b):  # views of the base tensors: written in place
            if rows is not None:
                rows.copy_(rows[perm])
        w.down_w.copy_(w.down_w[:, perm])
        self.weight_order = order.clone()

    def expert_slice(self, e: int) -> slice:
        """Expert e's hidden neurons in the weights as they are now: a contiguous slice (call `align_weights` first:
        a clustered split and a pinned unit reorder the blocks)."""
        width = self.dims["I"] // self.expert_router.n_experts
        e = e if self.expert_slot is None else self.expert_slot[e]
        return slice(e * width, (e + 1) * width)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self.state
        C, I = self.dims["C"], self.dims["I"]
        B, T, _ = x.shape
        tok_cap = st.layer_capacity("mlp_tokens", self.layer_idx) if self.token_router is not None else 1.0
        exp_cap = st.layer_capacity("mlp_experts_active", self.layer_idx) if self.expert_router is not None else 1.0
        dense = mlp_flops(B * T, C, I, self.gated)

        if st.teacher_targets and not st.enabled:
            return self._teacher_with_targets(x, dense)
        self.learn_on_student(x)
        if st.method == "static" and self.token_router is not None and tok_cap < 1.0:
            if st.statically_dropped("mlp_tokens", self.layer_idx):  # baseline: the whole sub-layer is skipped
                return self._skip_every_token(x, dense)
            tok_cap = 1.0
        if tok_cap <= 0.0 or exp_cap <= 0.0:  # allocated nothing: the sub-layer is skipped for every token
            return self._skip_every_token(x, dense)
        skip_padding = st.skips_padding(B, T, x.device)
        if tok_cap >= 1.0 and exp_cap >= 1.0 and not skip_padding:  # full capacity: the base sub-layer, untouched
            st.stats.append(SubLayerStats(self.layer_idx, "mlp", dense, dense))
            return self.base_layer(x, *args, **kwargs)

        if B * T == 1 and tok_cap < 1.0 and not st.topk and not torch.is_grad_enabled() \
                and self.token_router.calibration_log is None:
            return self._one_token(x, tok_cap, exp_cap, dense)

        xf = x.reshape(B * T, C)  # (B, T, C) -> (N, C)
        router_flops = 0
        idx = None
        positions = None  # (N,) each token's place among its row's real tokens: what expert routing keys on
        if exp_cap < 1.0:
            positions = self._flat_positions(B, T, x.device)
        if tok_cap < 1.0:
            valid = st.token_valid(B, T, x.device)
            forced = st.forced_tokens(B, T, x.device)
            sel = self.token_router(x, tok_cap, valid, forced, topk=st.route_topk, method=st.method,
                                    self_target=st.topk and not st.teacher_targets, generator=st.generator)
            router_flops += self.token_router.flops(B * T) if st.method == "learned" else 0
            if sel.aux_loss is not None:
                st.aux_losses["token_bce"].append(sel.aux_loss)
            idx = sel.selected.flatten().nonzero().squeeze(1)  # (n,) flat indices of processed tokens
            x_in = xf.index_select(0, idx)  # (n, C)
            if positions is not None:
                positions = positions.index_select(0, idx)  # (n,)
            # the straight-through gate's forward value is 1: it only matters where a gradient flows
            gate = sel.gate.flatten().index_select(0, idx)[:, None] if torch.is_grad_enabled() else None  # (n, 1)
            token_fraction = idx.numel() / max(1, st.n_valid(B, T, x.device))
        elif skip_padding:  # every real token, none of the padding
            idx = st.per_call(("real_flat", B, T, x.device),
                              lambda: st.token_valid(B, T, x.device).flatten().nonzero().squeeze(1))  # (n,)
            x_in, gate, token_fraction = xf.index_select(0, idx), None, 1.0  # (n, C)
            if positions is not None:
                positions = positions.index_select(0, idx)  # (n,)
        else:
            x_in, gate, token_fraction = xf, None, 1.0

        n = x_in.shape[0]
        if exp_cap < 1.0:
            y, exp_flops, unit_fraction = self._run_experts(x_in, exp_cap, positions)
            y = self.finish(y, x_in, self.weights().norm)
            router_flops += self.unit_router_flops("mlp_experts_active", self.expert_router, n)
        else:
            y = self.base_layer(x_in) if n else x_in.new_zeros(0, C)  # (n, C)
            exp_flops, unit_fraction = mlp_flops(n, C, I, self.gated), 1.0

        if idx is not None:  # scatter back; skipped tokens leave the residual stream alone, or get the stand-in
            y = y if gate is None else self.apply_gate(y, x_in, gate)
            skipped = valid & ~sel.selected if tok_cap < 1.0 else None  # (B, T) the skipped real tokens
            y, stand_in_flops = self.scatter(xf, idx, y, skipped)  # (N, C)
            exp_flops += stand_in_flops
        st.stats.append(SubLayerStats(self.layer_idx, "mlp", dense, exp_flops + router_flops, router_flops,
                                      token_fraction, unit_fraction))
        return y.view(B, T, C)

    def _one_token(self, x: torch.Tensor, capacity: float, expert_capacity: float, dense: int) -> torch.Tensor:
        """Decoding one token (batch 1) with token routing: one score and one host read decide whether the MLP (or
        the token's experts) runs on `x` as it is or not at all, without the gather / scatter of the batched path.
        x: (1, 1, C)."""
        st = self.state
        selected, expert_logits = self.one_token_choice(x, capacity, "mlp_experts_active", self.expert_router,
                                                        expert_capacity)
        router_flops = self.token_router.flops(1) if st.method == "learned" else 0
        if not selected:  # skipped: no weight of this MLP is read (the stand-in's, if any)
            st.stats.append(SubLayerStats(self.layer_idx, "mlp", dense, router_flops + self.skip_flops(1), router_flops,
                                          0.0, 1.0))
            return self.skipped_output(x)
        if expert_capacity >= 1.0:
            st.stats.append(SubLayerStats(self.layer_idx, "mlp", dense, dense + router_flops, router_flops, 1.0, 1.0))
            return self.base_layer(x)
        xf = x.view(1, -1)  # (1, 1, C) -> (1, C)
        y, flops, unit_fraction = self._run_experts(xf, expert_capacity, self._flat_positions(1, 1, x.device),
                                                    expert_logits)
        y = self.finish(y, xf, self.weights().norm)
        router_flops += self.unit_router_flops("mlp_experts_active", self.expert_router, 1)
        st.stats.append(SubLayerStats(self.layer_idx, "mlp", dense, flops + router_flops, router_flops, 1.0,
                                      unit_fraction))
        return y.view_as(x)

    def _flat_positions(self, B: int, T: int, device) -> torch.Tensor:
        """(B*T,) each token's place among its row's real tokens, what expert routing keys on; once per call."""
        st = self.state
        return st.per_call(("real_positions", B, T, device), lambda: st.real_positions(
            st.current_positions(T, device).expand(B, T)).reshape(B * T))

    def weights(self):
        """The MLP's weights (`ArchSpec.mlp_weights`), looked up once per model call (see
        `ElasticAttention.weights`)."""
        return self.state.per_call(("mlp_weights", self.layer_idx), lambda: self.spec.mlp_weights(self.base_layer))

    def output_norm(self) -> nn.Module | None:
        return self.weights().norm

    def _skip_every_token(self, x: torch.Tensor, dense: int) -> torch.Tensor:
        """The sub-layer skipped for every token (allocated nothing, or dropped by the static baseline)."""
        B, T, _ = x.shape
        self.state.stats.append(SubLayerStats(self.layer_idx, "mlp", dense, self.skip_flops(B * T), 0, 0.0, 0.0))
        return self.skipped_output(x)

    def _teacher_with_targets(self, x: torch.Tensor, dense: int) -> torch.Tensor:
        """Teacher pass of training: run the dense MLP, measure what each token (and each expert) adds to the
        residual stream, and turn that into the routers' supervised targets (their gradient flows even though the
        teacher runs without grad)."""
        st = self.state
        B, T, C = x.shape
        exp_cap = st.budget_capacity("mlp_experts_active", self.layer_idx) if self.expert_router is not None else 1.0
        st.stats.append(SubLayerStats(self.layer_idx, "mlp", dense, dense))
        if exp_cap < 1.0 or (st.importance_log is not None and self.expert_router is not None):
            # expert outputs, one by one, summed: the dense MLP and each expert's importance
            xf = x.reshape(B * T, C)
            per_expert = self._expert_outputs(xf)  # (E, N, C)
            y = per_expert.sum(0)
            w = self.weights()
            if w.down_b is not None:
                y = y + w.down_b
            y = self.finish(y, xf, w.norm)
            importance = per_expert.norm(dim=-1).T  # (N, E)
            if st.importance_log is not None:
                st.importance_log[id(self.expert_router)].append(importance.mean(0))
            else:
                st.add_target_loss("expert_rank", self.expert_router, xf.detach(), importance.detach(), exp_cap)
            y = y.view(B, T, C)
        else:
            y = self.base_layer(x)
        # what skipping would remove: the output, less what a skipped token gets (x after a post-LN, the stand-in)
        return self.teach_token_router(x, y, y - self.skipped_output(x))

    def _expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's output for every token (no down-projection bias). x: (N, C) -> (E, N, C)."""
        self.align_weights()
        w = self.weights()
        h = self.hidden_activations(x)  # (N, I)
        return torch.stack([F.linear(h[:, self.expert_slice(e)], w.down_w[:, self.expert_slice(e)])
                            for e in range(self.expert_router.n_experts)])

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the residual stream, before any post-LN. x: (N, C) -> (N, C)."""
        w = self.weights()
        return F.linear(self.hidden_activations(x), w.down_w, w.down_b)

    def hidden_activations(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's hidden units before the down projection. x: (N, C) -> (N, I)."""
        w = self.weights()
        h = F.linear(x, w.up_w, w.up_b)  # (N, I)
        return w.act(F.linear(x, w.gate_w, w.gate_b)) * h if w.gate_w is not None else w.act(h)

    def _run_experts(self, x: torch.Tensor, capacity: float, positions: torch.Tensor,
                     logits: list[float] | None = None) -> tuple[torch.Tensor, int, float]:
        """Dispatch each token to its chosen experts only; what they add (with the down bias), before any post-LN.
        x: (n, C), positions: (n,); logits: one token's expert logits already on the host (see `_one_token`)
        -> (n, C)."""
        C, I = self.dims["C"], self.dims["I"]
        w = self.weights()
        E = self.expert_router.n_experts
        width = I // E
        n = x.shape[0]
        if n == 0:
            return x.new_zeros(0, C), 0, 1.0
        st = self.state
        self.align_weights()
        one_token = n == 1 and not torch.is_grad_enabled()  # decoding one token: its experts' rows, in runs
        pinned = st.pinned_scores("mlp_experts_active", self.layer_idx)  # (E,) the same experts for every token
        if one_token and not st.topk:  # its experts decided on the host, no selection tensors
            only = st.batch_size == 1 and st.positions is not None and st.positions.numel() == 1  # the call's token
            position = st.per_call(("one_token_position",), lambda: int(positions)) if only else int(positions)
            if pinned is not None and logits is None:  # a pinned unit: its scores, already on the host
                logits = st.pinned_host_scores("mlp_experts_active", self.layer_idx)
            experts = self.expert_router.one_token_experts(x, capacity, position, method=st.method,
                                                           generator=st.generator, layer=self.layer_idx,
                                                           logits=logits, pinned=pinned)
        elif pinned is not None and not st.topk and not torch.is_grad_enabled():
            return self._pinned_experts(x, w, capacity, positions)
        else:
            sel = self.expert_router(x, capacity, with_aux=st.topk, method=st.method, generator=st.generator,
                                     positions=positions, layer=self.layer_idx, pinned=pinned)
            if sel.aux_loss is not None:
                st.aux_losses["expert_balance"].append(sel.aux_loss)
            experts = sorted(e for e in sel.chosen[0].tolist() if e >= 0) if one_token else None
        if one_token:
            out, flops = self._expert_set(x, w, experts)
            if w.down_b is not None:
                out = out + w.down_b
            return out, flops, len(experts) / E
        token_idx, slot, counts = dispatch_by_expert(sel.chosen, E)
        out = x.new_zeros(n, C)
        flops, begin = 0, 0
        for e, count in enumerate(counts):  # loop over experts (a handful), never over tokens
            if count == 0:
                continue
            t, k = token_idx[begin:begin + count], slot[begin:begin + count]  # (n_e,) tokens that chose e, slot
            begin += count
            s = self.expert_slice(e)  # contiguous rows of the (permuted) weights
            xe = x.index_select(0, t)  # (n_e, C)
            h = F.linear(xe, w.up_w[s], None if w.up_b is None else w.up_b[s])  # (n_e, I/E)
            if w.gate_w is not None:
                h = w.act(F.linear(xe, w.gate_w[s], None if w.gate_b is None else w.gate_b[s])) * h
            else:
                h = w.act(h)
            ye = F.linear(h, w.down_w[:, s])  # (n_e, C); the down bias is added once below
            if torch.is_grad_enabled():  # the straight-through gate (forward value 1) carries the router's gradient
                ye = ye * sel.gate[t, k][:, None]
            out.index_add_(0, t, ye)
            flops += mlp_flops(count, C, width, w.gate_w is not None)
        if w.down_b is not None:
            out = out + w.down_b
        return out, flops, sum(counts) / (n * E)

    def _pinned_experts(self, x: torch.Tensor, w, capacity: float, positions: torch.Tensor
                        ) -> tuple[torch.Tensor, int, float]:
        """A pinned unit on many tokens: every token runs the same most important experts, as one set of slices of
        the weights with no gather (a prefix of them: see `expert_layout`), and the tokens whose position falls in a
        fractional count run the next expert too (the rule of `fractional_top_units`). x: (n, C), positions: (n,)
        -> what the experts add (with the down bias), FLOPs, the fraction of (token, expert) pairs that ran."""
        n, E = x.shape[0], self.expert_router.n_experts
        scores = self.state.pinned_host_scores("mlp_experts_active", self.layer_idx)
        rank = best_first(scores)  # most important first
        k_lo, frac, k = fractional_count(capacity, E)
        out, flops = self._expert_set(x, w, sorted(rank[:k_lo]))
        pairs = n * k_lo
        if k > k_lo:
            t = (slot_phase(positions.to(torch.float64), self.layer_idx) < frac).nonzero().squeeze(1)  # (n_extra,)
            if t.numel():
                extra, extra_flops = self._expert_set(x.index_select(0, t), w, [rank[k_lo]])
                out.index_add_(0, t, extra)
                flops += extra_flops
                pairs += t.numel()
        if w.down_b is not None:
            out = out + w.down_b
        return out, flops, pairs / (n * E)

    def _expert_set(self, x: torch.Tensor, w, experts: list[int], out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, int]:
        """Tokens x (n, C) through the same `experts`, added to `out` (n, C; None: zeros): experts adjacent in the
        weights are one contiguous slice of them, so each run is a single up / gate / down matmul, reading exactly
        the chosen rows (call `align_weights` first)."""
        C, I = self.dims["C"], self.dims["I"]
        width = I // self.expert_router.n_experts
        blocks = sorted(experts if self.expert_slot is None else (self.expert_slot[e] for e in experts))

        def make() -> list[tuple[torch.Tensor | None, ...]]:  # per run of blocks: views of its rows / columns
            runs = [slice(first * width, (last + 1) * width) for first, last in contiguous_runs(blocks)]
            return [(w.up_w[s], None if w.up_b is None else w.up_b[s], None if w.gate_w is None else w.gate_w[s],
                     None if w.gate_b is None else w.gate_b[s], w.down_w[:, s]) for s in runs]

        flops = 0
        for up_w, up_b, gate_w, gate_b, down_w in views_per_weights(self, (w.up_w, w.down_w), tuple(blocks), make):
            h = F.linear(x, up_w, up_b)  # (n, run width): the neurons of one run of adjacent experts
            h = w.act(F.linear(x, gate_w, gate_b)) * h if gate_w is not None else w.act(h)
            y = F.linear(h, down_w)  # (n, C)
            out = y if out is None else out + y
            flops += mlp_flops(x.shape[0], C, up_w.shape[0], gate_w is not None)
        return (x.new_zeros(x.shape[0], C) if out is None else out), flops


def expert_layout(order: torch.Tensor | None, scores: list[float] | None, n_experts: int, hidden: int, device
                  ) -> tuple[torch.Tensor | None, list[int] | None]:
    """The hidden-neuron order an expert-routed MLP's weights hold, and where each expert's block sits in it.
    order: (I,) the clustered split's neuron order (None: contiguous experts); scores: the importances of a unit
    the allocation pinned (None: not pinned). A pinned unit's blocks are sorted by importance, most important
    first, so every set it runs (the top k experts, at any capacity) is one contiguous slice: one matmul per
    projection, as in a dense MLP of that width. Only the storage order changes, never the function.
    -> ((I,) original neuron indices or None for the original order, expert -> block position or None)."""
    if scores is None:
        return order, None
    rank = best_first(scores)  # the block order: experts by importance
    base = order if order is not None else torch.arange(hidden, device=device)
    blocks = base.view(n_experts, -1)  # (I,) -> (E, I/E) each expert's neurons
    target = blocks[torch.tensor(rank, device=blocks.device)].reshape(-1)  # (E, I/E) -> (I,)
    slot = [0] * n_experts
    for position, e in enumerate(rank):
        slot[e] = position
    return target, slot


def contiguous_runs(sorted_ids: list[int]) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6] -> [(0, 2), (5, 6)]: maximal runs of consecutive ids, as (first, last)."""
    runs: list[tuple[int, int]] = []
    for i in sorted_ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def dispatch_by_expert(chosen: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Group a router's choices by expert with one sort (and one read of the counts on the host, instead of one
    `nonzero` per expert). chosen: (n, k) expert per token and slot, -1 unused -> token index (u,), slot (u,), both
    ordered by expert (tokens in order within one), and the number of entries of each expert (E ints)."""
    k = chosen.shape[1]
    flat = chosen.flatten()  # (n*k,)
    used = (flat >= 0).nonzero().squeeze(1)  # (u,) entries that run an expert
    order = used[torch.argsort(flat[used], stable=True)]  # (u,) by expert, then by token
    counts = torch.bincount(flat[used], minlength=n_experts).tolist()
    return order // k, order % k, counts
