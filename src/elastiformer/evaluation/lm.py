"""`evaluate`: what the elastic model costs and loses on held-out data, at one or many budgets, always beside the
random-routing baseline at the same capacity, and timed against the dense model in the same process."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.batches import as_batches
from ..errors import DataError
from ..model import ElasticModel
from .baselines import (again_key, apply_budget, budget_settings, check_match, method_of, nominal, plan_budgets,
                        prepare_baselines)
from .timing import interleaved
from ..validation import check_int

def lm_metrics(teacher: torch.Tensor, student: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> dict:
    """Sums over next-token positions: teacher / student NLL on the real next tokens, KL(teacher || student),
    top-1 agreement. logits: (B, T, V), ids: (B, T)."""
    t = F.log_softmax(teacher[:, :-1].float(), dim=-1)  # (B, T-1, V)
    s = F.log_softmax(student[:, :-1].float(), dim=-1)
    target = ids[:, 1:]  # (B, T-1)
    keep = torch.ones_like(target, dtype=torch.bool) if mask is None else (mask[:, 1:].bool() & mask[:, :-1].bool())
    nll_t = -t.gather(-1, target[..., None]).squeeze(-1)
    nll_s = -s.gather(-1, target[..., None]).squeeze(-1)
    kl = (t.exp() * (t - s)).sum(-1)
    agree = (t.argmax(-1) == s.argmax(-1)).float()
    return {"n": int(keep.sum()), "nll_teacher": float(nll_t[keep].sum()), "nll": float(nll_s[keep].sum()),
            "kl": float(kl[keep].sum()), "agree": float(agree[keep].sum())}


def time_ratio(em: ElasticModel, batch: dict, context, reps: int) -> tuple[float, float, float]:
    """Median wall-clock of elastic and dense forwards on `batch`, interleaved (dense, elastic, dense, ...).
    -> (elastic / dense, dense seconds, elastic seconds)"""
    def dense():
        with em.disable_routers():
            em(**batch)

    def elastic():
        with context():
            em(**batch)

    with torch.no_grad():
        d, e = interleaved(dense, elastic, reps)
    return e / d, d, e


def evaluate(
    em: ElasticModel,
    data: Iterable[dict[str, torch.Tensor]] | torch.Tensor,
    budgets: Sequence[float | dict[str, float]] = (1.0,),
    *,
    baselines: Sequence[str] = ("random",),
    calibration_data=None,
    batch_size: int = 4,
    timing_reps: int = 3,
    seed: int = 0,
    progress: bool = True,
    match: str = "flops",
) -> dict[str, Any]:
    """Evaluate `em` at each budget (one fraction for the model, see `ElasticModel.set_budget`, or a dict per
    component).

    Baselines: "random", "norm" (training-free token scores; token components only), "norm_allocated" (the same
    score with the learned routers' fitted allocation) and "static" (pruning chosen once); all but random are
    fitted on `calibration_data`. `match="flops"` (default) runs each baseline at the budget where it executes the
    learned routers' block FLOPs (bisected on the first batch; `method_budget` in its record); `match="budget"` runs
    it at the same budget; `match="target"` reads each budget as a block-FLOPs ratio and bisects every method to it,
    the learned routers too (0.9: 10% of the block FLOPs removed, whatever budget that takes). Static pruning moves
    in steps, so it runs at the nearest budget that executes at least the learned FLOPs; when that is more (or when
    any other baseline's FLOPs could not be matched, see `baselines.plan_budgets`), its record also holds
    `learned_at_same_flops`: the learned routers measured again at that baseline's FLOPs (their budget bisected),
    the fair partner for that pair.

    Returns `{"teacher_nll", "teacher_perplexity", "tokens", "router_param_fraction", "records": [...]}`, one
    record per (method, budget) with: delta_lm_loss (elastic NLL - teacher NLL, nats/token), kl (per token),
    top1_agreement, perplexity, block_flops_ratio and model_flops_ratio (executed / dense, routers included), and
    prefill_time_ratio (elastic / dense wall-clock, median of interleaved repetitions; None when timing_reps=0).
    """
    check_int("batch_size", batch_size)
    check_int("timing_reps", timing_reps, minimum=0, hint="0 skips timing")
    check_int("seed", seed, minimum=0)
    check_match(match)
    if isinstance(budgets, (int, float)):  # one budget given bare
        budgets = [budgets]
    if isinstance(baselines, str):
        baselines = [baselines]
    settings = budget_settings(em, budgets)  # validated before any heavy work
    prepare_baselines(em, baselines, calibration_data)
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.shape[0] == 0:
            raise DataError(f"evaluation data of shape {tuple(data.shape)}: pass token ids [N sequences, T tokens]")
        data = [{"input_ids": data[i:i + batch_size]} for i in range(0, data.shape[0], batch_size)]
    batches = list(as_batches(data))
    if not batches:
        raise DataError("evaluation data is empty: pass held-out sequences")
    device = next(em.base_model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    methods = ["learned"] + list(baselines)
    contexts = {m: (lambda m=m: em.routing_method(m)) for m in methods}
    saved_budget, was_training = em.get_budget(), em.training
    em.eval()
    # the random baseline draws from this generator, reseeded per batch so that it draws the same way every run,
    # and leaves the caller's global torch RNG alone
    generator = torch.Generator(device=device)
    teacher_sum = {"n": 0, "nll": 0.0}
    bar = tqdm(desc="evaluating", disable=not progress)  # (its total is known once the FLOPs are matched)
    try:
        with torch.no_grad(), em.override("generator", generator):
            plan = plan_budgets(em, batches[0], settings, baselines, contexts, generator, seed, match, progress)
            sums = {key: {"n": 0, "nll_teacher": 0.0, "nll": 0.0, "kl": 0.0, "agree": 0.0, "dense": 0, "exec": 0,
                          "model_dense": 0, "model_exec": 0} for key in plan}
            bar.reset(total=len(batches) * (1 + len(plan)) + (len(methods) * len(settings) if timing_reps else 0))
            for bi, batch in enumerate(batches):
                with em.disable_routers():
                    teacher = em(**batch).logits
                bar.update()
                for (m, i), budget in plan.items():
                    generator.manual_seed(seed * 1009 + bi)  # the random baseline draws the same way every run
                    with apply_budget(em, budget), contexts[method_of(m)]():
                        student = em(**batch).logits
                    stats = em.last_stats()
                    r = lm_metrics(teacher, student, batch["input_ids"], batch.get("attention_mask"))
                    acc = sums[(m, i)]
                    for k in ("n", "nll_teacher", "nll", "kl", "agree"):
                        acc[k] += r[k]
                    acc["dense"] += stats["dense_flops"]
                    acc["exec"] += stats["elastic_flops"]
                    acc["model_dense"] += stats.get("model_dense_flops", stats["dense_flops"])
                    acc["model_exec"] += stats.get("model_elastic_flops", stats["elastic_flops"])
                    bar.update()
                teacher_sum["n"] += r["n"]
                teacher_sum["nll"] += r["nll_teacher"]

            def quality(m: str, i: int) -> dict[str, Any]:
                acc = sums[(m, i)]
                n = max(1, acc["n"])
                return {
                    "method_budget": nominal(plan[(m, i)]),
                    "delta_lm_loss": (acc["nll"] - acc["nll_teacher"]) / n,
                    "kl": acc["kl"] / n,
                    "top1_agreement": acc["agree"] / n,
                    "perplexity": math.exp(min(50.0, acc["nll"] / n)),
                    "block_flops_ratio": acc["exec"] / acc["dense"] if acc["dense"] else 1.0,
                    "model_flops_ratio": acc["model_exec"] / acc["model_dense"] if acc["model_dense"] else 1.0,
                }

            records = []
            for i, setting in enumerate(settings):
                for m in methods:
                    ratio = None
                    with apply_budget(em, plan[(m, i)]):
                        budgets_used = em.get_budget()
                        if timing_reps:
                            ratio, _, _ = time_ratio(em, batches[0], contexts[m], timing_reps)
                            bar.update()
                    records.append({"method": m, "budget": nominal(setting), "budgets": budgets_used}
                                   | quality(m, i) | {"prefill_time_ratio": ratio})
                    if (again_key(m), i) in plan:
                        records[-1]["learned_at_same_flops"] = quality(again_key(m), i)
    finally:
        bar.close()
        if saved_budget:
            em.set_budget(**saved_budget)
        em.train(was_training)
    n = max(1, teacher_sum["n"])
    return {
        "tokens": teacher_sum["n"],
        "teacher_nll": teacher_sum["nll"] / n,
        "teacher_perplexity": math.exp(min(50.0, teacher_sum["nll"] / n)),
        "router_param_fraction": em.num_router_parameters() / max(1, em.num_base_parameters()),
        "records": records,
    }
