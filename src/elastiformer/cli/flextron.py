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

import typer

from ..benchmarks.flextron import FLEXTRON_BENCH_OPTIONS
from ..flextron.pipeline import (FLEXTRON_EVAL_OPTIONS, LATENCY_OPTIONS, ROUTE_OPTIONS, SORT_OPTIONS, TRAIN_OPTIONS,
                                 run_flextron_eval, run_latency, run_route, run_sort, run_train)
from .options import Given, command

app = typer.Typer(help="Flextron (arXiv 2406.10260): importance-sort a model, make every layer nested-elastic, "
                       "continue-train it by distillation into sub-networks, and measure its per-layer latency.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@command(app, SORT_OPTIONS)
def sort(given: Given):
    """Rank MLP neurons and attention heads on calibration text, permute the weights (most important first; the
    logits do not change) and save a Flextron checkpoint with the width menus."""
    report = run_sort(given.merge())
    typer.echo(f"sorted on {report['calibration_tokens']:,} tokens in {report['seconds']:.0f}s (max logit change "
               f"{report['max_abs_logit_change']:.2e}); MLP widths {report['mlp_sizes']}, heads "
               f"{report['head_counts']}; checkpoint in {report['output']}")


@command(app, TRAIN_OPTIONS)
def train(given: Given):
    """Elastic continued-training: distil the starting model into the full, smallest and random sub-networks each
    step, updating the shared weights; saves a full checkpoint in OUTPUT/model."""
    r = run_train(given.merge())
    line = f"trained {r['steps']} steps on {r['tokens']:,} tokens in {r['seconds']:.0f}s; checkpoint in {r['output']}"
    if "heldout_kl_to_start" in r:
        b, a = r["heldout_kl_to_start"]["before"], r["heldout_kl_to_start"]["after"]
        line += "; held-out KL to the start " + ", ".join(f"{k} {b[k]:.3f} -> {a[k]:.3f}" for k in b)
    typer.echo(line)


@command(app, LATENCY_OPTIONS)
def latency(given: Given):
    """Measure every layer's MLP and attention latency at every menu width on this machine (the lookup table that
    latency budgets use); --check compares predicted and measured end-to-end latency."""
    o = given.merge()
    t = run_latency(o)
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
    if t.get("check") is None and not o["output"]:
        typer.echo("(pass --output FILE.json to keep the table)")


@command(app, ROUTE_OPTIONS)
def route(given: Given):
    """Train a width router: measure sampled configurations, fit the surrogate, train the router through it with a
    latency (or compute) budget loss, then a short joint fine-tune; saves router.safetensors + router_config.json
    and route_report.json."""
    r = run_route(given.merge())
    s = r["surrogate"]
    typer.echo(f"surrogate: held-out MSE {s['heldout_mse']:.4f} against {s['constant_heldout_mse']:.4f} for a "
               f"constant (R^2 {s['heldout_r2']:.2f}) on {s['n_heldout']} configurations")
    for row in r["budget_adherence"]:
        typer.echo(f"budget {row['budget']:.2f} of full {r['metric']}: router argmax spends {row['raw']:.3f}, "
                   f"exact pick {row['exact']:.3f}")
    typer.echo(f"router in {r['output']} ({r['seconds']:.0f}s)")


@command(app, FLEXTRON_EVAL_OPTIONS, "eval")
def eval_(given: Given):
    """Evaluate a routed Flextron checkpoint on held-out text at several budgets: the configuration picked, its
    predicted and measured latency, ΔLM loss, KL and top-1 agreement against the teacher."""
    from ..cache import atomic_write_json
    from ..errors import ConfigError

    o = given.merge()
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
@command(app, FLEXTRON_BENCH_OPTIONS,
         readme=(bool, typer.Option(False, "--readme", help="Do not run: rewrite README.md's Flextron results from "
                                    "the result JSON.")))
def bench(given: Given, readme: bool):
    """Benchmark Flextron routers at 0.5 and 0.75 of full latency against the uniform nested sub-network, the sorted
    model pruned without continued training, and ElastiFormer routing at the same executed FLOPs. Sorts and
    continue-trains SmolLM2 first when the checkpoints are missing (about an hour on a 2-core CPU)."""
    from ..errors import ConfigError
    from ..validation import project_readme
    from ..benchmarks.flextron import run_flextron_bench, update_readme

    o = given.merge()
    if readme:
        path = Path(o["output"])
        if not path.is_file():
            raise ConfigError(f"no results at {path}: run `elastiformer flextron bench` first")
        update_readme(json.loads(path.read_text()), project_readme())
        typer.echo(f"README.md Flextron results rewritten from {path}")
        return
    run_flextron_bench(o, echo=typer.echo)
