"""Latency lookup table: every nested sub-layer's wall-clock at every menu width, measured on this machine.

`measure_latency_table` times each sub-layer in place (a timer around it inside whole forwards of
`batch_size x seq_len` random tokens, one forward per uniform width, widths interleaved), takes the rest of the
forward (embeddings, norms, residual adds, LM head) as `overhead_ms`, then calibrates the table against end-to-end
forwards of the uniform widths and random mixes (a least-squares scale and overhead; see its docstring).
`predict_latency(table, choices)` = overhead + the chosen cells; `check_latency_prediction` measures other
configurations end to end and reports the prediction error. Tables hold the machine they were measured on; a table
is only valid for its machine, batch size and sequence length.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..cache import atomic_write_json
from ..evaluation.timing import machine
from ..errors import ConfigError, DataError
from .routing.costs import latency_tensors  # noqa: F401  (re-exported: part of this module's API)
from .model import FlextronModel
from .nested import NestedMLP

TABLE_VERSION = 1


def machine_info() -> dict[str, Any]:
    """timing.machine() plus the CPU model name (what a latency table is valid for)."""
    info = machine()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info | {"cpu_model": cpu}


@torch.no_grad()
def measure_latency_table(fm: FlextronModel, batch_size: int = 1, seq_len: int = 128, *, reps: int = 5,
                          warmup: int = 1, seed: int = 0, calibrate: bool = True, calibration_configs: int = 8,
                          progress: bool = True) -> dict[str, Any]:
    """Milliseconds of each layer's MLP and attention at every menu index, for a `batch_size x seq_len` prefill
    (no cache) on this machine. Returns a JSON-ready dict (`mlp_ms` / `attn_ms`: [L][n_choices], `overhead_ms`,
    `full_ms`, `machine`, shapes, menus and, with `calibrate`, the end-to-end fit in `calibration`).

    1. **Cells, timed in place.** The whole model runs at each uniform width c (every MLP at menu index c, every
       attention at c, clamped to each menu) with a timer around every nested sub-layer, so each cell is timed on
       its real inputs, with the caches and threads of a real forward. Widths are interleaved rep by rep, so the
       drift of a shared machine hits them alike; each cell is the median over reps.
    2. **Overhead** (embeddings, norms, residual adds, LM head) = the full forward minus the full-width cells.
    3. **Calibration** (`calibrate=True`): timers around sub-layers miss the dispatch between them, and medians of
       parts do not add up to the median of the whole. So the uniform widths plus `calibration_configs` random
       mixes are timed end to end and `measured = overhead + scale * sum(cells)` is fitted by least squares; the
       cells are scaled by `scale` (raw ones kept in `raw_mlp_ms` / `raw_attn_ms`) and the overhead replaced. The
       table stays additive, so a router's expected latency stays differentiable."""
    from .training import sample_subnet

    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("reps", reps)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}={v!r}: pass a positive integer")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup={warmup!r}: pass a non-negative integer")
    if not isinstance(calibration_configs, int) or calibration_configs < 0:
        raise ConfigError(f"calibration_configs={calibration_configs!r}: pass a non-negative integer")
    device = next(fm.parameters()).device
    ids = torch.randint(0, fm.dims["V"], (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)  # (B, T)
    L, n_mlp, n_attn = fm.n_layers, fm.flextron_config.n_mlp_choices, fm.flextron_config.n_attn_choices
    n_widths = max(n_mlp, n_attn)
    uniform = [{"mlp": [min(c, n_mlp - 1)] * L, "attn": [min(c, n_attn - 1)] * L} for c in range(n_widths)]
    modules = [m for pair in fm.nested_layers() for m in pair]  # attn 0, mlp 0, attn 1, ...
    started: dict[int, float] = {}
    elapsed: dict[int, float] = {}

    def pre_hook(i):
        return lambda mod, args: started.__setitem__(i, time.perf_counter())

    def post_hook(i):
        return lambda mod, args, out: elapsed.__setitem__(i, (time.perf_counter() - started[i]) * 1e3)

    was_training, saved = fm.training, fm.get_choices()
    fm.eval()
    forward = lambda: fm(input_ids=ids, use_cache=False)  # noqa: E731
    cell_times = [[[] for _ in modules] for _ in range(n_widths)]  # [width][module] -> ms per rep
    hooks = [h for i, m in enumerate(modules)
             for h in (m.register_forward_pre_hook(pre_hook(i)), m.register_forward_hook(post_hook(i)))]
    try:  # whatever fails, the model gets its choices, mode and hooks back
        try:
            bar = tqdm(total=(warmup + reps) * n_widths, desc="latency table", disable=not progress)
            for rep in range(warmup + reps):
                for c, choices in enumerate(uniform):  # interleaved widths
                    fm.set_choices(**choices)
                    elapsed.clear()
                    forward()
                    if rep >= warmup:
                        for i in range(len(modules)):
                            cell_times[c][i].append(elapsed[i])
                    bar.update()
            bar.close()
        finally:
            for h in hooks:
                h.remove()
        g = torch.Generator().manual_seed(seed + 7919)  # other mixes than check_latency_prediction's
        configs = {f"uniform_{c}": ch for c, ch in enumerate(uniform)}
        configs |= {f"random_{k}": sample_subnet(fm, "random", g) for k in range(calibration_configs if calibrate else 0)}
        measured = _time_configs(fm, forward, configs, warmup, reps, progress, "latency calibration")
    finally:
        fm.set_choices(**saved)
        fm.train(was_training)
    mlp_ms = [[0.0] * n_mlp for _ in range(L)]
    attn_ms = [[0.0] * n_attn for _ in range(L)]
    for c in range(n_widths):
        for i, module in enumerate(modules):
            row, n = (mlp_ms, n_mlp) if isinstance(module, NestedMLP) else (attn_ms, n_attn)
            if c < n:
                row[module.layer_idx][c] = statistics.median(cell_times[c][i])
    full_ms = measured["uniform_0"]
    table = {
        "version": TABLE_VERSION,
        "machine": machine_info(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "batch_size": batch_size, "seq_len": seq_len, "reps": reps, "device": str(device),
        "model": {k: v for k, v in fm.base_identity().items() if k != "fingerprint"},
        "mlp_sizes": list(fm.mlp_sizes), "head_counts": list(fm.head_counts),
        "mlp_ms": mlp_ms, "attn_ms": attn_ms,
        "full_ms": full_ms, "overhead_ms": max(0.0, full_ms - sum(r[0] for r in mlp_ms) - sum(r[0] for r in attn_ms)),
    }
    if calibrate:
        _calibrate(table, configs, measured)
    return table


def _time_configs(fm, forward, configs: dict[str, dict], warmup: int, reps: int, progress: bool,
                  desc: str) -> dict[str, float]:
    """Median end-to-end milliseconds of `forward()` at each configuration, repetitions interleaved."""
    from .evaluate import time_forwards

    setups = {name: (lambda c=choices: fm.set_choices(**c), forward) for name, choices in configs.items()}
    return time_forwards(setups, reps=reps, warmup=warmup, desc=desc if progress else None)


def _calibrate(table: dict[str, Any], configs: dict[str, dict], measured: dict[str, float]) -> None:
    """Fit `measured = overhead + scale * sum(cells)` over `configs` by least squares and apply it to `table`."""
    raw = {name: predict_latency(table, choices) - table["overhead_ms"] for name, choices in configs.items()}
    x = torch.tensor([raw[n] for n in configs], dtype=torch.float64)  # (N,) summed raw cells
    y = torch.tensor([measured[n] for n in configs], dtype=torch.float64)  # (N,) measured end to end
    through_origin = float((x * y).sum() / (x * x).sum()), 0.0
    scale, overhead = through_origin
    if len(configs) >= 2 and float(x.var()) > 0:
        scale = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        overhead = float(y.mean() - scale * x.mean())
        if overhead < 0 or scale <= 0:  # a fit no forward can have: through the origin instead
            scale, overhead = through_origin
    fitted = overhead + scale * x
    table["raw_mlp_ms"], table["raw_attn_ms"] = table["mlp_ms"], table["attn_ms"]
    table["mlp_ms"] = [[scale * v for v in row] for row in table["raw_mlp_ms"]]
    table["attn_ms"] = [[scale * v for v in row] for row in table["raw_attn_ms"]]
    table["calibration"] = {
        "scale": scale, "overhead_ms": overhead, "raw_overhead_ms": table["overhead_ms"],
        "configs": {n: {"raw_cells_ms": raw[n], "measured_ms": measured[n]} for n in configs},
        "fit_mean_abs_rel_error": float(((fitted - y).abs() / y).mean()),
        "uncalibrated_mean_abs_rel_error": float(((x + table["overhead_ms"] - y).abs() / y).mean()),
    }
    table["overhead_ms"] = overhead


def save_latency_table(table: dict[str, Any], path: str | Path) -> Path:
    atomic_write_json(path, table)
    return Path(path)


def load_latency_table(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no latency table at {path}: measure one with `elastiformer flextron latency`")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}): measure the latency table again") from err
    if not isinstance(table, dict) or not {"mlp_ms", "attn_ms", "overhead_ms"} <= set(table):
        raise DataError(f"{path} is not a latency table: measure one with `elastiformer flextron latency`")
    return table


def predict_latency(table: dict[str, Any], choices: dict[str, Sequence[Any]]) -> float:
    """Predicted milliseconds of a forward at `choices` (`{"mlp": [...], "attn": [...]}` per layer, as
    `fm.get_choices()` gives; None or a missing key = full width). A per-sequence entry (LongTensor (B,)) counts
    each choice for its share of the batch (the layer runs each group on its rows; time ~ linear in rows)."""
    mlp_ms, attn_ms, overhead = latency_tensors(table)
    total = overhead
    for key, cells in (("mlp", mlp_ms), ("attn", attn_ms)):
        L, n = cells.shape
        value = choices.get(key) if isinstance(choices, dict) else None
        if value is None:
            value = [0] * L
        if isinstance(value, (int, torch.Tensor)):
            value = [value] * L
        if len(value) != L:
            raise ConfigError(f"choices[{key!r}] has {len(value)} entries but the table has {L} layers: pass one "
                              "menu index per layer")
        for layer, c in enumerate(value):
            if isinstance(c, torch.Tensor) and c.dim() == 1:
                if c.numel() and (int(c.min()) < 0 or int(c.max()) >= n):
                    raise ConfigError(f"choices[{key!r}][{layer}] has indices outside the table's 0..{n - 1}")
                total += float(cells[layer][c.cpu()].mean())
                continue
            c = int(c)
            if not 0 <= c < n:
                raise ConfigError(f"choices[{key!r}][{layer}]={c} is not a menu index of the table (0..{n - 1})")
            total += float(cells[layer, c])
    return total


@torch.no_grad()
def check_latency_prediction(fm: FlextronModel, table: dict[str, Any], configs: dict[str, dict] | None = None, *,
                             reps: int = 5, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Measure configurations end to end at the table's batch size and sequence length, beside the prediction.

    configs: {name: {"mlp": [...], "attn": [...]}}; default: the full and smallest networks, each uniform width and
    three random mixes. Returns records (predicted_ms, measured_ms, rel_error) and the mean / max |rel_error|."""
    from .training import sample_subnet

    B, T = int(table["batch_size"]), int(table["seq_len"])
    if len(table["mlp_ms"]) != fm.n_layers or len(table["mlp_ms"][0]) != fm.flextron_config.n_mlp_choices or \
            len(table["attn_ms"][0]) != fm.flextron_config.n_attn_choices:
        raise ConfigError("the latency table was measured for another model or menu: measure it for this one")
    if configs is None:
        g = torch.Generator().manual_seed(seed)
        configs = {"full": sample_subnet(fm, "full", g), "smallest": sample_subnet(fm, "smallest", g)}
        for c in range(1, min(fm.flextron_config.n_mlp_choices, fm.flextron_config.n_attn_choices) - 1):
            configs[f"uniform_{c}"] = {"mlp": [c] * fm.n_layers, "attn": [c] * fm.n_layers}
        for k in range(3):
            configs[f"random_{k}"] = sample_subnet(fm, "random", g)
    device = next(fm.parameters()).device
    ids = torch.randint(0, fm.dims["V"], (B, T), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    was_training, saved = fm.training, fm.get_choices()
    fm.eval()
    try:
        measured = _time_configs(fm, lambda: fm(input_ids=ids, use_cache=False), configs, 1, reps, progress,
                                 "latency check")
    finally:
        fm.set_choices(**saved)
        fm.train(was_training)
    records = []
    for name, choices in configs.items():
        predicted = predict_latency(table, choices)
        records.append({"name": name, "choices": choices, "predicted_ms": predicted, "measured_ms": measured[name],
                        "rel_error": (predicted - measured[name]) / measured[name]})
    errors = [abs(r["rel_error"]) for r in records]
    return {"records": records, "mean_abs_rel_error": sum(errors) / len(errors), "max_abs_rel_error": max(errors),
            "machine": machine_info(), "table_machine": table.get("machine")}
