"""Elastic continued-training: distil the full model into sampled sub-networks, updating the shared base weights.

Each optimizer step draws the same batch for every sub-network in `subnets` (default: the full network, the smallest
and two random ones; "random" picks a menu index per layer independently for MLPs and attentions, "uniform" one
index for every layer) and sums their losses, KL(teacher || sub-network) on next-token distributions, before one
update of the base weights. Sub-networks and data order are functions of (seed, step), so a resumed run sees what an
uninterrupted one would.

The teacher. `teacher="frozen"` (default) is a frozen copy of the model as training starts (one more copy of the
weights in memory, 0.5 GB for SmolLM2-135M). It is needed because the student's weights *are* the teacher's: with
`teacher="self"` (the same weights at full width, no grad, no copy) the full network's KL to itself is zero, so
nothing anchors the full model while the shared weights move to serve the narrow ones, and the target drifts with
them. "self" is there for models too large to copy; add `lm_weight` (cross-entropy on the real next tokens) with it.

The optimisation loop (AdamW, schedule, accumulation, clipping, progress, checkpoints) is the one
`elastiformer.training.loop` runs for the routers too; batching (`batch_at`), option checks, `TrainReport` and the
atomic checkpoints (`checkpoint/`: weights + optimizer + schedule + step) come from `elastiformer.training.routers`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from ..cache import atomic_write_json, ensure_writable_dir
from ..distill import kl_teacher_student
from ..errors import ConfigError, ElastiformerError
from ..data.batches import as_batches
from ..artifacts import weight_fingerprint
from ..training.routers import CHECKPOINT, TrainReport, as_tensor_data, batch_at, check_train_options, finite_on_every_rank, \
    load_checkpoint, loss_failure, save_checkpoint, sequence_length
from ..training.loop import TrainingLoop
from .model import FlextronModel

logger = logging.getLogger(__name__)

SUBNET_KINDS = ("full", "smallest", "random", "uniform")
DEFAULT_SUBNETS = ("full", "smallest", "random", "random")
START_NAME = "flextron_train.json"  # in output_dir: what training started from (checked on resume)


def sample_subnet(fm: FlextronModel, kind: str, generator: torch.Generator) -> dict[str, list[int]]:
    """Menu indices per layer for one sub-network of `kind` (see SUBNET_KINDS)."""
    L, n_mlp, n_attn = fm.n_layers, fm.flextron_config.n_mlp_choices, fm.flextron_config.n_attn_choices
    if kind == "full":
        return {"mlp": [0] * L, "attn": [0] * L}
    if kind == "smallest":
        return fm.smallest_choices()
    if kind == "random":
        return {"mlp": torch.randint(0, n_mlp, (L,), generator=generator).tolist(),
                "attn": torch.randint(0, n_attn, (L,), generator=generator).tolist()}
    if kind == "uniform":
        m, a = int(torch.randint(0, n_mlp, (), generator=generator)), int(torch.randint(0, n_attn, (), generator=generator))
        return {"mlp": [m] * L, "attn": [a] * L}
    raise ConfigError(f"unknown sub-network kind {kind!r}: pass any of {', '.join(SUBNET_KINDS)}")


def check_subnets(subnets) -> tuple[str, ...]:
    if isinstance(subnets, str):
        subnets = tuple(s.strip() for s in subnets.split(",") if s.strip())
    subnets = tuple(subnets)
    bad = [s for s in subnets if s not in SUBNET_KINDS]
    if not subnets or bad:
        raise ConfigError(f"subnets={subnets!r}: pass one or more of {', '.join(SUBNET_KINDS)}, e.g. "
                          f"{','.join(DEFAULT_SUBNETS)}")
    return subnets


def frozen_teacher(fm: FlextronModel) -> torch.nn.Module:
    """A frozen copy of `fm`'s base model with its original sub-layers (full width, no hooks)."""
    with fm.unwrapped() as model:
        teacher = copy.deepcopy(model)
    teacher._forward_pre_hooks.clear()  # the copy must not report into fm's per-forward state
    teacher.requires_grad_(False)
    return teacher.eval()


class _WeightsView:
    """What trainer's checkpoint functions read from a model: every trainable tensor, keyed by its path in the base
    model (here the whole base model, not routers)."""

    def __init__(self, fm: FlextronModel):
        self.base_model = fm.base_model

    def router_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.base_model.named_parameters()}


@torch.no_grad()
def subnet_kl(fm: FlextronModel, data, choices: dict[str, Any], teacher: torch.nn.Module | None = None,
              max_batches: int | None = None) -> float:
    """Mean KL(teacher || sub-network) per token on `data` at `choices` (teacher: `fm` at full width if None)."""
    total, n = 0.0, 0
    device = next(fm.parameters()).device
    if isinstance(data, torch.Tensor):
        data = [{"input_ids": data[i:i + 8]} for i in range(0, data.shape[0], 8)]  # (<=8, T) batches
    for i, batch in enumerate(as_batches(data)):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        if teacher is None:
            with fm.full():
                t = fm(**batch).logits
        else:
            t = teacher(**batch).logits
        with fm.using(**choices):
            s = fm(**batch).logits
        tokens = batch["input_ids"].numel()
        total += float(kl_teacher_student(t, s, batch.get("attention_mask"))) * tokens
        n += tokens
    return total / max(1, n)


def train_flextron(
    fm: FlextronModel,
    data: Iterable[dict[str, torch.Tensor]] | torch.Tensor,
    steps: int = 100,
    *,
    subnets: tuple[str, ...] | str = DEFAULT_SUBNETS,
    teacher: str = "frozen",
    batch_size: int = 4,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    schedule: str = "cosine",
    warmup: int = 5,
    grad_accum: int = 1,
    seed: int = 0,
    temperature: float = 1.0,
    lm_weight: float = 0.0,
    output_dir: str | Path | None = None,
    checkpoint_every: int | None = 25,
    resume: bool = False,
    tokenizer=None,
    device: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainReport:
    """Elastic continued-training of `fm`'s base weights; returns a `TrainReport` (history: per step `loss`, `kl`
    (mean over sub-networks) and `kl_<kind>` per sub-network kind).

    With `output_dir`: checkpoints in `output_dir/checkpoint`, the log in `output_dir/train_log.json`, the final
    model (a full Flextron checkpoint, with `tokenizer` if given) in `output_dir/model`. To resume, pass `fm` built
    the same way as at the start (the frozen teacher is copied from it before the checkpoint's weights are loaded)
    and `resume=True`.
    """
    from accelerate import Accelerator

    if not isinstance(fm, FlextronModel):
        raise ConfigError(f"train_flextron needs a FlextronModel (get_flextron_model), got {type(fm).__name__}")
    check_train_options(steps, batch_size, lr, grad_accum, temperature, None, None, checkpoint_every)
    subnets = check_subnets(subnets)
    if teacher not in ("frozen", "self"):
        raise ConfigError(f"teacher={teacher!r}: pass 'frozen' (a frozen copy of the starting weights) or 'self' "
                          "(the same weights at full width, no copy)")
    if not (isinstance(lm_weight, (int, float)) and lm_weight >= 0):
        raise ConfigError(f"lm_weight={lm_weight!r}: pass a non-negative weight (0: distillation only)")
    if teacher == "self" and subnets == ("full",) and lm_weight == 0:
        raise ConfigError("with teacher='self' the full network's KL to itself is zero: add other subnets or lm_weight")
    data = as_tensor_data(data)
    out_dir = Path(output_dir) if output_dir is not None else None
    if resume and out_dir is None:
        raise ConfigError("resume=True needs output_dir (where the checkpoint is)")
    if out_dir is not None:
        ensure_writable_dir(out_dir)
    start_identity = {"fingerprint": weight_fingerprint(fm.base_model), "subnets": list(subnets), "teacher": teacher}
    if resume:
        _check_resume(out_dir, start_identity)

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=grad_accum)
    torch.manual_seed(seed)
    fm.to(accelerator.device)
    teacher_model = frozen_teacher(fm).to(accelerator.device) if teacher == "frozen" else None
    params = [p for p in fm.base_model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable weights: Flextron's continued training updates the base "
                          "weights, so do not freeze them (requires_grad_(True))")
    loop = TrainingLoop(accelerator, fm, params, lr=lr, schedule=schedule, steps=steps, warmup=warmup,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    model, optimizer, scheduler = loop.model, loop.optimizer, loop.scheduler
    core: FlextronModel = accelerator.unwrap_model(model)

    start, history = 0, []
    if resume:
        start, history = load_checkpoint(_WeightsView(core), optimizer, scheduler, out_dir / CHECKPOINT)
        logger.info("resumed from step %d", start)
    elif out_dir is not None and accelerator.is_main_process:
        atomic_write_json(out_dir / START_NAME, start_identity)

    rank, world = accelerator.process_index, accelerator.num_processes
    n_backward = grad_accum * len(subnets)
    per_kind = {kind: grad_accum * subnets.count(kind) for kind in subnets}  # a kind's KL: mean over its runs
    configs: list[tuple[str, dict[str, list[int]]]] = []

    def before_step(step: int) -> None:  # the step's sub-networks, the same for every micro-batch
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        configs[:] = [(kind, sample_subnet(core, kind, g)) for kind in subnets]

    def micro_step(step: int, micro: int, sync: bool) -> dict[str, float]:
        batch = batch_at(data, step, micro * world + rank, batch_size, seed, stride=grad_accum * world)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        mask = batch.get("attention_mask")
        with torch.no_grad():
            if teacher_model is not None:
                target = teacher_model(**batch).logits
            else:
                with core.full():
                    target = model(**batch).logits
        logs: dict[str, float] = {"loss": 0.0, "kl": 0.0}
        for j, (kind, choices) in enumerate(configs):
            core.set_choices(**choices)
            with loop.no_sync(sync and j == len(configs) - 1):  # DDP: all-reduce once, after the last backward
                student = model(**batch).logits
                kl = kl_teacher_student(target, student, mask, temperature)
                loss = kl
                if lm_weight:
                    loss = loss + lm_weight * _next_token_ce(student, batch["input_ids"], mask)
                if not finite_on_every_rank(accelerator, loss):
                    raise ElastiformerError(f"{loss_failure(loss)} at step {step} ({kind} sub-network): "
                                            "lower the learning rate; the last checkpoint is kept")
                accelerator.backward(loss / n_backward)
            logs["loss"] += loss.item() / n_backward
            logs["kl"] += kl.item() / n_backward
            logs[f"kl_{kind}"] = logs.get(f"kl_{kind}", 0.0) + kl.item() / per_kind[kind]
        return logs

    def save(done: int) -> None:
        save_checkpoint(_WeightsView(core), optimizer, scheduler, done, history, out_dir / CHECKPOINT)
        atomic_write_json(out_dir / "train_log.json", {"steps": done, "history": history, "finished": False})

    core.train()
    t0 = time.perf_counter()
    last = min(steps, stop_after) if stop_after is not None else steps
    saved_choices = core.get_choices()
    try:
        loop.run(start, last, history, grad_accum=grad_accum, micro_step=micro_step, before_step=before_step,
                 save=save if out_dir is not None else None, checkpoint_every=checkpoint_every,
                 desc="elastic training", progress=progress,
                 postfix=lambda e: {"loss": f"{e['loss']:.3f}", **{k: f"{v:.3f}" for k, v in e.items()
                                                                  if k in ("kl_full", "kl_smallest")}})
    finally:
        core.set_choices(**saved_choices)
        core.eval()
    accelerator.wait_for_everyone()
    tokens_per_step = batch_size * grad_accum * world * sequence_length(data)
    report = TrainReport(steps=len(history), tokens=len(history) * tokens_per_step, seconds=time.perf_counter() - t0,
                         resumed_from=start if resume and start else None, history=history)
    if out_dir is not None and accelerator.is_main_process:
        result = report.to_dict() | {"subnets": list(subnets), "teacher": teacher, "lr": lr,
                                     "batch_size": batch_size, "seq_len": sequence_length(data)}
        core.save_pretrained(out_dir / "model", tokenizer=tokenizer,
                             extra={"training": {k: v for k, v in result.items() if k != "history"}})
        atomic_write_json(out_dir / "train_log.json", result | {"finished": True, "model": str(out_dir / "model")})
    return report


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the next real token. logits: (B, T, V), ids: (B, T)."""
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")  # (B*(T-1),)
    if mask is not None:
        keep = (mask[:, 1:].bool() & mask[:, :-1].bool()).flatten()
        return loss[keep].mean()
    return loss.mean()


def _check_resume(out_dir: Path, start: dict[str, Any]) -> None:
    path = out_dir / START_NAME
    if not path.is_file():
        raise ElastiformerError(f"no {START_NAME} in {out_dir}: run without --resume first (or check --output)")
    saved = json.loads(path.read_text())
    if saved != start:
        raise ElastiformerError(f"{out_dir} was trained from other weights or settings ({saved}) than these: resume "
                                "from the model (and --subnets / --teacher) the run started with")
