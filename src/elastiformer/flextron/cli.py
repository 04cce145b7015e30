"""`elastiformer flextron ...`: sort | train | latency (a typer sub-app of the main command).

    elastiformer flextron sort --output runs/flextron/sorted            # importance-sort SmolLM2, save a checkpoint
    elastiformer flextron train --model runs/flextron/sorted --steps 40  # elastic continued-training
    elastiformer flextron latency --model runs/flextron/trained/model --check

Every command takes `--config FILE.yaml` (option: value lines; the command line wins), writes JSON, shows progress
bars, and turns errors a user can fix into one line (exit 2).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(help="Flextron (arXiv 2406.10260): importance-sort a model, make every layer nested-elastic, "
                       "continue-train it by distillation into sub-networks, and measure its per-layer latency.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def _menus(o: dict[str, Any]):
    from ..validation import parse_floats as _floats
    from .config import FlextronConfig

    return FlextronConfig(mlp_widths=tuple(_floats(o["mlp_widths"], "mlp_widths")),
                          head_widths=tuple(_floats(o["head_widths"], "head_widths")),
                          head_granularity=o["head_granularity"])


def _token_data(o: dict[str, Any], tokenizer, split: str, max_sequences, seq_len=None):
    from ..data import load_texts, pack_sequences

    texts = load_texts(None if o["data"] == "gutenberg" else o["data"], split=split)
    return pack_sequences(texts, tokenizer, int(seq_len or o["seq_len"]), max_sequences=max_sequences)


def load_flextron(model: str, o: dict[str, Any] | None = None):
    """A Flextron checkpoint folder, or any model `load_model` knows made nested (unsorted) with `o`'s menus."""
    from ..models import load_model
    from .model import CONFIG_NAME, FlextronModel, get_flextron_model

    if Path(model).is_dir() and (Path(model) / CONFIG_NAME).is_file():
        return FlextronModel.from_pretrained(model)
    return get_flextron_model(load_model(model), _menus(o) if o is not None else None)


# ---------------------------------------------------------------------- sort
SORT_DEFAULTS = dict(model="smollm2-135m", data="gutenberg", output="runs/flextron/sorted", seq_len=128,
                     calibration_sequences=32, batch_size=8, mlp_widths="1.0,0.75,0.5,0.25",
                     head_widths="1.0,0.75,0.5,0.25", head_granularity="head", overwrite=False)


def run_sort(o: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..cache import atomic_write_json
    from ..cli import _check_output
    from ..models import load_model, load_tokenizer
    from .model import get_flextron_model
    from .sorting import compute_importance, sort_by_importance_

    cfg = _menus(o)  # validate before loading anything
    out = Path(o["output"])
    _check_output(out, o["overwrite"], "the sorted checkpoint")
    t0 = time.perf_counter()
    model = load_model(o["model"])
    tokenizer = load_tokenizer(o["model"])
    data = _token_data(o, tokenizer, "train", int(o["calibration_sequences"]))  # (N, T) calibration tokens
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


@app.command()
def sort(
    model: Optional[str] = typer.Option(None, help="Short name (smollm2-135m), HF folder, .gguf file or hub id."),
    data: Optional[str] = typer.Option(None, help="Calibration text: 'gutenberg' (its training books) or a file / "
                                       "folder of text."),
    output: Optional[Path] = typer.Option(None, help="Folder for the sorted checkpoint (default runs/flextron/sorted); "
                                          "a report goes beside it as <output>_sort.json."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per calibration sequence."),
    calibration_sequences: Optional[int] = typer.Option(None, help="Calibration sequences (default 32)."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per forward."),
    mlp_widths: Optional[str] = typer.Option(None, help="MLP width menu, fractions widest first (1.0,0.75,0.5,0.25)."),
    head_widths: Optional[str] = typer.Option(None, help="Attention head menu, fractions widest first."),
    head_granularity: Optional[str] = typer.Option(None, help="'head' (query heads, group-major) or 'group' "
                                                   "(whole KV groups)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT."),
    config: Optional[Path] = typer.Option(None, help="YAML file of these options (the command line wins)."),
):
    """Rank MLP neurons and attention heads on calibration text, permute the weights (most important first; the
    logits do not change) and save a Flextron checkpoint with the width menus."""
    from ..cli import _merge

    given = {k: v for k, v in locals().items() if k != "config"}
    given["overwrite"] = overwrite or None
    report = run_sort(_merge(config, given, SORT_DEFAULTS, command=sort))
    typer.echo(f"sorted on {report['calibration_tokens']:,} tokens in {report['seconds']:.0f}s (max logit change "
               f"{report['max_abs_logit_change']:.2e}); MLP widths {report['mlp_sizes']}, heads "
               f"{report['head_counts']}; checkpoint in {report['output']}")


# ---------------------------------------------------------------------- train
TRAIN_DEFAULTS = dict(
    model="runs/flextron/sorted", data="gutenberg", output="runs/flextron/trained", steps=40, batch_size=4,
    seq_len=128, max_sequences=2000, lr=1e-4, schedule="cosine", warmup=5, grad_accum=1, seed=0, temperature=1.0,
    subnets="full,smallest,random,random", teacher="frozen", lm_weight=0.0, checkpoint_every=20, resume=False,
    eval_sequences=8, device=None, overwrite=False, mlp_widths="1.0,0.75,0.5,0.25", head_widths="1.0,0.75,0.5,0.25",
    head_granularity="head",
)


def _heldout_kl(fm, teacher, held) -> dict[str, float]:
    from .training import subnet_kl

    return {name: subnet_kl(fm, held, choices, teacher=teacher)
            for name, choices in (("full", {"mlp": 0, "attn": 0}), ("smallest", fm.smallest_choices()),
                                  ("half", {"mlp": min(2, fm.flextron_config.n_mlp_choices - 1),
                                            "attn": min(2, fm.flextron_config.n_attn_choices - 1)}))}


def run_train(o: dict[str, Any]) -> dict[str, Any]:
    from ..cache import atomic_write_json
    from ..cli import _check_output
    from ..models import load_tokenizer
    from .training import _check_subnets, frozen_teacher, train_flextron

    subnets = _check_subnets(o["subnets"])
    out = Path(o["output"])
    if not o["resume"]:
        _check_output(out, o["overwrite"], "its checkpoint")
    fm = load_flextron(str(o["model"]), o)
    if not fm.is_sorted:
        typer.echo("note: this model is not importance-sorted (run `elastiformer flextron sort` first): narrow widths "
                   "keep the first units, whatever their importance", err=True)
    tokenizer = load_tokenizer(fm.base_model)
    data = _token_data(o, tokenizer, "train", o["max_sequences"])
    held = _token_data(o, tokenizer, "heldout", int(o["eval_sequences"])) if int(o["eval_sequences"]) else None
    reference = frozen_teacher(fm) if held is not None else None  # the starting model, to measure what training did
    before = _heldout_kl(fm, reference, held) if held is not None else None
    report = train_flextron(
        fm, data, steps=int(o["steps"]), subnets=subnets, teacher=o["teacher"], batch_size=int(o["batch_size"]),
        lr=float(o["lr"]), schedule=o["schedule"], warmup=int(o["warmup"]), grad_accum=int(o["grad_accum"]),
        seed=int(o["seed"]), temperature=float(o["temperature"]), lm_weight=float(o["lm_weight"]), output_dir=out,
        checkpoint_every=int(o["checkpoint_every"]), resume=bool(o["resume"]), tokenizer=tokenizer,
        device=o["device"])
    result = report.to_dict() | {"model": str(o["model"]), "output": str(out / "model"), "subnets": list(subnets)}
    if held is not None:
        result["heldout_kl_to_start"] = {"before": before, "after": _heldout_kl(fm, reference, held),
                                         "tokens": int(held.numel())}
    atomic_write_json(out / "train_result.json", result)
    return result


@app.command()
def train(
    model: Optional[str] = typer.Option(None, help="A Flextron checkpoint (from `flextron sort`; default "
                                        "runs/flextron/sorted), or any model (then unsorted)."),
    data: Optional[str] = typer.Option(None, help="'gutenberg' (its training books) or your own text source."),
    output: Optional[Path] = typer.Option(None, help="Folder for model/, checkpoint/, train_log.json and "
                                          "train_result.json."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per micro-batch."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence."),
    max_sequences: Optional[int] = typer.Option(None, help="Use at most this many training sequences."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate of the base weights."),
    schedule: Optional[str] = typer.Option(None, help="cosine, linear or constant (after warmup)."),
    warmup: Optional[int] = typer.Option(None, help="Linear warmup steps."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step."),
    seed: Optional[int] = typer.Option(None, help="Seed of data order and sampled sub-networks."),
    temperature: Optional[float] = typer.Option(None, help="Distillation temperature."),
    subnets: Optional[str] = typer.Option(None, help="Sub-networks per step: full, smallest, random, uniform "
                                          "(default full,smallest,random,random)."),
    teacher: Optional[str] = typer.Option(None, help="'frozen' (a copy of the starting weights) or 'self' (the same "
                                          "weights at full width, no copy)."),
    lm_weight: Optional[float] = typer.Option(None, help="Weight of next-token cross-entropy added to the KL."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT/checkpoint (same --model)."),
    eval_sequences: Optional[int] = typer.Option(None, help="Held-out sequences for the KL before / after (0: skip)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: a GPU when there is one)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT."),
    config: Optional[Path] = typer.Option(None, help="YAML file of these options (the command line wins)."),
):
    """Elastic continued-training: distil the starting model into the full, smallest and random sub-networks each
    step, updating the shared weights; saves a full checkpoint in OUTPUT/model."""
    from ..cli import _merge

    given = {k: v for k, v in locals().items() if k != "config"}
    given["resume"] = resume or None
    given["overwrite"] = overwrite or None
    r = run_train(_merge(config, given, TRAIN_DEFAULTS, command=train))
    line = f"trained {r['steps']} steps on {r['tokens']:,} tokens in {r['seconds']:.0f}s; checkpoint in {r['output']}"
    if "heldout_kl_to_start" in r:
        b, a = r["heldout_kl_to_start"]["before"], r["heldout_kl_to_start"]["after"]
        line += "; held-out KL to the start " + ", ".join(f"{k} {b[k]:.3f} -> {a[k]:.3f}" for k in b)
    typer.echo(line)


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


@app.command()
def latency(
    model: Optional[str] = typer.Option(None, help="A Flextron checkpoint (default runs/flextron/trained/model)."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per forward (the table is for this batch)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence (the table is for this length)."),
    reps: Optional[int] = typer.Option(None, help="Timed repetitions per cell (median)."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice; recorded)."),
    check: bool = typer.Option(False, "--check", help="Also measure configurations end to end and report the "
                               "prediction error."),
    output: Optional[Path] = typer.Option(None, help="Write the table (JSON) here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT."),
    config: Optional[Path] = typer.Option(None, help="YAML file of these options (the command line wins)."),
):
    """Measure every layer's MLP and attention latency at every menu width on this machine (the lookup table that
    latency budgets use); --check compares predicted and measured end-to-end latency."""
    from ..cli import _merge

    given = {k: v for k, v in locals().items() if k != "config"}
    given["check"] = check or None
    given["overwrite"] = overwrite or None
    t = run_latency(_merge(config, given, LATENCY_DEFAULTS, command=latency))
    typer.echo(f"{len(t['mlp_ms'])} layers x ({len(t['mlp_ms'][0])} MLP + {len(t['attn_ms'][0])} attention widths) "
               f"at {t['batch_size']}x{t['seq_len']} tokens on {t['machine']['cpu_model']} "
               f"({t['machine']['torch_threads']} threads): full forward {t['full_ms']:.1f} ms, overhead "
               f"{t['overhead_ms']:.1f} ms")
    if "calibration" in t:
        c = t["calibration"]
        typer.echo(f"  calibrated on {len(c['configs'])} end-to-end forwards: cells x {c['scale']:.3f}, overhead "
                   f"{c['raw_overhead_ms']:.1f} -> {c['overhead_ms']:.1f} ms; fit error "
                   f"{100 * c['uncalibrated_mean_abs_rel_error']:.1f}% -> {100 * c['fit_mean_abs_rel_error']:.1f}%")
    if "check" in t:
        for r in t["check"]["records"]:
            typer.echo(f"  {r['name']:>10}: predicted {r['predicted_ms']:8.1f} ms, measured {r['measured_ms']:8.1f} "
                       f"ms ({100 * r['rel_error']:+.1f}%)")
        typer.echo(f"  mean |error| {100 * t['check']['mean_abs_rel_error']:.1f}%, max "
                   f"{100 * t['check']['max_abs_rel_error']:.1f}%")
    if t.get("check") is None and not output:
        typer.echo("(pass --output FILE.json to keep the table)")


from . import route_cli  # noqa: E402,F401  (registers route | eval | bench on this app)
