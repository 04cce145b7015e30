"""`elastiformer bench-vision`: ElastiFormer on the ViT teacher (Fashion-MNIST), per component and combined, against
baselines, plus robustness to the domain the routers were trained on.

For each setting, one router set is trained by cosine self-distillation on the final [CLS] features (the classifier's
input), with a budget drawn per step, and evaluated at every budget of the sweep beside the random, training-free
(norm) and static-pruning baselines at the same budget, on the same held-out test images in the same process:
test accuracy (and the teacher's), top-1 agreement with the teacher, cosine to the teacher's features, executed
block FLOPs. Domain robustness (the paper's ImageNet-subsets experiment): routers trained on images of classes 0-4
only, 5-9 only, and all classes, each evaluated on all test classes and on each half.
Results go to `bench/results/vision.json` (rewritten after each setting) and a PNG beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..cache import atomic_write_json
from ..config import ElasticConfig
from ..errors import ConfigError
from ..model import ElasticModel
from ..evaluation.vision import evaluate_images
from ..options import Option, defaults
from .runner import Measured, plot_quality, run_settings, summarize, update_readme
from .settings import baselines_of

VISION_SETTINGS: dict[str, dict[str, Any]] = {
    "mlp_tokens": dict(mlp_tokens=0.7),
    "attn_tokens": dict(attn_tokens=0.7),
    "attn_heads": dict(attn_heads=0.75),
    "mlp_experts": dict(mlp_experts=8, mlp_experts_active=0.75),
    "combined": dict(mlp_tokens=0.7, attn_tokens=0.7, attn_heads=0.75, mlp_experts=8, mlp_experts_active=0.75),
}
# Token routers on the ViT learn from the cosine loss alone: the teacher-importance target that helps on SmolLM2 (the
# norm of what each token's sub-layer adds) made learned MLP-token routing lose to random routing here (measured on
# 1000 test images at budget 0.7: cosine to the teacher 0.970 against random 0.985; without it 0.986 against 0.985).
# Head and expert routers keep their importance targets, which beat the baselines.
VISION_AUX_WEIGHTS = {"token_importance": 0.0}
DOMAINS = ("0-4", "5-9", "all")  # classes the domain-robustness routers are trained on

VISION_BENCH_OPTIONS = {
    "model": Option("vit-fashion-mnist", "A ViTForImageClassification folder, or vit-fashion-mnist (trained here "
                    "first if missing, as no pretrained ViT installs)."),
    "components": Option("mlp_tokens,attn_tokens,attn_heads,mlp_experts,combined", "Settings to run ('' for none)."),
    "budgets": Option("0.6,0.7,0.8,0.9", "Budgets of the sweep."),
    "steps": Option(150, "Router training steps per setting."),
    "batch_size": Option(64, "Images per router training step."),
    "lr": Option(1e-2, "Peak learning rate of the routers."),
    "train_images": Option(6000, "Routers train on the first N training images."),
    "test_images": Option(2000, "Evaluate on the first N test images."),
    "domain_component": Option("combined", "Setting of the domain-robustness runs (routers trained on classes 0-4, "
                               "5-9, all; '' skips them)."),
    "domain_budgets": Option("0.7,0.8", "Budgets of the domain runs."),
    "domain_steps": Option(150, "Router training steps per domain run."),
    "dense_layers": Option("", "Layers never routed, e.g. 0,-1."),
    "output": Option("bench/results/vision.json", "Result JSON (a PNG beside it).", kind=Path),
    "seed": Option(0, "Seed of data order, budgets and router init."),
    "timing_reps": Option(3, "Interleaved timing repetitions (0: no timing)."),
    "append": Option(False, "Keep the other settings' records in OUTPUT (and its domain runs when "
                     "--domain-component '' skips them)."),
    "resume": Option(False, "Continue an interrupted run: keep the settings and domain runs OUTPUT already holds "
                     "and run only the others."),
}
VISION_BENCH_DEFAULTS = defaults(VISION_BENCH_OPTIONS)


def _train(em: ElasticModel, pixels: torch.Tensor, o: dict[str, Any], budgets: Sequence[float], steps: int) -> Any:
    """Cosine self-distillation on the final [CLS] features; images [N, C, H, W] are shuffled and batched by the
    trainer; one budget drawn per step from a range that covers the sweep."""
    from ..training.routers import train_routers

    return train_routers(em, pixels, steps=steps, batch_size=int(o["batch_size"]), lr=float(o["lr"]),
                         seed=int(o["seed"]), budget_range=(max(0.05, min(budgets) - 0.1), 0.95),
                         checkpoint_every=None, loss="cosine", pooling="cls", aux_weights=VISION_AUX_WEIGHTS,
                         calibration_data=[{"pixel_values": pixels[-64:]}],
                         allocation_floor=max(0.05, min(0.5, min(budgets) - 0.05)))


def run_vision_bench(o: dict[str, Any], plot=None, echo=print) -> dict[str, Any]:
    from ..data.images import ImageFormat, load_fashion_mnist, parse_classes, pixel_values_for
    from ..evaluation.lm import time_ratio
    from ..model import get_elastic_model
    from ..loading.models import load_model
    from ..evaluation.timing import machine
    from ..validation import parse_floats, parse_ints

    components = [c.strip() for c in str(o["components"]).split(",") if c.strip()]
    unknown = [c for c in components + [o["domain_component"]] if c and c not in VISION_SETTINGS]
    if unknown:
        raise ConfigError(f"unknown vision bench components {unknown}: pick from {', '.join(VISION_SETTINGS)}")
    budgets, domain_budgets = parse_floats(o["budgets"], "budgets"), parse_floats(o["domain_budgets"], "domain_budgets")
    dense = parse_ints(o["dense_layers"], "dense_layers")
    out = Path(o["output"])
    base = load_model(o["model"])
    fmt = ImageFormat.of(base)
    train = load_fashion_mnist("train", limit=int(o["train_images"]))
    test = load_fashion_mnist("test", limit=int(o["test_images"]))
    train_x, test_x = pixel_values_for(train.images, fmt), pixel_values_for(test.images, fmt)
    calib = [{"pixel_values": train_x[-64:]}]  # training images the steps rarely reach
    result: dict[str, Any] = {
        "model": o["model"], "data": "Fashion-MNIST (Debian dataset-fashion-mnist), first test images",
        "test_images": len(test), "train_images": len(train), "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in o.items()},
        "teacher_note": "no pretrained ViT installs here: the teacher is trained by `elastiformer vit-teacher`",
        "components": {}, "records": [],
        "domain": {"component": o["domain_component"], "steps": int(o["domain_steps"]), "records": []},
    }
    if (o["append"] or o.get("resume")) and out.is_file():  # the domain runs of the earlier file, if not redone
        import json

        previous = json.loads(out.read_text()).get("domain")
        if not o["domain_component"] and previous:
            result["domain"] = previous
        elif o.get("resume") and (previous or {}).get("component") == o["domain_component"]:
            result["domain"] = previous  # its finished domains are kept and not run again

    def fresh(setting: dict[str, Any]) -> ElasticModel:
        return get_elastic_model(load_model(o["model"]), ElasticConfig(**setting, dense_layers=dense))

    def measure(comp: str) -> Measured:
        echo(f"[{comp}] training routers ({o['steps']} steps, cosine distillation on the final [CLS] features)...")
        em = fresh(VISION_SETTINGS[comp])
        report = _train(em, train_x, o, budgets, int(o["steps"]))
        baselines = baselines_of(comp)
        echo(f"[{comp}] evaluating on {len(test)} test images at budgets {budgets} beside {', '.join(baselines)} at "
             "matched block FLOPs...")
        ev = evaluate_images(em, test_x, test.labels, budgets, baselines=baselines, calibration_data=calib,
                             seed=int(o["seed"]))
        timing = {}
        for b in budgets:
            em.set_budget(b)
            timing[b] = time_ratio(em, {"pixel_values": test_x[:256]}, lambda: em.routing_method("learned"),
                                   int(o["timing_reps"]))[0] if int(o["timing_reps"]) else None
        records = [r | {"component": comp, "teacher_accuracy": ev["teacher_accuracy"],
                        "time_ratio": timing[r["budget"]] if r["method"] == "learned" else None}
                   for r in ev["records"]]
        result["teacher_accuracy"] = ev["teacher_accuracy"]
        info = {"train_images_seen": report.steps * int(o["batch_size"]), "steps": report.steps,
                "train_seconds": report.seconds, "final_loss": report.history[-1]["loss"] if report.history else None,
                "router_param_fraction": ev["router_param_fraction"],
                "pinned": em.allocation.pinned_layers() if em.allocation else {}}
        return Measured(records, info)

    def finish(result: dict[str, Any]) -> None:
        result["summary"] = {metric: summarize([r | {"lora_rank": 0} for r in result["records"]], metric=metric,
                                               higher_is_better=True) for metric in ("cosine", "accuracy")}

    run_settings(o, result, VISION_SETTINGS, measure,
                 same=("model", "test_images", "train_images"), finish=finish, plot=plot, echo=echo)

    if o["domain_component"]:
        comp = o["domain_component"]
        halves = {"0-4": parse_classes("0-4"), "5-9": parse_classes("5-9")}
        finished = {r["train_classes"] for r in result["domain"]["records"]}
        for domain in DOMAINS:
            if domain in finished:
                echo(f"[domain {domain}] already in {out} (--resume)")
                continue
            t0 = time.perf_counter()
            classes = parse_classes(domain)
            keep = torch.ones(len(train), dtype=torch.bool) if classes is None else \
                torch.isin(train.labels, torch.tensor(classes))
            echo(f"[domain {domain}] training {comp} routers on {int(keep.sum())} images of classes {domain}...")
            em = fresh(VISION_SETTINGS[comp])
            _train(em, train_x[keep], o, domain_budgets, int(o["domain_steps"]))
            for eval_name, eval_classes in (("all", None), *halves.items()):
                sel = torch.ones(len(test), dtype=torch.bool) if eval_classes is None else \
                    torch.isin(test.labels, torch.tensor(eval_classes))
                ev = evaluate_images(em, test_x[sel], test.labels[sel], domain_budgets, baselines=(),
                                     seed=int(o["seed"]), progress=False)
                for r in ev["records"]:
                    result["domain"]["records"].append(
                        {"train_classes": domain, "eval_classes": eval_name, "budget": r["budget"],
                         "accuracy": r["accuracy"], "teacher_accuracy": ev["teacher_accuracy"],
                         "agreement": r["agreement"], "block_flops_ratio": r["block_flops_ratio"]})
            result["domain"]["gaps"] = domain_gaps(result["domain"]["records"])
            atomic_write_json(out, result)
            echo(f"[domain {domain}] done in {time.perf_counter() - t0:.0f}s")
    return result


def domain_gaps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy of routers trained on one half of the classes minus that of routers trained on all classes, on the
    other half (out of domain), on their own half, and on all classes, per budget (negative: worse)."""
    acc = {(r["train_classes"], r["eval_classes"], r["budget"]): r["accuracy"] for r in records}
    out = []
    for train_half, other in (("0-4", "5-9"), ("5-9", "0-4")):
        for b in sorted({r["budget"] for r in records}):
            if ("all", other, b) not in acc or (train_half, other, b) not in acc:
                continue
            out.append({"train_classes": train_half, "budget": b,
                        "gap_unseen_half": acc[(train_half, other, b)] - acc[("all", other, b)],
                        "gap_own_half": acc[(train_half, train_half, b)] - acc[("all", train_half, b)],
                        "gap_all_classes": acc[(train_half, "all", b)] - acc[("all", "all", b)]})
    return out


def plot_vision_bench(result: dict[str, Any], path: Path) -> None:
    """One panel per component: test accuracy against executed block FLOPs, one line per method."""
    plot_quality(result, path, metrics=(("accuracy", "test accuracy"),),
                  data_name=f"Fashion-MNIST, {result['test_images']} test images")


def vision_results_markdown(result: dict[str, Any]) -> str:
    """The README's vision results subsection, generated from `vision.json`."""
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"ViT teacher `{result['model']}` (trained here by `elastiformer vit-teacher`: no pretrained ViT installs "
        f"here), test accuracy {100 * result.get('teacher_accuracy', float('nan')):.2f}% on the first "
        f"{result['test_images']:,} Fashion-MNIST test images. Routers trained by cosine self-distillation on the "
        f"final [CLS] features, steps x {s['batch_size']} images drawn from the first "
        f"{result['train_images']:,} training images (steps: "
        + ", ".join(f"{c} {v['steps']}" for c, v in result["components"].items())
        + "), one router set per setting evaluated at every budget; "
        f"{m['cpu_count']}-core {m['processor']} CPU, torch {m['torch']}. Time is elastic / dense wall-clock of a "
        "forward over 256 images (median of interleaved runs). Regenerate: `elastiformer bench-vision`, then "
        "`elastiformer bench-vision --readme`.",
        "",
        "| component | budget | method | block FLOPs | accuracy | Δ vs teacher | agreement | cosine | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(VISION_SETTINGS)
    for r in sorted(result["records"], key=lambda r: (order.index(r["component"]), -r["budget"],
                                                      r["method"] != "learned", r["method"])):
        t = "-" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}"
        lines.append(f"| {r['component']} | {r['budget']:.2f} | {r['method']} | {r['block_flops_ratio']:.3f} | "
                     f"{100 * r['accuracy']:.2f}% | {100 * (r['accuracy'] - r['teacher_accuracy']):+.2f} | "
                     f"{r['agreement']:.3f} | {r['cosine']:.4f} | {t} |")
        if "learned_at_same_flops" in r:  # the learned routers again, at static's FLOPs (the pair the tally compares)
            q = r["learned_at_same_flops"]
            lines.append(f"| {r['component']} | {r['budget']:.2f} | learned @ {r['method']} FLOPs | "
                         f"{q['block_flops_ratio']:.3f} | {100 * q['accuracy']:.2f}% | "
                         f"{100 * (q['accuracy'] - r['teacher_accuracy']):+.2f} | {q['agreement']:.3f} | "
                         f"{q['cosine']:.4f} | - |")
    dom = result.get("domain", {})
    if dom.get("records"):
        lines += ["", f"Robustness to the training domain ({dom['component']} routers, {dom['steps']} steps "
                  "each, trained on classes 0-4, 5-9 or all; accuracy on each test half and on all classes):", "",
                  "| trained on | budget | block FLOPs | all classes | classes 0-4 | classes 5-9 |",
                  "|---|---|---|---|---|---|"]
        acc = {(r["train_classes"], r["eval_classes"], r["budget"]): r for r in dom["records"]}
        for train_classes in DOMAINS:
            for b in sorted({r["budget"] for r in dom["records"]}, reverse=True):
                row = [acc.get((train_classes, e, b)) for e in ("all", "0-4", "5-9")]
                if row[0] is None:
                    continue
                cells = " | ".join("-" if r is None else f"{100 * r['accuracy']:.2f}%" for r in row)
                lines.append(f"| {train_classes} | {b:.2f} | {row[0]['block_flops_ratio']:.3f} | {cells} |")
        gaps = dom.get("gaps") or []
        if gaps:
            worst = min(gaps, key=lambda g: g["gap_unseen_half"])
            lines += ["", "Gap on the unseen half (trained on one half minus trained on all): "
                      + ", ".join(f"{g['train_classes']} @ {g['budget']:.2f}: {100 * g['gap_unseen_half']:+.2f}"
                                  for g in gaps)
                      + f" points (worst {100 * worst['gap_unseen_half']:+.2f})."]
    return "\n".join(lines) + "\n"


def update_vision_readme(result: dict[str, Any], readme: Path, image: str) -> None:
    """Rewrite the README's `<!-- results:vision -->` subsection from `vision.json`."""
    update_readme(result, readme, image, marker="vision", render=vision_results_markdown)
