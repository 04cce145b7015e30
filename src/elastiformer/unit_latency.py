"""What a move of the allocation saves in wall-clock time, measured on this machine: the unit latency table.

The allocation path (`allocation.py`) ranks its moves by distillation loss per FLOP saved. FLOPs are not time: on a
2-core CPU, decoding one token at batch 1, a layer whose heads run a partial set is *slower* than the dense attention
(the routed path's extra small ops cost more than the q / o rows it skips), while a skipped attention saves its whole
step. With a latency table, `fit_allocation(data, latency=table)` ranks moves by loss per *second* saved, and moves
that save no time come after every move that does (see `allocation.fit_path`).

`measure_unit_latency` times greedy generation at batch 1 with the model's wrappers in place, routing on: a reference
run with every unit at capacity 1, and, per routed component, variant (routed per token, or pinned: the same heads /
experts for every token) and level, a run with every movable unit of that component at that level (all units at once,
so the signal is the sum of their savings, not one unit's inside the timer's noise), interleaved repetition by
repetition. A unit's saving at a level is (1 - median paired time ratio) / its number of units: the fraction of the
reference's decoding time it saves. Layers are assumed alike (one model's layers have equal shapes).

The table is valid for the machine, threads and regime it was measured on (it records them), like Flextron's
(`flextron/latency.py`, which times its nested widths per layer in a prefill).
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable

import torch

from .allocation import DROPPED_BY, LEVELS, PINNABLE, check_levels
from .calibration import calibrate, collect_batches, unit_scores
from .errors import ConfigError, DataError
from .evaluation.timing import machine, time_setups_all
from .routers import TokenRouter
from .validation import check_int

TABLE_VERSION = 1


@torch.no_grad()
def measure_unit_latency(em, data: Iterable[dict[str, Any]] | torch.Tensor, *, prompt_len: int = 8,
                         new_tokens: int = 16, reps: int = 5, levels: tuple[float, ...] = LEVELS, pin: bool = True,
                         progress: bool = True) -> dict[str, Any]:
    """Time what each routed component's units save per level and variant when decoding at batch 1 (see the module
    docstring). `data`: calibration batches; the prompt is the first `prompt_len` tokens of the first row, and the
    pinned variants keep the heads / experts `fit_allocation` would pin (largest mean output norm on `data`).
    Token routers without thresholds are calibrated first (uniform capacities). Cost: (1 + components x levels x
    variants) x (reps + 1) generations of `new_tokens` tokens.

    -> a JSON-ready dict: `saved` = {component: {"routed" | "pinned": {level (str): fraction of the reference decode
    time saved per unit}}}, `n_units` per component, `reference_s` (median seconds of the reference generation), and
    the regime and machine it holds for."""
    for name, v in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("reps", reps)):
        check_int(name, v)
    check_levels(levels)
    if not em.is_causal or not hasattr(em.base_model, "generate"):
        raise ConfigError("measure_unit_latency() times decoding at batch 1: it needs a causal language model "
                          "(an encoder or vision model has no decoding to time); fit the allocation without latency")
    batches = collect_batches(em, data, 1, "measure_unit_latency()")
    ids = batches[0].get("input_ids")
    if ids is None or ids.shape[-1] < 1:
        raise DataError("measure_unit_latency() needs token ids: pass batches holding input_ids")
    prompt = ids[:1, :prompt_len]  # (1, prompt_len)
    st = em.state
    components = em.elastic_config.components()
    L = st.n_layers
    movable = {k: [i for i in range(L) if i not in st.dense_layers[k]] for k in components}
    saved_state = (dict(st.budget), st.method, st.topk, em.training)
    em.eval()
    try:
        if any(isinstance(r, TokenRouter) and not r.is_calibrated for _, r in em.stack_routers()):
            calibrate(em, batches, max_batches=1)  # the token routers' thresholds at uniform capacities
        pinnable = [k for k in PINNABLE if k in components] if pin else []
        scores = unit_scores(em, batches) if pinnable else {}
        st.method, st.topk = "learned", False  # routing as at inference
        st.budget = {k: 0.5 for k in components}  # any value: the override sets every capacity
        pad = getattr(getattr(em.base_model, "generation_config", None), "eos_token_id", None)

        def setup(component: str | None = None, level: float = 1.0, pinned: bool = False):
            def prepare() -> None:
                caps = {k: [1.0] * L for k in components}
                if component is not None:
                    for i in movable[component]:
                        caps[component][i] = level
                st.capacity_override = caps
                st.pin_override = {component: {i: scores[(component, i)] for i in movable[component]}} \
                    if pinned else {}
            return prepare

        def generate() -> None:
            em.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=pad)

        setups = {"reference": (setup(), generate)}
        for k in components:
            for level in levels:
                if level == 0.0 and DROPPED_BY.get(k) in components:
                    continue  # dropped whole through the layer's token component (see allocation.DROPPED_BY)
                for pinned in ((False, True) if k in pinnable and level > 0.0 else (False,)):
                    setups[f"{k}/{'pinned' if pinned else 'routed'}/{level}"] = (setup(k, level, pinned), generate)
        times = time_setups_all(setups, reps=reps, warmup=1,
                                desc="timing the units" if progress else None)
    finally:
        st.capacity_override = st.pin_override = None
        st.budget, st.method, st.topk = saved_state[0], saved_state[1], saved_state[2]
        em.train(saved_state[3])
    ref = times.pop("reference")
    saved: dict[str, dict[str, dict[str, float]]] = {k: {} for k in components}
    for name, t in times.items():
        k, variant, level = name.split("/")
        ratio = statistics.median(e / d for d, e in zip(ref, t))  # paired with the reference of the same round
        saved[k].setdefault(variant, {})[level] = (1.0 - ratio) / max(1, len(movable[k]))
    return {"version": TABLE_VERSION, "regime": "decode", "batch": 1, "prompt_len": int(prompt.shape[1]),
            "new_tokens": new_tokens, "reps": reps, "reference_s": statistics.median(ref),
            "machine": machine(), "n_units": {k: len(v) for k, v in movable.items()}, "saved": saved}
