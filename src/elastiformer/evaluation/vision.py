"""Image classifiers (a ViT with a classification head): test accuracy of the teacher and of the elastic model at
each budget, beside the baselines at matched block FLOPs, on the same images (`evaluate_images`)."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..model import ElasticModel
from .baselines import again_key, apply_budget, check_match, method_of, plan_budgets, prepare_baselines


@torch.no_grad()
def features_and_logits(em: ElasticModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final [CLS] features (B, C) and class logits (B, classes) of one forward at the current routing."""
    emb = em.embed(batch)
    return emb.pooled, em.base_model.classifier(emb.pooled)


def evaluate_images(em: ElasticModel, pixels: torch.Tensor, labels: torch.Tensor, budgets: Sequence[float],
                    *, baselines: Sequence[str] = ("random",), calibration_data=None, batch_size: int = 256,
                    seed: int = 0, progress: bool = True, match: str = "flops") -> dict[str, Any]:
    """Test accuracy of the teacher and of the elastic model at each budget (one value for every routed component),
    with the learned routers and each baseline, on the same images.

    Returns `{"teacher_accuracy", "images", "router_param_fraction", "records": [...]}`; each record: method,
    budget, accuracy, agreement (top-1 with the teacher), cosine (of the final features to the teacher's),
    block_flops_ratio (executed / dense FLOPs of the transformer blocks, routers included).
    """
    if not hasattr(em.base_model, "classifier"):
        raise ConfigError(f"evaluate_images needs an image classifier (ViTForImageClassification), not a "
                          f"{type(em.base_model).__name__}: pass a ViT folder with a classification head")
    if "static" in baselines and calibration_data is None:
        raise ConfigError("the static baseline is chosen on calibration images: pass calibration_data")
    prepare_baselines(em, baselines, calibration_data)
    check_match(match)
    methods = ["learned", *baselines]
    batches = [(pixels[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, pixels.shape[0], batch_size)]
    saved_budget, was_training = em.get_budget(), em.training
    em.eval()
    teacher_correct = 0
    bar = tqdm(desc="evaluating", disable=not progress)  # (its total is known once the FLOPs are matched)
    generator = torch.Generator(device=pixels.device)  # the random baseline's draws (the global RNG is left alone)
    contexts = {m: (lambda m=m: em.routing_method(m)) for m in methods}
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(em.override("generator", generator))
        # the budget each method runs at: bisected to the learned routers' FLOPs (keys: (method, index of budget))
        plan = plan_budgets(em, {"pixel_values": batches[0][0]}, list(budgets), baselines, contexts, generator, seed,
                            match, progress)
        sums = {k: {"correct": 0, "agree": 0, "cos": 0.0, "dense": 0, "exec": 0} for k in plan}
        bar.reset(total=len(batches) * (1 + len(plan)))
        for bi, (x, y) in enumerate(batches):
            batch = {"pixel_values": x}
            with em.disable_routers():
                t_feat, t_logits = features_and_logits(em, batch)
            t_pred = t_logits.argmax(-1)
            teacher_correct += int((t_pred == y).sum())
            bar.update()
            for key, budget in plan.items():
                generator.manual_seed(seed * 1009 + bi)  # the random baseline draws the same way every run
                with apply_budget(em, budget), em.routing_method(method_of(key[0])):
                    feat, logits = features_and_logits(em, batch)
                stats = em.last_stats()
                acc = sums[key]
                pred = logits.argmax(-1)
                acc["correct"] += int((pred == y).sum())
                acc["agree"] += int((pred == t_pred).sum())
                acc["cos"] += float(torch.nn.functional.cosine_similarity(feat, t_feat, dim=-1).sum())
                acc["dense"] += stats["dense_flops"]
                acc["exec"] += stats["elastic_flops"]
                bar.update()
    finally:
        bar.close()
        stack.close()
        em.set_budget(**saved_budget)
        em.train(was_training)
    n = max(1, pixels.shape[0])

    def measured(key) -> dict[str, Any]:
        acc = sums[key]
        return {"method_budget": plan[key], "accuracy": acc["correct"] / n, "agreement": acc["agree"] / n,
                "cosine": acc["cos"] / n, "block_flops_ratio": acc["exec"] / max(1, acc["dense"])}

    records = []
    for i, b in enumerate(budgets):
        for m in methods:
            records.append({"method": m, "budget": b} | measured((m, i)))
            if (again_key(m), i) in plan:  # the learned routers again, at this step baseline's FLOPs
                records[-1]["learned_at_same_flops"] = measured((again_key(m), i))
    return {"teacher_accuracy": teacher_correct / n, "images": int(pixels.shape[0]),
            "router_param_fraction": em.num_router_parameters() / max(1, em.num_base_parameters()), "records": records}
