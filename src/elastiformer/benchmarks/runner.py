"""The one loop every ElastiFormer benchmark runs, and the parts they share.

A bench is a list of settings (`--components`), each measured by the task's `measure(setting)` (train routers,
evaluate against baselines, time): `run_settings` runs them in order and rewrites the result JSON (and its plot)
after each, so a cut run keeps every finished setting; `--append` keeps the other settings of an earlier file and
`--resume` also skips those it finished (`keep_previous`). Also here: the learned-against-baselines tally at matched
block FLOPs (`summarize`, `summary_line`), the quality-against-compute plot, the allocation heat map, and the
README section writer (`update_readme`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..cache import atomic_write_json
from ..errors import ConfigError


@dataclass
class Measured:
    """What one bench setting produced: its records, what the result file keeps about it under `components`, and
    the training tokens it used (summed into the result's `train_tokens` where the task counts them)."""

    records: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    train_tokens: int = 0


def parse_components(text: Any, settings: dict[str, Any]) -> list[str]:
    """`--components a,b`: the bench settings to run, each one of `settings`."""
    from ..errors import ConfigError

    components = [c.strip() for c in str(text).split(",") if c.strip()]
    unknown = [c for c in components if c not in settings]
    if unknown:
        raise ConfigError(f"unknown bench components {unknown}: pick from {', '.join(settings)}")
    return components


def calibration_tail(batches: list, allocation_batches: int) -> list:
    """Calibration batches from the end of the training batches, which the steps rarely reach: the last two in
    order (what thresholds and the baselines are fitted on, whatever the count), then as many more before them,
    newest first, as the allocation is fitted on."""
    n = max(2, allocation_batches)
    if n > len(batches):
        raise ConfigError(f"--allocation-batches {allocation_batches} needs {n} calibration batches and the "
                          f"training data gave {len(batches)}: pass fewer, or more training data")
    return [batches[-2], batches[-1], *batches[-n:-2][::-1]]


def save_result(result: dict[str, Any], out: Path, plot: Callable[[dict, Path], None] | None = None) -> None:
    """Write the result JSON atomically, and its plot beside it (same name, .png)."""
    atomic_write_json(out, result)
    if plot is not None:
        plot(result, out.with_suffix(".png"))


def run_settings(o: dict[str, Any], result: dict[str, Any], settings: dict[str, Any],
                 measure: Callable[[str], Measured], *, same: tuple[str, ...], lora: int = 0,
                 finish: Callable[[dict[str, Any]], None] | None = None,
                 plot: Callable[[dict, Path], None] | None = None, echo=print) -> dict[str, Any]:
    """Run `measure(setting)` for each setting of `o["components"]` (names of `settings`), adding its records to
    `result`, then `finish(result)` (summaries), then saving the JSON and plot, after each one.

    `o["append"]` / `o["resume"]`: keep an earlier result file at `o["output"]` measured on the same data (`same`
    keys agree); `resume` also skips the settings it finished."""
    components = parse_components(o["components"], settings)
    out = Path(o["output"])
    if o.get("append") or o.get("resume"):
        components = keep_previous(result, out, components, lora, same=same, resume=bool(o.get("resume")),
                                   echo=echo)
    for setting in components:
        t0 = time.perf_counter()
        got = measure(setting)
        result["records"].extend(got.records)
        if "train_tokens" in result:
            result["train_tokens"] += got.train_tokens
        result["components"][setting if not lora else f"{setting}+lora{lora}"] = \
            got.info | {"seconds": time.perf_counter() - t0}
        if finish is not None:
            finish(result)
        save_result(result, out, plot)
        echo(f"[{setting}] done in {time.perf_counter() - t0:.0f}s; results so far in {out}")
    return result


def keep_previous(result: dict[str, Any], out: Path, components: list[str], lora: int, same: tuple[str, ...],
                  resume: bool = False, echo=print) -> list[str]:
    """`--append`: keep the other settings' records of an earlier result file (this run replaces its own), if it
    was measured on the same model and held-out data (the `same` keys agree). `--resume` also keeps the settings
    the file already finished (a bench writes each one as it completes) and returns only those still to run."""
    import json

    from ..errors import ConfigError

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
    if "train_tokens" in result:
        result["train_tokens"] = old.get("train_tokens", 0)
    result["settings"] = old.get("settings", result["settings"])
    return components



def summarize(records: list[dict[str, Any]], tolerance: float = 0.01, metric: str = "delta_lm_loss",
              higher_is_better: bool = False) -> dict[str, Any]:
    """Learned routing against each baseline at matched block FLOPs: a pair is won when learned is at least as
    good on `metric` (ΔLM loss: no higher) while executing at most `tolerance` more block FLOPs than the baseline.
    A baseline record holding `learned_at_same_flops` (static pruning, whose FLOPs move in steps and land above the
    learned routers', or a baseline whose FLOPs jump past them) is compared with that measurement of the learned
    routers at its own FLOPs."""
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
            ours = r.get("learned_at_same_flops") or learned
            if sign * ours[metric] <= sign * r[metric] and ours["block_flops_ratio"] <= r["block_flops_ratio"] + tolerance:
                won += 1
            else:
                lost.append({"setting": setting, "lora_rank": lora, "budget": budget, "baseline": method,
                             "learned": [ours["block_flops_ratio"], ours[metric]],
                             "baseline_point": [r["block_flops_ratio"], r[metric]]})
    return {"metric": metric, "pairs": pairs, "won": won, "lost": lost}



def summary_line(summary: dict[str, Any]) -> str:
    f = "+.3f" if summary.get("metric", "delta_lm_loss") == "delta_lm_loss" else ".4f"
    lost = "; ".join(f"{x['setting']}{' + LoRA' if x['lora_rank'] else ''} at {x['budget']:.2f} against "
                     f"{x['baseline']} ({x['learned'][1]:{f}} at {x['learned'][0]:.3f} FLOPs vs "
                     f"{x['baseline_point'][1]:{f}} at {x['baseline_point'][0]:.3f})" for x in summary["lost"])
    return (f"**Learned routing is at least as good as the baseline in {summary['won']} of {summary['pairs']} pairs at "
            f"matched block FLOPs.**" + (f" Lost: {lost}." if lost else ""))


def update_readme(result: dict[str, Any], readme: Path, image: str | None, *, marker: str,
                  render: Callable[[dict[str, Any]], str]) -> None:
    """Replace the text between the README's `results:<marker>` markers with `render(result)` (and the plot at
    `image`, a path relative to the README, if given)."""
    from .readme_section import replace_readme_section

    body = render(result) + (f"\n![quality against compute]({image})" if image else "")
    replace_readme_section(readme, marker, body)


VARIANT_NAMES = {"mlp_experts_cluster": "mlp_experts (clustered)", "mlp_tokens_paper": "mlp_tokens, paper objective",
                 "mlp_tokens_sensitivity": "mlp_tokens, sensitivity targets",
                 "mlp_tokens_student": "mlp_tokens, student inputs",
                 "mlp_tokens_no_stand_in": "mlp_tokens, no stand-in (skipped tokens get nothing)",
                 "mlp_tokens_fitted_stand_in": "mlp_tokens, stand-ins as fitted (not trained)"}


def label(r: dict[str, Any]) -> str:
    """How a record's setting is named in tables and plots."""
    setting = r.get("setting", r["component"])
    name = VARIANT_NAMES.get(setting, setting)
    return name + (f" + LoRA r={r['lora_rank']}" if r.get("lora_rank") else "")


def plot_quality(result: dict[str, Any], path: Path,
                 metrics: tuple[tuple[str, str], ...] = (("delta_lm_loss", "ΔLM loss (nats/token)"),),
                 data_name: str = "held-out Gutenberg") -> None:
    """One panel per component (one row per metric): the metric against executed block FLOPs, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..cache import atomic_path

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


def plot_allocation(result: dict[str, Any], path: Path) -> None:
    """A layer x budget heat map of the learned allocation's capacities, one panel per (setting, component)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..cache import atomic_path

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
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.9 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.6, wspace=0.3)  # (each panel's layer axis clear of the title below it)
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
