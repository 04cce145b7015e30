"""Low-rank adapters trained with the routers (ElastiFormer's rank-1 LoRA on the attention projections).

`LoRALinear` wraps an unmodified projection (nn.Linear or GPT-2's Conv1D) and adds `scale * B A x` while routing is
on; with routers disabled it is the base projection alone, so the distillation teacher stays the original model.
B starts at zero, so an untrained adapter changes nothing. Only `lora_A` and `lora_B` are saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, rank: int, state, conv1d: bool = False, alpha: float | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.conv1d = conv1d  # Conv1D keeps its weight as (in, out): y = x @ W + b
        w = base_layer.weight
        in_features, out_features = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, device=w.device, dtype=w.dtype) * in_features**-0.5)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=w.device, dtype=w.dtype))
        self.scale = (alpha if alpha is not None else rank) / rank
        self._state = [state]  # in a list so nn.Module does not register it

    @property
    def active(self) -> bool:
        return self._state[0].enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.active:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale  # (..., in) -> (..., r) -> (..., out)
        return y

    def linear_weight(self) -> torch.Tensor:
        """The effective weight in nn.Linear convention (out, in): what the custom attention paths multiply by."""
        w = self.base_layer.weight.T if self.conv1d else self.base_layer.weight
        return w + (self.lora_B @ self.lora_A) * self.scale if self.active else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}


def linear_weight(module: nn.Module, conv1d: bool = False) -> torch.Tensor:
    """Weight of a projection in nn.Linear convention, with its LoRA update when one is active."""
    if isinstance(module, LoRALinear):
        return module.linear_weight()
    return module.weight.T if conv1d else module.weight
