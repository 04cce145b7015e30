"""Flextron's steps as functions of an option dict (the defaults below): sort, continue-train, measure latency,
build a width router, evaluate budgets. The `elastiformer flextron ...` commands (elastiformer/cli/flextron.py) and
the Flextron benchmark (benchmarks/flextron.py) both run them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ..options import Option, defaults

MENU_OPTIONS = {
    "mlp_widths": Option("1.0,0.75,0.5,0.25", "MLP width menu, fractions widest first."),
    "head_widths": Option("1.0,0.75,0.5,0.25", "Attention head menu, fractions widest first."),
    "head_granularity": Option("head", "'head' (query heads, group-major) or 'group' (whole KV groups)."),
}

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
SORT_OPTIONS = {
    "model": Option("smollm2-135m", "Short name (smollm2-135m), HF folder, .gguf file or hub id."),
    "data": Option("gutenberg", "Calibration text: 'gutenberg' (its training books) or a file / folder of text."),
    "output": Option("runs/flextron/sorted", "Folder for the sorted checkpoint; a report goes beside it as "
                     "<output>_sort.json.", kind=Path),
    "seq_len": Option(128, "Tokens per calibration sequence."),
    "calibration_sequences": Option(32, "Calibration sequences."),
    "batch_size": Option(8, "Sequences per forward."),
    **MENU_OPTIONS,
    "overwrite": Option(False, "Replace an existing OUTPUT."),
}
SORT_DEFAULTS = defaults(SORT_OPTIONS)


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
TRAIN_OPTIONS = {
    "model": Option("runs/flextron/sorted", "A Flextron checkpoint (from `flextron sort`), or any model (then "
                    "unsorted, made nested with the menus below)."),
    "data": Option("gutenberg", "'gutenberg' (its training books) or your own text source."),
    "output": Option("runs/flextron/trained", "Folder for model/, checkpoint/, train_log.json and "
                     "train_result.json.", kind=Path),
    "steps": Option(40, "Optimizer steps."),
    "batch_size": Option(4, "Sequences per micro-batch."),
    "seq_len": Option(128, "Tokens per sequence."),
    "max_sequences": Option(2000, "Use at most this many training sequences."),
    "lr": Option(1e-4, "Peak learning rate of the base weights."),
    "schedule": Option("cosine", "cosine, linear or constant (after warmup)."),
    "warmup": Option(5, "Linear warmup steps."),
    "grad_accum": Option(1, "Micro-batches per optimizer step."),
    "seed": Option(0, "Seed of data order and sampled sub-networks."),
    "temperature": Option(1.0, "Distillation temperature."),
    "subnets": Option("full,smallest,random,random", "Sub-networks per step: full, smallest, random, uniform."),
    "teacher": Option("frozen", "'frozen' (a copy of the starting weights) or 'self' (the same weights at full "
                      "width, no copy)."),
    "lm_weight": Option(0.0, "Weight of next-token cross-entropy added to the KL."),
    "checkpoint_every": Option(20, "Checkpoint every N steps."),
    "resume": Option(False, "Continue from OUTPUT/checkpoint (same --model)."),
    "eval_sequences": Option(8, "Held-out sequences for the KL before / after (0: skip)."),
    "device": Option(None, "cpu or cuda (default: a GPU when there is one).", kind=str),
    "overwrite": Option(False, "Replace an existing OUTPUT."),
    **MENU_OPTIONS,
}
TRAIN_DEFAULTS = defaults(TRAIN_OPTIONS)


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
LATENCY_OPTIONS = {
    "model": Option("runs/flextron/trained/model", "A Flextron checkpoint."),
    "batch_size": Option(1, "Sequences per forward (the table is for this batch)."),
    "seq_len": Option(128, "Tokens per sequence (the table is for this length)."),
    "reps": Option(5, "Timed repetitions per cell (median)."),
    "output": Option(None, "Write the table (JSON) here.", kind=Path),
    "check": Option(False, "Also measure configurations end to end and report the prediction error."),
    "threads": Option(None, "torch threads (default: torch's choice; recorded).", kind=int),
    "overwrite": Option(False, "Replace an existing OUTPUT."),
}
LATENCY_DEFAULTS = defaults(LATENCY_OPTIONS)


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
ROUTE_OPTIONS = {
    "model": Option("runs/flextron/trained/model", "A Flextron checkpoint."),
    "output": Option(None, "Router folder (default MODEL/router).", kind=Path),
    "data": Option("gutenberg", "Training text: 'gutenberg' (its training books) or your own."),
    "latency_table": Option(None, "Latency table JSON (`elastiformer flextron latency --output`); budgets become "
                            "fractions of its full latency.", kind=Path),
    "measure_latency": Option(False, "Measure the latency table now (when no --latency-table is given)."),
    "latency_batch": Option(1, "Batch of the measured latency table."),
    "latency_seq_len": Option(128, "Sequence length of the measured latency table."),
    "adaptive": Option(False, "Input-adaptive router (budget + the input's pooled embedding, a configuration per "
                       "sequence) instead of the static one."),
    "metric": Option(None, "What budgets are fractions of: latency_ms (default with a latency table) or "
                     "relative_compute (block FLOPs).", kind=str),
    "seq_len": Option(128, "Tokens per training sequence."),
    "max_sequences": Option(1000, "Training sequences to use."),
    "n_configs": Option(256, "Configurations measured to fit the surrogate."),
    "calibration_sequences": Option(64, "Sequences the configurations are measured on."),
    "router_steps": Option(500, "Router steps through the surrogate."),
    "joint_steps": Option(20, "Joint fine-tune steps through the model (0: none)."),
    "joint_batch": Option(4, "Sequences per joint fine-tune step."),
    "model_lr": Option(0.0, "Also update the model's weights in the joint fine-tune at this learning rate (0: "
                       "routers only)."),
    "seed": Option(0, "Seed of configurations, budgets and init."),
    "overwrite": Option(False, "Replace an existing OUTPUT."),
}
ROUTE_DEFAULTS = defaults(ROUTE_OPTIONS)


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
FLEXTRON_EVAL_OPTIONS = {
    "model": Option("runs/flextron/trained/model", "A Flextron checkpoint."),
    "router": Option(None, "Router folder (default MODEL/router).", kind=Path),
    "teacher": Option(None, "Score against this model (e.g. smollm2-135m, the original) instead of the checkpoint "
                      "at full width.", kind=str),
    "data": Option("gutenberg", "'gutenberg' (its held-out books) or your own text."),
    "budgets": Option("0.5,0.75", "Budgets as fractions of the full model's latency (or compute with --metric "
                      "relative_compute)."),
    "metric": Option("latency_ms", "latency_ms or relative_compute."),
    "seq_len": Option(256, "Tokens per held-out sequence."),
    "max_sequences": Option(16, "Held-out sequences."),
    "batch_size": Option(4, "Sequences per forward."),
    "timing_reps": Option(3, "Interleaved timing repetitions (0: no timing)."),
    "output": Option(None, "Write the results as JSON here.", kind=Path),
    "overwrite": Option(False, "Replace an existing OUTPUT."),
}
FLEXTRON_EVAL_DEFAULTS = defaults(FLEXTRON_EVAL_OPTIONS)


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
