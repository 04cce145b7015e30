"""`set_budget` on a Flextron model: the router turns a budget into the width of every layer.

- `relative_compute=x`: the configuration's block FLOPs are at most x of the full model's.
- `latency_ms=t`: its latency, predicted from the latency table measured on this machine, is at most t.

The static router picks one configuration at once. The input-adaptive router picks one per sequence, in a forward
pre-hook on the base model (so `generate` goes through it too), from the pooled embedding of the sequence's real
tokens (the attention mask's, so left padding does not count). That is a **per-sequence decision on the prompt**,
kept for the whole generation. Which forward is a new prompt and which continues the current one:

1. A forward given a non-empty KV cache (under any keyword: `cache`, `past_key_values`, ..., or any argument that is
   a cache object) is a decode step: it keeps the current decision, because the cached keys / values belong to
   its head slices. (With no decision for its batch size, it is decided from the tokens it is given.)
2. A forward without one (or with an empty one: a prefill) continues the current decision when every row's real
   tokens start with the real tokens of the prompt that row was decided on. That is what `generate(use_cache=False)`
   feeds at each step (the whole growing sequence), and what re-scoring a generated text feeds.
3. Any other forward is a new prompt and is decided afresh from its own real tokens. `FlextronModel.generate` always
   starts from a new decision on its prompt, and so does `set_budget`.

None of this depends on the keyword a transformers version passes the cache under. The decision is a function of the
prompt: the same prompt always gets the same widths, but a different prompt, including the same prompt with tokens
appended and given to `generate` (or to a forward after another prompt), may get other widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import BudgetError, ConfigError
from .routers import FlextronRouter
from .configurations import base_model, full_choices, menu_sizes, pooled_features, set_index_choices

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
    # the adaptive router's decision: per row, the real token ids of the prompt `current` was decided on (None: the
    # next forward decides afresh), and the choice lists it set on the model (to notice choices changed meanwhile)
    prompt: list[torch.Tensor] | None = None
    applied: tuple[Any, Any] | None = None


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
    from ...errors import RouterFileError

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
    state.prompt = None  # a new budget: the next forward decides afresh
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


_CACHE_KEYWORDS = ("cache", "past_key_values", "past", "layer_past")  # what transformers versions have called it


def _kv_cache(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward was given, whatever its keyword: a known keyword first, else any argument that is a
    cache object (has `get_seq_length`)."""
    for key in _CACHE_KEYWORDS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    for value in (*kwargs.values(), *args):
        if hasattr(value, "get_seq_length"):
            return value
    return None


def _cached_tokens(cache: Any) -> int:
    """How many tokens per sequence `cache` already holds (0: none, or not a cache this knows)."""
    cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder wrapper
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # the legacy format: a tuple of (key, value) per layer, key (B, KVH, T, D)
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, KeyError, AttributeError):
        return 0


def _real_tokens(ids: torch.Tensor, attention_mask: Any) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(mask (B, T) bool over the given tokens or None: all real, [the real token ids of each row]). A 2-D mask
    longer than the input (a decode step's: past + new tokens) is cut to the given tokens; other masks (4-D) are
    not a per-token padding mask and count every token as real."""
    B, T = ids.shape
    mask = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.shape[0] == B \
            and attention_mask.shape[1] >= T:
        mask = attention_mask[:, attention_mask.shape[1] - T:].bool()
    rows = list(ids.detach()) if mask is None else [ids[b].detach()[mask[b]] for b in range(B)]
    return mask, rows


def _extends(row: torch.Tensor, prompt: torch.Tensor) -> bool:
    n = prompt.shape[0]
    return row.shape[0] >= n and torch.equal(row[:n], prompt)


def new_generation(fm) -> None:
    """Make the adaptive router's next forward decide afresh from its input (a new prompt), whatever came before."""
    state = fm.__dict__.get(_STATE)
    if state is not None:
        state.prompt = None


def _adaptive_hook(fm, state: BudgetState):
    """The forward pre-hook of the input-adaptive router: the rule of the module docstring."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ConfigError("the input-adaptive router routes on input_ids: call the model with input_ids "
                              "(batch, tokens)")
        mask, rows = _real_tokens(ids, kwargs.get("attention_mask"))
        decided = state.current is not None and tuple(state.current["mlp"].shape[:1]) == (ids.shape[0],) and \
            state.current["mlp"].dim() == 2  # a (B, L) decision for this batch (a static pick is (L,))
        if decided and _cached_tokens(_kv_cache(args, kwargs)) > 0:
            pass  # a decode step: its KV cache holds the prompt's head slices
        elif decided and state.prompt is not None and len(state.prompt) == len(rows) and \
                all(_extends(r, p) for r, p in zip(rows, state.prompt)):
            pass  # the prompt re-fed with tokens after it (generate without a cache): the same generation
        else:  # a new prompt: decide from its real tokens
            feats = pooled_features(fm, ids, mask)  # (B, C)
            state.current = state.router.choose(state.target, state.metric, features=feats, exact=state.exact)
            state.prompt = rows
            state.applied = None
        if state.applied is None or state.applied[0] is not fm.state.mlp or state.applied[1] is not fm.state.attn:
            set_index_choices(fm, state.current)  # (B, L): one configuration per sequence
            state.applied = (fm.state.mlp, fm.state.attn)  # set_choices replaces these lists, never edits them
        return None
    return hook


def current_choices(fm) -> dict[str, torch.Tensor] | None:
    state = fm.__dict__.get(_STATE)
    return None if state is None else state.current
