"""`evaluate_encoder`: how close an elastic encoder (BERT, ViT) stays to its teacher on held-out inputs, at one or
many budgets, beside the baselines at the same budget, against executed FLOPs.

Quality is measured on the pooled embedding (`ElasticModel.embed`): the mean cosine similarity to the teacher's
embedding of the same input, and top-1 agreement of nearest-neighbour retrieval: each input's nearest *other* input
in the evaluation set (by cosine), found once among the teacher's embeddings and once among the elastic model's;
the fraction of inputs whose neighbour is the same. With `labels` in the batches and a classifier model
(ViTForImageClassification), the teacher's and the elastic model's accuracy too.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from .baselines import (again_key, apply_budget, budget_settings, check_match, method_of, nominal, plan_budgets,
                        prepare_baselines)
from .lm import time_ratio
from ..data.batches import as_batches
from ..model import ElasticModel


def nearest_other(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar other row. emb: (N, C) -> (N,)."""
    x = F.normalize(emb.float(), dim=-1)
    sim = x @ x.T  # (N, N)
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=1)


def retrieval_agreement(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row is the same among teacher and among student embeddings."""
    return float((nearest_other(teacher) == nearest_other(student)).float().mean())


def _split_labels(data) -> list[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    items = [data] if isinstance(data, (dict, torch.Tensor)) else list(data)
    out = []
    for item in items:
        labels = item.get("labels") if isinstance(item, dict) else None
        for batch in as_batches([item]):
            out.append((batch, labels))
    return out


def evaluate_encoder(
    em: ElasticModel,
    data: Iterable[dict[str, torch.Tensor]],
    budgets: Sequence[float | dict[str, float]] = (1.0,),
    *,
    baselines: Sequence[str] = ("random",),
    calibration_data=None,
    pooling: str | None = None,
    timing_reps: int = 0,
    seed: int = 0,
    progress: bool = True,
    match: str = "flops",
) -> dict[str, Any]:
    """Evaluate encoder `em` at each budget (one fraction for every routed component, or a dict per component).

    data: batches (dicts of input_ids + attention_mask, or pixel_values; optional labels), held out from training.
    Baselines: "random", "norm" (token components only; "norm_allocated" with the learned routers' fitted
    allocation) and "static" (fitted on `calibration_data`), each at the budget where it executes the learned
    routers' block FLOPs (`match="flops"`, bisected on the first batch; its record's `method_budget`) or at the same
    budget (`match="budget"`), or every method, learned too, at the budget that executes the budget as block FLOPs
    (`match="target"`). Returns `{"inputs", "tokens", "router_param_fraction", "records": [...]}` (plus
    "teacher_accuracy" with labels), one record per (method, budget) with: cosine (mean cosine similarity of the
    pooled embedding to the teacher's), cosine_p05 (its 5th percentile), token_cosine (mean over real tokens of the
    final states' cosine), retrieval_agreement, block_flops_ratio / model_flops_ratio (executed / dense, routers
    included), time_ratio (elastic / dense wall-clock of the first batch; None when timing_reps=0), accuracy.
    """
    if em.is_causal:
        raise ConfigError("evaluate_encoder is for encoders (BERT, ViT): evaluate a causal LM with "
                          "elastiformer.evaluation.lm.evaluate")
    prepare_baselines(em, baselines, calibration_data)
    settings = budget_settings(em, budgets)
    items = _split_labels(data)
    if len(items) == 0 or sum(b[next(iter(b))].shape[0] for b, _ in items) < 2:
        raise DataError("evaluate_encoder needs at least 2 held-out inputs (retrieval compares each with the others)")
    device = next(em.base_model.parameters()).device
    items = [({k: v.to(device) for k, v in b.items()}, None if y is None else y.to(device)) for b, y in items]
    methods = ["learned"] + list(baselines)
    check_match(match)
    saved_budget, was_training = em.get_budget(), em.training
    em.eval()
    bar = tqdm(desc="evaluating", disable=not progress)  # (its total is known once the FLOPs are matched)
    records = []
    generator = torch.Generator(device=device)  # the random baseline's draws; the caller's global RNG is left alone
    contexts = {m: (lambda m=m: em.routing_method(m)) for m in methods}
    try:
        with torch.no_grad(), em.override("generator", generator):
            plan = plan_budgets(em, items[0][0], settings, baselines, contexts, generator, seed, match, progress)
            bar.reset(total=len(items) * (1 + len(plan)))
            with em.disable_routers():
                teacher = [em.embed(b, pooling) for b, _ in items]
            bar.update(len(items))
            t_pooled = torch.cat([t.pooled for t in teacher])  # (N, C)
            labelled = all(y is not None for _, y in items) and all(t.logits is not None for t in teacher)
            teacher_correct = sum(int((t.logits.argmax(-1) == y).sum()) for t, (_, y) in zip(teacher, items)) \
                if labelled else None
            measured = {}
            for (m, i), budget in plan.items():
                method = method_of(m)  # ("learned@static": the learned routers at the static baseline's FLOPs)
                pooled, dense, executed, tok_sum, tok_n, correct = [], 0, 0, 0.0, 0, 0
                with apply_budget(em, budget), em.routing_method(method):
                    budgets_used = em.get_budget()
                    for bi, ((batch, labels), t) in enumerate(zip(items, teacher)):
                        generator.manual_seed(seed * 1009 + bi)  # the random baseline draws the same way every run
                        s = em.embed(batch, pooling)
                        stats = em.last_stats()
                        dense += stats["dense_flops"]
                        executed += stats["elastic_flops"]
                        pooled.append(s.pooled)
                        tok = F.cosine_similarity(t.tokens.float(), s.tokens.float(), dim=-1)[t.mask]
                        tok_sum, tok_n = tok_sum + float(tok.sum()), tok_n + tok.numel()
                        if labelled:
                            correct += int((s.logits.argmax(-1) == labels).sum())
                        bar.update()
                    ratio = time_ratio(em, items[0][0], lambda: em.routing_method(method), timing_reps)[0] \
                        if timing_reps and m == method else None
                s_pooled = torch.cat(pooled)
                cos = F.cosine_similarity(t_pooled.float(), s_pooled.float(), dim=-1)  # (N,)
                record = {
                    "method": m,
                    "budget": nominal(settings[i]),
                    "method_budget": nominal(budget),
                    "budgets": budgets_used,
                    "cosine": float(cos.mean()),
                    "cosine_p05": float(torch.quantile(cos, 0.05)),
                    "token_cosine": tok_sum / max(1, tok_n),
                    "retrieval_agreement": retrieval_agreement(t_pooled, s_pooled),
                    "block_flops_ratio": executed / dense if dense else 1.0,
                    "model_flops_ratio": executed / dense if dense else 1.0,
                    "time_ratio": ratio,
                }
                if labelled:
                    record["accuracy"] = correct / t_pooled.shape[0]
                measured[(m, i)] = record
            for i in range(len(settings)):
                for m in methods:
                    records.append(measured[(m, i)])
                    again = measured.get((again_key(m), i))
                    if again is not None:  # the learned routers again, at this step baseline's FLOPs
                        records[-1]["learned_at_same_flops"] = {k: v for k, v in again.items()
                                                                if k not in ("method", "budget", "budgets", "time_ratio")}
    finally:
        bar.close()
        if saved_budget:
            em.set_budget(**saved_budget)
        em.train(was_training)
    out = {
        "inputs": int(t_pooled.shape[0]),
        "tokens": int(sum(int(t.mask.sum()) for t in teacher)),
        "router_param_fraction": em.num_router_parameters() / max(1, em.num_base_parameters()),
        "records": records,
    }
    if teacher_correct is not None:
        out["teacher_accuracy"] = teacher_correct / t_pooled.shape[0]
    return out
