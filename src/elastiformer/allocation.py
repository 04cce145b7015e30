"""Spend one global budget where it costs least: a per-layer allocation of capacities, fitted on calibration data.

A *unit* is one routed (component, layer) pair: the MLP tokens of layer 5, the heads of layer 12, ... Its capacity
is the fraction of that unit's work it does: 1 runs it dense, 0 skips it for every token (static pruning of that
sub-layer is the special case where capacities are only 0 or 1). The cost of skipping work differs a hundredfold
between layers (on SmolLM2, skipping 20% of layer 0's MLP tokens costs +1.8 nats, most middle layers +0.01), so a
uniform capacity in every layer is a trap.

The allocation is a *path*: starting from the dense model, a sequence of moves, each lowering one unit's
capacity, chosen greedily by measured cost (distillation loss with routing on) per FLOP saved. Every budget is a
point on the path, so the allocations of all budgets are nested and one artifact serves them all:

- a component's budget (`set_budget(mlp_tokens=0.8)`) is the fraction of that component's routed work done, the
  mean capacity over the layers (the layers of one model have equal FLOPs per unit of capacity). The component's own
  moves, in path order, are applied until its mean capacity reaches the budget; the last one partially, so compute
  falls continuously with the budget;
- a joint budget over every routed component (`set_budget(0.8)` on a model that routes several) is the fraction of
  the routed sub-layers' FLOPs, as measured at each point of the path while it was fitted: it sets how far along
  the path the model goes, hence each component's budget.

A unit of heads or experts is lowered either routed (each token's router chooses its heads / experts) or *pinned*:
the same heads / experts for every token, the ones that matter most on the calibration text (static pruning of
heads / experts, the special case the path may choose per unit). The path measures both and takes whichever costs
less; a unit keeps the variant of its first move at every budget, so allocations stay nested. A pinned unit runs no
router at all.

Costs compound (skipping in one layer makes skipping in the next costlier), so the path is fitted with routing on:
single-unit cost curves measured once give first estimates, and every move is re-measured at the current
allocation before it is taken (lazy greedy, see `fit_allocation`).

FLOPs are not time: with a unit latency table (`unit_latency.py`: what one unit saves per capacity level when
decoding at batch 1 on this machine), the path ranks its moves by cost per *time* saved instead, and moves that save
no time (partial heads, on a CPU) come after every move that does (`fit_path(time_saved=...)`). Budgets stay
fractions of FLOPs; the table is kept with the allocation.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from .errors import ConfigError, RouterFileError

logger = logging.getLogger(__name__)

LEVELS = (0.75, 0.5, 0.25, 0.0)  # capacities a unit may be lowered to, from dense (1.0)
# A sub-layer is dropped whole (capacity 0) through its token component when the layer routes one: its skipped
# tokens then get the stand-in (layers/stand_in.py), while no head / expert left gives them nothing. So heads and
# experts do not go to 0 in a layer whose tokens are routed too (same FLOPs saved, a dearer loss).
DROPPED_BY = {"attn_heads": "attn_tokens", "mlp_experts_active": "mlp_tokens"}
PINNABLE = ("attn_heads", "mlp_experts_active")  # components whose units may be lowered pinned (see below)


@dataclass(frozen=True)
class Move:
    component: str
    layer: int
    start: float  # the unit's capacity before the move
    end: float  # and after
    pinned: bool = False  # the unit runs the same heads / experts for every token (see the module docstring)


@dataclass
class Allocation:
    """A fitted path of moves (see the module docstring) and what was measured along it."""

    n_layers: int
    components: tuple[str, ...]
    moves: list[Move] = field(default_factory=list)
    # executed FLOPs of the routed sub-layers (routers included) / what they execute at full capacity (their dense
    # FLOPs, less any padding skipped), measured after 0..len(moves) moves
    flops: list[float] = field(default_factory=lambda: [1.0])
    cost: list[float] = field(default_factory=lambda: [0.0])  # distillation loss measured after 0..len(moves) moves
    fixed: dict[str, list[int]] = field(default_factory=dict)  # units that never move (dense layers)
    tokens: int = 0  # calibration tokens the path was measured on
    # {component: {layer: per-unit importance}}: the scores a pinned unit chooses its heads / experts by, the same
    # for every token (mean output norm of each head / expert on the calibration text)
    pinned: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    # the unit latency table the path's moves were ranked by (loss per decoding time saved, see `fit_path`), or
    # None: ranked by loss per FLOP saved
    latency: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lookups
    def component_fraction_after(self, component: str, k: int) -> float:
        """The component's budget (mean capacity) after the first `k` moves of the path."""
        return 1.0 - sum(m.start - m.end for m in self.moves[:k] if m.component == component) / self.n_layers

    def capacities(self, component: str, budget: float) -> list[float]:
        """Per-layer capacities that spend `budget` (mean capacity) of `component`. Walks the component's moves in
        path order, the last one partially; below the path's end, the movable units shrink in proportion."""
        L = self.n_layers
        caps = [1.0] * L
        frac = 1.0
        for m in self.moves:
            if m.component != component:
                continue
            step = (m.start - m.end) / L
            if frac - step >= budget - 1e-12:
                caps[m.layer] = m.end
                frac -= step
                continue
            caps[m.layer] = m.start - (frac - budget) * L  # partial move: lands exactly on the budget
            return caps
        if frac > budget + 1e-9:  # past the fitted path: shrink what may move, in proportion
            fixed = set(self.fixed.get(component, ()))
            movable = [i for i in range(L) if i not in fixed]
            have = sum(caps[i] for i in movable)
            want = max(0.0, budget * L - (L - len(movable)))
            scale = want / have if have > 0 else 0.0
            for i in movable:
                caps[i] *= scale
        return caps

    def component_budgets(self, flops: float) -> dict[str, float]:
        """Each component's budget at the point of the path where the routed FLOPs ratio is `flops`."""
        f = self.flops
        if flops >= f[0]:
            return {c: 1.0 for c in self.components}
        for k in range(len(self.moves)):
            if f[k + 1] <= flops:  # the move k lands at or below the target: take part of it
                t = (f[k] - flops) / (f[k] - f[k + 1]) if f[k] > f[k + 1] else 1.0
                out = {c: self.component_fraction_after(c, k) for c in self.components}
                m = self.moves[k]
                out[m.component] -= t * (m.start - m.end) / self.n_layers
                return out
        # past the fitted path: every component's budget shrinks in proportion to the FLOPs still to save
        end = {c: self.component_fraction_after(c, len(self.moves)) for c in self.components}
        scale = flops / f[-1] if f[-1] > 0 else 0.0
        return {c: v * scale for c, v in end.items()}

    def points_covering(self, components: Sequence[str]) -> list[int]:
        """The fewest points of the path (as numbers of moves made) at which every unit of `components` is seen at
        each capacity strictly between 0 and 1 that it holds on the path: where calibrate() runs the data, so each
        router's threshold for a capacity comes from the scores it sees when it runs at that capacity. A unit holds
        a level from the move that sets it to the unit's next move; choosing the points is interval stabbing
        (greedy by right end, which is optimal)."""
        held: list[tuple[int, int]] = []  # (first point, last point) at which a unit holds a partial level
        since: dict[tuple[str, int], int | None] = {}
        for j, m in enumerate(self.moves):
            if m.component not in components:
                continue
            unit = (m.component, m.layer)
            if since.get(unit) is not None:
                held.append((since[unit], j))  # after moves 0..j-1 the unit still holds it; move j changes it
            since[unit] = j + 1 if 0.0 < m.end < 1.0 else None
        held += [(k, len(self.moves)) for k in since.values() if k is not None]
        points: list[int] = []
        for first, last in sorted(held, key=lambda t: t[1]):
            if not points or first > points[-1]:
                points.append(last)
        return points

    def pinned_units(self) -> set[tuple[str, int]]:
        """(component, layer) of the units the path pinned."""
        return {(m.component, m.layer) for m in self.moves if m.pinned}

    def pinned_layers(self) -> dict[str, list[int]]:
        """{component: sorted layers} of the pinned units (what `info` and the benches report)."""
        out: dict[str, list[int]] = {}
        for c, i in sorted(self.pinned_units()):
            out.setdefault(c, []).append(i)
        return out

    @property
    def min_flops(self) -> float:
        return self.flops[-1]

    def table(self, budgets: Sequence[float]) -> dict[str, list[list[float]]]:
        """{component: [per-layer capacities at each budget]}: the heat map of the allocation."""
        return {c: [self.capacities(c, b) for b in budgets] for c in self.components}

    # ------------------------------------------------------------------ artifacts
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["components"] = list(self.components)
        d["moves"] = [[m.component, m.layer, m.start, m.end] + ([True] if m.pinned else []) for m in self.moves]
        d["pinned"] = {c: {str(i): list(v) for i, v in per.items()} for c, per in self.pinned.items()}
        return d

    @classmethod
    def from_dict(cls, d: Any, n_layers: int, components: Sequence[str], where: str = "the router folder"
                  ) -> "Allocation":
        """Read a saved allocation; refuse one that does not fit this model (other layer count or components)."""
        try:
            moves = [Move(str(c), int(i), float(s), float(e), bool(p[0]) if p else False)
                     for c, i, s, e, *p in d["moves"]]
            alloc = cls(n_layers=int(d["n_layers"]), components=tuple(d["components"]), moves=moves,
                        flops=[float(v) for v in d["flops"]], cost=[float(v) for v in d["cost"]],
                        fixed={str(k): [int(i) for i in v] for k, v in d.get("fixed", {}).items()},
                        tokens=int(d.get("tokens", 0)),
                        pinned={str(c): {int(i): [float(x) for x in v] for i, v in per.items()}
                                for c, per in d.get("pinned", {}).items()},
                        latency=d.get("latency"))
            if alloc.latency is not None:
                check_latency_table(alloc.latency, alloc.components)
        except (KeyError, TypeError, ValueError, ConfigError) as err:
            raise RouterFileError(f"the allocation in {where} is malformed ({err!r}): fit it again with "
                                  "em.fit_allocation(data), or train the routers again") from err
        bad = [m for m in alloc.moves if m.component not in components or not 0 <= m.layer < n_layers
               or not 0.0 <= m.end < m.start <= 1.0]
        unscored = alloc.pinned_units() - {(c, i) for c, per in alloc.pinned.items() for i in per}
        if alloc.n_layers != n_layers or set(alloc.components) - set(components) or bad or unscored \
                or len(alloc.flops) != len(alloc.moves) + 1 or len(alloc.cost) != len(alloc.moves) + 1:
            raise RouterFileError(f"the allocation in {where} does not fit this model ({n_layers} layers, routed "
                                  f"{', '.join(components)}): fit it again with em.fit_allocation(data)")
        return alloc


def check_levels(levels: Sequence[float]) -> None:
    """Refuse capacity levels a unit could not be lowered to (each in [0, 1); at least one)."""
    if not levels or any(not 0.0 <= v < 1.0 for v in levels):
        raise ConfigError(f"levels={levels!r}: pass capacities in [0, 1) a unit may be lowered to")


# ---------------------------------------------------------------------- latency
def check_latency_table(table: Any, components: Sequence[str]) -> None:
    """Refuse a unit latency table (`unit_latency.measure_unit_latency`) that is malformed or lacks a component."""
    saved = table.get("saved") if isinstance(table, dict) else None
    if not isinstance(saved, dict):
        raise ConfigError("the latency table has no 'saved' entry: measure it with em.measure_unit_latency(data)")
    missing = [c for c in components if c not in saved]
    if missing:
        raise ConfigError(f"the latency table has no entry for {', '.join(missing)} (it holds "
                          f"{', '.join(saved) or 'none'}): measure it again with em.measure_unit_latency(data)")
    for c in components:
        for variant, per in (saved[c].items() if isinstance(saved[c], dict) else [("?", None)]):
            try:
                ok = variant in ("routed", "pinned") and isinstance(per, dict) and per and all(
                    0.0 <= float(k) < 1.0 and isinstance(v, (int, float)) for k, v in per.items())
            except (TypeError, ValueError):  # a level that is not a number
                ok = False
            if not ok:
                raise ConfigError(f"the latency table's {c}/{variant} entry is malformed: measure it again with "
                                  "em.measure_unit_latency(data)")


def level_time_saved(table: dict[str, Any], component: str, pinned: bool, level: float) -> float:
    """Fraction of the reference decoding time one unit of `component` saves at capacity `level` (0 at 1.0),
    linear between the levels measured. A pinned unit at 0 runs nothing, as a routed one does."""
    if level >= 1.0:
        return 0.0
    per = table["saved"][component]
    points = {float(k): float(v) for k, v in per.get("routed", {}).items()}
    if pinned and level > 0.0:
        points = {float(k): float(v) for k, v in per.get("pinned", {}).items()} or points
    points[1.0] = 0.0
    xs = sorted(points)
    if level <= xs[0]:
        return points[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if lo <= level <= hi:
            t = (level - lo) / (hi - lo)
            return points[lo] + t * (points[hi] - points[lo])
    return 0.0


def move_time_saved(table: dict[str, Any], component: str, pinned: bool, start: float, end: float) -> float:
    """Fraction of the reference decoding time a move of one unit from capacity `start` to `end` saves (negative:
    it costs time)."""
    return level_time_saved(table, component, pinned, end) - level_time_saved(table, component, pinned, start)


# ---------------------------------------------------------------------- fitting
# (capacities, pinned units) -> (cost, routed FLOPs ratio)
Measure = Callable[[dict[str, list[float]], frozenset], tuple[float, float]]  # pins: frozenset of (component, layer)
Candidate = tuple[str, int, bool]  # (component, layer, pinned): a unit, lowered routed or pinned


def fit_path(measure: Measure, units: Sequence[tuple[str, int]], n_layers: int, components: Sequence[str],
             min_flops: float = 0.4, levels: Sequence[float] = LEVELS, lookahead: int = 3, max_lookahead: int = 8,
             progress: Callable[[str], None] | None = None, fixed: dict[str, list[int]] | None = None,
             on_move: Callable[[dict[str, list[float]], frozenset], None] | None = None,
             pinnable: Sequence[str] = (),
             time_saved: Callable[[str, bool, float, float], float] | None = None) -> Allocation:
    """Fit an allocation path by lazy greedy on measured costs.

    `measure(capacities, pins)` runs the model on calibration data with `capacities` ({component: [per layer]}),
    the units in `pins` pinned, and returns (distillation loss, executed / full-capacity FLOPs of the routed
    sub-layers). The units of `pinnable` components (heads / experts) are candidates twice, routed and pinned; a
    unit's first move fixes which, for the rest of the path. Phase 1 measures every candidate alone at every level:
    single-unit cost curves, the first estimates. Phase 2 repeats, until those FLOPs fall to
    `min_flops`: rank the candidate moves (each unit to any lower level; not heads / experts to 0 where the layer's
    tokens are routed too, see `DROPPED_BY`) by estimated cost per FLOP saved,
    re-measure the `lookahead` best at the current allocation, and go on down the ranking (up to `max_lookahead`)
    while the next candidate's estimate is below the best measured cost per FLOP (lazy greedy: a move whose estimate
    is already worse than a measured one cannot win); take the best measured. Each re-measure updates its unit's
    estimates (costs compound: what a move costs grows as others are made), and the estimates of units of the same
    component that were not re-measured recently are scaled by that component's typical ratio of measured to
    estimated cost (components compound differently; with one shared ratio and the better of two candidates taken,
    the SmolLM2 combined path dropped whole MLPs through their experts at 3.3-6.5 nats per unit of FLOPs while the
    MLP-token moves around them cost 1.8-4.3). `on_move(capacities, pins)` is told the allocation after each move
    taken (fit_allocation then replays its leading blocks for the next candidates, see `block_replay`).

    `time_saved(component, pinned, start, end)`: the fraction of decoding time a move of one unit saves (from a unit
    latency table, `move_time_saved`). With it, moves are ranked by cost per time saved, and a move that saves no
    time (a partial set of heads at batch 1 on a CPU) ranks after every move that does, by cost per FLOP: the path
    spends the FLOPs budget where it buys time first.
    """
    note = progress or (lambda s: None)
    dense = {c: [1.0] * n_layers for c in components}
    base_cost, base_flops = measure(dense, frozenset())
    alloc = Allocation(n_layers, tuple(components), flops=[base_flops], cost=[base_cost], fixed=fixed or {})
    candidates: list[Candidate] = [(c, i, False) for c, i in units] + [(c, i, True) for c, i in units
                                                                        if c in pinnable]
    # ---- phase 1: each candidate alone, at every level ----
    curve: dict[Candidate, dict[float, tuple[float, float]]] = {}
    unit_set = set(units)
    for n, u in enumerate(candidates):
        c, i, pin = u
        curve[u] = {1.0: (0.0, 0.0)}
        for lev in levels:
            if lev == 0.0 and (DROPPED_BY.get(c), i) in unit_set:
                continue  # dropped whole through the layer's token component instead
            if lev == 0.0 and pin:  # nothing runs either way: the routed unit's measurement
                curve[u][lev] = curve[(c, i, False)][lev]
                continue
            caps = {k: list(v) for k, v in dense.items()}
            caps[c][i] = lev
            cost, flops = measure(caps, frozenset({(c, i)} if pin else ()))
            curve[u][lev] = (cost - base_cost, base_flops - flops)  # (added cost, FLOPs saved)
        note(f"cost curves: {n + 1}/{len(candidates)} units")
    # ---- phase 2: lazy greedy with routing on ----
    caps = {k: list(v) for k, v in dense.items()}
    pins: set[tuple[str, int]] = set()
    variant: dict[tuple[str, int], bool] = {}  # a unit's variant, from its first move on
    cost, flops = base_cost, base_flops
    unit_scale = {u: 1.0 for u in candidates}  # measured / single-unit-curve cost, at the candidate's last re-measure
    seen_scale: dict[str, list[float]] = {c: [] for c in components}  # recent ratios per component, for units
    # not re-measured lately

    def rank(added: float, flops_saved: float, u: Candidate, start: float, end: float) -> tuple[int, float]:
        """Sort key of a move (lower first): cost per FLOP saved; with `time_saved`, cost per time saved, and the
        moves that save no time after all the others."""
        if time_saved is None:
            return 0, added / flops_saved
        fraction = time_saved(u[0], u[2], start, end)  # of the decoding time
        return (0, added / fraction) if fraction > 0 else (1, added / flops_saved)

    def estimate(u: Candidate):
        """(rank of u's best move by its estimated cost, see `rank`; its target level), or None if u cannot
        move."""
        c, i, pin = u
        if variant.get((c, i), pin) != pin:
            return None  # the unit moved as the other variant
        cur = caps[c][i]
        here = curve[u].get(cur)
        if here is None:  # between levels (never, levels are exact) -> nearest
            here = min(curve[u].items(), key=lambda kv: abs(kv[0] - cur))[1]
        scale = unit_scale[u]
        best = None
        for lev, (dc, df) in curve[u].items():
            if lev >= cur - 1e-9:
                continue
            saved = df - here[1]
            if saved <= 0:
                continue
            r = rank(max(0.0, dc - here[0]) * scale, saved, u, cur, lev)
            if best is None or r < best[0]:
                best = (r, lev)
        return best

    while flops > min_flops + 1e-9:
        ranked = sorted((e[0], u, e[1]) for u in candidates if (e := estimate(u)) is not None)
        if not ranked:
            break
        trials, measured = [], set()
        for n, (est, u, lev) in enumerate(ranked[:max(lookahead, max_lookahead)]):
            if n >= lookahead and trials and est >= min(t[0] for t in trials):
                break  # every candidate left is estimated worse than one already measured
            c, i, pin = u
            old = caps[c][i]
            caps[c][i] = lev
            new_cost, new_flops = measure(caps, frozenset(pins | {(c, i)} if pin else pins))
            caps[c][i] = old
            saved = flops - new_flops
            added = new_cost - cost
            base_added = curve[u][lev][0] - curve[u].get(old, (0.0, 0.0))[0]
            if base_added > 1e-6 and added > 0:
                unit_scale[u] = added / base_added
                seen_scale[c].append(unit_scale[u])
            if saved > 0:
                trials.append((rank(added, saved, u, old, lev), u, lev, new_cost, new_flops))
            measured.add(u)
        if not trials:  # nothing re-measured saves FLOPs: never propose those moves again
            for _, u, lev in ranked[:len(measured)]:
                curve[u].pop(lev, None)
            continue
        for c, seen in seen_scale.items():  # units not re-measured lately: they compound like their component's
            if seen:
                recent = sorted(seen[-16:])
                typical = recent[len(recent) // 2]
                for u in candidates:
                    if u[0] == c and u not in measured:
                        unit_scale[u] = max(unit_scale[u], typical)
        _, u, lev, cost, flops = min(trials, key=lambda t: t[0])
        c, i, pin = u
        alloc.moves.append(Move(c, i, caps[c][i], lev, pin))
        caps[c][i] = lev
        variant[(c, i)] = pin
        if pin:
            pins.add((c, i))
        alloc.flops.append(flops)
        alloc.cost.append(cost)
        if on_move is not None:
            on_move({k: list(v) for k, v in caps.items()}, frozenset(pins))
        note(f"path: {len(alloc.moves)} moves, routed FLOPs {flops:.3f}, cost {cost - base_cost:+.4f}")
    _make_monotone(alloc)
    return alloc


def _make_monotone(alloc: Allocation) -> None:
    """Measured FLOPs fall with every move (each saves work); guard the lookup against ties from rounding."""
    for k in range(1, len(alloc.flops)):
        if alloc.flops[k] >= alloc.flops[k - 1]:
            alloc.flops[k] = alloc.flops[k - 1] - 1e-9


def uniform_capacity(budget: float, n_layers: int, dense: frozenset[int] | set[int]) -> float:
    """The capacity of every routed layer when a component's budget is shared uniformly (no allocation fitted):
    dense layers run in full and are paid for out of the same budget."""
    n_routed = n_layers - len(dense)
    if n_routed <= 0:
        return 1.0
    return min(1.0, max(0.0, (budget * n_layers - len(dense)) / n_routed))

