"""Wall-clock measurement: one interleaved timer (`time_setups`, and `interleaved` for the elastic / dense pair every
benchmark reports), and the record of what machine it ran on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
from tqdm.auto import tqdm


def machine() -> dict[str, Any]:
    """Platform, CPU, core count, torch threads and version, GPU (if any) of this process."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def time_setups(setups: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], reps: int = 5, warmup: int = 1,
                desc: str | None = None) -> dict[str, float]:
    """Median seconds of each setup's `run()`, repetitions interleaved across setups (so a machine that slows down
    or speeds up meanwhile weighs on every setup alike). setups: name -> (prepare, run): `prepare()` (untimed) puts
    the model in that setup, `run()` (timed) does the work. The first `warmup` rounds are not counted. `desc`: show
    a progress bar with that label."""
    return {name: statistics.median(t) for name, t in time_setups_all(setups, reps, warmup, desc).items()}


def time_setups_all(setups: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], reps: int = 5, warmup: int = 1,
                    desc: str | None = None) -> dict[str, list[float]]:
    """`time_setups`, every counted repetition's seconds in order (repetition i of every setup ran in round i)."""
    times: dict[str, list[float]] = {name: [] for name in setups}
    bar = tqdm(total=(warmup + reps) * len(setups), desc=desc, disable=desc is None)
    for rep in range(warmup + reps):
        for name, (prepare, run) in setups.items():
            prepare()
            t0 = time.perf_counter()
            run()
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
            bar.update()
    bar.close()
    return times


def interleaved(dense: Callable[[], Any], elastic: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median seconds of `dense()` and `elastic()`, each warmed up once, then run alternately `reps` times."""
    d, e = interleaved_runs(dense, elastic, reps)
    return statistics.median(d), statistics.median(e)


def interleaved_runs(dense: Callable[[], Any], elastic: Callable[[], Any], reps: int
                     ) -> tuple[list[float], list[float]]:
    """`interleaved`, every repetition's seconds: run i of `elastic()` directly followed run i of `dense()`, so
    e[i] / d[i] are paired ratios whose spread shows how steady the machine was."""
    nothing = lambda: None  # noqa: E731
    t = time_setups_all({"dense": (nothing, dense), "elastic": (nothing, elastic)}, reps=reps, warmup=1)
    return t["dense"], t["elastic"]
