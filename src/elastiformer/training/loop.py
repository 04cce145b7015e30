"""The one optimisation loop both trainers run on accelerate: ElastiFormer's routers (`training.routers.train_routers`) and
Flextron's shared weights (`flextron.training.train_flextron`).

A trainer says what one micro-batch does (`micro_step`: forward, loss, backward; it returns the numbers to log) and
what a step adds to its log entry; the loop owns the rest: AdamW and the learning-rate schedule, gradient
accumulation (the trainer's backward runs under `no_sync` except on the last micro-batch, so DDP all-reduces once
per step), the NaN / inf gradient check, clipping, the progress bar, the history and the checkpoints. Data order and
everything random are functions of (seed, step) in the trainers, so a run resumed from a checkpoint ends where an
uninterrupted one ends.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError

# micro_step(step, micro, sync) -> {name: number}: summed over a step's micro-batches into its log entry
MicroStep = Callable[[int, int, bool], dict[str, float]]


def lr_factor(schedule: str, step: int, steps: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup from 1/warmup (so the first step trains), then
    constant, linear to 0 or cosine to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ConfigError(f"schedule={schedule!r}: pass 'cosine', 'linear' or 'constant'")


class TrainingLoop:
    """AdamW + schedule over `params` of `model`, prepared by `accelerator`; `run` trains steps [start, last)."""

    def __init__(self, accelerator, model: torch.nn.Module, params: list[torch.nn.Parameter], *, lr: float,
                 schedule: str, steps: int, warmup: int, weight_decay: float = 0.0,
                 max_grad_norm: float | None = None, slow_params: tuple[list[torch.nn.Parameter], float] | None = None):
        """slow_params: (more parameters, their learning rate as a fraction of `lr`), one more AdamW group on the
        same schedule."""
        groups = [{"params": params}]
        if slow_params is not None and slow_params[0]:
            groups.append({"params": slow_params[0], "lr": lr * slow_params[1]})
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(schedule, s, steps, warmup))
        self.accelerator = accelerator
        self.params = [p for g in groups for p in g["params"]]
        self.max_grad_norm = max_grad_norm
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)

    def no_sync(self, sync: bool):
        """The context of a backward: gradients all-reduced only when `sync` (the step's last backward)."""
        import contextlib

        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)

    def run(self, start: int, last: int, history: list[dict[str, Any]], *, grad_accum: int, micro_step: MicroStep,
            before_step: Callable[[int], None] | None = None,
            step_entry: Callable[[int, dict[str, float]], dict[str, Any]] | None = None,
            on_nonfinite_grad: Callable[[int], None] | None = None,
            save: Callable[[int], None] | None = None, checkpoint_every: int | None = None,
            postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None,
            desc: str = "training", progress: bool = True) -> list[dict[str, Any]]:
        """Steps [start, last): `before_step(step)`, then `micro_step(step, micro, sync)` for each of `grad_accum`
        micro-batches (sync on the last), the gradient check (`on_nonfinite_grad(step)` raises), clipping, the
        optimizer and schedule steps; the entry `{"step", **summed micro logs, **step_entry(step, logs), "lr"}` goes
        to `history`; `save(done)` runs on the main process every `checkpoint_every` steps and after the last."""
        acc = self.accelerator
        bar = tqdm(range(start, last), desc=desc, disable=not (progress and acc.is_main_process), initial=start,
                   total=last)
        try:
            for step in bar:
                if before_step is not None:
                    before_step(step)
                logs: dict[str, float] = {}
                for micro in range(grad_accum):
                    for key, value in micro_step(step, micro, micro == grad_accum - 1).items():
                        logs[key] = logs.get(key, 0.0) + value
                if on_nonfinite_grad is not None and not all(
                        torch.isfinite(p.grad).all() for p in self.params if p.grad is not None):
                    on_nonfinite_grad(step)
                if self.max_grad_norm is not None:
                    logs["grad_norm"] = float(acc.clip_grad_norm_(self.params, self.max_grad_norm))
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
                entry = {"step": step + 1, **logs, **(step_entry(step, logs) if step_entry else {}),
                         "lr": self.scheduler.get_last_lr()[0]}
                history.append(entry)
                if postfix is not None:
                    bar.set_postfix(**postfix(entry))
                done = step + 1
                if save is not None and checkpoint_every and (done % checkpoint_every == 0 or done == last):
                    acc.wait_for_everyone()
                    if acc.is_main_process:
                        save(done)
        finally:
            bar.close()
        return history
