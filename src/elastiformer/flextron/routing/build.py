"""`build_router`: the whole router recipe on a (sorted, continued-trained) Flextron model, in the paper's order.

1. measure the ΔLM loss of sampled configurations on training text and fit the surrogate (held-out fit reported
   against a constant predictor);
2. train the static or input-adaptive router through the frozen surrogate with a budget loss from the latency
   table (or from the FLOPs table when there is no latency table);
3. a short joint fine-tune through the real model (soft nested widths);
4. report how close the argmax configurations land on a few budgets.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ...errors import ConfigError, DataError
from .routers import FlextronRouter, WidthRouter, joint_finetune, train_router
from .configurations import compute_cost_model, latency_cost_model, menu_sizes, pooled_features
from .surrogate import fit_surrogate, measure_configurations


@torch.no_grad()
def _features(fm, data: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    device = next(fm.parameters()).device
    return torch.cat([pooled_features(fm, data[i:i + batch_size].to(device)).cpu()
                      for i in range(0, data.shape[0], batch_size)])  # (N, C)


def budget_adherence(bundle: FlextronRouter, budgets=(0.5, 0.75, 0.9), features: torch.Tensor | None = None) -> list:
    """For each relative budget: the relative cost (router's metric) of the raw argmax and of the exact pick."""
    out = []
    cost = bundle.cost
    for b in budgets:
        target = b * cost.full
        row = {"budget": b}
        for name, exact in (("raw", False), ("exact", True)):
            picked = bundle.choose(target, bundle.metric, features=features, exact=exact)
            rel = cost.hard(picked) / cost.full
            row[name] = float(rel.mean())
            row[f"{name}_max_miss"] = float(((rel - b) / b).abs().max())
        out.append(row)
    return out


def build_router(fm, data: torch.Tensor, *, latency_table: dict[str, Any] | None = None, adaptive: bool = False,
                 metric: str | None = None, n_configs: int = 256, per_sequence: bool = True,
                 calibration_sequences: int = 64, measure_batch: int = 8, surrogate_hidden: int = 64,
                 router_steps: int = 500, router_hidden: int = 64, joint_steps: int = 20, joint_batch: int = 4,
                 model_lr: float = 0.0, cost_weight: float = 200.0, seed: int = 0, surrogate=None,
                 progress: bool = True) -> tuple[FlextronRouter, dict[str, Any]]:
    """Train a width router for `fm` on training token ids `data` (N, T); returns it and a report.

    metric: what the router's budget is a fraction of, "latency_ms" (default when a latency table is given) or
    "relative_compute" (block FLOPs). The other metric is kept too, so `set_budget` takes either.
    surrogate: a `(Surrogate, SurrogateReport)` already fitted on this model (e.g. for a second router), else one
    is measured and fitted here."""
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.shape[0] < 2:
        raise DataError("router training data must be token ids [N >= 2 sequences, T tokens] of training text")
    costs = {"relative_compute": compute_cost_model(fm, seq_len=int(data.shape[1]))}
    if latency_table is not None:
        costs["latency_ms"] = latency_cost_model(latency_table)
    metric = metric or ("latency_ms" if latency_table is not None else "relative_compute")
    if metric not in costs:
        raise ConfigError(f"metric={metric!r} needs {'a latency table' if metric == 'latency_ms' else 'a known metric'}: "
                          "pass latency_table=measure_latency_table(fm) or metric='relative_compute'")
    t0 = time.perf_counter()
    n_layers, n_mlp, n_attn = menu_sizes(fm)
    calib = data[:calibration_sequences]
    if surrogate is None:
        samples = measure_configurations(fm, [{"input_ids": calib[i:i + measure_batch]}
                                              for i in range(0, calib.shape[0], measure_batch)],
                                         n_configs, per_sequence=per_sequence, seed=seed, progress=progress)
        surrogate = fit_surrogate(samples, hidden=surrogate_hidden, seed=seed)
    surrogate, sm_report = surrogate
    t_surrogate = time.perf_counter() - t0
    features = _features(fm, data) if adaptive else None
    torch.manual_seed(seed)
    router = WidthRouter(n_layers, n_mlp, n_attn, feature_dim=features.shape[1] if adaptive else 0,
                         hidden=router_hidden)
    if adaptive:
        router.set_feature_stats(features)
    meta = {"base_model": fm.base_identity(), "flextron_config": fm.flextron_config.to_dict(),
            "seq_len": int(data.shape[1])}
    if latency_table is not None:
        meta["machine_name"] = latency_table.get("machine", {}).get("cpu_model", "the table's machine")
        meta["latency_table"] = {k: latency_table.get(k) for k in ("batch_size", "seq_len", "machine", "created")}
    bundle = FlextronRouter(router, costs, metric, meta)
    r1 = train_router(bundle, surrogate, features=features, steps=router_steps, cost_weight=cost_weight, seed=seed,
                      progress=progress)
    before = budget_adherence(bundle, features=features[:16] if adaptive else None)
    r2 = None
    if joint_steps:
        r2 = joint_finetune(fm, bundle, data, steps=joint_steps, batch_size=joint_batch, model_lr=model_lr,
                            cost_weight=cost_weight, seed=seed, progress=progress)
    bundle.meta["base_model"] = fm.base_identity()  # weights change when model_lr > 0
    report = {
        "surrogate_model": (surrogate, sm_report),  # not JSON: dropped by the CLI, reused by the benchmark
        "metric": metric, "adaptive": adaptive, "n_configs": n_configs, "per_sequence": per_sequence,
        "surrogate": sm_report.to_dict(), "surrogate_seconds": t_surrogate,
        "calibration_tokens": int(calib.numel()),
        "router_surrogate_phase": {"steps": r1.steps, "seconds": r1.seconds, "final": r1.history[-1]},
        "budget_adherence_after_surrogate_phase": before,
        "joint_finetune": None if r2 is None else {"steps": r2.steps, "seconds": r2.seconds, "tokens": r2.tokens,
                                                   "first": r2.history[0], "final": r2.history[-1]},
        "budget_adherence": budget_adherence(bundle, features=features[:16] if adaptive else None),
        "seconds": time.perf_counter() - t0,
    }
    bundle.meta["report"] = {k: report[k] for k in ("surrogate", "budget_adherence")}
    return bundle, report
