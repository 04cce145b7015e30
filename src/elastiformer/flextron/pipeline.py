"""Flextron's steps as functions of an option dict (the defaults below): sort, continue-train, measure latency,
build a width router, evaluate budgets. The `elastiformer flextron ...` commands (elastiformer/cli/flextron.py) and
the Flextron benchmark (benchmarks/flextron.py) both run them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


def menus(o: dict[str, Any]):
    from ..validation import parse_floats as _floats
    from .config import FlextronConfig

    return FlextronConfig(mlp_widths=tuple(_floats(o["mlp_widths"], "mlp_widths")),
                          head_widths=tuple(_floats(o["head_widths"], "head_widths")),
                          head_granularity=o["head_granularity"])


def token_data(o: dict[str, Any], tokenizer, split: str, max_sequences, seq_len=None):
    from ..data.text import load_texts, pack_sequences

    texts = load_texts(None if o["data"] == "gutenberg" else o["data"], split=split)
    return pack_sequences(texts, tokenizer, int(seq_len or o["seq_len"]), max_sequences=max_sequences)


def load_flextron(model: str, o: dict[str, Any] | None = None):
    """A Flextron checkpoint folder, or any model `load_model` knows made nested (unsorted) with `o`'s menus."""
    from ..loading.models import load_model
    from .model import CONFIG_NAME, FlextronModel, get_flextron_model

    if Path(model).is_dir() and (Path(model) / CONFIG_NAME).is_file():
        return FlextronModel.from_pretrained(model)
    return get_flextron_model(load_model(model), menus(o) if o is not None else None)


# ---------------------------------------------------------------------- sort
SORT_DEFAULTS = dict(model="smollm2-135m", data="gutenberg", output="runs/flextron/sorted", seq_len=128,
                     calibration_sequences=32, batch_size=8, mlp_widths="1.0,0.75,0.5,0.25",
                     head_widths="1.0,0.75,0.5,0.25", head_granularity="head", overwrite=False)


def run_sort(o: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..cache import atomic_write_json
    from ..validation import check_output_dir
    from ..loading.models import load_model, load_tokenizer
    from .model import get_flextron_model
    from .sorting import compute_importance, sort_by_importance_

    cfg = menus(o)  # validate before loading anything
    out = Path(o["output"])
    check_output_dir(out, o["overwrite"], "the sorted checkpoint", flag="--overwrite")
    t0 = time.perf_counter()
    model = load_model(o["model"])
    tokenizer = load_tokenizer(o["model"])
    data = token_data(o, tokenizer, "train", int(o["calibration_sequences"]))  # (N, T) calibration tokens
    probe = data[: min(2, data.shape[0])]
    with torch.no_grad():
        before = model(input_ids=probe).logits
    importance = compute_importance(model, [{"input_ids": data[i:i + int(o["batch_size"])]}
                                            for i in range(0, data.shape[0], int(o["batch_size"]))], max_batches=None)
    info = sort_by_importance_(model, importance)
    with torch.no_grad():
        diff = float((model(input_ids=probe).logits - before).abs().max())
    fm = get_flextron_model(model, cfg)
    fm.save_pretrained(out, tokenizer=tokenizer, extra={"sort": {"model": str(o["model"]), "data": o["data"],
                                                                 "calibration_tokens": importance["tokens"]}})
    report = {"model": str(o["model"]), "output": str(out), "calibration_tokens": importance["tokens"],
              "max_abs_logit_change": diff, "seconds": time.perf_counter() - t0,
              "mlp_sizes": list(fm.mlp_sizes), "head_counts": list(fm.head_counts), "kv_counts": list(fm.kv_counts),
              "mlp_importance_top_share": [float(t[:t.numel() // 4].sum() / t.sum().clamp_min(1e-12))
                                           for t in (s.sort(descending=True).values for s in importance["mlp"])],
              "sorting": {k: v for k, v in info.items() if k == "calibration_tokens"}}
    atomic_write_json(out.parent / f"{out.name}_sort.json", report)
    return report


# ---------------------------------------------------------------------- train
TRAIN_DEFAULTS = dict(
    model="runs/flextron/sorted", data="gutenberg", output="runs/flextron/trained", steps=40, batch_size=4,
    seq_len=128, max_sequences=2000, lr=1e-4, schedule="cosine", warmup=5, grad_accum=1, seed=0, temperature=1.0,
    subnets="full,smallest,random,random", teacher="frozen", lm_weight=0.0, checkpoint_every=20, resume=False,
    eval_sequences=8, device=None, overwrite=False, mlp_widths="1.0,0.75,0.5,0.25", head_widths="1.0,0.75,0.5,0.25",
    head_granularity="head",
)


def heldout_kl(fm, teacher, held) -> dict[str, float]:
    from .training import subnet_kl

    return {name: subnet_kl(fm, held, choices, teacher=teacher)
            for name, choices in (("full", {"mlp": 0, "attn": 0}), ("smallest", fm.smallest_choices()),
                                  ("half", {"mlp": min(2, fm.flextron_config.n_mlp_choices - 1),
                                            "attn": min(2, fm.flextron_config.n_attn_choices - 1)}))}


def run_train(o: dict[str, Any]) -> dict[str, Any]:
    from ..cache import atomic_write_json
    from ..validation import check_output_dir
    from ..loading.models import load_tokenizer
    from .training import check_subnets, frozen_teacher, train_flextron

    subnets = check_subnets(o["subnets"])
    out = Path(o["output"])
    if not o["resume"]:
        check_output_dir(out, o["overwrite"], "its checkpoint", flag="--overwrite")
    fm = load_flextron(str(o["model"]), o)
    if not fm.is_sorted:
        print("note: this model is not importance-sorted (run `elastiformer flextron sort` first): narrow widths "
              "keep the first units, whatever their importance", file=sys.stderr)
    tokenizer = load_tokenizer(fm.base_model)
    data = token_data(o, tokenizer, "train", o["max_sequences"])
    held = token_data(o, tokenizer, "heldout", int(o["eval_sequences"])) if int(o["eval_sequences"]) else None
    reference = frozen_teacher(fm) if held is not None else None  # the starting model, to measure what training did
    before = heldout_kl(fm, reference, held) if held is not None else None
    report = train_flextron(
        fm, data, steps=int(o["steps"]), subnets=subnets, teacher=o["teacher"], batch_size=int(o["batch_size"]),
        lr=float(o["lr"]), schedule=o["schedule"], warmup=int(o["warmup"]), grad_accum=int(o["grad_accum"]),
        seed=int(o["seed"]), temperature=float(o["temperature"]), lm_weight=float(o["lm_weight"]), output_dir=out,
        checkpoint_every=int(o["checkpoint_every"]), resume=bool(o["resume"]), tokenizer=tokenizer,
        device=o["device"])
    result = report.to_dict() | {"model": str(o["model"]), "output": str(out / "model"), "subnets": list(subnets)}
    if held is not None:
        result["heldout_kl_to_start"] = {"before": before, "after": heldout_kl(fm, reference, held),
                                         "tokens": int(held.numel())}
    atomic_write_json(out / "train_result.json", result)
    return result


# ---------------------------------------------------------------------- latency
LATENCY_DEFAULTS = dict(model="runs/flextron/trained/model", batch_size=1, seq_len=128, reps=5, output=None,
                        check=False, threads=None, overwrite=False)


def run_latency(o: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..cache import atomic_write_json
    from ..errors import ConfigError
    from .latency import check_latency_prediction, measure_latency_table

    out = Path(o["output"]) if o["output"] else None
    if out is not None and out.exists() and not o["overwrite"]:
        raise ConfigError(f"{out} already exists: pass --overwrite to replace it")
    if o["threads"] is not None:
        torch.set_num_threads(int(o["threads"]))
    fm = load_flextron(str(o["model"]))
    table = measure_latency_table(fm, int(o["batch_size"]), int(o["seq_len"]), reps=int(o["reps"]))
    if o["check"]:
        table["check"] = check_latency_prediction(fm, table, reps=int(o["reps"]))
    if out is not None:
        atomic_write_json(out, table)
    return table


# ---------------------------------------------------------------------- route
ROUTE_DEFAULTS = dict(
    model="runs/flextron/trained/model", output=None, data="gutenberg", latency_table=None, measure_latency=False,
    latency_batch=1, latency_seq_len=128, adaptive=False, metric=None, seq_len=128, max_sequences=1000,
    n_configs=256, calibration_sequences=64, router_steps=500, joint_steps=20, joint_batch=4, model_lr=0.0, seed=0,
    overwrite=False,
)


def run_route(o: dict[str, Any]) -> dict[str, Any]:
    from ..cache import atomic_write_json
    from ..validation import check_output_dir
    from ..errors import ConfigError
    from ..loading.models import load_tokenizer
    from .latency import load_latency_table, measure_latency_table
    from .routing.build import build_router

    if o["metric"] not in (None, "latency_ms", "relative_compute"):
        raise ConfigError(f"--metric {o['metric']!r}: pass latency_ms or relative_compute")
    table = load_latency_table(o["latency_table"]) if o["latency_table"] else None  # fail fast, before loading
    out = Path(o["output"] or Path(o["model"]) / "router")
    check_output_dir(out, o["overwrite"], "the router", flag="--overwrite")
    fm = load_flextron(str(o["model"]))
    if table is None and o["measure_latency"]:
        table = measure_latency_table(fm, int(o["latency_batch"]), int(o["latency_seq_len"]))
    data = token_data(o, load_tokenizer(fm.base_model), "train", o["max_sequences"])
    bundle, report = build_router(
        fm, data, latency_table=table, adaptive=bool(o["adaptive"]), metric=o["metric"], n_configs=int(o["n_configs"]),
        calibration_sequences=int(o["calibration_sequences"]), router_steps=int(o["router_steps"]),
        joint_steps=int(o["joint_steps"]), joint_batch=int(o["joint_batch"]), model_lr=float(o["model_lr"]),
        seed=int(o["seed"]))
    report.pop("surrogate_model")
    bundle.save_pretrained(out)
    if table is not None:
        atomic_write_json(out / "latency_table.json", table)
    report |= {"model": str(o["model"]), "output": str(out)}
    atomic_write_json(out / "route_report.json", report)
    return report


# ---------------------------------------------------------------------- eval
FLEXTRON_EVAL_DEFAULTS = dict(
    model="runs/flextron/trained/model", router=None, teacher=None, data="gutenberg", budgets="0.5,0.75",
    metric="latency_ms", seq_len=256, max_sequences=16, batch_size=4, timing_reps=3, output=None, overwrite=False,
)


def run_flextron_eval(o: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..validation import parse_floats as _floats
    from ..errors import ConfigError
    from ..loading.models import load_model, load_tokenizer
    from .routing.budget import clear_budget
    from .evaluate import TeacherCache, lm_quality, time_forwards
    from .routing.routers import FlextronRouter

    budgets = _floats(o["budgets"], "budgets")
    if o["metric"] not in ("latency_ms", "relative_compute"):
        raise ConfigError(f"--metric {o['metric']!r}: pass latency_ms or relative_compute")
    router_dir = Path(o["router"] or Path(o["model"]) / "router")
    router = FlextronRouter.from_pretrained(router_dir)  # fail fast, before loading the model
    if o["metric"] not in router.costs:
        raise ConfigError(f"the router in {router_dir} has no latency table: pass --metric relative_compute")
    cost = router.costs[o["metric"]]
    for b in budgets:  # fail fast, before the model and the teacher run
        price = b * cost.full if o["metric"] == "latency_ms" else b * cost.full
        if not 0 < b <= 1 or price < cost.minimum:
            from ..errors import BudgetError

            raise BudgetError(f"budget {b} is outside (0, 1] or below the smallest sub-network's predicted "
                              f"{o['metric']} ({cost.minimum / cost.full:.3f} of full): pass budgets in "
                              f"[{cost.minimum / cost.full:.3f}, 1]")
    fm = load_flextron(str(o["model"]))
    fm.load_router(router_dir)
    held = token_data(o, load_tokenizer(fm.base_model), "heldout", int(o["max_sequences"]))
    if o["teacher"]:
        original = load_model(o["teacher"])
        teacher = TeacherCache(lambda b: original(**b).logits, held, int(o["batch_size"]))
        teacher_name = str(o["teacher"])
    else:
        with fm.full():
            teacher = TeacherCache(lambda b: fm(**b).logits, held, int(o["batch_size"]))
        teacher_name = "the checkpoint at full width"
    cost = router.costs[o["metric"]]
    records, setups = [], {}
    ids = held[:1, :128]
    for b in budgets:
        target = b * cost.full if o["metric"] == "latency_ms" else b
        picked = fm.set_budget(**{o["metric"]: target})
        q = lm_quality(lambda batch: fm(**batch), teacher, fm.last_stats)
        records.append(q | {"budget": b, "metric": o["metric"], "target": target, "picked": picked})
        setups[f"budget {b}"] = ((lambda t=target: fm.set_budget(**{o["metric"]: t})), lambda: fm(input_ids=ids))
    if int(o["timing_reps"]):
        setups["full"] = ((lambda: clear_budget(fm)), lambda: fm(input_ids=ids))
        with torch.no_grad():
            ms = time_forwards(setups, reps=int(o["timing_reps"]))
        for r in records:
            r["measured_ms"] = ms[f"budget {r['budget']}"]
            r["measured_fraction_of_full"] = r["measured_ms"] / ms["full"]
    return {"model": str(o["model"]), "router": str(router_dir), "teacher": teacher_name, "tokens": teacher.tokens,
            "timing_input": list(ids.shape), "records": records}
