"""Fitting an ElasticModel to data, once, after its routers exist: the token routers' inference thresholds
(`calibrate`), the per-layer allocation of a global budget (`fit_allocation`), the co-activation expert split
(`split_experts`), what tokens that skip a routed MLP or attention get (`fit_stand_ins`) and what the static-pruning
baseline drops (`fit_static`).

Each function takes the `ElasticModel` and changes its routing state or router buffers in place; the model's
methods of the same names call them (`em.calibrate(data)`, ...). None of them trains anything.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch

from .allocation import LEVELS, PINNABLE, check_latency_table, check_levels, fit_path, move_time_saved
from .block_replay import BlockReplay
from .data.batches import as_batches
from .config import TOKEN_COMPONENTS
from .errors import ConfigError, DataError, ElastiformerError
from .layers import ElasticAttention, ElasticMLP  # (before .arch: importing arch first closes an import circle)
from .arch import get_dotted
from .layers.state import ALLOCATED_METHODS
from .routers import ExpertRouter, HeadRouter, TokenRouter
from .routers.token import calibration_thresholds


@torch.no_grad()
def calibrate(em, data: Iterable[dict[str, Any]] | torch.Tensor, max_batches: int | None = 2,
              n_budgets: int = 12, method: str = "learned", progress: bool = False) -> None:
    """Fit the token routers' inference thresholds on `data`, so `set_budget` takes effect at once for any budget.

    The data runs with routing on at several points of the allocation path: the fewest at which every token router
    runs at each capacity it holds on the path (`Allocation.points_covering`), every component (heads and experts
    too) as it will run there. Each routed layer keeps the tokens whose score reaches the quantile that leaves its
    capacity of the batch, and logs the quantiles of every capacity of a fixed grid (`CALIBRATION_CAPACITIES`); each
    grid capacity's threshold comes from the forwards where the layer ran nearest to it (averaged over batches) and
    is interpolated at inference. Without an allocation, and for layers the path only ever runs dense or skips,
    every layer runs at the same capacity, at `n_budgets` capacities spread over the usable range. Fitting with
    routing on matters: when earlier layers skip tokens, later layers' scores shift, and thresholds fitted on the
    dense model, or with every layer at a uniform capacity, spend visibly more or less than the budget (on SmolLM2
    with all four components routed, thresholds from uniform capacities kept 96-100% of the tokens of layers the
    path runs at 75%). Cost: (path points, or `n_budgets`) x `max_batches` forwards.
    `method="norm"` / `"norm_allocated"` fit the thresholds of those training-free baselines instead (not saved
    with the routers). Non-causal models (encoders) route by top-k at inference and need no thresholds.
    """
    token_routers = [r for _, r in em.stack_routers() if isinstance(r, TokenRouter)]
    components = [k for k in TOKEN_COMPONENTS if k in em.state.budget]
    if not token_routers or not components or not em.is_causal:  # encoders route by top-k: nothing to fit
        return
    batches = collect_batches(em, data, max_batches, "calibrate()")
    st = em.state
    lo = max(st.min_budget(k) for k in components)
    grid = torch.linspace(max(lo + 0.02, 0.05), 0.99, n_budgets).tolist()
    saved = (dict(st.budget), st.method, em.training)
    em.eval()
    em.calibrating = True
    logs: dict[int, list[tuple[float, torch.Tensor]]] = {id(r): [] for r in token_routers}

    from tqdm.auto import tqdm

    bar = tqdm(desc="calibrating thresholds", unit="fwd", disable=not progress)

    def run(states, into) -> None:  # each state: a function that sets every layer's capacity; log `into` routers
        for set_state in states:
            set_state()
            for r in token_routers:  # (every router selects by this batch's quantile while calibrating)
                r.calibration_log = []
            for batch in batches:
                em.base_model(**batch)
                bar.update()
            for r in into:  # (nothing logged where a layer ran dense or skipped every token)
                logs[id(r)] += r.calibration_log

    def after(k: int):  # the allocation after its first k moves, every component (heads and experts too)
        return lambda: st.budget.update({c: alloc.component_fraction_after(c, k) for c in alloc.components})

    def uniform(b: float):
        return lambda: setattr(st, "capacity_override", {
            k: [b if i not in st.dense_layers[k] else 1.0 for i in range(st.n_layers)] for k in st.budget})

    st.method = method
    alloc = st.allocation
    try:
        if alloc is not None and method in ALLOCATED_METHODS:
            run([after(k) for k in alloc.points_covering(components)], token_routers)
        need = [r for r in token_routers if not logs[id(r)]]
        if need:  # no allocation (uniform capacities), or layers its path never routes partially
            run([uniform(b) for b in grid], need)
    finally:
        bar.close()
        em.calibrating = False
        st.capacity_override = None
        st.budget, st.method = saved[0], saved[1]
        for r in token_routers:
            r.calibration_log = None
        em.train(saved[2])
    if not all(torch.isfinite(t).all() for r in token_routers for _, t in logs[id(r)]):
        raise ElastiformerError("calibrate() got non-finite router scores (NaN / inf in the model's hidden "
                                "states or the routers): check the data and the router weights")
    if any(not logs[id(r)] for r in token_routers):
        raise ElastiformerError("calibrate() saw no tokens in a routed layer: pass longer sequences")
    for r in token_routers:
        r.set_calibration(method, *calibration_thresholds(logs[id(r)]))

def collect_batches(em, data, max_batches: int | None, what: str) -> list[dict[str, torch.Tensor]]:
    batches = [b for _, b in zip(range(max_batches or 10**9), as_batches(data))]
    if not batches:
        raise ElastiformerError(f"{what} got no data: pass an iterable of dicts holding input_ids")
    device = next(em.base_model.parameters()).device
    return [{k: v.to(device) for k, v in b.items()} for b in batches]

@torch.no_grad()
def fit_allocation(em, data: Iterable[dict[str, Any]] | torch.Tensor, max_batches: int | None = 1, *,
                   min_budget: float = 0.5, levels: tuple[float, ...] = LEVELS, lookahead: int = 2,
                   max_lookahead: int = 8, progress: bool = True, replay: bool = True, pin: bool = True,
                   latency: dict[str, Any] | None = None) -> None:
    """Fit where the budget is spent: the per-layer allocation path (see `elastiformer.allocation`).

    Measured on `data` (calibration text, never the evaluation text) with the learned routers choosing by
    top-k inside each layer: first each routed (component, layer) alone at each of `levels`, then greedily,
    move by move, the cheapest next reduction per FLOP saved with routing on (each move re-measures `lookahead` to
    `max_lookahead` candidates), until the routed sub-layers run `min_budget` of their dense FLOPs (below it,
    capacities shrink in proportion). Cost: about (units x levels + moves x lookahead..max_lookahead) forwards of
    `data`, less the blocks before each candidate's changed layer, which are replayed from the current
    allocation's forward (`block_replay`; `replay=False` runs every block, for the same path). Stored with the
    routers by `save_pretrained`; call `calibrate` afterwards (`train_routers` does both when it ends).

    With `pin` (the default), each unit of heads / experts may instead be lowered *pinned*: the same heads / experts
    for every token, those with the largest mean output norm on `data` (no router runs for it); the path measures
    both variants and keeps the cheaper.

    With `latency` (a unit latency table, `unit_latency.measure_unit_latency`), moves are ranked by loss per
    decoding time saved on the machine the table was measured on, and moves that save no time come after every move
    that does (`allocation.fit_path`); the table is stored with the allocation."""
    from tqdm.auto import tqdm

    if not 0.0 < min_budget < 1.0:
        raise ConfigError(f"min_budget={min_budget!r}: pass the fraction of routed FLOPs where the path ends, "
                          "e.g. 0.5")
    check_levels(levels)
    components = em.elastic_config.components()
    if latency is not None:
        check_latency_table(latency, components)
    batches = collect_batches(em, data, max_batches, "fit_allocation()")
    st = em.state
    sublayers = {"attn" if k.startswith("attn") else "mlp" for k in components}
    units = [(k, i) for k in components for i in range(st.n_layers) if i not in st.dense_layers[k]]
    saved = (dict(st.budget), st.method, em.training)
    em.eval()
    try:
        with em.disable_routers():
            teachers = [em.distill_target(b) for b in batches]
        pinnable = [k for k in PINNABLE if k in components] if pin else []
        scores = unit_scores(em, batches) if pinnable else {}  # {(component, layer): (U,) mean output norms}
        st.method, st.topk = "learned", True  # top-k inside each layer: thresholds are fitted afterwards
        st.budget = {k: 0.5 for k in components}  # any value: the override sets every capacity
        bar = tqdm(desc="fitting the allocation", unit="fwd", disable=not progress)
        blocks = BlockReplay(em.spec.layers(em.base_model), len(batches))

        def run(caps: dict[str, list[float]], pins: frozenset = frozenset(), record: bool = False
                ) -> tuple[float, int]:
            """-> (distillation loss, executed FLOPs of the routed sub-layers) with these capacities and these
            (component, layer) units pinned. The blocks before the first layer whose capacities differ from the
            reference's are replayed (a unit is pinned only by a move that changes its capacity); `record` makes
            `caps` the reference."""
            st.capacity_override = caps
            st.pin_override = {}
            for c, i in pins:
                st.pin_override.setdefault(c, {})[i] = scores[(c, i)]
            start = blocks.first_change(caps) if replay else 0
            cost, executed = 0.0, 0
            for n, (t, b) in enumerate(zip(teachers, batches)):
                with blocks.replaying(n, start, record):
                    cost += float(em.distill_distance(t, em.distill_target(b), b)) / len(batches)
                per_block: dict[int, int] = defaultdict(int)
                for s in st.stats:
                    if s.sublayer in sublayers:
                        per_block[s.layer] += s.executed_flops
                executed += blocks.prefix_flops(n, start) + sum(per_block.values())
                if record:
                    blocks.record_flops(n, start, per_block)
            if record:
                blocks.reference = {k: list(v) for k, v in caps.items()}
            bar.update()
            return cost, executed

        # what the routed sub-layers execute at full capacity: their dense FLOPs, less any padding (a padded
        # encoder batch skips it under routing), so the path's FLOPs ratio starts at 1 and a joint budget is a
        # fraction of the compute the real tokens need
        dense = {k: [1.0] * st.n_layers for k in components}
        dense_cost, full = run(dense, record=replay)
        full = max(1, full)

        def measure(caps: dict[str, list[float]], pins: frozenset) -> tuple[float, float]:
            # fit_path starts from the dense capacities: measured above already
            cost, executed = (dense_cost, full) if caps == dense else run(caps, pins)
            return cost, executed / full

        fixed = {k: sorted(st.dense_layers[k]) for k in components}
        alloc = fit_path(measure, units, st.n_layers, components, min_flops=min_budget, levels=levels,
                         lookahead=lookahead, max_lookahead=max_lookahead, progress=bar.set_postfix_str,
                         fixed=fixed, on_move=(lambda caps, pins: run(caps, pins, record=True)) if replay else None,
                         pinnable=pinnable,
                         time_saved=None if latency is None else (
                             lambda c, pinned, start, end: move_time_saved(latency, c, pinned, start, end)))
        bar.close()
        alloc.latency = latency
        for c, i in sorted(alloc.pinned_units()):
            alloc.pinned.setdefault(c, {})[i] = [float(v) for v in scores[(c, i)]]
    finally:
        st.capacity_override = st.pin_override = None
        st.budget, st.method = saved[0], saved[1]
        em.train(saved[2])
    alloc.tokens = sum(int(b["input_ids"].numel()) for b in batches if "input_ids" in b)
    st.set_allocation(alloc)


def unit_routed(em) -> list[ElasticAttention | ElasticMLP]:
    """The sub-layers of this layer stack that route heads or experts."""
    st = em.state
    return [m for m in em.base_model.modules() if getattr(m, "state", None) is st and (
        isinstance(m, ElasticAttention) and m.head_router is not None
        or isinstance(m, ElasticMLP) and m.expert_router is not None)]


def unit_key(m: ElasticAttention | ElasticMLP) -> tuple[str, int]:
    """The allocation unit of a head- or expert-routed sub-layer: (component, layer)."""
    return ("attn_heads" if isinstance(m, ElasticAttention) else "mlp_experts_active", m.layer_idx)


def unit_router(m: ElasticAttention | ElasticMLP) -> HeadRouter | ExpertRouter:
    return m.head_router if isinstance(m, ElasticAttention) else m.expert_router


@torch.no_grad()
def unit_scores(em, batches: list[dict[str, torch.Tensor]]) -> dict[tuple[str, int], torch.Tensor]:
    """How much each head (or KV group) and expert matters, once for every token: its mean output norm on the base
    model over `batches`. -> {(component, layer): (U,)} for every head / expert-routed sub-layer. The static
    baseline drops the lowest; a pinned unit of the allocation keeps the highest."""
    st = em.state
    with em.disable_routers(), em.teacher_targets():  # importances of heads / experts on the base model
        st.importance_log = defaultdict(list)
        try:
            for b in batches:
                em.base_model(**b)
            log = st.importance_log
        finally:
            st.importance_log = None
    return {unit_key(m): torch.stack(log[id(unit_router(m))]).mean(0) for m in unit_routed(em)}


@torch.no_grad()
def split_experts(em, data: Iterable[dict[str, Any]] | torch.Tensor, max_batches: int | None = 2,
                  seed: int = 0) -> None:
    """For `expert_split="cluster"`: group each routed MLP's hidden neurons into experts by co-activation on
    `data` (balanced k-means; see layers/expert_split.py). Fit it before training the expert routers:
    `train_routers` does so when the split has not been fitted. The order is saved with the routers."""
    from .layers.expert_split import cluster_neurons

    if em.elastic_config.expert_split != "cluster":
        raise ConfigError("split_experts() needs ElasticConfig(expert_split='cluster'); the contiguous split "
                          "has nothing to fit")
    batches = [b for _, b in zip(range(max_batches or 10**9), as_batches(data))]
    if not batches:
        raise DataError("split_experts() got no data: pass an iterable of dicts holding input_ids")
    device = next(em.base_model.parameters()).device
    mlps = [m for m in em.base_model.modules() if isinstance(m, ElasticMLP) and m.expert_router is not None]
    acts: dict[int, list[torch.Tensor]] = defaultdict(list)

    def grab(module, args):
        x = args[0]
        mask = em.state.token_valid(x.shape[0], x.shape[1], x.device).flatten()  # padding does not vote
        acts[id(module)].append(module.hidden_activations(x.reshape(-1, x.shape[-1]))[mask].cpu())

    hooks = [m.register_forward_pre_hook(grab) for m in mlps]
    try:
        # in the original neuron order, so a refit finds what a first fit would (k-means starts by index)
        with torch.no_grad(), em.disable_routers(), em.original_weight_order():
            for b in batches:
                em.base_model(**{k: v.to(device) for k, v in b.items()})
    finally:
        for h in hooks:
            h.remove()
    for m in mlps:
        order = cluster_neurons(torch.cat(acts[id(m)]), m.expert_router.n_experts, seed=seed)
        m.expert_router.neuron_order.copy_(order.to(m.expert_router.neuron_order.device))
        m.align_weights()  # permute the MLP's weights once: each expert becomes a contiguous slice


@torch.no_grad()
def fit_stand_ins(em, data: Iterable[dict[str, Any]] | torch.Tensor, max_batches: int | None = 8, *,
                  quantile: float = 0.3) -> None:
    """Fit the stand-in of every token-routed MLP and attention (`layers.stand_in`): a rank-r least-squares estimate
    of the sub-layer's update from its input, on the real tokens of `data` whose update norm is in the lowest
    `quantile` of the layer (per batch): the tokens a router skips, whose updates differ from the average token's
    (the largest updates would dominate a fit on every token, which then misestimates the small ones). The teacher
    runs: one forward per batch, routers off. An attention's update is read at its output projection (before the
    post-LN of a post-LN model)."""
    from .layers.stand_in import RegressionStats

    if not 0.0 < quantile <= 1.0:
        raise ConfigError(f"quantile={quantile!r}: pass the fraction of each layer's tokens (smallest updates) the "
                          "stand-ins are fitted on, e.g. 0.3")
    subs = [m for m in em.base_model.modules()
            if isinstance(m, (ElasticMLP, ElasticAttention)) and m.stand_in is not None]
    if not subs:
        raise ConfigError("fit_stand_ins() found no stand-in: it needs mlp_tokens / attn_tokens routing and "
                          "stand_in_rank / attn_stand_in_rank > 0")
    batches = collect_batches(em, data, max_batches, "fit_stand_ins()")
    stats = {id(m): RegressionStats(em.dims["C"], m.stand_in.down.device) for m in subs}
    inputs: dict[int, torch.Tensor] = {}  # each attention's input, until its output projection has run

    def add(module, x: torch.Tensor, y: torch.Tensor) -> None:  # x, y: (n, C) real tokens, their updates
        norms = y.float().norm(dim=-1)
        low = norms <= torch.quantile(norms, quantile)
        stats[id(module)].add(x[low], y[low])

    def real(module, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (n, C): padding does not count
        valid = module.state.token_valid(x.shape[0], x.shape[1], x.device).flatten()  # (its layer stack's padding)
        return x.reshape(-1, x.shape[-1])[valid]

    def grab_mlp(module, args):
        x = real(module, args[0])
        add(module, x, module.update(x))  # what the MLP adds (before a post-LN)

    def grab_attention_input(module, args, kwargs):
        inputs[id(module)] = args[0] if args else kwargs["hidden_states"]

    def grab_attention_update(owner):
        def hook(proj, args, out):  # the output projection's output: what the attention adds (with its bias)
            x = inputs.pop(id(owner))
            add(owner, real(owner, x), real(owner, out.view(x.shape)))
        return hook

    hooks = []
    for m in subs:
        if isinstance(m, ElasticMLP):
            hooks.append(m.register_forward_pre_hook(grab_mlp))
        else:
            hooks.append(m.register_forward_pre_hook(grab_attention_input, with_kwargs=True))
            hooks.append(get_dotted(m.base_layer, m.spec.o_proj_name).register_forward_hook(grab_attention_update(m)))
    try:
        with em.disable_routers():
            for b in batches:
                em.base_model(**b)
    finally:
        for h in hooks:
            h.remove()
    for m in subs:
        m.stand_in.fit(stats[id(m)])


@torch.no_grad()
def fit_static(em, data: Iterable[dict[str, Any]] | torch.Tensor, max_batches: int | None = 1) -> None:
    """Choose, once, what the "static" pruning baseline drops: for token components, the sub-layers whose
    removal alone changes the output least (KL to the base model on `data`, one forward per routed layer); for
    heads / experts, those with the smallest mean output norm on `data`. Encoders measure the cost of dropping
    a sub-layer as the cosine distance of their pooled embedding (`embed`) instead of the KL of logits."""
    batches = [b for _, b in zip(range(max_batches or 10**9), as_batches(data))]
    if not batches:
        raise ElastiformerError("fit_static() got no data: pass an iterable of dicts holding input_ids")
    device = next(em.base_model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    st = em.state
    saved = (dict(st.budget), st.method, em.training)
    em.eval()
    try:
        with em.disable_routers():
            teachers = [em.distill_target(b) for b in batches]
        st.method = "static"
        for comp in (k for k in TOKEN_COMPONENTS if k in st.budget):
            routed = [i for i in range(st.n_layers) if i not in st.dense_layers[comp]]
            cost = {}
            for layer in routed:  # drop this layer alone: budget of exactly one layer's worth less
                st.static_layer_order[comp] = [layer]
                st.budget = {comp: 1.0 - 1.0 / st.n_layers + 1e-6}
                cost[layer] = sum(float(em.distill_distance(t, em.distill_target(b), b))
                                  for t, b in zip(teachers, batches))
            st.static_layer_order[comp] = sorted(routed, key=cost.get)
        st.budget = saved[0]
        scores = unit_scores(em, batches)
        for m in unit_routed(em):
            unit_router(m).static_importance = scores[unit_key(m)]
    finally:
        st.budget, st.method = saved[0], saved[1]
        st.importance_log = None
        em.train(saved[2])
