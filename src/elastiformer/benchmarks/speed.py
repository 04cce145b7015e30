"""`elastiformer bench-speed`: does skipped compute show up in wall-clock time?

Per routed component (and their combination) and budget, and for Flextron's sub-networks at the same budgets:
prefill of `prefill_batch` x `prefill_len` tokens, and greedy generation of `decode_tokens` tokens at each batch
size of `decode_batches`, each as the elastic / dense time ratio (median of `reps` interleaved runs: dense,
elastic, dense, ...; dense is the base model as loaded, a separate copy never wrapped) and tokens/s, beside the
executed model-FLOPs ratio of the same run (blocks, routers and LM head). The physical limit is a time ratio equal
to the FLOPs ratio: the PNG plots one against the other with the line y = x. The JSON records the machine and the
torch threads, since ratios measured on a busy machine mean little.

ElastiFormer's routers are trained briefly here (`steps`; what the routes look like matters for speed, not their
quality), their allocation fitted and thresholds calibrated; with `rankings` "flops,time", twice on the same routers:
ranked by loss per FLOP saved, then by loss per decoding time saved (a unit latency table timed here first, see
`unit_latency.py`). Every record holds `heldout_kl`, the subject's KL from the dense model's next-token distributions
on the prefill batch: what its time was bought with. Flextron runs the base model's nested widths: with
`flextron_checkpoint` (a sorted, trained checkpoint holding `router/`), the routed sub-network its router picks at
each budget (`set_budget(relative_compute=b)`); without, the same width in every layer, the widest whose block
FLOPs fit the budget (the speed of a sub-network depends on its widths, not on how they were chosen).
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from ..cache import atomic_path
from ..config import ElasticConfig
from ..evaluation.timing import interleaved_runs, machine
from ..options import Option, defaults
from .runner import Measured, parse_components, run_settings, save_result
from .settings import SETTINGS

SPEED_SETTINGS = {k: SETTINGS[k] for k in ("mlp_tokens", "attn_tokens", "attn_heads", "mlp_experts",
                                           "mlp_experts_cluster", "combined")}
SPEED_OPTIONS = {
    "model": Option("smollm2-135m", "The base model."),
    "components": Option(",".join(SPEED_SETTINGS), "ElastiFormer settings to time: "
                         f"{', '.join(SPEED_SETTINGS)} ('' for none)."),
    "budgets": Option("0.6,0.75,0.9", "Budgets, for Flextron too."),
    "steps": Option(30, "Router training steps per setting (the routes matter for speed, not their quality)."),
    "target_steps": Option(0, "Teacher forwards of the router-target phase before training."),
    "batch_size": Option(4, "Sequences per router training step."),
    "allocation_sequences": Option(4, "Training sequences the allocation and the thresholds are fitted on."),
    "seq_len": Option(128, "Tokens per training sequence."),
    "train_sequences": Option(400, "Training sequences."),
    "prefill_batch": Option(4, "Sequences of the timed prefill."),
    "prefill_len": Option(512, "Tokens per sequence of the timed prefill."),
    "decode_tokens": Option(64, "Tokens generated per timed generation."),
    "decode_batches": Option("1,8", "Batch sizes of the timed generations."),
    "prompt_len": Option(32, "Prompt tokens of each timed generation."),
    "reps": Option(3, "Interleaved repetitions per measurement (median)."),
    "rankings": Option("flops,time", "How ElastiFormer's allocation ranks its moves, each on the same trained "
                       "routers: 'flops' (loss per FLOP saved, train_routers' default), 'time' (loss per decoding "
                       "time saved, from a unit latency table measured here first)."),
    "flextron": Option(True, "Time Flextron's sub-networks at the same budgets too."),
    "flextron_checkpoint": Option(None, "A sorted, trained Flextron checkpoint with its router/ (routed "
                                  "sub-networks); without, the same width in every layer.", kind=Path),
    "threads": Option(0, "torch threads (0: torch's own choice)."),
    "seed": Option(0, "Seed of data order, budgets and router init."),
    "output": Option("bench/results/speed.json", "Result JSON (a PNG beside it).", kind=Path),
    "overwrite": Option(False, "Replace an existing OUTPUT (and its PNG)."),
}
SPEED_DEFAULTS = defaults(SPEED_OPTIONS)
FLEXTRON_MENUS = dict(mlp_widths=(1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25), head_widths=(1.0, 0.75, 0.5, 0.25))


# ---------------------------------------------------------------- timing
def timing_record(kind: str, tokens: int, dense: list[float], elastic: list[float], flops_ratio: float
                  ) -> dict[str, Any]:
    """One measurement from the interleaved runs' seconds: `tokens` processed (prefill) or generated (decode) per
    run. time_ratio is the ratio of the medians; paired_ratios each repetition's elastic / dense, its noise."""
    dense_s, elastic_s = statistics.median(dense), statistics.median(elastic)
    return {"kind": kind, "time_ratio": elastic_s / dense_s, "model_flops_ratio": flops_ratio,
            "dense_s": dense_s, "elastic_s": elastic_s,
            "paired_ratios": [e / d for d, e in zip(dense, elastic)],
            "dense_tokens_per_s": tokens / dense_s, "elastic_tokens_per_s": tokens / elastic_s}


class Subject:
    """What the bench times, ElastiFormer or Flextron alike: the model in its elastic setting (`elastic()`, a
    context), and the executed / dense model FLOPs of the last call. The dense side of every ratio is the base model
    as loaded, never wrapped (`measure_subject`'s `dense`), not the elastic model with its routing off: the wrappers
    cost a few percent of a decode step even then, and that overhead belongs to the elastic side."""

    def __init__(self, model, elastic: Callable[[], Any], flops: Callable[[bool], float]):
        self.model, self.elastic, self.flops = model, elastic, flops


def heldout_kl(reference: list[torch.Tensor], logits: torch.Tensor) -> float:
    """Mean KL(dense || elastic) of the next-token distributions over every position of the prefill batch: what the
    time was bought with. reference: the dense model's log-probabilities, one (T, V) tensor per row; logits (B, T, V)."""
    total = 0.0
    for ref, row in zip(reference, logits):  # a row at a time: (T, V) floats of a 49k vocabulary add up
        total += float((ref.exp() * (ref - torch.log_softmax(row.float(), dim=-1))).sum(-1).mean())
    return total / len(reference)


def measure_subject(subject: Subject, dense, prefill: torch.Tensor, prompts: dict[int, torch.Tensor],
                    new_tokens: int, reps: int, reference: list[torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Prefill and decode records of one subject at its current budget, against `dense`: the plain base model (a
    separate copy of the same weights, never wrapped). reference: the dense model's log-probabilities on `prefill`
    (one (T, V) tensor per row): each record then holds `heldout_kl`, the subject's KL from them."""
    m = subject.model
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               pad_token_id=dense.config.eos_token_id)

    def run(context, fn):
        def go():
            with torch.no_grad(), context():
                fn()
        return go

    forward = lambda: m(input_ids=prefill)  # noqa: E731
    d, e = interleaved_runs(run(contextlib.nullcontext, lambda: dense(input_ids=prefill)),
                            run(subject.elastic, forward), reps)
    with torch.no_grad(), subject.elastic():
        logits = getattr(forward(), "logits", None)
    quality = {} if reference is None or logits is None else {"heldout_kl": heldout_kl(reference, logits)}
    del logits
    records = [timing_record("prefill", int(prefill.numel()), d, e, subject.flops(False)) |
               {"batch": int(prefill.shape[0]), "tokens": int(prefill.shape[1])}]
    for batch, prompt in prompts.items():
        generate = lambda p=prompt: m.generate(p, **gen)  # noqa: E731
        d, e = interleaved_runs(run(contextlib.nullcontext, lambda p=prompt: dense.generate(p, **gen)),
                                run(subject.elastic, generate), reps)
        with torch.no_grad(), subject.elastic():
            generate()
        records.append(timing_record("decode", batch * new_tokens, d, e, subject.flops(True)) |
                       {"batch": batch, "tokens": new_tokens})
    return [r | quality for r in records]


# ---------------------------------------------------------------- the two kinds of elastic model
def elastic_subject(em) -> Subject:
    """An ElasticModel at its current budget; generation FLOPs are its totals over every forward of generate()."""
    def flops(generation: bool) -> float:
        stats = em.last_stats()
        return (stats["generation"] if generation else stats)["model_flops_ratio"]
    return Subject(em, contextlib.nullcontext, flops)


class _FlopsTotals:
    """Executed and dense model FLOPs of a Flextron model summed over the forwards of a call (e.g. generate)."""

    def __init__(self, fm):
        self.fm, self.dense, self.executed = fm, 0.0, 0.0
        fm.base_model.register_forward_hook(self._add)

    def _add(self, module, args, output) -> None:
        stats = self.fm.last_stats()
        self.dense += stats.get("model_dense_flops", 0.0)
        self.executed += stats.get("model_elastic_flops", 0.0)

    @contextlib.contextmanager
    def counting(self):
        self.dense = self.executed = 0.0
        yield

    def ratio(self) -> float:
        return self.executed / self.dense if self.dense else 1.0


def flextron_subject(fm, totals: _FlopsTotals, choices: dict[str, Any] | None) -> Subject:
    """A FlextronModel at fixed `choices`, or (None) at what its attached router picks for the budget set with
    `set_budget` (a static router once, an input-adaptive one in each forward)."""
    @contextlib.contextmanager
    def elastic():
        with (fm.using(**choices) if choices is not None else contextlib.nullcontext()), totals.counting():
            yield

    return Subject(fm, elastic, lambda generation: totals.ratio())


def uniform_widths(fm, budget: float, seq_len: int) -> dict[str, int]:
    """The same menu index in every layer, the combination of MLP and head widths with the most block FLOPs within
    `budget` (the smallest one if none fits)."""
    cfg = fm.flextron_config
    pairs = itertools.product(range(cfg.n_mlp_choices), range(cfg.n_attn_choices))
    cost = {(m, a): fm.choices_flops(m, a, seq_len=seq_len) for m, a in pairs}
    within = [p for p, c in cost.items() if c <= budget + 1e-9] or [min(cost, key=cost.get)]
    mlp, attn = max(within, key=cost.get)
    return {"mlp": mlp, "attn": attn}


# ---------------------------------------------------------------- the bench
def run_speed_bench(o: dict[str, Any], echo=print, new_model: Callable[[], Any] | None = None,
                    data: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Run the bench described by options `o` (see SPEED_DEFAULTS) and write its JSON and PNG.

    new_model: () -> a fresh base model (default: loads `o["model"]`); data: training and held-out token ids, each
    (N, T) (default: the bundled books, tokenized for the model). Tests pass a tiny model and random tokens."""
    from ..flextron import FlextronConfig, FlextronModel, get_flextron_model
    from ..model import get_elastic_model
    from ..training.routers import train_routers
    from ..validation import parse_floats, parse_ints

    if int(o["threads"]):
        torch.set_num_threads(int(o["threads"]))
    parse_components(o["components"], SPEED_SETTINGS)  # an unknown setting is refused before any work
    rankings = parse_rankings(o["rankings"])
    budgets = parse_floats(o["budgets"], "budgets")
    new_model = new_model or (lambda: _load_model(o["model"]))
    train, held = data if data is not None else _load_books(o)
    torch.manual_seed(int(o["seed"]))
    prefill = held[:int(o["prefill_batch"]), :int(o["prefill_len"])]
    prompts = {b: held[:b, :int(o["prompt_len"])] for b in parse_ints(o["decode_batches"], "decode_batches")}
    calib = [{"input_ids": train[-int(o["allocation_sequences"]):]}]  # allocation + thresholds
    result: dict[str, Any] = {"model": o["model"], "machine": machine() | {"torch_threads": torch.get_num_threads()},
                              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in o.items()},
                              "components": {}, "records": []}
    dense = new_model().eval()  # the dense side of every ratio: the base model as loaded, never wrapped
    result["dense"] = "the base model as loaded, never wrapped (a separate copy of the same weights)"
    with torch.no_grad():
        reference = [torch.log_softmax(row.float(), dim=-1) for row in dense(input_ids=prefill).logits]  # (T, V) each
    timing = dict(dense=dense, prefill=prefill, prompts=prompts, new_tokens=int(o["decode_tokens"]),
                  reps=int(o["reps"]), reference=reference)
    out = Path(o["output"])

    def measure(comp: str) -> Measured:
        spec = {k: v for k, v in SPEED_SETTINGS[comp].items() if k != "train"}
        echo(f"[{comp}] training routers ({o['steps']} steps), allocation, thresholds...")
        em = get_elastic_model(new_model(), ElasticConfig(**spec))
        train_routers(em, train, steps=int(o["steps"]), batch_size=int(o["batch_size"]), seed=int(o["seed"]),
                      budget_range=(min(budgets) - 0.05, 0.95), calibration_data=calib, allocation=False,
                      target_steps=int(o["target_steps"]), progress=False, checkpoint_every=None)
        records, info = [], {}
        for ranking in rankings:  # each allocation on the same routers
            latency = None
            if ranking == "time":
                echo(f"[{comp}] timing the units (latency table)...")
                latency = em.measure_unit_latency(calib, progress=False)
                info["latency"] = latency
            em.fit_allocation(calib, max_batches=1, min_budget=min(0.5, min(budgets) - 0.05), latency=latency)
            em.calibrate(calib, progress=False)
            for b in budgets:
                em.set_budget(b)
                echo(f"[{comp}] timing at budget {b} ({ranking}-ranked allocation)...")
                for r in measure_subject(elastic_subject(em), **timing):
                    records.append({"system": "elastiformer", "component": comp, "ranking": ranking,
                                    "budget": b} | r)
            # units run as the same heads / experts for every token
            info[f"pinned ({ranking}-ranked)"] = em.allocation.pinned_layers()
        em.unload()
        return Measured(records, info)

    run_settings(o, result, SPEED_SETTINGS, measure, same=(), plot=plot_speed, echo=echo)
    if o["flextron"]:
        checkpoint = o.get("flextron_checkpoint")
        fm = (FlextronModel.from_pretrained(checkpoint) if checkpoint else
              get_flextron_model(new_model(), FlextronConfig(**FLEXTRON_MENUS)))
        totals = _FlopsTotals(fm)
        if checkpoint:
            fm.load_router(Path(checkpoint) / "router")
        name = "flextron (routed)" if checkpoint else "flextron (uniform widths)"
        for b in budgets:
            echo(f"[{name}] timing at budget {b}...")
            if checkpoint:
                fm.set_budget(relative_compute=b)
                choices = None
            else:
                choices = uniform_widths(fm, b, int(o["prefill_len"]))
            for r in measure_subject(flextron_subject(fm, totals, choices), **timing):
                result["records"].append({"system": "flextron", "component": name, "budget": b} | r)
    save_result(result, out, plot_speed)
    for line in summary_lines(result):
        echo(line)
    return result


def parse_rankings(value: str) -> list[str]:
    """'flops,time' -> ['flops', 'time']: how the allocations the bench times rank their moves."""
    from ..errors import ConfigError

    rankings = [v.strip() for v in str(value).split(",") if v.strip()]
    bad = [v for v in rankings if v not in ("flops", "time")]
    if not rankings or bad:
        raise ConfigError(f"rankings={value!r}: pass 'flops', 'time' or 'flops,time' (how the allocation ranks its "
                          "moves: loss per FLOP or per decoding time saved)")
    return list(dict.fromkeys(rankings))


def series(r: dict[str, Any]) -> str:
    """A record's name in the plot and tables: its setting, and how its allocation was ranked when by time."""
    return r["component"] + (" (time-ranked)" if r.get("ranking") == "time" else "")


def _load_model(name: str):
    from ..loading.models import load_model

    return load_model(name)


def _load_books(o: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training text (routers) and held-out text (timed), as token ids of the bench model's tokenizer."""
    from ..data.text import load_texts, pack_sequences
    from ..loading.models import load_tokenizer
    from ..validation import parse_ints

    tokenizer = load_tokenizer(o["model"])
    train = pack_sequences(load_texts(None, split="train"), tokenizer, int(o["seq_len"]),
                           max_sequences=int(o["train_sequences"]))
    rows = max(int(o["prefill_batch"]), *parse_ints(o["decode_batches"], "decode_batches"))
    held = pack_sequences(load_texts(None, split="heldout"), tokenizer, int(o["prefill_len"]), max_sequences=rows)
    return train, held


def summary_lines(result: dict[str, Any]) -> list[str]:
    """One line per record: time ratio against FLOPs ratio, and the throughput."""
    lines = []
    for r in result["records"]:
        where = f"{r['kind']} b{r['batch']}"
        kl = f"  KL {r['heldout_kl']:.3f}" if "heldout_kl" in r else ""
        lines.append(f"{series(r):<40} {r['budget']:<5} {where:<11} time {r['time_ratio']:.3f}  "
                     f"FLOPs {r['model_flops_ratio']:.3f}  {r['elastic_tokens_per_s']:.1f} tok/s "
                     f"(dense {r['dense_tokens_per_s']:.1f}){kl}")
    return lines


def plot_speed(result: dict[str, Any], path: Path) -> None:
    """One panel per measurement (prefill, decode at each batch): time ratio against model-FLOPs ratio, a series per
    component, and the line y = x (time falling exactly as the work does)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["kind"], r["batch"]) for r in result["records"]))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, (kind, batch) in zip(axes[0], panels):
        rows = [r for r in result["records"] if (r["kind"], r["batch"]) == (kind, batch)]
        for comp in dict.fromkeys(series(r) for r in rows):
            mine = sorted((r for r in rows if series(r) == comp), key=lambda r: r["model_flops_ratio"])
            ax.plot([r["model_flops_ratio"] for r in mine], [r["time_ratio"] for r in mine], "o-", label=comp)
        values = [v for r in rows for v in (r["model_flops_ratio"], r["time_ratio"])]
        lo, hi = min(values + [1.0]) - 0.05, max(values + [1.0]) + 0.05
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set_xlabel("executed model FLOPs / dense")
        ax.set_ylabel("wall-clock time / dense")
        ax.set_title(f"{kind}, batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"{result['model']}: {m.get('processor')}, {m.get('torch_threads')} threads", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# the targets a row is checked against (time ratio at most the model-FLOPs ratio plus this slack; and never slower
# than dense below full budget): prefill, and decoding at batch 1
SLACK = {("prefill", None): 0.05, ("decode", 1): 0.10}


def target_check(r: dict[str, Any]) -> str:
    """'met' / 'missed (...)' for the rows the targets cover, '' for the others (decode at batch > 1)."""
    slack = SLACK.get((r["kind"], None if r["kind"] == "prefill" else r["batch"]))
    if slack is None:
        return ""
    misses = []
    if r["time_ratio"] > 1.0:
        misses.append("slower than dense")
    if r["time_ratio"] > r["model_flops_ratio"] + slack:
        misses.append(f"> FLOPs + {slack:.2f}")
    return "met" if not misses else "missed: " + ", ".join(misses)


def paired_range(r: dict[str, Any]) -> str:
    """'0.91-0.95': the lowest and highest paired ratio of a record ('-' in results written before they were)."""
    p = r.get("paired_ratios")
    return f"{min(p):.2f}-{max(p):.2f}" if p else "-"


def speed_markdown(result: dict[str, Any]) -> str:
    """The README's speed table: one row per system, component, budget and measurement."""
    m, s = result["machine"], result["settings"]
    lines = [f"Model `{result['model']}` on {m.get('processor')} ({m.get('cpu_count')} cores, {m.get('torch_threads')} "
             f"torch threads, torch {m.get('torch')}). Prefill of {s.get('prefill_batch')} x {s.get('prefill_len')} "
             f"tokens; generation of {s.get('decode_tokens')} tokens at batch {s.get('decode_batches')}; elastic and "
             f"dense runs interleaved, median of {s.get('reps')}; dense: "
             f"{result.get('dense', 'the elastic model with its routing off')}. Targets: prefill time ratio <= "
             "model-FLOPs ratio + 0.05 and decode at batch 1 <= FLOPs ratio + 0.10, never slower than dense. "
             "Regenerate: `make bench-speed`, then `elastiformer bench-speed --readme`.", "",
             "Paired: each repetition's elastic / dense time (lowest - highest), how steady the machine was. KL: "
             "mean KL(dense || elastic) of the next-token distributions on the prefill batch (held-out text), what "
             "the time was bought with. Time-ranked: the allocation ranked its moves by loss per decoding time saved "
             "(a unit latency table measured on this machine), on the same routers.", "",
             "| system | setting | budget | run | batch | model FLOPs | time / dense | paired | tokens/s (dense) "
             "| KL | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        kl = f"{r['heldout_kl']:.3f}" if "heldout_kl" in r else "-"
        lines.append(f"| {r['system']} | {series(r)} | {r['budget']:.2f} | {r['kind']} | {r['batch']} | "
                     f"{r['model_flops_ratio']:.3f} | {r['time_ratio']:.3f} | {paired_range(r)} | "
                     f"{r['elastic_tokens_per_s']:.1f} "
                     f"({r['dense_tokens_per_s']:.1f}) | {kl} | {target_check(r)} |")
    checked = [target_check(r) for r in result["records"] if target_check(r)]
    lines += ["", f"Targets met in {sum(c == 'met' for c in checked)} of {len(checked)} checked rows."]
    return "\n".join(lines)
