"""Additive cost of a nested-width configuration: `overhead + sum over layers of cost[layer, chosen width]`, for the
MLP and the attention of each layer. The same tensors price a hard configuration (indices) and a soft one (the
routers' choice probabilities: the expected cost), which is what makes the latency / compute loss differentiable.

Built from the latency table (`configurations.latency_cost_model`) or the FLOPs table (`configurations.compute_cost_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


# A hard configuration: menu indices per layer, `{"mlp": LongTensor[..., L], "attn": LongTensor[..., L]}`
# (leading dims: none for one configuration, (B,) for one per sequence). Index 0 is the full width.
Choices = dict[str, torch.Tensor]
SUBLAYERS = ("mlp", "attn")


@dataclass
class CostModel:
    kind: str  # "latency_ms" or "relative_compute"
    mlp: torch.Tensor  # (L, Km) cost of layer l's MLP at menu index k
    attn: torch.Tensor  # (L, Ka)
    overhead: float  # what no width choice changes (embeddings, LM head, norms)

    @property
    def full(self) -> float:
        return self.overhead + float(self.mlp[:, 0].sum() + self.attn[:, 0].sum())

    @property
    def minimum(self) -> float:
        """The cheapest sub-network: every layer at its cheapest width."""
        return self.overhead + float(self.mlp.min(dim=1).values.sum() + self.attn.min(dim=1).values.sum())

    def hard(self, choices: Choices) -> torch.Tensor:
        """Cost of index configurations; shape = the leading dims of `choices` (scalar for one configuration)."""
        m = self.mlp.gather(1, choices["mlp"].long().reshape(-1, self.mlp.shape[0]).T).T  # (N, L)
        a = self.attn.gather(1, choices["attn"].long().reshape(-1, self.attn.shape[0]).T).T  # (N, L)
        total = self.overhead + m.sum(-1) + a.sum(-1)  # (N,)
        return total.reshape(choices["mlp"].shape[:-1])

    def soft(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Expected cost of choice probabilities `{"mlp": (..., L, Km), "attn": (..., L, Ka)}` -> (...)."""
        return (self.overhead + (probs["mlp"] * self.mlp.to(probs["mlp"])).sum((-1, -2))
                + (probs["attn"] * self.attn.to(probs["attn"])).sum((-1, -2)))

    def relative(self, value: torch.Tensor | float) -> torch.Tensor | float:
        return value / self.full

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mlp": self.mlp.tolist(), "attn": self.attn.tolist(), "overhead": self.overhead}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostModel":
        return cls(kind=d["kind"], mlp=torch.tensor(d["mlp"], dtype=torch.float64),
                   attn=torch.tensor(d["attn"], dtype=torch.float64), overhead=float(d["overhead"]))


def latency_tensors(table: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mlp_ms (L, n_mlp), attn_ms (L, n_attn), overhead_ms) of a latency table: for a router's expected,
    differentiable latency."""
    return torch.tensor(table["mlp_ms"]), torch.tensor(table["attn_ms"]), float(table["overhead_ms"])
