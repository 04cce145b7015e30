"""`set_budget` on a Flextron model: the router turns a budget into the width of every layer.

- `relative_compute=x`: the configuration's block FLOPs are at most x of the full model's.
- `latency_ms=t`: its latency, predicted from the latency table measured on this machine, is at most t.

The static router picks one configuration at once. The input-adaptive router picks one per sequence, in a forward
pre-hook on the base model (so `generate` goes through it too), from the prompt's pooled embedding; decode steps
with a KV cache keep the prompt's configuration, because the cached keys / values belong to its head slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BudgetError, ConfigError
from .routers import FlextronRouter
from .routing import base_model, full_choices, menu_sizes, pooled_features, set_index_choices

_STATE = "_flextron_budget_state"  # kept in the model's __dict__, outside its modules and state_dict


@dataclass
class BudgetState:
    router: FlextronRouter
    metric: str | None = None
    target: float | None = None  # in the metric's units
    exact: bool = True
    hook: Any = None
    current: dict[str, torch.Tensor] | None = None  # the configuration of the last forward
    history: list[dict[str, Any]] = field(default_factory=list)


def attach_router(fm, router: FlextronRouter) -> None:
    """Give `fm` its router (replacing any earlier one and its budget)."""
    n_layers, n_mlp, n_attn = menu_sizes(fm)
    spec = router.router.spec()
    if (spec["n_layers"], spec["n_mlp"], spec["n_attn"]) != (n_layers, n_mlp, n_attn):
        raise ConfigError(f"this router was trained for {spec['n_layers']} layers with {spec['n_mlp']} MLP and "
                          f"{spec['n_attn']} head widths, not this model's {n_layers} / {n_mlp} / {n_attn}: "
                          "load the router trained for this Flextron model")
    detach_router(fm)
    fm.__dict__[_STATE] = BudgetState(router=router.to(next(fm.parameters()).device))


def load_router(fm, path, *, check_fingerprint: bool = True) -> FlextronRouter:
    """Load a saved router and attach it, refusing one trained for other weights or menus."""
    from ..errors import RouterFileError

    router = FlextronRouter.from_pretrained(path)
    saved = router.meta.get("base_model", {})
    if router.meta.get("flextron_config") not in (None, fm.flextron_config.to_dict()):
        raise RouterFileError(f"the router in {path} was trained for menus {router.meta['flextron_config']}, not this "
                              f"model's {fm.flextron_config.to_dict()}: load the checkpoint it was trained for")
    if check_fingerprint and saved.get("fingerprint") not in (None, fm.base_identity()["fingerprint"]):
        raise RouterFileError(f"the router in {path} was trained on other weights than this model's: load the "
                              "Flextron checkpoint it was routed on, or pass check_fingerprint=False")
    attach_router(fm, router)
    return router


def detach_router(fm) -> None:
    state = fm.__dict__.pop(_STATE, None)
    if state is not None and state.hook is not None:
        state.hook.remove()


def get_router(fm) -> FlextronRouter | None:
    state = fm.__dict__.get(_STATE)
    return None if state is None else state.router


def _check_budget(relative_compute: Any, latency_ms: Any) -> tuple[str, float]:
    given = {k: v for k, v in (("relative_compute", relative_compute), ("latency_ms", latency_ms)) if v is not None}
    if len(given) != 1:
        raise BudgetError("pass exactly one of relative_compute=FRACTION (e.g. 0.5) or latency_ms=MILLISECONDS")
    name, value = next(iter(given.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise BudgetError(f"{name}={value!r} is not a number: pass e.g. {name}={0.5 if name == 'relative_compute' else 20.0}")
    value = float(value)
    if name == "relative_compute" and not 0.0 < value <= 1.0:
        raise BudgetError(f"relative_compute={value} is outside (0, 1]: pass the fraction of the full model's compute, "
                          "e.g. relative_compute=0.5")
    if name == "latency_ms" and not (value > 0 and math.isfinite(value)):
        raise BudgetError(f"latency_ms={value} is not a positive number of milliseconds: pass e.g. latency_ms=20.0")
    return name, value


def set_budget(fm, relative_compute: float | None = None, latency_ms: float | None = None, *,
               exact: bool = True) -> dict[str, Any]:
    """Pick the width configuration for a budget; returns what was picked (for the adaptive router: the budget,
    the per-input pick happens in each forward). See `FlextronRouter.choose` for `exact`."""
    state = fm.__dict__.get(_STATE)
    if state is None:
        raise ConfigError("this Flextron model has no router: train one (`elastiformer flextron route`) and load it "
                          "with fm.load_router(FOLDER), or attach one with fm.attach_router(router)")
    metric, value = _check_budget(relative_compute, latency_ms)
    if metric not in state.router.costs:
        raise BudgetError("latency_ms needs a latency table, and this router has none: route again with a latency "
                          "table (measure_latency_table), or pass relative_compute instead")
    cost = state.router.costs[metric]
    target = value * cost.full if metric == "relative_compute" else value
    if target < cost.minimum * (1 - 1e-9):
        if metric == "latency_ms":
            raise BudgetError(f"latency_ms={value:g} is below the smallest sub-network's predicted latency, "
                              f"{cost.minimum:.3f} ms on {state.router.meta.get('machine_name', 'this machine')}: "
                              f"pass latency_ms >= {cost.minimum:.3f}")
        raise BudgetError(f"relative_compute={value:g} is below the smallest sub-network's compute, "
                          f"{cost.minimum / cost.full:.3f} of the full model: pass relative_compute >= "
                          f"{cost.minimum / cost.full:.3f}")
    state.metric, state.target, state.exact = metric, target, exact
    if state.hook is not None:
        state.hook.remove()
        state.hook = None
    if not state.router.adaptive:
        choices = state.router.choose(target, metric, exact=exact)  # (L,) per sub-layer
        set_index_choices(fm, choices)
        state.current = choices
        return describe(state.router, choices, metric, target)
    state.hook = base_model(fm).register_forward_pre_hook(_adaptive_hook(fm, state), with_kwargs=True)
    return {"metric": metric, "target": target, "adaptive": True}


def clear_budget(fm) -> None:
    """Back to the full width (index 0 everywhere), with no routing hook."""
    state = fm.__dict__.get(_STATE)
    if state is not None and state.hook is not None:
        state.hook.remove()
        state.hook = None
    set_index_choices(fm, full_choices(menu_sizes(fm)[0]))


def describe(router: FlextronRouter, choices: dict[str, torch.Tensor], metric: str, target: float) -> dict[str, Any]:
    """The picked configuration with its predicted cost in every metric the router knows."""
    out = {"metric": metric, "target": target, "mlp": choices["mlp"].tolist(), "attn": choices["attn"].tolist()}
    for name, cost in router.costs.items():
        price = cost.hard(choices)
        out[f"predicted_{name}"] = price.tolist() if price.dim() else float(price)
    return out


def _adaptive_hook(fm, state: BudgetState):
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ConfigError("the input-adaptive router routes on input_ids: call the model with input_ids")
        past = kwargs.get("past_key_values")
        cached = past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0
        if cached and state.current is not None and state.current["mlp"].shape[0] == ids.shape[0]:
            return None  # decode step: keep the prompt's configuration (its KV cache is of those slices)
        feats = pooled_features(fm, ids, kwargs.get("attention_mask"))  # (B, C)
        choices = state.router.choose(state.target, state.metric, features=feats, exact=state.exact)  # (B, L)
        set_index_choices(fm, choices)
        state.current = choices
        return None
    return hook


def current_choices(fm) -> dict[str, torch.Tensor] | None:
    state = fm.__dict__.get(_STATE)
    return None if state is None else state.current
