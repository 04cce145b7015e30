"""Low-rank adapters trained with the routers (ElastiFormer's rank-1 LoRA on the attention projections).

`LoRALinear` wraps an unmodified projection (nn.Linear or GPT-2's Conv1D) and adds `scale * B A x` while routing is
on; with routers disabled it is the base projection alone, so the distillation teacher stays the original model.
B starts at zero, so an untrained adapter changes nothing. Only `lora_A` and `lora_B` are saved.

Once the adapters are trained, the elastic model at full budget is the *adapted* model (base + BA), not the base
model: `em.disable_routers()` is the only way back to the base model. The update always runs as two thin matmuls
(`x -> x A^T -> (x A^T) B^T`), never by rebuilding `W + BA`, and its FLOPs (2 x tokens x r x (in + out) per
application) are counted in the sub-layer's executed FLOPs, not in its dense FLOPs (what the unmodified model runs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class LowRank(NamedTuple):
    """An active adapter's update in nn.Linear convention: `delta(x) = scale * (x @ A.T) @ B.T`."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scale  # (..., in) -> (..., r) -> (..., out)

    def out_rows(self, rows) -> "LowRank":
        """The update of the output rows `rows` only (a slice of a fused projection, or one head's rows)."""
        return LowRank(self.A, self.B[rows], self.scale)

    def flops(self, n_rows: int) -> int:
        return lora_flops(n_rows, self.A.shape[0], self.A.shape[1], self.B.shape[0])


def lora_flops(n_rows: int, rank: int, in_features: int, out_features: int) -> int:
    """x A^T and (x A^T) B^T on `n_rows` rows."""
    return 2 * n_rows * rank * (in_features + out_features)


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, rank: int, state, conv1d: bool = False, alpha: float | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.conv1d = conv1d  # Conv1D keeps its weight as (in, out): y = x @ W + b
        w = base_layer.weight
        in_features, out_features = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, device=w.device, dtype=w.dtype) * in_features**-0.5)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=w.device, dtype=w.dtype))
        self.scale = (alpha if alpha is not None else rank) / rank
        self._state = [state]  # in a list so nn.Module does not register it

    @property
    def active(self) -> bool:
        """On while routing is on (any budget, full budget included: the adapted model); off under
        `disable_routers()` (the base model, the distillation teacher)."""
        return self._state[0].enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.active:
            y = y + self.low_rank()(x)
        return y

    def low_rank(self) -> LowRank:
        return LowRank(self.lora_A, self.lora_B, self.scale)

    def flops(self, n_rows: int) -> int:
        """FLOPs the update adds when the projection runs on `n_rows` rows (0 while inactive)."""
        return lora_flops(n_rows, self.rank, self.in_features, self.out_features) if self.active else 0

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}


def linear_weight(module: nn.Module, conv1d: bool = False) -> torch.Tensor:
    """The base weight of a projection in nn.Linear convention (out, in), a view of the base model's tensor (a
    LoRA-wrapped projection gives its base weight; its update comes from `low_rank`)."""
    if isinstance(module, LoRALinear):
        module = module.base_layer
    return module.weight.T if conv1d else module.weight


def low_rank(module: nn.Module) -> LowRank | None:
    """The projection's active LoRA update, or None (no adapter, or routing off)."""
    return module.low_rank() if isinstance(module, LoRALinear) and module.active else None


def out_rows(update: LowRank | None, rows) -> LowRank | None:
    return None if update is None else update.out_rows(rows)


class HeadPathLoRA:
    """The adapters' updates on ElasticAttention's per-head path, as thin matmuls, with their FLOPs.

    `x A^T` is computed once per distinct A on the processed tokens (GPT-2's fused c_attn shares one A among q, k and
    v); each head then adds `(x A^T) B[rows]^T` for its own query rows, and the output projection's update is
    accumulated as `sum_h o_h A_o[:, rows_h]^T` per token and multiplied by `B_o` once at the end."""

    def __init__(self, weights, x: torch.Tensor):
        self.w = weights  # AttentionWeights, with q/k/v/o_lora
        self.x = x  # (B, m, C)
        self.flops = 0
        self._down: dict[int, torch.Tensor] = {}
        o = weights.o_lora
        self._o_down = None if o is None else x.new_zeros(x.shape[0] * x.shape[1], o.A.shape[0])  # (B*m, r)

    def _x_a(self, update: LowRank) -> torch.Tensor:
        key = id(update.A)
        if key not in self._down:
            self._down[key] = F.linear(self.x, update.A)  # (B, m, r)
            self.flops += 2 * self.x.shape[0] * self.x.shape[1] * update.A.shape[0] * update.A.shape[1]
        return self._down[key]

    def _up(self, xa: torch.Tensor, update: LowRank) -> torch.Tensor:
        self.flops += 2 * xa.shape[:-1].numel() * update.B.shape[1] * update.B.shape[0]
        return F.linear(xa, update.B) * update.scale

    def add(self, y: torch.Tensor, name: str) -> torch.Tensor:
        """`y` (B, m, out) = the "k" or "v" projection of every processed token, plus its update."""
        update = getattr(self.w, f"{name}_lora")
        return y if update is None else y + self._up(self._x_a(update), update)

    def add_query_heads(self, q: torch.Tensor, flat: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """`q` (U, n, D) = the queries of heads `heads` (U,) for the tokens at `flat` (U*n,) among the B*m processed
        ones (head-major, as ElasticAttention's head buckets), plus their update."""
        update = self.w.q_lora
        if update is None:
            return q
        U, n, D = q.shape
        r = update.A.shape[0]
        xa = self._x_a(update).reshape(-1, r).index_select(0, flat).view(U, n, r)  # (U, n, r)
        b = _per_head(update.B, heads, 0, D)  # (out, r) -> (U, D, r)
        self.flops += 2 * U * n * D * r
        return q + torch.bmm(xa, b.transpose(1, 2)) * update.scale  # (U, n, r) @ (U, r, D)

    def add_heads_output(self, o: torch.Tensor, heads: torch.Tensor, flat: torch.Tensor, keep: torch.Tensor) -> None:
        """The used heads' outputs `o` (U, n, D), entering the output projection at their columns: their share of the
        update's low-rank input, added at the flat token indices `flat` of the slots `keep` (U*n,) bool."""
        update = self.w.o_lora
        if update is None:
            return
        U, n, D = o.shape
        r = update.A.shape[0]
        a = torch.bmm(o, _per_head(update.A, heads, 1, D).transpose(1, 2))  # (U, n, D) @ (U, D, r) -> (U, n, r)
        self.flops += 2 * U * n * D * r
        self._o_down.index_add_(0, flat, a.reshape(U * n, r)[keep].to(self._o_down.dtype))

    def finish_output(self, out: torch.Tensor) -> torch.Tensor:
        """`out` (B*m, C): the heads' output projection, plus the update's `(sum_h o_h A_h^T) B^T`."""
        update = self.w.o_lora
        return out if update is None else out + self._up(self._o_down, update).to(out.dtype)


def _per_head(weight: torch.Tensor, heads: torch.Tensor, dim: int, D: int) -> torch.Tensor:
    """The `D`-wide slices of `weight` along `dim` that belong to `heads` (U,), stacked first: (U, ...)."""
    parts = weight.unflatten(dim, (-1, D)).movedim(dim, 0)  # (H, ...) a view
    return parts if heads.numel() == parts.shape[0] else parts.index_select(0, heads)
