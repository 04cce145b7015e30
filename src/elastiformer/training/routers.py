"""`train_routers`: self-distillation of the routers on accelerate (DDP / FSDP come from `accelerate launch`).

Each step: the teacher (the same model with routers disabled, no second copy) and the student (routers on, top-k at a
budget drawn from `budget_range`, or a fixed budget) see the same batch; loss = the distillation loss plus the
routers' auxiliary losses (`DEFAULT_AUX_WEIGHTS`). The distillation loss is KL(teacher || student) on the
next-token distributions for causal LMs, and the cosine distance of the pooled embeddings (optionally plus that of
the token states) for encoders (`loss="kl" | "cosine"`, chosen from the model by default). Checkpoints (routers,
optimizer, schedule, step) are written atomically every `checkpoint_every` steps; `resume=True` continues from the
last one and ends where an uninterrupted run with the same seed ends: data order and budgets are functions of
(seed, step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..cache import atomic_dir, atomic_write_json, committed_dir, ensure_writable_dir
from ..distill import DEFAULT_AUX_WEIGHTS, LOSSES, POOLINGS, embedding_distance, kl_teacher_student
from ..allocation import check_latency_table
from ..errors import ConfigError, DataError, ElastiformerError
from ..data.batches import as_batches, tensor_batch
from ..layers.stand_in import StandIn
from ..model import ElasticModel
from .loop import TrainingLoop, lr_factor  # noqa: F401  (lr_factor: part of this module's API)
from ..validation import check_device, check_int, check_token_ids

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
ROUTER_TARGETS = ("teacher", "sensitivity", "self")  # what token routers learn to predict (see train_routers)


@dataclass
class TrainReport:
    steps: int
    tokens: int  # training tokens seen (teacher and student see the same ones)
    seconds: float
    resumed_from: int | None
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per optimizer step
    loss: str = "kl"  # the distillation loss: "kl" (causal LMs) or "cosine" (encoders)
    target_history: list[dict[str, float]] = field(default_factory=list)  # the target phase, one entry per step

    @property
    def final_distill(self) -> float:
        """The distillation loss over the last tenth of the steps (KL, or cosine distance for encoders)."""
        tail = self.history[-max(1, len(self.history) // 10):]
        return sum(h.get("distill", h.get("kl", 0.0)) for h in tail) / len(tail)

    @property
    def final_kl(self) -> float:
        """`final_distill` (named for the LM case; for encoders it is the cosine distance)."""
        return self.final_distill

    def to_dict(self) -> dict[str, Any]:
        final = self.final_distill if self.history else None
        return asdict(self) | {"final_kl": final, "final_distill": final}


def as_tensor_data(data) -> torch.Tensor | list[dict[str, torch.Tensor]]:
    if isinstance(data, torch.Tensor):
        images = data.is_floating_point() and data.dim() == 4 and data.shape[0] > 0
        if not images and (data.dim() != 2 or data.shape[0] == 0 or data.shape[1] < 2):
            raise DataError(f"training data of shape {tuple(data.shape)}: pass token ids [N sequences, T >= 2 tokens] "
                            "or images [N, C, H, W]")
        return data
    items = list(as_batches(data))
    if not items:
        raise DataError("training data is empty: pass at least one sequence of input_ids")
    return items


def batch_at(data, step: int, micro: int, batch_size: int, seed: int, stride: int = 1) -> dict[str, torch.Tensor]:
    """The `micro`-th of the `stride` micro-batches of optimizer step `step` (stride = grad_accum x processes).

    A pure function of its arguments, which is what makes a resumed run see exactly the batches it would have seen.
    """
    if isinstance(data, torch.Tensor):
        n = data.shape[0]
        per_epoch = max(1, n // batch_size)
        flat = step * stride + micro  # which micro-batch overall
        epoch, pos = divmod(flat, per_epoch)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
        idx = order[pos * batch_size:(pos + 1) * batch_size]
        if idx.numel() < batch_size:  # fewer sequences than a batch: repeat them
            idx = order[torch.arange(batch_size) % n]
        return tensor_batch(data[idx])
    return data[(step * stride + micro) % len(data)]


def sample_budget(components: tuple[str, ...], budget_range: tuple[float, float], step: int, seed: int,
                  min_budget: dict[str, float]) -> dict[str, float]:
    """One global budget per component for this step, uniform in `budget_range` (never below the dense minimum)."""
    g = torch.Generator().manual_seed(seed * 7_919 + step)
    lo, hi = budget_range
    out = {}
    for comp in components:
        b = lo + (hi - lo) * float(torch.rand((), generator=g))
        out[comp] = max(b, min_budget[comp] + 0.02)
    return out


def check_train_options(steps, batch_size, lr, grad_accum, temperature, budget, budget_range, checkpoint_every):
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}: pass a positive number of optimizer steps")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: pass a positive integer")
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ConfigError(f"grad_accum={grad_accum!r}: pass a positive integer")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr={lr!r}: pass a positive learning rate, e.g. 1e-3")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ConfigError(f"temperature={temperature!r}: pass a positive number, e.g. 1.0")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ConfigError(f"checkpoint_every={checkpoint_every!r}: pass a positive number of steps")
    if budget is not None and budget_range is not None:
        raise ConfigError("pass either budget (fixed) or budget_range (sampled), not both")
    if budget_range is not None:
        if not isinstance(budget_range, (tuple, list)) or len(budget_range) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in budget_range):
            raise ConfigError(f"budget_range={budget_range!r}: pass two numbers (low, high), e.g. (0.5, 0.95)")
        lo, hi = budget_range
        if not (0 < lo <= hi < 1):
            raise ConfigError(f"budget_range={budget_range}: pass (low, high) with 0 < low <= high < 1")


def train_routers(
    em: ElasticModel,
    data: Iterable[dict[str, torch.Tensor]] | torch.Tensor,
    steps: int = 200,
    *,
    batch_size: int = 4,
    lr: float = 2e-3,
    schedule: str = "cosine",
    warmup: int = 10,
    grad_accum: int = 1,
    seed: int = 0,
    temperature: float = 1.0,
    budget: float | dict[str, float] | None = None,
    budget_range: tuple[float, float] | None = None,
    aux_weights: dict[str, float] | None = None,
    router_targets: str = "teacher",
    router_inputs: str = "teacher",
    loss: str | None = None,
    pooling: str | None = None,
    token_weight: float = 0.0,
    output_dir: str | Path | None = None,
    checkpoint_every: int | None = 50,
    resume: bool = False,
    calibration_data=None,
    device: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    overwrite: bool = False,
    allocation: bool = True,
    allocation_floor: float = 0.5,
    allocation_batches: int = 1,
    allocation_levels: tuple[float, ...] | None = None,
    allocation_pin: bool = True,
    allocation_latency: bool | dict | None = None,
    target_steps: int | None = None,
    target_repeats: int = 4,
    stand_in_lr_scale: float = 0.1,
    key_value_targets: bool | None = None,
) -> TrainReport:
    """Train `em`'s routers by self-distillation against its own base model; returns a `TrainReport`.

    data: token ids [N, T] (batched and shuffled here, by seed) or an iterable of dicts holding `input_ids`.
    budget: a fixed global budget (one value for every routed component, or a dict); budget_range: sample one
    uniformly per step so one set of routers serves all budgets in the range (the default, (0.5, 0.95)).
    router_targets: "teacher" (default) adds supervised losses towards the tokens / heads / experts whose outputs
    are largest on the teacher (`distill.DEFAULT_AUX_WEIGHTS`); "sensitivity" teaches token routers how much
    skipping each token's update moves the teacher's output instead (one extra backward of the teacher per step,
    see `ElasticModel.teacher_sensitivities`); "self" keeps only the KL and each router's BCE towards its own top-k
    (the paper's objective). router_inputs: "teacher" (default) regresses token routers on the teacher's hidden
    states; "student" on the student's, which is what they see at inference.
    loss: "kl" (next-token logits; the default for causal LMs) or "cosine" (embeddings; the default for encoders):
    the cosine distance between teacher and student `em.embed(batch, pooling)` (pooling "mean" | "cls" | "pooler",
    default the architecture's: mean for BERT, cls for ViT), plus `token_weight` x the mean cosine distance of the
    valid tokens' final states. With
    `output_dir`, checkpoints go to `output_dir/checkpoint`, the log to `output_dir/train_log.json`, the final
    routers to `output_dir`. `stop_after` ends the run early after that many steps (for tests and time limits);
    the schedule still follows `steps`. An `output_dir` that holds a previous run's results is refused unless
    `resume=True` (continue it) or `overwrite=True` (start again; its checkpoint is deleted first).

    target_steps: before distillation, that many teacher forwards (batches of `batch_size`, no student pass) each
    give the routers their targets (router_targets "teacher" or "sensitivity"), and `target_repeats` router updates
    are made on them: the supervised targets need many more router updates than the distillation steps give, and a
    teacher forward costs a third of a distillation step. None (the default): 2 x `steps` (0 with
    router_targets="self", which has no targets); 0 turns the phase off.
    allocation: when training ends, fit the per-layer allocation of the budget on the calibration batches
    (`ElasticModel.fit_allocation`, down to `allocation_floor` of the routed FLOPs, or the lowest training budget if
    lower) before calibrating, on the first `allocation_batches` of them (the fit's cost grows with each, its noise
    falls); False keeps every routed layer at the same capacity. allocation_levels: the capacities
    each unit's cost curve is measured at (default `allocation.LEVELS`; fewer levels, fewer forwards).
    allocation_pin: a layer's heads / experts may be lowered pinned, the same for every token, where the fit measures
    that cheaper than routing them per token (`ElasticModel.fit_allocation(pin=...)`).
    allocation_latency: True ranks the allocation's moves by decoding time saved on this machine, measured first on
    the calibration batches (`ElasticModel.measure_unit_latency`, causal LMs, one process); or pass a table it
    returned. None / False: by FLOPs saved.
    stand_in_lr_scale: the stand-ins of skipped MLP / attention tokens (`ElasticConfig.stand_in_rank`,
    `attn_stand_in_rank`) are fitted by regression before the target phase, then trained by the distillation loss
    beside the routers at this fraction of `lr` (0: kept as fitted). Only the student's skipped tokens reach them, so
    they learn what those tokens need.
    key_value_targets: attention-token routers learn, beside their token's own update, what the token is worth to
    the other tokens as a key / value (`ElasticAttention.key_value_importance`: a skipped token is no key for anyone).
    With router_targets="teacher" only. None (the default): on for bidirectional encoders (BERT, ViT), where it
    turned learned attention-token routing from losing to the norm score into winning, off for causal LMs, where it
    measured no better on SmolLM2 (see the README).

    A NaN / inf loss or gradient stops the run with an `ElastiformerError` naming the step; the last checkpoint
    (written before it) is kept, so `resume=True` with a lower learning rate continues from there.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if budget is None and budget_range is None:
        budget_range = (0.5, 0.95)
    check_train_options(steps, batch_size, lr, grad_accum, temperature, budget, budget_range, checkpoint_every)
    lr_factor(schedule, steps, steps, 0)  # validates the schedule name before any work
    check_int("warmup", warmup, minimum=0)
    explicit_target_steps = target_steps is not None
    if target_steps is None:
        target_steps = 0 if router_targets == "self" else 2 * steps
    check_int("target_steps", target_steps, minimum=0)
    check_int("target_repeats", target_repeats)
    if target_steps and router_targets == "self":
        raise ConfigError("target_steps trains routers on the teacher's targets, and router_targets='self' has none: "
                          "pass target_steps=0, or router_targets='teacher' / 'sensitivity'")
    if isinstance(stand_in_lr_scale, bool) or not (isinstance(stand_in_lr_scale, (int, float))
                                                   and 0 <= stand_in_lr_scale and math.isfinite(stand_in_lr_scale)):
        raise ConfigError(f"stand_in_lr_scale={stand_in_lr_scale!r}: pass a fraction of lr >= 0, e.g. 0.1 (0: the "
                          "stand-ins stay as fitted)")
    if not (isinstance(allocation_floor, (int, float)) and 0 < allocation_floor < 1):
        raise ConfigError(f"allocation_floor={allocation_floor!r}: pass a fraction of routed FLOPs in (0, 1), e.g. 0.5")
    if allocation_levels is not None and (not allocation_levels or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1 for v in allocation_levels)):
        raise ConfigError(f"allocation_levels={allocation_levels!r}: pass capacities in [0, 1) a unit may be lowered "
                          "to, e.g. (0.875, 0.75, 0.5, 0.25, 0.0), or None for the default")
    if allocation_latency is not None and not isinstance(allocation_latency, (bool, dict)):  # (1 is no True here)
        raise ConfigError(f"allocation_latency={allocation_latency!r}: pass True (measure decoding time on this "
                          "machine), a table from em.measure_unit_latency(data), or None (rank moves by FLOPs)")
    if isinstance(allocation_latency, dict):
        check_latency_table(allocation_latency, em.elastic_config.components())
    check_int("seed", seed, minimum=0)
    check_int("allocation_batches", allocation_batches)
    if stop_after is not None:
        check_int("stop_after", stop_after)
    check_device(device)
    if router_targets not in ROUTER_TARGETS:
        raise ConfigError(f"router_targets={router_targets!r}: pass 'teacher' (the norm of each token's update on the "
                          "teacher), 'sensitivity' (how much skipping it moves the teacher's output) or 'self' (each "
                          "router's own top-k, the paper's BCE)")
    if router_inputs not in ("teacher", "student"):
        raise ConfigError(f"router_inputs={router_inputs!r}: pass 'teacher' or 'student' (the hidden states the "
                          "token routers see at inference)")
    if router_inputs == "student" and router_targets == "self":
        raise ConfigError("router_inputs='student' moves the teacher's targets onto the student's inputs: use it with "
                          "router_targets='teacher' or 'sensitivity'")
    if key_value_targets is not None and not isinstance(key_value_targets, bool):
        raise ConfigError(f"key_value_targets={key_value_targets!r}: pass True, False, or None (on for encoders)")
    if key_value_targets is None:
        key_value_targets = not em.is_causal and router_targets == "teacher"
    if key_value_targets and router_targets != "teacher":
        raise ConfigError(f"key_value_targets=True adds a term to the teacher's update-norm targets, and "
                          f"router_targets={router_targets!r} has none: pass router_targets='teacher'")
    loss_kind = loss if loss is not None else ("kl" if em.is_causal else "cosine")
    if loss_kind not in LOSSES:
        raise ConfigError(f"loss={loss!r}: pass 'kl' (causal LMs) or 'cosine' (encoders), or leave it out")
    if loss_kind == "cosine" and em.is_causal:
        raise ConfigError("loss='cosine' distils embeddings of an encoder (BERT, ViT): a causal LM trains with "
                          "loss='kl'")
    if pooling is not None and pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r}: pass one of {', '.join(POOLINGS)}")
    if not (isinstance(token_weight, (int, float)) and token_weight >= 0 and math.isfinite(token_weight)):
        raise ConfigError(f"token_weight={token_weight!r}: pass a weight >= 0 (0: pooled embeddings only)")
    weights = DEFAULT_AUX_WEIGHTS | (aux_weights or {})
    data = as_tensor_data(data)
    if isinstance(data, torch.Tensor):
        token_ids = [] if data.is_floating_point() else [data]  # float tensors are images
    else:
        token_ids = [b["input_ids"] for b in data if "input_ids" in b]
    for item in token_ids:
        check_token_ids(item, vocab_size=em._vocab_size, context=em._context, what="training data")
    components = em.elastic_config.components()
    fixed = None
    if budget is not None:
        fixed = budget if isinstance(budget, dict) else {k: budget for k in components}
        em.set_budget(**fixed)  # validates
    out_dir = Path(output_dir) if output_dir is not None else None
    if resume and out_dir is None:
        raise ConfigError("resume=True needs output_dir (where the checkpoint is)")
    if out_dir is not None:
        ensure_writable_dir(out_dir)
        previous = [n for n in (CHECKPOINT, "routers", "train_log.json") if (out_dir / n).exists()]
        if previous and not resume and not overwrite:
            raise ConfigError(f"{out_dir} holds a previous run ({', '.join(previous)}): pass resume=True to continue "
                              "it, overwrite=True (--overwrite) to start again, or another output folder")
        if overwrite and not resume:  # a fresh run must never resume from the old run's checkpoint
            for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
                shutil.rmtree(out_dir / name, ignore_errors=True)
        for stale in out_dir.glob(f".{CHECKPOINT}.*.tmp"):  # left by a run killed while writing a checkpoint
            shutil.rmtree(stale, ignore_errors=True)
    options = dict(batch_size=batch_size, lr=lr, schedule=schedule, warmup=warmup, grad_accum=grad_accum, seed=seed,
                   temperature=temperature, budget=budget, budget_range=list(budget_range or []) or None,
                   router_targets=router_targets, elastic_config=em.elastic_config.to_dict())
    if router_inputs != "teacher":  # (only when set, so older checkpoints still resume)
        options["router_inputs"] = router_inputs
    if key_value_targets:
        options["key_value_targets"] = True
    if explicit_target_steps and target_steps:  # (the default follows `steps`, which a resumed run may extend)
        options |= {"target_steps": target_steps, "target_repeats": target_repeats}

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=grad_accum,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(seed)
    em.to(accelerator.device)
    if em.elastic_config.expert_split == "cluster" and not resume and not all(
            r.is_split for r in em.routers() if getattr(r, "neuron_order", None) is not None):
        # the experts must exist before their routers learn which to pick: cluster neurons on held-back batches
        em.split_experts(_split_batches([batch_at(data, 0, i, batch_size, seed + 2) for i in range(2)]), seed=seed)
        logger.info("experts split by co-activation on 2 batches")
    stand_ins = [m for _, m in em.named_routers() if isinstance(m, StandIn)]
    if stand_ins and not resume and not all(m.is_fitted for m in stand_ins):
        # what skipped tokens get, before the routers learn which tokens to skip: on held-back batches
        em.fit_stand_ins(_split_batches([batch_at(data, 0, i, batch_size, seed + 3) for i in range(8)]))
        logger.info("stand-ins of skipped tokens fitted on 8 batches")
    stand_in_params = [p for m in stand_ins for p in m.parameters()]
    for p in stand_in_params:  # (before DDP wraps the model: it syncs what requires grad then)
        p.requires_grad_(stand_in_lr_scale > 0)
    if stand_in_params and stand_in_lr_scale > 0:  # (only when trained, so older checkpoints still resume)
        options["stand_in_lr_scale"] = stand_in_lr_scale
    slow = {id(p) for p in stand_in_params}
    params = [p for p in em.router_parameters() if id(p) not in slow]
    loop = TrainingLoop(accelerator, em, params, lr=lr, schedule=schedule, steps=steps, warmup=warmup,
                        slow_params=(stand_in_params, stand_in_lr_scale) if stand_in_lr_scale > 0 else None)
    model, optimizer, scheduler = loop.model, loop.optimizer, loop.scheduler
    core: ElasticModel = accelerator.unwrap_model(model)

    start, history = 0, []
    if resume:
        start, history = load_checkpoint(core, optimizer, scheduler, out_dir / CHECKPOINT, options)
        logger.info("resumed from step %d", start)
    resumed_from = start if resume and start else None

    rank, world = accelerator.process_index, accelerator.num_processes
    if allocation and allocation_latency is True and world > 1:
        raise ConfigError("allocation_latency=True times decoding in each process, and the processes would fit "
                          "different allocations: measure the table once with em.measure_unit_latency(data) and "
                          "pass it as allocation_latency=table")
    core.state.set_allocation(None)  # an allocation fitted for other routers would be stale: refitted at the end
    with core.override("key_value_targets", key_value_targets):  # the targets of both phases
        target_history = []
        if target_steps and start == 0:  # (a resumed run's checkpoint already holds the routers this phase trained)
            target_history = fit_router_targets(core, data, target_steps, target_repeats, batch_size=batch_size,
                                                seed=seed, lr=lr, router_targets=router_targets, weights=weights,
                                                loss_kind=loss_kind, pooling=pooling, device=accelerator.device,
                                                progress=progress and accelerator.is_main_process)
        # filled by each teacher pass, read by the student
        student_targets = {} if router_inputs == "student" else None
        sampler = torch.Generator(device=accelerator.device).manual_seed(seed)  # the sensitivity targets' samples
        step_budget: dict[str, float] = {}

        def before_step(step: int) -> None:  # one budget per step, the same for every micro-batch
            step_budget.clear()
            step_budget.update(fixed or sample_budget(components, budget_range, step, seed,
                                                      {k: core.state.min_budget(k) for k in components}))
            core.set_budget(**step_budget)

        def micro_step(step: int, micro: int, sync: bool) -> dict[str, float]:
            batch = batch_at(data, step, micro * world + rank, batch_size, seed, stride=grad_accum * world)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with loop.no_sync(sync), core.override("student_targets", student_targets):
                if router_targets == "sensitivity":  # the teacher's forward and one backward (of a Fisher sample)
                    teacher, teacher_aux = core.teacher_sensitivities(batch, generator=sampler)
                    if loss_kind == "cosine":
                        with torch.no_grad(), core.disable_routers():
                            teacher = _distill_target(core, model, batch, loss_kind, pooling)
                else:
                    with torch.no_grad(), core.disable_routers(), core.teacher_targets(router_targets == "teacher"):
                        teacher = _distill_target(core, model, batch, loss_kind, pooling)
                    teacher_aux = core.aux_losses()  # importance targets measured on the teacher (grad to routers)
                student = _distill_target(core, model, batch, loss_kind, pooling)
                if loss_kind == "kl":
                    distill = kl_teacher_student(teacher, student, batch.get("attention_mask"), temperature)
                else:
                    distill = embedding_distance(teacher, student, token_weight)
                aux = core.aux_losses()
                if router_targets != "self":  # the teacher's importance targets replace self-consistency
                    aux.pop("token_bce", None)
                aux |= teacher_aux
                total = distill + sum(weights.get(k, 0.0) * v for k, v in aux.items())
                if not finite_on_every_rank(accelerator, total):
                    _stop_diverged(f"{loss_failure(total, {loss_kind: distill, **aux})} at step {step + 1}",
                                   out_dir if accelerator.is_main_process else None, history)
                accelerator.backward(total)  # (accelerate divides by grad_accum)
            return {"distill": distill.item() / grad_accum, "loss": total.item() / grad_accum,
                    **{k: v.item() / grad_accum for k, v in aux.items()}, "tokens": _batch_tokens(batch, core) * world}

        def step_entry(step: int, logs: dict[str, float]) -> dict[str, Any]:
            return {"kl" if loss_kind == "kl" else "cosine_distance": logs["distill"],
                    "flops_ratio": core.last_stats()["flops_ratio"], "tokens": int(logs["tokens"]),
                    **{f"budget_{k}": v for k, v in step_budget.items()}}

        def nonfinite_grad(step: int) -> None:
            _stop_diverged(f"a router gradient became NaN / inf at step {step + 1}",
                           out_dir if accelerator.is_main_process else None, history)

        def save(done: int) -> None:
            save_checkpoint(core, optimizer, scheduler, done, history, out_dir / CHECKPOINT, options)
            atomic_write_json(out_dir / "train_log.json", {"steps": done, "history": history, "finished": False})

        core.train()
        t0 = time.perf_counter()
        last = min(steps, stop_after) if stop_after is not None else steps
        loop.run(start, last, history, grad_accum=grad_accum, micro_step=micro_step, before_step=before_step,
                 step_entry=step_entry, on_nonfinite_grad=nonfinite_grad, save=save if out_dir is not None else None,
                 checkpoint_every=checkpoint_every, desc="training routers", progress=progress,
                 postfix=lambda e: {"loss": f"{e['loss']:.3f}", loss_kind: f"{e['distill']:.4f}",
                                    "compute": f"{e['flops_ratio']:.2f}"})
    accelerator.wait_for_everyone()
    for p in stand_in_params:
        p.requires_grad_(True)  # (as every router parameter)

    cal = calibration_data if calibration_data is not None else [batch_at(data, 0, i, batch_size, seed + 1)
                                                                 for i in range(max(2, allocation_batches))]
    cal = _split_batches(cal)  # fit_allocation() / calibrate() move the batches to the model's device
    if allocation:  # where each budget is spent: fitted on calibration batches with the trained routers
        lowest = min(fixed.values()) if fixed else budget_range[0]
        levels = {"levels": tuple(allocation_levels)} if allocation_levels else {}
        latency = allocation_latency if isinstance(allocation_latency, dict) else None
        if allocation_latency is True:  # (refused above with several processes: each would time its own)
            latency = core.measure_unit_latency(cal, pin=allocation_pin, **levels,
                                                progress=progress and accelerator.is_main_process)
        core.fit_allocation(cal, allocation_batches, min_budget=min(allocation_floor, max(0.05, lowest - 0.05)),
                            **levels, pin=allocation_pin, latency=latency,
                            progress=progress and accelerator.is_main_process)
    core.trained_budgets = ((min(fixed.values()), max(fixed.values())) if fixed
                            else (float(budget_range[0]), float(budget_range[1])))
    core.set_budget(**(fixed or em.elastic_config.capacities()))
    core.calibrate(cal, progress=progress and accelerator.is_main_process)
    core.eval()
    report = TrainReport(steps=len(history), tokens=sum(h.get("tokens", 0) for h in history),
                         seconds=time.perf_counter() - t0, resumed_from=resumed_from, history=history, loss=loss_kind,
                         target_history=target_history)
    if out_dir is not None and accelerator.is_main_process:
        core.save_pretrained(out_dir / "routers", overwrite=True)  # this run's own folder, checked above
        atomic_write_json(out_dir / "train_log.json", report.to_dict() | {"finished": True})
    return report


def fit_router_targets(core: ElasticModel, data, steps: int, repeats: int, *, batch_size: int, seed: int, lr: float,
                       router_targets: str, weights: dict[str, float], loss_kind: str, pooling: str | None, device,
                       progress: bool = True) -> list[dict[str, float]]:
    """The target phase of `train_routers`: `steps` teacher forwards, each followed by `repeats` updates of the
    routers on the targets it measured (importance of each token / head / expert; see `RoutingState.add_target_loss`).
    No student pass, no distillation loss: this only teaches the routers to rank. Every process runs the same batches
    (so the routers stay identical across processes without a gradient all-reduce). Returns the losses per step."""
    params = [p for r in core.routers() if not isinstance(r, StandIn) for p in r.parameters()]  # (targets only rank)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sampler = torch.Generator(device=device).manual_seed(seed + 5)
    history = []
    stop_layer = _last_routed_layer(core) if router_targets == "teacher" else None
    core.train()
    bar = tqdm(range(steps), desc="routers on the teacher's targets", disable=not progress)
    for step in bar:
        batch = {k: v.to(device) for k, v in batch_at(data, step, 0, batch_size, seed + 3).items()}
        with core.override("target_records", []):
            if router_targets == "sensitivity":
                core.teacher_sensitivities(batch, generator=sampler)
            else:
                with torch.no_grad(), core.disable_routers(), core.teacher_targets(True), _stop_after(stop_layer):
                    _distill_target(core, core, batch, loss_kind, pooling)
            records = list(core.state.target_records or [])  # (one list, shared by every layer stack's state)
        if not records:
            raise ConfigError("target_steps: the teacher pass gave the routers no targets (no routed layer?)")
        for _ in range(repeats):
            parts: dict[str, list[torch.Tensor]] = {}
            for kind, loss_fn in records:
                value = loss_fn()
                if value is not None:
                    parts.setdefault(kind, []).append(value)
            terms = {k: torch.stack(v).mean() for k, v in parts.items()}
            total = sum(weights.get(k, 0.0) * v for k, v in terms.items())
            if not torch.isfinite(total):
                raise ElastiformerError(f"the routers' target loss became {total.item()} at target step {step + 1}: "
                                        "check the data, or train with a lower learning rate")
            optimizer.zero_grad()
            total.backward()
            if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
                raise ElastiformerError(f"the routers' gradient became NaN / inf at target step {step + 1} (not "
                                        "applied): check the data, or train with a lower learning rate")
            optimizer.step()
        history.append({"step": step + 1, "tokens": _batch_tokens(batch, core),
                        **{k: float(v.detach()) for k, v in terms.items()}})
        bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items() if k not in ("step", "tokens")})
    bar.close()
    return history


class _TargetsMeasured(Exception):
    """Raised after the last routed layer of a target-phase teacher pass: what follows (later dense layers, the LM
    head: a fifth of SmolLM2's FLOPs) would only compute logits nobody reads."""


def _last_routed_layer(core: ElasticModel) -> nn.Module | None:
    """The block after which no router measures anything (None where towers route too: their order is the model's)."""
    if core._towers:
        return None
    st = core.state
    routed = [i for i in range(st.n_layers) if any(i not in st.dense_layers.get(c, ()) for c in st.budget)]
    return core.spec.layers(core.base_model)[max(routed)] if routed else None


@contextlib.contextmanager
def _stop_after(layer: nn.Module | None):
    """Stop the forward pass once `layer` has run (the targets are all recorded by then)."""
    if layer is None:
        yield
        return

    def stop(module, args, output):
        raise _TargetsMeasured

    handle = layer.register_forward_hook(stop)
    try:
        yield
    except _TargetsMeasured:
        pass
    finally:
        handle.remove()


def finite_on_every_rank(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process. Under DDP a process that stopped alone would leave the others
    waiting forever in the gradient all-reduce of backward, so all of them decide together (one tiny all-reduce)."""
    finite = bool(torch.isfinite(loss.detach()).all())
    if accelerator.num_processes == 1:
        return finite
    flag = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum")) == 0.0


def loss_failure(loss: torch.Tensor, parts: dict[str, torch.Tensor] | None = None) -> str:
    """What went wrong, for the error once `finite_on_every_rank` said no: this process's non-finite loss (and which
    of its `parts`), or, when everything here is finite, another process's."""
    bad = [k for k, v in (parts or {}).items() if not torch.isfinite(v)]
    if not bad and bool(torch.isfinite(loss).all()):
        return "the loss became NaN / inf on another process"
    return f"the loss became {loss.item()}" + (f" ({', '.join(bad) or 'sum'})" if parts is not None else "")


def _stop_diverged(what: str, out_dir: Path | None, history: list) -> None:
    """Stop training on a non-finite loss / gradient; the checkpoint on disk predates the step, so it is kept."""
    kept = "no checkpoint was written yet"
    if out_dir is not None and (out_dir / CHECKPOINT / "trainer_state.json").is_file():
        step = json.loads((out_dir / CHECKPOINT / "trainer_state.json").read_text())["step"]
        kept = f"the last good checkpoint (step {step}) is kept in {out_dir / CHECKPOINT} (resume=True / --resume)"
    message = f"{what}: training stopped; {kept}; check the data, or start again with a lower learning rate"
    if out_dir is not None:
        atomic_write_json(out_dir / "train_log.json", {"steps": len(history), "history": history, "finished": False,
                                                       "error": message})
    raise ElastiformerError(message)


def sequence_length(data) -> int:
    return int(data.shape[1]) if isinstance(data, torch.Tensor) else int(data[0]["input_ids"].shape[-1])


def _distill_target(core: ElasticModel, model, batch: dict[str, torch.Tensor], loss_kind: str, pooling: str | None):
    """Next-token logits (loss "kl") or the embedding (loss "cosine") of `batch`, through `model` (the accelerate-
    prepared wrapper, so DDP sees the forward)."""
    if loss_kind == "kl":
        logits = getattr(model(**batch), "logits", None)
        if logits is None:
            raise ConfigError(f"loss='kl' needs a model with logits, and {type(core.base_model).__name__} has none: "
                              "pass loss='cosine'")
        return logits
    return core.embed(batch, pooling, forward=model)


def _batch_tokens(batch: dict[str, torch.Tensor], core: ElasticModel) -> int:
    """Tokens this batch trained on: the real (unpadded) ones, or every token the blocks saw (images: patches)."""
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch:
        return int(batch["input_ids"].numel())
    positions = core.state.positions
    return int(core.state.batch_size * (positions.numel() if positions is not None else 0))


def _split_batches(data) -> list[dict[str, torch.Tensor]]:
    """Token ids [N, T] (or images [N, C, H, W]) -> batches of 8; an iterable of batches passes through."""
    if isinstance(data, torch.Tensor):
        return [tensor_batch(data[i:i + 8]) for i in range(0, data.shape[0], 8)]
    return [b if isinstance(b, dict) else tensor_batch(b) for b in data]


# ---------------------------------------------------------------------- checkpoints (no pickle)
def save_checkpoint(em: ElasticModel, optimizer, scheduler, step: int, history: list, path: Path,
                     options: dict | None = None) -> None:
    opt = optimizer.state_dict()
    tensors = {f"router.{k}": v.cpu() for k, v in em.router_state_dict().items()}
    for pid, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optim.{pid}.{k}"] = v.detach().cpu().reshape(-1) if v.dim() == 0 else v.detach().cpu()
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {"step": step, "param_groups": opt["param_groups"], "scheduler": sched, "history": history,
            "options": options}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(meta))


def load_checkpoint(em: ElasticModel, optimizer, scheduler, path: Path, options: dict | None = None
                     ) -> tuple[int, list]:
    path = committed_dir(path)
    if not (path / "trainer_state.json").is_file() or not (path / "state.safetensors").is_file():
        raise ElastiformerError(f"no checkpoint in {path}: run without --resume first (or check --output)")
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except Exception as err:  # noqa: BLE001  (any corruption means the same thing to the user)
        raise ElastiformerError(f"checkpoint in {path} is corrupt ({err}): delete it and train again") from err
    saved = meta.get("options")
    if options is not None and saved is not None:
        changed = sorted(k for k in options if json.loads(json.dumps(options[k])) != saved.get(k))
        if changed:
            raise ConfigError(f"the checkpoint in {path} was written with other settings ({', '.join(changed)}), so "
                              "resuming would not reproduce that run: resume with its settings, or pass "
                              "overwrite=True (--overwrite) to start again")
    own = em.router_state_dict()
    modules = dict(em.base_model.named_modules())
    with torch.no_grad():
        for key in own:
            if f"router.{key}" not in tensors or tensors[f"router.{key}"].shape != own[key].shape:
                raise ElastiformerError(f"checkpoint in {path} is for other routers: use another --output folder")
            owner, _, attr = key.rpartition(".")
            getattr(modules[owner], attr).copy_(tensors[f"router.{key}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v.reshape(()) if name == "step" else v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"] | {"lr_lambdas": [None] * len(meta["param_groups"])})
    return int(meta["step"]), list(meta["history"])
