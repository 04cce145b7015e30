"""`elastiformer flextron ...`: sort | train | latency | route | eval | bench (a typer sub-app of the main command).

    elastiformer flextron sort --output runs/flextron/sorted            # importance-sort SmolLM2, save a checkpoint
    elastiformer flextron train --model runs/flextron/sorted --steps 40  # elastic continued-training
    elastiformer flextron latency --model runs/flextron/trained/model --check
    elastiformer flextron route --model runs/flextron/trained/model --latency-table table.json   # -> MODEL/router
    elastiformer flextron eval --model runs/flextron/trained/model --budgets 0.5,0.75 --output eval.json
    elastiformer flextron bench                                     # bench/results/flextron.json

Every command takes `--config FILE.yaml` (option: value lines; the command line wins), writes JSON, shows progress
bars, and turns errors a user can fix into one line (exit 2). The work itself is in elastiformer/flextron/pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..flextron.pipeline import (FLEXTRON_EVAL_DEFAULTS, LATENCY_DEFAULTS, ROUTE_DEFAULTS, SORT_DEFAULTS,
                                 TRAIN_DEFAULTS, run_flextron_eval, run_latency, run_route, run_sort, run_train)
from .options import merge_options

app = typer.Typer(help="Flextron (arXiv 2406.10260): importance-sort a model, make every layer nested-elastic, "
                       "continue-train it by distillation into sub-networks, and measure its per-layer latency.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


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

    given = {k: v for k, v in locals().items() if k != "config"}
    given["overwrite"] = overwrite or None
    report = run_sort(merge_options(config, given, SORT_DEFAULTS, command=sort))
    typer.echo(f"sorted on {report['calibration_tokens']:,} tokens in {report['seconds']:.0f}s (max logit change "
               f"{report['max_abs_logit_change']:.2e}); MLP widths {report['mlp_sizes']}, heads "
               f"{report['head_counts']}; checkpoint in {report['output']}")


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

    given = {k: v for k, v in locals().items() if k != "config"}
    given["resume"] = resume or None
    given["overwrite"] = overwrite or None
    r = run_train(merge_options(config, given, TRAIN_DEFAULTS, command=train))
    line = f"trained {r['steps']} steps on {r['tokens']:,} tokens in {r['seconds']:.0f}s; checkpoint in {r['output']}"
    if "heldout_kl_to_start" in r:
        b, a = r["heldout_kl_to_start"]["before"], r["heldout_kl_to_start"]["after"]
        line += "; held-out KL to the start " + ", ".join(f"{k} {b[k]:.3f} -> {a[k]:.3f}" for k in b)
    typer.echo(line)


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

    given = {k: v for k, v in locals().items() if k != "config"}
    given["check"] = check or None
    given["overwrite"] = overwrite or None
    t = run_latency(merge_options(config, given, LATENCY_DEFAULTS, command=latency))
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


@app.command()
def route(
    model: Optional[str] = typer.Option(None, help="A Flextron checkpoint (default runs/flextron/trained/model)."),
    output: Optional[Path] = typer.Option(None, help="Router folder (default MODEL/router)."),
    data: Optional[str] = typer.Option(None, help="Training text: 'gutenberg' (its training books) or your own."),
    latency_table: Optional[Path] = typer.Option(None, help="Latency table JSON (`elastiformer flextron latency "
                                                 "--output`); budgets become fractions of its full latency."),
    measure_latency: bool = typer.Option(False, "--measure-latency", help="Measure the latency table now (when no "
                                         "--latency-table is given)."),
    latency_batch: Optional[int] = typer.Option(None, help="Batch of the measured latency table."),
    latency_seq_len: Optional[int] = typer.Option(None, help="Sequence length of the measured latency table."),
    adaptive: bool = typer.Option(False, "--adaptive", help="Input-adaptive router (budget + the input's pooled "
                                  "embedding, a configuration per sequence) instead of the static one."),
    metric: Optional[str] = typer.Option(None, help="What budgets are fractions of: latency_ms (default with a "
                                         "latency table) or relative_compute (block FLOPs)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per training sequence."),
    max_sequences: Optional[int] = typer.Option(None, help="Training sequences to use."),
    n_configs: Optional[int] = typer.Option(None, help="Configurations measured to fit the surrogate."),
    calibration_sequences: Optional[int] = typer.Option(None, help="Sequences the configurations are measured on."),
    router_steps: Optional[int] = typer.Option(None, help="Router steps through the surrogate."),
    joint_steps: Optional[int] = typer.Option(None, help="Joint fine-tune steps through the model (0: none)."),
    joint_batch: Optional[int] = typer.Option(None, help="Sequences per joint fine-tune step."),
    model_lr: Optional[float] = typer.Option(None, help="Also update the model's weights in the joint fine-tune at "
                                             "this learning rate (default 0: routers only)."),
    seed: Optional[int] = typer.Option(None, help="Seed of configurations, budgets and init."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT."),
    config: Optional[Path] = typer.Option(None, help="YAML file of these options (the command line wins)."),
):
    """Train a width router: measure sampled configurations, fit the surrogate, train the router through it with a
    latency (or compute) budget loss, then a short joint fine-tune; saves router.safetensors + router_config.json
    and route_report.json."""

    given = {k: v for k, v in locals().items() if k != "config"}
    for flag in ("measure_latency", "adaptive", "overwrite"):
        given[flag] = given[flag] or None
    r = run_route(merge_options(config, given, ROUTE_DEFAULTS, command=route))
    s = r["surrogate"]
    typer.echo(f"surrogate: held-out MSE {s['heldout_mse']:.4f} against {s['constant_heldout_mse']:.4f} for a "
               f"constant (R^2 {s['heldout_r2']:.2f}) on {s['n_heldout']} configurations")
    for row in r["budget_adherence"]:
        typer.echo(f"budget {row['budget']:.2f} of full {r['metric']}: router argmax spends {row['raw']:.3f}, "
                   f"exact pick {row['exact']:.3f}")
    typer.echo(f"router in {r['output']} ({r['seconds']:.0f}s)")


@app.command("eval")
def eval_(
    model: Optional[str] = typer.Option(None, help="A Flextron checkpoint (default runs/flextron/trained/model)."),
    router: Optional[Path] = typer.Option(None, help="Router folder (default MODEL/router)."),
    teacher: Optional[str] = typer.Option(None, help="Score against this model (e.g. smollm2-135m, the original) "
                                          "instead of the checkpoint at full width."),
    data: Optional[str] = typer.Option(None, help="'gutenberg' (its held-out books) or your own text."),
    budgets: Optional[str] = typer.Option(None, help="Budgets as fractions of the full model's latency (or compute "
                                          "with --metric relative_compute), e.g. 0.5,0.75."),
    metric: Optional[str] = typer.Option(None, help="latency_ms (default) or relative_compute."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per held-out sequence."),
    max_sequences: Optional[int] = typer.Option(None, help="Held-out sequences."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per forward."),
    timing_reps: Optional[int] = typer.Option(None, help="Interleaved timing repetitions (0: no timing)."),
    output: Optional[Path] = typer.Option(None, help="Write the results as JSON here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT."),
    config: Optional[Path] = typer.Option(None, help="YAML file of these options (the command line wins)."),
):
    """Evaluate a routed Flextron checkpoint on held-out text at several budgets: the configuration picked, its
    predicted and measured latency, ΔLM loss, KL and top-1 agreement against the teacher."""
    from ..cache import atomic_write_json
    from ..errors import ConfigError

    given = {k: v for k, v in locals().items() if k != "config"}
    given["overwrite"] = overwrite or None
    o = merge_options(config, given, FLEXTRON_EVAL_DEFAULTS, command=eval_)
    if o["output"] and Path(o["output"]).exists() and not o["overwrite"]:
        raise ConfigError(f"{o['output']} already exists: pass --overwrite to replace it")
    result = run_flextron_eval(o)
    for r in result["records"]:
        p = r["picked"]
        lat = p.get("predicted_latency_ms")
        lat = "" if lat is None else f", predicted {lat if isinstance(lat, float) else sum(lat) / len(lat):.1f} ms"
        meas = f", measured {r['measured_fraction_of_full']:.2f} of full" if "measured_ms" in r else ""
        typer.echo(f"budget {r['budget']:.2f}: block FLOPs {r['block_flops_ratio']:.3f}{lat}{meas}; ΔLM "
                   f"{r['delta_lm_loss']:+.3f}, KL {r['kl']:.3f}, top-1 {r['top1_agreement']:.3f}")
    if o["output"]:
        atomic_write_json(o["output"], result)
        typer.echo(f"results: {o['output']}")


# ---------------------------------------------------------------------- bench
@app.command()
def bench(
    checkpoint: Optional[Path] = typer.Option(None, help="Continued-trained Flextron checkpoint (default: the cache's "
                                              "flextron/smollm2-135m-trained)."),
    sorted_checkpoint: Optional[Path] = typer.Option(None, help="Sorted, not continued-trained checkpoint (default: "
                                                     "the cache's flextron/smollm2-135m-sorted; sorted here if "
                                                     "missing)."),
    allow_untrained: bool = typer.Option(False, "--allow-untrained", help="Without a continued-trained checkpoint, "
                                         "route the sorted one (the result says so)."),
    budgets: Optional[str] = typer.Option(None, help="Fractions of the full model's latency (default 0.5,0.75)."),
    output: Optional[Path] = typer.Option(None, help="Result JSON (default bench/results/flextron.json)."),
    readme: bool = typer.Option(False, "--readme", help="Do not run: rewrite README.md's Flextron results from the "
                                "result JSON."),
    config: Optional[Path] = typer.Option(None, help="YAML file of bench options (benchmarks.flextron "
                                          "FLEXTRON_BENCH_DEFAULTS)."),
):
    """Benchmark Flextron routers at 0.5 and 0.75 of full latency against the uniform nested sub-network, the sorted
    model pruned without continued training, and ElastiFormer routing at the same executed FLOPs. Sorts and
    continue-trains SmolLM2 first when the checkpoints are missing (about an hour on a 2-core CPU)."""
    from ..errors import ConfigError
    from ..validation import project_readme
    from ..benchmarks.flextron import FLEXTRON_BENCH_DEFAULTS, run_flextron_bench, update_readme

    given = {"checkpoint": checkpoint, "sorted_checkpoint": sorted_checkpoint, "budgets": budgets, "output": output,
             "allow_untrained": allow_untrained or None}
    o = merge_options(config, given, FLEXTRON_BENCH_DEFAULTS, command=bench)
    if readme:
        path = Path(o["output"])
        if not path.is_file():
            raise ConfigError(f"no results at {path}: run `elastiformer flextron bench` first")
        update_readme(json.loads(path.read_text()), project_readme())
        typer.echo(f"README.md Flextron results rewritten from {path}")
        return
    run_flextron_bench(o, echo=typer.echo)
