"""The baselines learned routing is measured against, and the budgets they run at.

random / norm / static share the budget uniformly between layers; norm_allocated uses the learned routers' fitted
allocation with the training-free norm score (what learned scores add beyond the allocation). With
`match="flops"` each baseline's budget is bisected until it executes the learned routers' block FLOPs
(`plan_budgets`), in the LM, encoder and image evaluations alike; `match="target"` reads each budget as a block-FLOPs
target and bisects every method to it, the learned routers included.
"""

from __future__ import annotations

import statistics
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..config import check_fraction
from ..errors import ConfigError
from ..model import ElasticModel

BASELINES = ("random", "norm", "norm_allocated", "static")
MATCHES = {"flops": "each baseline at the learned routers' block FLOPs, its budget bisected",
           "budget": "every method at the same budget",
           "target": "every method, the learned routers too, bisected to execute the budget as its block-FLOPs ratio"}


def check_match(match: str) -> str:
    """`match` if it names a way to pair methods (see `plan_budgets`), else a one-line ConfigError listing them."""
    if match not in MATCHES:
        raise ConfigError(f"match={match!r}: pass " + "; ".join(f"'{k}' ({v})" for k, v in MATCHES.items()))
    return match


def prepare_baselines(em: ElasticModel, baselines: Sequence[str], calibration_data) -> None:
    """Check the baseline names and fit what they need on calibration data: "norm" thresholds (causal models only;
    encoders route by top-k) and the "static" choice of what to drop."""
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ConfigError(f"unknown baselines {sorted(unknown)}: the baselines are {', '.join(BASELINES)}")
    if {"norm", "norm_allocated", "static"} & set(baselines):
        if calibration_data is None:
            raise ConfigError("the norm and static baselines are fitted on calibration text: pass calibration_data "
                              "(training text, never the evaluation text)")
        for method in ("norm", "norm_allocated"):
            if method in baselines:
                em.routing_method(method)  # validates that it applies to this model
                em.calibrate(calibration_data, method=method)
        if "static" in baselines:
            em.fit_static(calibration_data)


def budget_settings(em: ElasticModel, budgets: Sequence[float | dict[str, float]]) -> list[float | dict[str, float]]:
    """Each budget validated: a fraction (one budget for the model, see `ElasticModel.set_budget`) or a dict per
    component."""
    if not budgets:
        raise ConfigError("no budgets to evaluate: pass at least one, e.g. budgets=[0.8]")
    settings = []
    for b in budgets:
        if isinstance(b, dict):
            settings.append({k: check_fraction(k, v) for k, v in b.items()})
        else:
            settings.append(check_fraction("budget", b))
    for setting in settings:  # unknown / unrouted keys and budgets below the dense layers' share
        with apply_budget(em, setting):
            pass
    return settings


def apply_budget(em: ElasticModel, setting):
    """`with apply_budget(em, 0.8)` / `apply_budget(em, {"mlp_tokens": 0.8})`: em.budget(...) for either form."""
    return em.budget(**setting) if isinstance(setting, dict) else em.budget(setting)


def nominal(setting) -> float:
    return statistics.mean(setting.values()) if isinstance(setting, dict) else float(setting)


def scaled(setting, t: float):
    """The budget `t` in the form of `setting` (a dict keeps its components' proportions)."""
    if not isinstance(setting, dict):
        return t
    ref = nominal(setting)
    return {k: min(1.0, v * t / ref) for k, v in setting.items()}


def probe_flops(em: ElasticModel, batch: dict, setting, context, generator: torch.Generator | None, seed: int) -> float:
    """Executed / dense block FLOPs of one forward of `batch` at `setting` under `context` (a routing method)."""
    if generator is not None:
        generator.manual_seed(seed)
    with torch.no_grad(), apply_budget(em, setting), context():
        em(**batch)
    return em.last_stats()["flops_ratio"]


EDGE = 1.0 - 1e-6  # the highest budget below 1 that `match_flops` tries


def match_flops(em: ElasticModel, batch: dict, setting, target: float, context, lowest: float,
                generator: torch.Generator | None, seed: int, steps: int = 8, from_above: bool = False):
    """(budget in the form of `setting`, the block FLOPs it executes on `batch`): where a method executes `target`
    block FLOPs, by bisection: FLOPs fall with the budget. `from_above`: of the budgets tried, the closest one that
    executes at least `target` (for a method whose FLOPs move in steps, e.g. dropping whole layers: it gets the
    benefit of the doubt)."""
    lo, hi = lowest, 1.0
    tried = []
    for _ in range(steps):
        mid = (lo + hi) / 2
        f = probe_flops(em, batch, scaled(setting, mid), context, generator, seed)
        tried.append((mid, f))
        if f > target:
            hi = mid
        else:
            lo = mid
    for b in (lo, hi):
        tried.append((b, probe_flops(em, batch, scaled(setting, b), context, generator, seed)))
    if hi == 1.0:  # just below 1: the routing-free point of a padded encoder (padding skipped, every real token run),
        # which FLOPs jump past at 1.0 itself and no bisection step lands on
        tried.append((EDGE, probe_flops(em, batch, scaled(setting, EDGE), context, generator, seed)))
    pool = [t for t in tried if t[1] >= target - 1e-9] if from_above else tried
    best = min(pool or tried, key=lambda t: abs(t[1] - target))
    return scaled(setting, best[0]), best[1]


# baselines whose FLOPs move in steps (whole sub-layers dropped): they run at the nearest budget executing at least
# the learned routers' FLOPs, and the learned routers are measured again at theirs ("learned_at_same_flops")
STEP_BASELINES = ("static",)
MATCH_TOLERANCE = 0.005  # a continuous baseline further than this from the learned FLOPs gets its own learned partner
# a step baseline above the learned FLOPs by more than this does: on a small model one head of one layer is ~1e-3 of
# the block FLOPs, and a pair that far apart can flip
STEP_TOLERANCE = 1e-4


def again_key(baseline: str) -> str:
    """The plan key of the learned routers measured again at `baseline`'s FLOPs."""
    return f"learned@{baseline}"


def method_of(key: str) -> str:
    """The routing method a plan key runs ("learned@static": the learned routers, at static's FLOPs)."""
    return key.split("@")[0]


def plan_budgets(em: ElasticModel, batch: dict, settings: Sequence, baselines: Sequence[str], contexts: dict,
                 generator: torch.Generator | None, seed: int, match: str = "flops", progress: bool = False
                 ) -> dict[tuple[str, int], object]:
    """{(method, i): the budget it runs at for `settings[i]`}. `match="flops"`: each baseline at the budget where it
    executes the learned routers' block FLOPs on `batch`; a step baseline (static) at the nearest one executing at
    least as many. Where a baseline's FLOPs still differ from the learned routers' (static's steps; or a jump, e.g.
    an encoder's padding, never computed once any token is routed, leaves a baseline's FLOPs no budget between 1 and
    0.99 can match), an extra entry ("learned@<baseline>", i) holds the learned routers bisected to that baseline's
    FLOPs: the fair partner of that pair. `match="target"`: the same, but the FLOPs every method is bisected to are
    the budget itself read as a block-FLOPs ratio (the learned routers' executed FLOPs can drift from their budget:
    thresholds calibrated on other text, stand-ins and routers' own FLOPs), so a record measures "x% of the block
    FLOPs removed" directly. `match="budget"`: every method at the same budget."""
    methods = ["learned", *baselines]
    plan = {(m, i): setting for m in methods for i, setting in enumerate(settings)}
    if match == "budget" or match == "flops" and not baselines:
        return plan
    lowest = max(em.state.min_budget(k) for k in em.elastic_config.components()) + 1e-3
    for i, setting in enumerate(tqdm(settings, desc="matching FLOPs", disable=not progress)):
        if match == "target":
            target = nominal(setting)
            plan[("learned", i)], target = match_flops(em, batch, setting, target, contexts["learned"], lowest,
                                                       generator, seed * 1009)
        else:
            target = probe_flops(em, batch, setting, contexts["learned"], generator, seed * 1009)
        for m in baselines:
            step = m in STEP_BASELINES
            plan[(m, i)], got = match_flops(em, batch, setting, target, contexts[m], lowest, generator, seed * 1009,
                                            from_above=step)
            if (got > target + STEP_TOLERANCE) if step else abs(got - target) > MATCH_TOLERANCE:
                plan[(again_key(m), i)], _ = match_flops(em, batch, setting, got, contexts["learned"], lowest,
                                                           generator, seed * 1009)
    return plan
