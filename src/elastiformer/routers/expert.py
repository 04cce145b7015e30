"""Expert router: per token, which of the MLP's experts (slices of its hidden neurons) run. Top-k of a softmax,
with the Switch-Transformer load-balancing loss so that training does not collapse onto a few experts."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .net import (fractional_top_units, make_router_net, one_token_units, router_net_flops, static_scores,
                  straight_through_gate)


class ExpertSelection(NamedTuple):
    chosen: torch.Tensor  # (N, k) expert indices per token (-1: a slot this token does not use)
    gate: torch.Tensor  # (N, k) float, forward value 1
    aux_loss: torch.Tensor | None  # load balance (training only)


class ExpertRouter(nn.Module):
    def __init__(self, hidden: int, n_experts: int, kind: str = "linear", router_hidden: int = 32,
                 mlp_width: int | None = None, clustered: bool = False):
        super().__init__()
        self.n_experts = n_experts
        self.net = make_router_net(hidden, n_experts, kind, router_hidden)
        self.static_importance: torch.Tensor | None = None  # (E,) set by ElasticModel.fit_static (baseline)
        self.width = None if mlp_width is None else mlp_width // n_experts  # hidden neurons per expert
        if clustered:  # expert_split="cluster": expert e owns neurons neuron_order[e*I/E:(e+1)*I/E]
            if mlp_width is None:
                raise ValueError("a clustered expert split needs the MLP width")
            self.register_buffer("neuron_order", torch.arange(mlp_width))
        else:
            self.neuron_order = None

    @property
    def is_split(self) -> bool:
        """Whether a clustered neuron order has been fitted (a fresh one equals the contiguous split)."""
        order = self.neuron_order
        return order is not None and not torch.equal(order, torch.arange(order.numel(), device=order.device))

    def expert_neurons(self, e: int) -> slice | torch.Tensor:
        """The hidden neurons of expert e in the base model's original numbering: a contiguous slice, or the indices
        of the e-th cluster (at run time `ElasticMLP` holds its weights permuted into this order, so each expert is a
        contiguous slice there)."""
        if self.neuron_order is None:
            return slice(e * self.width, (e + 1) * self.width)
        return self.neuron_order[e * self.width:(e + 1) * self.width]

    def flops(self, n_tokens: int) -> int:
        return router_net_flops(self.net, n_tokens)

    def n_active(self, capacity: float) -> int:
        """Experts in the supervised target (at least one): the rounded count at this capacity."""
        return max(1, min(self.n_experts, round(capacity * self.n_experts)))

    def forward(self, x: torch.Tensor, capacity: float, with_aux: bool, method: str = "learned",
                generator: torch.Generator | None = None, positions: torch.Tensor | None = None,
                layer: int = 0, pinned: torch.Tensor | None = None) -> ExpertSelection:
        """x: (N, C), positions: (N,) sequence index of each token. A fractional count of experts per token (see
        `fractional_top_units`), so compute falls strictly with the capacity. pinned: (E,) the scores of a unit the
        allocation pinned (the same experts for every token), else None."""
        logits = self.logits(x, method, generator, pinned)  # (N, C) -> (N, E)
        # uniform scores, or the same experts for every token: no router probability to gate by
        baseline = method in ("random", "static") or pinned is not None
        if baseline or not with_aux and not torch.is_grad_enabled():  # (the softmax keeps the order; the gate is 1)
            chosen, kept = fractional_top_units(logits, capacity, positions, layer)  # (N, k)
            gate = kept.float() if baseline else logits.new_ones(()).expand(chosen.shape)
            return ExpertSelection(chosen.masked_fill(~kept, -1), gate, None)
        probs = logits.softmax(dim=-1)  # (N, E)
        chosen, kept = fractional_top_units(probs, capacity, positions, layer)  # (N, k)
        top_p = probs.gather(-1, chosen)
        aux = None
        if with_aux and kept.any():
            E = self.n_experts
            # fraction of routed slots per expert, times mean router probability per expert (Switch, eq. 4)
            used = chosen[kept]
            load = torch.zeros(E, device=x.device).index_add_(0, used, torch.ones(used.numel(), device=x.device))
            aux = E * (load / used.numel() * probs.mean(dim=0)).sum()
        return ExpertSelection(chosen.masked_fill(~kept, -1), straight_through_gate(top_p), aux)

    def logits(self, x: torch.Tensor, method: str, generator: torch.Generator | None,
               pinned: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C) -> (N, E) the scores the experts are chosen by (the learned router's softmax keeps their order)."""
        if pinned is not None:  # a unit the allocation pinned: its calibration importances, for every token
            return static_scores(pinned, x, self.n_experts)
        if method == "random":  # baseline: uniform scores (from `generator` when given, else torch's global RNG)
            return torch.rand(x.shape[0], self.n_experts, device=x.device, generator=generator)
        if method == "static":  # baseline: the same experts for every token, the most important on calibration text
            return static_scores(self.static_importance, x, self.n_experts)
        return self.net(x)

    def one_token_experts(self, x: torch.Tensor, capacity: float, position: int, method: str = "learned",
                          generator: torch.Generator | None = None, layer: int = 0,
                          logits: list[float] | None = None, pinned: torch.Tensor | None = None) -> list[int]:
        """Decoding one token: its experts as a sorted list, the same choice as `forward` makes at inference,
        decided on the host. x: (1, C); position: the token's place among its row's real tokens; logits: this
        router's logits already read to the host (`joint_one_token_logits`), else computed; pinned: as in
        `forward`."""
        if logits is None:
            logits = self.logits(x, method, generator, pinned)
        return one_token_units(logits, capacity, position, layer)

    def importance_loss(self, x: torch.Tensor, importance: torch.Tensor, capacity: float) -> torch.Tensor:
        """Cross-entropy of the router's distribution against the top-k experts by `importance` (the norm of each
        expert's output on the teacher), spread evenly over them. x: (N, C), importance: (N, E)."""
        k = self.n_active(capacity)
        target = torch.zeros_like(importance).scatter_(-1, importance.topk(k, dim=-1).indices, 1.0 / k)
        return -(target * self.net(x).log_softmax(dim=-1)).sum(dim=-1).mean()
