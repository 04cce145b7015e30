"""Quality and latency of width configurations on held-out text, against a teacher, in one process.

`TeacherCache` runs the teacher (the original model, or the Flextron model at full width) once per batch and keeps
its logits, so every method is scored against the same teacher outputs. `lm_quality` scores the model's current
configuration (static choices, or the adaptive router's per-input picks) with the core's metrics (ΔLM loss, KL,
top-1 agreement; `elastiformer.evaluation.lm`). `time_forwards` gives `evaluation.timing.time_setups` in milliseconds.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..evaluation.lm import lm_metrics
from ..evaluation.timing import time_setups


class TeacherCache:
    """Held-out batches with the teacher's logits of each, computed once."""

    def __init__(self, teacher: Callable[[dict], torch.Tensor], data: torch.Tensor, batch_size: int = 4,
                 device: torch.device | str = "cpu", progress: bool = True):
        self.batches = [{"input_ids": data[i:i + batch_size].to(device)} for i in range(0, data.shape[0], batch_size)]
        with torch.no_grad():
            self.logits = [teacher(b) for b in tqdm(self.batches, desc="teacher", disable=not progress)]
        self.tokens = int(data.numel())


@torch.no_grad()
def lm_quality(model: Callable[[dict], Any], teacher: TeacherCache, stats: Callable[[], dict] | None = None) -> dict:
    """Score `model(batch) -> output with .logits` against the cached teacher on every batch.

    Returns delta_lm_loss, kl, top1_agreement, perplexity, teacher_nll and (when `stats` gives `last_stats()`)
    block_flops_ratio / model_flops_ratio of what ran."""
    acc = {"n": 0, "nll_teacher": 0.0, "nll": 0.0, "kl": 0.0, "agree": 0.0}
    dense = executed = model_dense = model_exec = 0
    for batch, t in zip(teacher.batches, teacher.logits):
        s = model(batch).logits
        r = lm_metrics(t, s, batch["input_ids"], batch.get("attention_mask"))
        for k in acc:
            acc[k] += r[k]
        if stats is not None:
            st = stats()
            dense += st["dense_flops"]
            executed += st["elastic_flops"]
            model_dense += st.get("model_dense_flops", st["dense_flops"])
            model_exec += st.get("model_elastic_flops", st["elastic_flops"])
    n = max(1, acc["n"])
    out = {"delta_lm_loss": (acc["nll"] - acc["nll_teacher"]) / n, "kl": acc["kl"] / n,
           "top1_agreement": acc["agree"] / n, "perplexity": math.exp(min(50.0, acc["nll"] / n)),
           "teacher_nll": acc["nll_teacher"] / n, "tokens": acc["n"]}
    if stats is not None:
        out["block_flops_ratio"] = executed / dense if dense else 1.0
        out["model_flops_ratio"] = model_exec / model_dense if model_dense else 1.0
    return out


@torch.no_grad()
def time_forwards(setups: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], reps: int = 5,
                  warmup: int = 1, desc: str | None = None) -> dict[str, float]:
    """Median milliseconds of each setup's forward, interleaved across setups (`evaluation.timing.time_setups`, in
    ms: what latency tables hold). setups: name -> (prepare, run), `run()` one forward, routing included."""
    return {k: v * 1e3 for k, v in time_setups(setups, reps=reps, warmup=warmup, desc=desc).items()}


@contextlib.contextmanager
def configuration(fm, choices: dict[str, list[int]] | None):
    """Run `fm` at fixed index `choices` (per layer) for the block; None keeps whatever is set (e.g. a router)."""
    if choices is None:
        yield
        return
    with fm.using(**choices):
        yield


def best_uniform(fm, cost, target: float) -> dict[str, list[int]]:
    """The uniform configuration (one MLP width and one head width for every layer) with the highest cost not above
    `target`: the nested sub-network one picks without a router."""
    L = fm.n_layers
    best, best_price = None, -float("inf")
    for m in range(cost.mlp.shape[1]):
        for a in range(cost.attn.shape[1]):
            choice = {"mlp": torch.full((L,), m), "attn": torch.full((L,), a)}
            price = float(cost.hard(choice))
            if best_price < price <= target * (1 + 1e-9):
                best, best_price = choice, price
    if best is None:  # below every uniform network: the smallest
        best = {"mlp": torch.full((L,), cost.mlp.shape[1] - 1), "attn": torch.full((L,), cost.attn.shape[1] - 1)}
    return {k: v.tolist() for k, v in best.items()}
