"""Wall-clock measurement: the interleaved elastic / dense timer, and the record of what machine it ran on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import torch


def machine() -> dict[str, Any]:
    """Platform, CPU, core count, torch threads and version, GPU (if any) of this process."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def interleaved(dense: Callable[[], Any], elastic: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median seconds of `dense()` and `elastic()`, each warmed up once, then run alternately `reps` times (so a
    machine that slows down or speeds up meanwhile weighs on both alike)."""
    dense(), elastic()
    d, e = [], []
    for _ in range(reps):
        for run, times in ((dense, d), (elastic, e)):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return statistics.median(d), statistics.median(e)
