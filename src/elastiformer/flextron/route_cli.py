"""`elastiformer flextron route | eval | bench`: train width routers, evaluate budgets, run the benchmark.

    elastiformer flextron route --model runs/flextron/trained/model --latency-table table.json   # -> MODEL/router
    elastiformer flextron eval --model runs/flextron/trained/model --budgets 0.5,0.75 --output eval.json
    elastiformer flextron bench                                     # bench/results/flextron.json

Registered on the `flextron` sub-app of flextron/cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .cli import app, load_flextron

# ---------------------------------------------------------------------- route
ROUTE_DEFAULTS = dict(
    model="runs/flextron/trained/model", output=None, data="gutenberg", latency_table=None, measure_latency=False,
    latency_batch=1, latency_seq_len=128, adaptive=False, metric=None, seq_len=128, max_sequences=1000,
    n_configs=256, calibration_sequences=64, router_steps=500, joint_steps=20, joint_batch=4, model_lr=0.0, seed=0,
    overwrite=False,
)


def run_route(o: dict[str, Any]) -> dict[str, Any]:
    from ..cache import atomic_write_json
    from ..cli import _check_output
    from ..errors import ConfigError
    from ..models import load_tokenizer
    from .cli import _token_data
    from .latency import load_latency_table, measure_latency_table
    from .route import build_router

    if o["metric"] not in (None, "latency_ms", "relative_compute"):
        raise ConfigError(f"--metric {o['metric']!r}: pass latency_ms or relative_compute")
    table = load_latency_table(o["latency_table"]) if o["latency_table"] else None  # fail fast, before loading
    out = Path(o["output"] or Path(o["model"]) / "router")
    _check_output(out, o["overwrite"], "the router")
    fm = load_flextron(str(o["model"]))
    if table is None and o["measure_latency"]:
        table = measure_latency_table(fm, int(o["latency_batch"]), int(o["latency_seq_len"]))
    data = _token_data(o, load_tokenizer(fm.base_model), "train", o["max_sequences"])
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
    from ..cli import _merge

    given = {k: v for k, v in locals().items() if k != "config"}
    for flag in ("measure_latency", "adaptive", "overwrite"):
        given[flag] = given[flag] or None
    r = run_route(_merge(config, given, ROUTE_DEFAULTS, command=route))
    s = r["surrogate"]
    typer.echo(f"surrogate: held-out MSE {s['heldout_mse']:.4f} against {s['constant_heldout_mse']:.4f} for a "
               f"constant (R^2 {s['heldout_r2']:.2f}) on {s['n_heldout']} configurations")
    for row in r["budget_adherence"]:
        typer.echo(f"budget {row['budget']:.2f} of full {r['metric']}: router argmax spends {row['raw']:.3f}, "
                   f"exact pick {row['exact']:.3f}")
    typer.echo(f"router in {r['output']} ({r['seconds']:.0f}s)")


# ---------------------------------------------------------------------- eval
FLEXTRON_EVAL_DEFAULTS = dict(
    model="runs/flextron/trained/model", router=None, teacher=None, data="gutenberg", budgets="0.5,0.75",
    metric="latency_ms", seq_len=256, max_sequences=16, batch_size=4, timing_reps=3, output=None, overwrite=False,
)


def run_flextron_eval(o: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..validation import parse_floats as _floats
    from ..errors import ConfigError
    from ..models import load_model, load_tokenizer
    from .budget import clear_budget
    from .cli import _token_data
    from .evaluate import TeacherCache, lm_quality, time_forwards
    from .routers import FlextronRouter

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
    held = _token_data(o, load_tokenizer(fm.base_model), "heldout", int(o["max_sequences"]))
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
    from ..cli import _merge
    from ..errors import ConfigError

    given = {k: v for k, v in locals().items() if k != "config"}
    given["overwrite"] = overwrite or None
    o = _merge(config, given, FLEXTRON_EVAL_DEFAULTS, command=eval_)
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
    config: Optional[Path] = typer.Option(None, help="YAML file of bench options (flextron.bench "
                                          "FLEXTRON_BENCH_DEFAULTS)."),
):
    """Benchmark Flextron routers at 0.5 and 0.75 of full latency against the uniform nested sub-network, the sorted
    model pruned without continued training, and ElastiFormer routing at the same executed FLOPs. Sorts and
    continue-trains SmolLM2 first when the checkpoints are missing (about an hour on a 2-core CPU)."""
    from ..cli import _merge
    from ..errors import ConfigError
    from ..validation import project_readme
    from .bench import FLEXTRON_BENCH_DEFAULTS, run_flextron_bench, update_readme

    given = {"checkpoint": checkpoint, "sorted_checkpoint": sorted_checkpoint, "budgets": budgets, "output": output,
             "allow_untrained": allow_untrained or None}
    o = _merge(config, given, FLEXTRON_BENCH_DEFAULTS, command=bench)
    if readme:
        path = Path(o["output"])
        if not path.is_file():
            raise ConfigError(f"no results at {path}: run `elastiformer flextron bench` first")
        update_readme(json.loads(path.read_text()), project_readme())
        typer.echo(f"README.md Flextron results rewritten from {path}")
        return
    run_flextron_bench(o, echo=typer.echo)
