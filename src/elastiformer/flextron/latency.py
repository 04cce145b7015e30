"""Latency lookup table: every nested sub-layer's wall-clock at every menu width, measured on this machine.

`measure_latency_table` runs one full-width forward of `batch_size x seq_len` random tokens to capture each
sub-layer's real inputs (hidden states, rotary embeddings, mask), then times each sub-layer alone at each width
(median of `reps`, widths interleaved so slow drift of a shared machine hits them alike). What is not in a sub-layer
(embeddings, norms, residual adds, LM head) is the `overhead_ms`: the measured full forward minus the full-width
sub-layers. `predict_latency(table, choices)` = overhead + the chosen cells; `check_latency_prediction` measures
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

from ..benchmark import machine
from ..cache import atomic_write_json
from ..errors import ConfigError, DataError
from .model import FlextronModel
from .nested import NestedAttention, NestedMLP

TABLE_VERSION = 1


def machine_info() -> dict[str, Any]:
    """benchmark.machine() plus the CPU model name (what a latency table is valid for)."""
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


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure_latency_table(fm: FlextronModel, batch_size: int = 1, seq_len: int = 128, *, reps: int = 5,
                          warmup: int = 1, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Milliseconds of each layer's MLP and attention at every menu index, for a `batch_size x seq_len` prefill
    (no cache) on this machine. Returns a JSON-ready dict (`mlp_ms` / `attn_ms`: [L][n_choices], `overhead_ms`,
    `full_ms`, `machine`, shapes and menus)."""
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("reps", reps)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}={v!r}: pass a positive integer")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup={warmup!r}: pass a non-negative integer")
    device = next(fm.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, fm.dims["V"], (batch_size, seq_len), generator=g).to(device)  # (B, T)
    captured: dict[int, tuple[tuple, dict]] = {}
    modules = [m for pair in fm.nested_layers() for m in pair]  # attn 0, mlp 0, attn 1, ...
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw, i=i: captured.__setitem__(i, (a, kw)), with_kwargs=True)
             for i, m in enumerate(modules)]
    was_training, saved = fm.training, fm.get_choices()
    fm.eval()
    try:
        with fm.full():
            try:
                fm(input_ids=ids, use_cache=False)
            finally:
                for h in hooks:
                    h.remove()
            for _ in range(warmup):
                fm(input_ids=ids, use_cache=False)
            full_ms = _median_ms(lambda: fm(input_ids=ids, use_cache=False), reps)
        L = fm.n_layers
        mlp_ms = [[0.0] * fm.flextron_config.n_mlp_choices for _ in range(L)]
        attn_ms = [[0.0] * fm.flextron_config.n_attn_choices for _ in range(L)]
        bar = tqdm(total=len(modules), desc="latency table", disable=not progress)
        for i, module in enumerate(modules):
            args, kwargs = captured[i]
            row, key = (mlp_ms, "mlp") if isinstance(module, NestedMLP) else (attn_ms, "attn")
            choices = getattr(fm.state, key)
            n = len(row[module.layer_idx])
            times: list[list[float]] = [[] for _ in range(n)]
            for rep in range(warmup + reps):
                for c in range(n):  # interleaved widths
                    choices[module.layer_idx] = c
                    t0 = time.perf_counter()
                    module(*args, **kwargs)
                    if rep >= warmup:
                        times[c].append((time.perf_counter() - t0) * 1e3)
            choices[module.layer_idx] = 0
            row[module.layer_idx] = [statistics.median(t) for t in times]
            fm.state.stats = []
            bar.update()
        bar.close()
    finally:
        fm.set_choices(**saved)
        fm.train(was_training)
    layers_full = sum(r[0] for r in mlp_ms) + sum(r[0] for r in attn_ms)
    return {
        "version": TABLE_VERSION,
        "machine": machine_info(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "batch_size": batch_size, "seq_len": seq_len, "reps": reps, "device": str(device),
        "model": {k: v for k, v in fm.base_identity().items() if k != "fingerprint"},
        "mlp_sizes": list(fm.mlp_sizes), "head_counts": list(fm.head_counts),
        "mlp_ms": mlp_ms, "attn_ms": attn_ms,
        "full_ms": full_ms, "overhead_ms": max(0.0, full_ms - layers_full),
    }


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


def latency_tensors(table: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mlp_ms (L, n_mlp), attn_ms (L, n_attn), overhead_ms): for a router's expected, differentiable latency."""
    return torch.tensor(table["mlp_ms"]), torch.tensor(table["attn_ms"]), float(table["overhead_ms"])


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
    was_training = fm.training
    fm.eval()
    records = []
    try:
        for name, choices in tqdm(configs.items(), desc="latency check", disable=not progress):
            with fm.using(**choices):
                fm(input_ids=ids, use_cache=False)  # warm-up
                measured = _median_ms(lambda: fm(input_ids=ids, use_cache=False), reps)
            predicted = predict_latency(table, choices)
            records.append({"name": name, "choices": choices, "predicted_ms": predicted, "measured_ms": measured,
                            "rel_error": (predicted - measured) / measured})
    finally:
        fm.train(was_training)
    errors = [abs(r["rel_error"]) for r in records]
    return {"records": records, "mean_abs_rel_error": sum(errors) / len(errors), "max_abs_rel_error": max(errors),
            "machine": machine_info(), "table_machine": table.get("machine")}
