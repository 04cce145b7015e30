"""The `elastiformer` command: train | eval | info | demo | bench | lm-eval | vit-teacher | bench-vision, and
`flextron ...` (cli/flextron.py).

Every subcommand takes `--config FILE.yaml` whose keys are the subcommand's option names (dashes or underscores);
options given on the command line win over the file. Errors a user can fix print one line and exit 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import ConfigError, ElastiformerError
from ..validation import parse_floats as _floats, parse_ints as _ints, project_readme, remove_empty_created_outputs
from ..options import Option, defaults
from .options import Given, check_numbers, check_output, command
from ..benchmarks.speed import SPEED_OPTIONS
from ..benchmarks.vision import VISION_BENCH_OPTIONS

app = typer.Typer(
    help="Make a pretrained Transformer elastic: train tiny routers by self-distillation, then pick the compute "
         "budget at inference time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: flags read as flags (rich shows every flag as taking a <bool>)
)
_DEBUG = False


def _print_version(value: bool) -> None:
    if value:
        from ..version import __version__

        typer.echo(f"elastiformer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    global _DEBUG
    _DEBUG = debug


# ---------------------------------------------------------------------- train
TRAIN_OPTIONS = {
    "model": Option("smollm2-135m", "Short name (smollm2-135m), HF folder, .gguf file or hub id."),
    "data": Option("gutenberg", "'gutenberg' (its training books), a .txt file or folder, a .jsonl file, or a "
                   "datasets folder."),
    "output": Option("runs/train", "Folder for routers/, checkpoint/ and train_log.json.", kind=Path),
    "mlp_tokens": Option(None, "Route tokens of each MLP at this capacity (the default component, 0.8, when no "
                         "component is given).", kind=float),
    "attn_tokens": Option(None, "Route tokens of each attention at this capacity.", kind=float),
    "attn_heads": Option(None, "Fraction of attention heads active per token.", kind=float),
    "mlp_experts": Option(None, "Split each MLP into this many experts.", kind=int),
    "mlp_experts_active": Option(None, "Fraction of experts active per token.", kind=float),
    "expert_split": Option("contiguous", "How neurons form experts: contiguous (slices) or cluster (neurons that "
                           "fire together, fitted on training text)."),
    "router": Option("linear", "Router network: linear or mlp."),
    "router_norm_feature": Option(False, "Token routers also see the log-norm of their input (which their LayerNorm "
                                  "removes), starting as the training-free norm score's ranking."),
    "dense_layers": Option("", "Layers never routed, e.g. 0,-2,-1 (default: none; the fitted allocation decides)."),
    "lora_rank": Option(0, "Also train rank-r LoRA on the attention projections (0: none)."),
    "stand_in_rank": Option(32, "Tokens that skip a routed MLP get a rank-r linear estimate of its update, fitted "
                            "before training (0: nothing, as in the paper; r at most hidden/16)."),
    "attn_stand_in_rank": Option(8, "The same for tokens that skip a routed attention (0: nothing)."),
    "stand_in_lr_scale": Option(0.1, "The stand-ins then train with the routers at this fraction of --lr (0: kept "
                                "as fitted)."),
    "steps": Option(200, "Optimizer steps."),
    "batch_size": Option(2, "Sequences per micro-batch."),
    "seq_len": Option(256, "Tokens per sequence: train on sequences as long as those you will run (`eval` reads 256 "
                      "by default; routers trained on 128 tokens lost more at positions 128-255 than before them)."),
    "max_sequences": Option(None, "Use at most this many training sequences (default: all).", kind=int),
    "lr": Option(2e-3, "Peak learning rate of the routers."),
    "schedule": Option("cosine", "cosine, linear or constant (after warmup)."),
    "warmup": Option(10, "Linear warmup steps."),
    "grad_accum": Option(1, "Micro-batches per optimizer step."),
    "seed": Option(0, "Seed of data order, budgets and router init."),
    "temperature": Option(1.0, "Distillation temperature."),
    "budget": Option(None, "Train at this fixed global budget instead of sampling one per step.", kind=float),
    "budget_range": Option(None, "Sample a budget per step in low,high (default 0.5,0.95).", kind=str),
    "checkpoint_every": Option(50, "Checkpoint every N steps."),
    "router_targets": Option("teacher", "What token routers learn to predict: teacher (the norm of each token's "
                             "update), sensitivity (how much skipping it moves the output; one extra backward per "
                             "step) or self (the paper's BCE towards their own top-k)."),
    "key_value_targets": Option(None, "Attention-token routers also learn what each token is worth to the other "
                                "tokens as a key / value (a skipped token is no key for anyone), not only its own "
                                "update; with --router-targets teacher. Default: on for encoders, off for causal "
                                "LMs (where it measured no better).", kind=bool),
    "router_inputs": Option("teacher", "teacher or student: the hidden states token routers are regressed on "
                            "(student: what they see at inference)."),
    "target_steps": Option(None, "Teacher forwards before distillation whose targets the routers are trained on (no "
                           "student pass; default 2 x --steps, 0 with --router-targets self; 0 turns it off).",
                           kind=int),
    "target_repeats": Option(4, "Router updates per target step."),
    "allocation": Option(True, "Fit the per-layer allocation of the budget when training ends."),
    "allocation_floor": Option(0.5, "Fraction of routed FLOPs where the fitted allocation path ends (below, "
                               "capacities shrink in proportion)."),
    "allocation_batches": Option(1, "Calibration batches the allocation is fitted on (each adds the fit's forwards "
                                 "again; more batches, a less noisy allocation)."),
    "allocation_levels": Option("", "Capacities each unit's cost curve is measured at and a move may lower it to, "
                                "e.g. 0.875,0.75,0.5,0.25,0 (default: 0.75,0.5,0.25,0). 0.875 spreads a budget near "
                                "1 over more layers, each at its cheapest work; every level adds forwards to the "
                                "fit."),
    "allocation_pin": Option(True, "Let the allocation lower a layer's heads / experts as the same set for every "
                             "token (no router) where that costs less than routing them per token."),
    "allocation_time": Option(False, "Rank the allocation's moves by loss per decoding time saved on this machine "
                              "(a unit latency table is timed first: batch-1 generation, about a minute for a "
                              "135M model on a 2-core CPU), not per FLOP saved: the budget goes where it buys "
                              "time, e.g. whole attentions skipped rather than partial heads, at some cost in "
                              "quality."),
    "resume": Option(False, "Continue from OUTPUT/checkpoint."),
    "device": Option(None, "cpu or cuda (default: a GPU when there is one).", kind=str),
    "overwrite": Option(False, "Replace an existing OUTPUT."),
}
TRAIN_DEFAULTS = defaults(TRAIN_OPTIONS)


def _elastic_config(o: dict[str, Any]):
    from ..config import ElasticConfig

    return ElasticConfig(
        mlp_tokens=o["mlp_tokens"], attn_tokens=o["attn_tokens"], attn_heads=o["attn_heads"],
        mlp_experts=o["mlp_experts"], mlp_experts_active=o["mlp_experts_active"],
        expert_split=o["expert_split"], router=o["router"], router_norm_feature=bool(o["router_norm_feature"]),
        dense_layers=_ints(o["dense_layers"], "dense_layers"), lora_rank=int(o["lora_rank"]),
        stand_in_rank=int(o["stand_in_rank"]), attn_stand_in_rank=int(o["attn_stand_in_rank"]),
    )


def run_train(o: dict[str, Any]) -> dict[str, Any]:
    """Train routers as `o` says; returns the report dict (also written to OUTPUT/train_log.json)."""
    from accelerate import PartialState

    from ..config import check_fraction
    from ..data.text import load_texts, pack_sequences
    from ..model import get_elastic_model
    from ..loading.models import load_model, load_tokenizer
    from ..training.routers import train_routers

    # validate everything cheap before any heavy work (loading the model, tokenizing)
    from ..training.routers import check_train_options, lr_factor
    from ..validation import allocation_path_options, check_device

    check_numbers(o, dict(steps=1, batch_size=1, seq_len=2, max_sequences=1, warmup=0, grad_accum=1, seed=0,
                           checkpoint_every=1, lora_rank=0, stand_in_rank=0, attn_stand_in_rank=0,
                           mlp_experts=2, target_steps=0, target_repeats=1),
                   ("lr", "temperature"))
    from ..training.routers import ROUTER_TARGETS

    if o["router_targets"] not in ROUTER_TARGETS:
        raise ConfigError(f"--router-targets {o['router_targets']!r}: pass one of {', '.join(ROUTER_TARGETS)}")
    if o["key_value_targets"] and o["router_targets"] != "teacher":
        raise ConfigError(f"--key-value-targets adds to the teacher's update-norm targets, and --router-targets "
                          f"{o['router_targets']} has none: pass --router-targets teacher")
    if o["router_inputs"] not in ("teacher", "student"):
        raise ConfigError(f"--router-inputs {o['router_inputs']!r}: pass teacher or student")
    if o["target_steps"] and o["router_targets"] == "self":
        raise ConfigError("--target-steps trains routers on the teacher's targets, and router_targets='self' has "
                          "none: pass --target-steps 0, or --router-targets teacher / sensitivity")
    if not float(o["stand_in_lr_scale"]) >= 0:
        raise ConfigError(f"--stand-in-lr-scale {o['stand_in_lr_scale']}: pass a fraction of --lr >= 0, e.g. 0.1 (0: "
                          "the stand-ins stay as fitted)")
    levels = allocation_path_options(o["allocation_floor"], o["allocation_levels"])
    if int(o["allocation_batches"]) < 1:
        raise ConfigError(f"--allocation-batches {o['allocation_batches']}: pass 1 or more calibration batches")
    lr_factor(o["schedule"], 0, 1, 0)
    check_device(o["device"])
    cfg = _elastic_config(o)
    if o["budget"] is not None:
        check_fraction("budget", o["budget"])
    if o["budget"] is not None and o["budget_range"] is not None:
        raise ConfigError(f"--budget {o['budget']} trains at one budget and --budget-range {o['budget_range']} samples "
                          "one per step: pass one of them")
    if o["expert_split"] not in (None, "contiguous") and not o["mlp_experts"]:
        raise ConfigError(f"--expert-split {o['expert_split']} splits MLP experts, and none are routed: add "
                          "--mlp-experts N, or leave --expert-split out")
    if o["resume"] and o["overwrite"]:
        raise ConfigError("--resume continues the run in OUTPUT and --overwrite deletes it: pass one of them")
    budget_range = None if o["budget"] is not None else tuple(_floats(o["budget_range"] or "0.5,0.95",
                                                                      "budget_range"))
    if budget_range is not None and len(budget_range) != 2:
        raise ConfigError(f"--budget-range {o['budget_range']!r}: pass two numbers low,high, e.g. 0.5,0.95")
    check_train_options(o["steps"], o["batch_size"], o["lr"], o["grad_accum"], o["temperature"], o["budget"],
                   budget_range, o["checkpoint_every"])
    out = Path(o["output"])
    import torch

    cpu = o["device"] == "cpu" or (o["device"] is None and not torch.cuda.is_available())
    if not o["resume"] and PartialState(cpu=cpu).is_main_process:  # under `accelerate launch`, one process checks
        check_output(out, o["overwrite"], "its routers")
    texts = load_texts(None if o["data"] == "gutenberg" else o["data"], split="train")
    model = load_model(o["model"])
    _check_seq_len(o["seq_len"], model)
    tokenizer = load_tokenizer(o["model"] if isinstance(o["model"], str) else model)
    data = pack_sequences(texts, tokenizer, int(o["seq_len"]), max_sequences=o["max_sequences"])
    em = get_elastic_model(model, cfg)
    report = train_routers(
        em, data, steps=int(o["steps"]), batch_size=int(o["batch_size"]), lr=float(o["lr"]), schedule=o["schedule"],
        warmup=int(o["warmup"]), grad_accum=int(o["grad_accum"]), seed=int(o["seed"]),
        temperature=float(o["temperature"]), budget=None if o["budget"] is None else float(o["budget"]),
        budget_range=budget_range, output_dir=out, checkpoint_every=int(o["checkpoint_every"]),
        resume=bool(o["resume"]), device=o["device"], overwrite=bool(o["overwrite"]),
        router_targets=o["router_targets"], router_inputs=o["router_inputs"], target_steps=o["target_steps"],
        key_value_targets=o["key_value_targets"],
        target_repeats=int(o["target_repeats"]), allocation=bool(o["allocation"]),
        allocation_floor=float(o["allocation_floor"]), allocation_batches=int(o["allocation_batches"]),
        allocation_levels=levels.get("levels"), allocation_pin=bool(o["allocation_pin"]),
        allocation_latency=bool(o["allocation_time"]) or None,
        stand_in_lr_scale=float(o["stand_in_lr_scale"]),
    )
    return report.to_dict() | {"routers": str(out / "routers")}


@command(app, TRAIN_OPTIONS)
def train(given: Given):
    """Train routers by self-distillation against the frozen model itself."""
    o = given.merge()
    if not any(o[k] is not None for k in ("mlp_tokens", "attn_tokens", "attn_heads", "mlp_experts")):
        o["mlp_tokens"] = 0.8  # the component that pays best on small models (see the README results)
    report = run_train(o)
    typer.echo(f"trained {report['steps']} steps on {report['tokens']:,} tokens in {report['seconds']:.0f}s; "
               f"final KL {report['final_kl']:.4f}; routers in {report['routers']}")


# ---------------------------------------------------------------------- eval
EVAL_OPTIONS = {
    "routers": Option(None, "Router folder written by `elastiformer train` (OUTPUT/routers).", kind=Path),
    "model": Option(None, "The base model the routers were trained for (default: the one the routers folder "
                    "records).", kind=str),
    "data": Option("gutenberg", "'gutenberg' (its held-out books) or your own text source."),
    "split": Option("heldout", "heldout or train."),
    "budgets": Option("0.7,0.8,0.9", "Budgets to evaluate, e.g. 0.5,0.7,0.9."),
    "seq_len": Option(256, "Tokens per sequence."),
    "max_sequences": Option(16, "Evaluate on at most this many sequences."),
    "batch_size": Option(4, "Sequences per forward."),
    "timing_reps": Option(3, "Interleaved timing repetitions (0: no timing)."),
    "output": Option(None, "Write the results as JSON here.", kind=Path),
    "plot": Option(None, "Write a PNG of quality against compute here.", kind=Path),
    "seed": Option(0, "Seed of the random-routing baseline."),
    "baselines": Option("random", "Baselines beside the learned routers, of random, norm, norm_allocated, static "
                        "('' for none)."),
    "calibration_data": Option(None, "Text the norm / static baselines are fitted on (default: the Gutenberg "
                               "training books).", kind=str),
    "match": Option("flops", "flops (each baseline at the learned routers' block FLOPs, its budget bisected), "
                    "budget (every method at the same budget) or target (every method, the learned routers too, "
                    "bisected to execute each budget as its block-FLOPs ratio: 0.9 = 10% of the block FLOPs removed)."),
    "overwrite": Option(False, "Replace existing output files."),
}
EVAL_DEFAULTS = defaults(EVAL_OPTIONS)


def _check_seq_len(seq_len: int, model) -> None:
    """--seq-len must fit the model's context: refused here, before the text is tokenized, not deep in a forward."""
    from ..validation import model_context

    context = model_context(model.config)
    if context is not None and int(seq_len) > context:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's context of {context} tokens "
                          f"(max_position_embeddings): pass --seq-len {context} or less")


def run_eval(o: dict[str, Any], em=None) -> dict[str, Any]:
    from ..config import check_fraction
    from ..data.text import load_texts, pack_sequences
    from ..evaluation.baselines import check_match
    from ..evaluation.lm import evaluate
    from ..model import ElasticModel
    from ..loading.models import load_model, load_tokenizer

    check_match(o["match"])
    budgets = _floats(o["budgets"], "budgets")
    if not budgets:
        raise ConfigError(f"--budgets {o['budgets']!r}: pass at least one budget, e.g. 0.5,0.7,0.9")
    for b in budgets:
        check_fraction("budget", b)
    check_numbers(o, dict(seq_len=2, max_sequences=1, batch_size=1, timing_reps=0, seed=0))
    if em is None:
        if not o["routers"]:
            raise ConfigError("eval needs --routers FOLDER (the routers/ folder that `elastiformer train` wrote)")
        from ..artifacts import base_model_source, read_router_config

        saved = read_router_config(o["routers"])  # fail fast, before loading the model
        if o["model"] is None:  # the base model the routers were trained on, as the routers folder records it
            o["model"] = base_model_source(saved, o["routers"])
    texts = load_texts(None if o["data"] == "gutenberg" else o["data"], split=o["split"])
    if em is None:
        em = ElasticModel.from_pretrained(load_model(o["model"]), o["routers"])
    _check_seq_len(o["seq_len"], em.base_model)
    if em.trained_budgets is not None and min(budgets) < em.trained_budgets[0] - 1e-9:
        low, high = em.trained_budgets
        typer.echo(f"warning: budget {min(budgets)} is below the range the routers were trained on ({low:g}-{high:g}):"
                   " expect them to do worse there (train with a lower --budget-range)", err=True)
    tokenizer = load_tokenizer(o["model"] if isinstance(o["model"], str) else em.base_model)
    data = pack_sequences(texts, tokenizer, int(o["seq_len"]), max_sequences=o["max_sequences"])
    baselines = [b.strip() for b in str(o["baselines"] or "").split(",") if b.strip()]
    calibration = None
    if set(baselines) - {"random"}:  # the fitted baselines need text that is not the evaluation text
        source = o["calibration_data"]
        if source is None and (o["data"] != "gutenberg" or o["split"] != "heldout"):
            raise ConfigError("--baselines norm / norm_allocated / static are fitted on calibration text: pass "
                              "--calibration-data (text that is not the evaluation text)")
        cal_texts = load_texts(None, split="train") if source is None else load_texts(source, split="train")
        calibration = pack_sequences(cal_texts, tokenizer, min(128, int(o["seq_len"])), max_sequences=8)[:8]
        calibration = [{"input_ids": calibration[:4]}, {"input_ids": calibration[4:]}]
    result = evaluate(em, data, budgets=budgets, batch_size=int(o["batch_size"]), timing_reps=int(o["timing_reps"]),
                      seed=int(o["seed"]), baselines=baselines, calibration_data=calibration, match=o["match"])
    result |= {"model": str(o["model"]), "routers": str(o["routers"]), "data": o["data"], "split": o["split"],
               "seq_len": int(o["seq_len"]), "elastic_config": em.elastic_config.to_dict(),
               "allocation": allocation_table(em, budgets), "allocation_fitted": em.allocation is not None}
    return result


def allocation_table(em, budgets) -> dict[str, Any]:
    """{budget: {"budgets": per component, "capacities": {component: per layer}}} of the learned routers."""
    out = {}
    with em.budget(1.0):
        for b in budgets:
            em.set_budget(b)
            out[str(b)] = {"budgets": em.get_budget(), "capacities": em.capacities()}
    return out


def describe_allocation(meta: dict[str, Any], folder: Path, budgets=(0.9, 0.8, 0.7, 0.6, 0.5)) -> dict[str, Any]:
    """What `info` shows of a saved allocation: how it was fitted, and each budget's per-layer capacities."""
    from ..allocation import Allocation
    from ..config import ElasticConfig

    components = ElasticConfig.from_dict(meta["elastic_config"]).components()
    alloc = Allocation.from_dict(meta["allocation"], int(meta["base_model"]["dims"]["L"]), components,
                                 where=str(folder / "elastic_config.json"))
    table = {}
    for b in budgets:
        split = alloc.component_budgets(b) if len(components) > 1 else {components[0]: b}
        table[str(b)] = {"budgets": {k: round(v, 4) for k, v in split.items()},
                         "capacities": {k: [round(c, 3) for c in alloc.capacities(k, v)] for k, v in split.items()}}
    return {"moves": len(alloc.moves), "calibration_tokens": alloc.tokens,
            "path_end_routed_flops": round(alloc.flops[-1], 4), "path_end_cost": round(alloc.cost[-1] - alloc.cost[0], 5),
            "pinned": alloc.pinned_layers(), "ranked_by": "time" if alloc.latency is not None else "flops",
            "per_budget": table}


def print_allocation(table: dict[str, Any], fitted: bool) -> None:
    """Per-layer capacities at each budget, one row per (budget, component)."""
    typer.echo("per-layer capacities (fraction of each layer's work; " +
               ("the fitted allocation)" if fitted else "no allocation fitted: the same in every routed layer)"))
    for b, entry in table.items():
        for comp, caps in entry["capacities"].items():
            share = entry["budgets"].get(comp, float(b))
            typer.echo(f"  {float(b):.2f} {comp:<18} ({share:.3f}) " + " ".join(f"{c:.2f}" for c in caps))


def print_table(result: dict[str, Any]) -> None:
    typer.echo(f"teacher: NLL {result['teacher_nll']:.3f} nats/token, perplexity {result['teacher_perplexity']:.2f} "
               f"on {result['tokens']:,} held-out tokens; routers are {100 * result['router_param_fraction']:.4f}% "
               "of the model's parameters")
    head = f"{'budget':>7} {'method':>15} {'run at':>7} {'block FLOPs':>11} {'model FLOPs':>11} {'dLM loss':>9} " \
           f"{'KL':>7} {'top-1 agree':>11} {'time':>6}"
    typer.echo(head)
    typer.echo("-" * len(head))
    for r in result["records"]:
        t = "-" if r["prefill_time_ratio"] is None else f"{r['prefill_time_ratio']:.2f}"
        typer.echo(f"{r['budget']:>7.2f} {r['method']:>15} {r.get('method_budget', r['budget']):>7.3f} "
                   f"{r['block_flops_ratio']:>11.3f} {r['model_flops_ratio']:>11.3f} {r['delta_lm_loss']:>+9.3f} "
                   f"{r['kl']:>7.3f} {r['top1_agreement']:>11.3f} {t:>6}")
    typer.echo("block / model FLOPs and time are elastic / dense; dLM loss = elastic NLL - teacher NLL (nats/token); "
               "'run at': the budget each method ran at (baselines: bisected to the learned routers' block FLOPs)")
    if result.get("allocation"):
        print_allocation(result["allocation"], fitted=bool(result.get("allocation_fitted", True)))


def plot_curve(result: dict[str, Any], path: Path) -> None:
    """Quality (delta LM loss) against executed block FLOPs, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..cache import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in result["records"]):
        pts = sorted((r["block_flops_ratio"], r["delta_lm_loss"]) for r in result["records"] if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("executed / dense FLOPs of the transformer blocks")
    ax.set_ylabel("ΔLM loss vs the original model (nats/token)")
    ax.set_title(f"{result.get('model', '')}: quality against compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


@command(app, EVAL_OPTIONS, "eval")
def eval_(given: Given):
    """Evaluate routers on held-out text at several budgets, beside baselines at the same executed FLOPs, and show
    the per-layer capacities each budget runs at."""
    o = given.merge()
    from ..validation import check_output_file

    for key in ("output", "plot"):
        if o[key] is not None:
            check_output_file(o[key], bool(o["overwrite"]))
    result = run_eval(o)
    print_table(result)
    if o["output"]:
        from ..cache import atomic_write_json

        atomic_write_json(o["output"], result)
        typer.echo(f"results: {o['output']}")
    if o["plot"]:
        plot_curve(result, Path(o["plot"]))
        typer.echo(f"plot: {o['plot']}")


# ---------------------------------------------------------------------- info
def router_summary(shown: dict[str, Any], folder: Path) -> str:
    """`info ROUTERS` for people: what the routers were trained on and for, and where each budget's work goes."""
    cfg, base = shown["elastic_config"], shown.get("base_model") or {}
    dims = base.get("dims") or {}
    routed = [f"{k} {cfg[k]}" for k in ("mlp_tokens", "attn_tokens", "attn_heads") if cfg.get(k) is not None]
    if cfg.get("mlp_experts"):
        routed.append(f"mlp_experts {cfg['mlp_experts']} ({cfg['expert_split']} split, "
                      f"{cfg.get('mlp_experts_active') or 'budget-set'} active)")
    lines = [
        f"routers:        {folder}",
        f"base model:     {base.get('name_or_path', '?')} ({base.get('model_type', '?')}, {dims.get('L', '?')} layers, "
        f"hidden {dims.get('C', '?')}, {dims.get('H', '?')} heads, MLP {dims.get('I', '?')})",
        f"routed:         {', '.join(routed) or 'nothing'}; router {cfg.get('router')}; LoRA rank {cfg.get('lora_rank', 0)}"
        + (f"; dense layers {cfg['dense_layers']}" if cfg.get("dense_layers") else "")
        + (f"; skipped MLP tokens get a rank-{cfg['stand_in_rank']} stand-in"
           if cfg.get("stand_in_rank") and cfg.get("mlp_tokens") is not None else "")
        + (f"; skipped attention tokens get a rank-{cfg['attn_stand_in_rank']} stand-in"
           if cfg.get("attn_stand_in_rank") and cfg.get("attn_tokens") is not None else ""),
        "trained on:     budgets " + ("-".join(str(b) for b in shown["trained_budgets"])
                                       if shown.get("trained_budgets") else "(not recorded)"),
        f"format:         router format {shown.get('format_version')}, elastiformer "
        f"{shown.get('elastiformer_version', '?')}",
    ]
    alloc = shown.get("allocation")
    if not alloc:
        lines.append("allocation:     none fitted: every routed layer gets the same capacity")
        return "\n".join(lines)
    lines.append(f"allocation:     fitted on {alloc['calibration_tokens']} tokens, {alloc['moves']} moves; the "
                 f"cheapest end of the path runs {alloc['path_end_routed_flops']:.2f} of the routed FLOPs")
    if alloc.get("ranked_by") == "time":
        lines.append("ranked by:      loss per decoding time saved (a unit latency table timed at batch 1 when it "
                     "was fitted), not per FLOP")
    for comp, layers in alloc.get("pinned", {}).items():
        lines.append(f"pinned:         {comp} of layers {', '.join(map(str, layers))}: the same for every token "
                     "(the calibration's most important), no router")
    lines.append("per-layer capacities (fraction of each layer's work kept; 0 = skipped for every token):")
    for b, entry in alloc["per_budget"].items():
        for comp, caps in entry["capacities"].items():
            lines.append(f"  budget {float(b):.2f} {comp:<12} ({entry['budgets'][comp]:.3f}) "
                         + " ".join(f"{c:.2f}" for c in caps))
    return "\n".join(lines)


@app.command()
def info(
    routers: Optional[Path] = typer.Argument(None, help="A router folder to describe."),
    model: Optional[str] = typer.Option(None, help="Describe this model's routable structure."),
    as_json: bool = typer.Option(False, "--json", help="Print a router folder's description as JSON (for scripts)."),
):
    """Describe a router folder, a model, or (with no argument) what elastiformer supports."""
    from ..arch import supported_model_types
    from ..loading.models import available_models

    if routers is not None:
        from ..artifacts import read_router_config

        meta = read_router_config(routers)
        shown = {k: meta[k] for k in ("format_version", "elastiformer_version", "elastic_config", "base_model",
                                      "trained_budgets") if k in meta}
        shown["allocation"] = describe_allocation(meta, Path(routers)) if meta.get("allocation") else None
        typer.echo(json.dumps(shown, indent=2) if as_json else router_summary(shown, Path(routers)))
        return
    if model is not None:
        from ..arch import get_arch_spec
        from ..loading.models import load_model

        m = load_model(model)
        spec = get_arch_spec(m)
        dims = spec.dims(spec.stack_config(m.config))
        n = sum(p.numel() for p in m.parameters())
        typer.echo(f"{model}: {m.config.model_type} ({spec.name} spec), {n / 1e6:.1f}M parameters, "
                   f"{dims['L']} layers, hidden {dims['C']}, {dims['H']} heads / {dims['KVH']} KV heads "
                   f"(head dim {dims['D']}), MLP {dims['I']}, vocab {dims['V']}")
        divisors = [e for e in range(2, 65) if dims["I"] % e == 0]
        typer.echo(f"mlp_experts can be any of {divisors}")
        return
    typer.echo("bundled models (no hub needed):")
    for name, desc in available_models().items():
        typer.echo(f"  {name}: {desc}")
    typer.echo(f"supported model types: {', '.join(supported_model_types())} (tested; other decoder LMs are "
               "understood from their modules where their layout is conventional)")


# ---------------------------------------------------------------------- vit-teacher
def vit_teacher_options() -> dict[str, Option]:
    from ..training.vit_teacher import VIT_TEACHER_OPTIONS

    return {"output": Option(None, "Where the HF folder goes (default: the cache folder, where "
                             "`load_model('vit-fashion-mnist')` finds it).", kind=Path),
            **VIT_TEACHER_OPTIONS,
            "overwrite": Option(False, "Train again even if OUTPUT holds a teacher.")}


@command(app, vit_teacher_options(), "vit-teacher")
def vit_teacher(given: Given):
    """Train the small ViT teacher on Fashion-MNIST and cache it. No pretrained ViT installs here (no hub access),
    so the vision path trains its own; any other local HF ViT folder works the same way afterwards."""
    from ..cache import cache_dir
    from ..training.vit_teacher import VIT_TEACHER_NAME, VIT_TEACHER_OPTIONS, teacher_report, train_vit_teacher

    o = given.merge()
    overwrite = bool(o["overwrite"])
    out = Path(o["output"]) if o["output"] else cache_dir() / "models" / VIT_TEACHER_NAME
    done = teacher_report(out)
    if done is not None and not overwrite:
        typer.echo(f"a ViT teacher is already in {out} (test accuracy {done['test_accuracy']:.4f}); pass "
                   "--overwrite to train again")
        return
    check_output(out, overwrite, "the teacher")
    typer.echo("No pretrained ViT installs here, so elastiformer trains its own ViT teacher on Fashion-MNIST "
               "(Debian package dataset-fashion-mnist).")
    report = train_vit_teacher(out, **{k: o[k] for k in VIT_TEACHER_OPTIONS})
    typer.echo(f"trained {report['steps']} steps ({report['epochs']:.2f} epochs) on {report['train_images']:,} images "
               f"in {report['seconds']:.0f}s; test accuracy {report['test_accuracy']:.4f} on "
               f"{report['test_images']:,} images; teacher in {out}")


# ---------------------------------------------------------------------- bench
def bench_tasks() -> dict[str, dict[str, Any]]:
    """What `elastiformer bench --task T` runs: options, runner, plot, README renderer and README marker."""
    from ..benchmarks.encoder import (ENCODER_BENCH_OPTIONS, encoder_results_markdown, plot_encoder_bench,
                                      run_encoder_bench)
    from ..benchmarks.lm import BENCH_OPTIONS, plot_lm_bench, results_markdown, run_lm_bench

    return {
        "lm": dict(options=BENCH_OPTIONS, run=run_lm_bench, plot=plot_lm_bench, render=results_markdown,
                   marker="lm"),
        "encoder": dict(options=ENCODER_BENCH_OPTIONS, run=run_encoder_bench, plot=plot_encoder_bench,
                        render=encoder_results_markdown, marker="encoder"),
    }


def bench_options() -> dict[str, Option]:
    """The options of every bench task, for the one `bench` command: the LM bench's, then the encoder's own; where
    the encoder's default differs, the help says so."""
    tasks = bench_tasks()
    lm, encoder = tasks["lm"]["options"], tasks["encoder"]["options"]
    merged = {}
    for key in {**lm, **encoder}:
        if key not in encoder:
            merged[key] = Option(lm[key].default, lm[key].help.rstrip(".") + " (lm task only).", kind=lm[key].type)
        elif key not in lm:  # (no default shown: the lm task does not take it)
            merged[key] = Option(None, encoder[key].help.rstrip(".") + " (encoder task only; default "
                                 f"{encoder[key].default}).", kind=encoder[key].type)
        elif lm[key].default != encoder[key].default and not lm[key].switch:
            merged[key] = Option(lm[key].default, lm[key].help.rstrip(".") + f" (encoder: {encoder[key].default}).",
                                 kind=lm[key].type)
        else:
            merged[key] = lm[key]
    return merged


@command(app, bench_options(),
         task=(str, typer.Option("lm", help="lm: the causal LM (default smollm2-135m; ΔLM loss, KL, top-1 agreement, "
                                 "prefill / decode time), results in bench/results/lm.json. encoder: the sentence "
                                 "encoder (default minilm-l6; cosine to the teacher's sentence embedding and "
                                 "nearest-neighbour retrieval agreement on held-out sentences, cosine distillation), "
                                 "results in bench/results/encoder.json.")),
         readme=(bool, typer.Option(False, "--readme", help="Do not run: rewrite the task's results section of "
                                    "README.md from the result JSON.")))
def bench(given: Given, task: str, readme: bool):
    """Benchmark each routed component and their combination against random, training-free and static baselines
    on held-out books: quality against executed FLOPs, and elastic / dense wall-clock."""
    tasks = bench_tasks()
    if task not in tasks:
        raise ConfigError(f"--task {task!r}: pass one of {', '.join(tasks)}")
    t = tasks[task]
    o = given.merge(t["options"])
    if o["resume"] and o["overwrite"]:
        raise ConfigError("--resume keeps OUTPUT's finished settings and --overwrite replaces them: pass one")
    if readme:
        path = Path(o["output"])
        if not path.is_file():
            raise ConfigError(f"no results at {path}: run `elastiformer bench --task {task}` first")
        from ..benchmarks.runner import update_readme

        update_readme(json.loads(path.read_text()), project_readme(), str(path.with_suffix(".png")),
                      marker=t["marker"], render=t["render"])
        typer.echo(f"README.md {task} results section rewritten from {path}")
        return
    from ..validation import check_output_file

    if task == "lm":
        check_numbers(o, dict(steps=1, batch_size=1, seq_len=2, train_sequences=1, eval_sequences=1, eval_seq_len=2,
                               prefill_batch=1, prefill_len=1, decode_tokens=1, timing_reps=0, seed=0, lora_rank=0,
                               lm_eval_docs=0))
        from ..evaluation.baselines import check_match

        check_match(o["match"])
    check_output_file(o["output"], bool(o["overwrite"] or o["append"] or o["resume"]),
                      flag="--overwrite (or --append, --resume)")
    result = t["run"](o, plot=t["plot"], echo=typer.echo)
    typer.echo(f"{len(result['records'])} records in {o['output']} (plot: {Path(o['output']).with_suffix('.png')})")


@command(app, SPEED_OPTIONS, "bench-speed",
         readme=(bool, typer.Option(False, "--readme", help="Do not run: rewrite README.md's speed results from the "
                                    "result JSON.")))
def bench_speed(given: Given, readme: bool):
    """Does skipped compute show up in wall-clock time? Per component and budget (and Flextron's sub-networks):
    prefill and generation time ratios, elastic / dense (interleaved, median), and tokens/s, beside the executed
    model-FLOPs ratio; a PNG of time ratio against FLOPs ratio with the line y = x. Run it on a quiet machine."""
    from ..benchmarks.speed import run_speed_bench, speed_markdown
    from ..validation import check_output_file

    o = given.merge()
    if readme:
        from ..benchmarks.readme_section import replace_readme_section

        path = Path(o["output"])
        if not path.is_file():
            raise ConfigError(f"no results at {path}: run `elastiformer bench-speed` first")
        replace_readme_section(project_readme(), "speed", speed_markdown(json.loads(path.read_text())) +
                               f"\n\n![time against executed FLOPs]({path.with_suffix('.png')})")
        typer.echo(f"README.md speed results rewritten from {path}")
        return
    check_numbers(o, dict(steps=0, target_steps=0, allocation_sequences=1, prefill_batch=1, prefill_len=1,
                          decode_tokens=1, reps=1, threads=0))
    check_output_file(o["output"], bool(o["overwrite"]), flag="--overwrite")
    result = run_speed_bench(o, echo=typer.echo)
    typer.echo(f"{len(result['records'])} records in {o['output']} (plot: {Path(o['output']).with_suffix('.png')})")


@command(app, VISION_BENCH_OPTIONS, "bench-vision",
         readme=(bool, typer.Option(False, "--readme", help="Do not run: rewrite README.md's vision results "
                                    "subsection from the result JSON.")))
def bench_vision(given: Given, readme: bool):
    """Benchmark the elastic ViT on Fashion-MNIST: test accuracy of teacher and elastic model against executed
    FLOPs for each routed component (tokens = patches, heads, experts) and their combination, beside random,
    training-free (norm) and static baselines; then robustness to the classes the routers were trained on."""
    from ..benchmarks.vision import plot_vision_bench, run_vision_bench, update_vision_readme

    o = given.merge()
    if readme:
        path = Path(o["output"])
        if not path.is_file():
            raise ConfigError(f"no results at {path}: run `elastiformer bench-vision` first")
        update_vision_readme(json.loads(path.read_text()), project_readme(), str(path.with_suffix(".png")))
        typer.echo(f"README.md vision results subsection rewritten from {path}")
        return
    result = run_vision_bench(o, plot=plot_vision_bench, echo=typer.echo)
    typer.echo(f"{len(result['records'])} records in {o['output']} (plot: {Path(o['output']).with_suffix('.png')})")


# ---------------------------------------------------------------------- lm-eval
@app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                          "help_option_names": []})
def lm_eval_(ctx: typer.Context):
    """lm-evaluation-harness's command line with the `elastiformer` model registered, e.g.
    `elastiformer lm-eval --model elastiformer --model_args pretrained=smollm2-135m,routers=runs/x/routers,budget=0.8
    --tasks elastiformer_last_word` (the local last-word task from held-out books; hub tasks need hub access).
    Every argument goes to lm_eval (`elastiformer lm-eval --help` shows its options)."""
    from ..integrations.lm_eval import main as lm_eval_main

    lm_eval_main(list(ctx.args))


# ---------------------------------------------------------------------- demo
@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), help="Where the routers, JSON and PNG go."),
    steps: int = typer.Option(80, help="Training steps (about 5 s each on 2 CPU cores)."),
    max_sequences: int = typer.Option(16, help="Held-out sequences to evaluate on."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier demo in OUTPUT."),
):
    """The main job end to end: make SmolLM2-135M's MLPs token-elastic on Gutenberg books and show the trade-off."""
    t0 = time.perf_counter()
    check_output(output, overwrite, "the earlier demo's results")
    typer.echo("elastiformer demo: SmolLM2-135M, MLP token routing (Mixture-of-Depths style), trained by "
               "self-distillation on Gutenberg books, evaluated on held-out books.\n")
    opts = dict(TRAIN_DEFAULTS) | dict(output=str(output), mlp_tokens=0.8, dense_layers="", steps=steps,
                                       batch_size=2, seq_len=256, max_sequences=2000, budget_range="0.6,0.95",
                                       overwrite=overwrite, checkpoint_every=20)
    typer.echo(f"1/2 training routers for {steps} steps, then fitting where each budget is spent: the per-layer "
               "allocation, measured on calibration text with the trained routers...")
    report = run_train(opts)
    typer.echo(f"    {report['steps']} steps, {report['tokens']:,} tokens, {report['seconds']:.0f}s, "
               f"final KL {report['final_kl']:.4f}\n")
    typer.echo("2/2 evaluating on held-out books at 3 budgets, beside random routing and static pruning (whole "
               "least-important MLPs dropped) at the same executed FLOPs...")
    ev = dict(EVAL_DEFAULTS) | dict(routers=str(output / "routers"), budgets="0.7,0.8,0.9",
                                    max_sequences=max_sequences, baselines="random,static")
    result = run_eval(ev)
    result["train"] = {k: report[k] for k in ("steps", "tokens", "seconds", "final_kl")}
    from ..cache import atomic_write_json

    atomic_write_json(output / "demo.json", result)
    plot_curve(result, output / "demo.png")
    plot_allocation_heatmap(result["allocation"], output / "demo_allocation.png", result.get("model", ""))
    typer.echo("")
    print_table(result)
    typer.echo(f"\nwrote {output / 'demo.json'}, {output / 'demo.png'} and {output / 'demo_allocation.png'} in "
               f"{time.perf_counter() - t0:.0f}s")


def plot_allocation_heatmap(table: dict[str, Any], path: Path, model: str = "") -> None:
    """Layer x budget heat map of the capacities in `allocation_table`'s output (one panel per component)."""
    from ..benchmarks.runner import plot_allocation

    plot_allocation({"model": model, "components": {"learned": {"allocation": table}}}, path)


# ---------------------------------------------------------------------- flextron (its own sub-app)
from .flextron import app as _flextron_app  # noqa: E402

app.add_typer(_flextron_app, name="flextron")


def _cli_exceptions() -> tuple[tuple, tuple, tuple]:
    """(exit, abort, usage-error) exception classes of the click that typer runs on: its own vendored copy in newer
    typer releases (typer.TyperException), click's in older ones; both are caught."""
    exits, aborts, usage = [typer.Exit], [typer.Abort], []
    if hasattr(typer, "TyperException"):
        usage.append(typer.TyperException)
    try:
        import click

        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
        usage.append(click.ClickException)
    except ImportError:
        pass
    return tuple(exits), tuple(aborts), tuple(usage)


def main() -> None:
    """Console entry point (see `_run` for the exit codes); an output folder a failed run created stays only if
    something was written into it."""
    code = 1
    remove_empty_created_outputs(failed=False)  # (folders an earlier library call in this process created)
    try:
        code = _run()
    finally:
        remove_empty_created_outputs(failed=bool(code))
    sys.exit(code)


def _run() -> int:
    """The command line. Exit codes: 0 success, 2 a usage or input error (one line naming the fix), 130 Ctrl-C
    (one line: what was kept), 1 an internal error (one line; --debug shows the traceback)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars are noise around our own progress bars
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    global _DEBUG
    _DEBUG = False  # (set by --debug for this call only: main() may run more than once in one process)
    exits, aborts, usage = _cli_exceptions()
    debug = "--debug" in sys.argv
    try:
        code = typer.main.get_command(app).main(standalone_mode=False, prog_name="elastiformer")
    except exits as e:
        code = getattr(e, "exit_code", 0)
    except (KeyboardInterrupt, *aborts):
        code = 130
    except usage as e:  # a bad option value or a typo: one line, and where to look
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        command = getattr(getattr(e, "ctx", None), "command_path", None) or "elastiformer"
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" or not message.strip():  # a bare command: its help, not "error:"
            typer.echo(ctx.get_help() if ctx is not None else message)
            return getattr(e, "exit_code", 2)
        typer.echo(f"error: {message} (see `{command} --help`)", err=True)
        return getattr(e, "exit_code", 2)
    except ElastiformerError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        return 2
    except Exception as e:  # noqa: BLE001  (a bug: one line, the traceback on request)
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        typer.echo(f"internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback, and "
                   "please report it)", err=True)
        return 1
    if code == 130:  # typer's standalone_mode=False *returns* 130 on Ctrl-C instead of raising
        typer.echo("interrupted: finished files are kept (a training run's last checkpoint: continue it with "
                   "--resume; a bench keeps every finished setting: continue it with --resume)", err=True)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
