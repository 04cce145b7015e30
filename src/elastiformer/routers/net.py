"""The scoring network shared by every router, and the straight-through gate."""

from __future__ import annotations

import math

import torch
from torch import nn


def make_router_net(hidden: int, out: int, kind: str = "linear", router_hidden: int = 32) -> nn.Module:
    """`linear`: LayerNorm -> Linear(C -> out). `mlp`: LayerNorm -> Linear(C -> h) -> GELU -> Linear(h -> out).

    The parameter-free LayerNorm puts every model's hidden states on one scale (a sub-layer's input can have
    dimensions in the tens or hundreds), so one learning rate fits all; the last layer starts near zero, so the
    routers start with no opinion rather than a random one.
    """
    norm = nn.LayerNorm(hidden, elementwise_affine=False)
    if kind == "linear":
        last = nn.Linear(hidden, out)
        net = nn.Sequential(norm, last)
    else:
        first = nn.Linear(hidden, router_hidden)
        nn.init.normal_(first.weight, std=hidden**-0.5)
        nn.init.zeros_(first.bias)
        last = nn.Linear(router_hidden, out)
        net = nn.Sequential(norm, first, nn.GELU(), last)
    nn.init.normal_(last.weight, std=0.01 * last.in_features**-0.5)
    nn.init.zeros_(last.bias)
    return net


def router_net_flops(net: nn.Module, n_tokens: int) -> int:
    """Multiply-adds x2 of the router's Linear layers over `n_tokens` tokens."""
    return sum(2 * n_tokens * m.in_features * m.out_features for m in net.modules() if isinstance(m, nn.Linear))


def straight_through_gate(p: torch.Tensor) -> torch.Tensor:
    """Forward value exactly 1 (outputs stay the base model's), backward the gradient of `p`.

    d loss / d p = <d loss / d output, output>: the router learns how much each selected unit's output helps.
    """
    return 1.0 + p - p.detach()


def static_scores(importance: torch.Tensor | None, x: torch.Tensor, n_units: int) -> torch.Tensor:
    """The "static" baseline's scores: one importance per head / expert, the same for every token. -> (..., U)"""
    from ..errors import NotCalibratedError

    if importance is None:
        raise NotCalibratedError("the static baseline has no importances yet: call em.fit_static(data) first")
    return importance.to(x.device).expand(*x.shape[:-1], n_units)


def fractional_top_units(logits: torch.Tensor, capacity: float, positions: torch.Tensor | None, layer: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the top units of `logits` (..., U) at a fractional count `capacity * U`.

    Every token gets floor(capacity * U) units, and a fraction of the tokens, fixed by their position alone (a
    low-discrepancy sequence, so the choice is causal and the same in training and inference), gets one more: the
    executed work falls strictly with the capacity instead of in steps of 1 / U, and 0 runs no unit at all.
    positions: (...) sequence index of each token (None: by order within the batch).
    -> chosen (..., k) unit indices, kept (..., k) bool (False: the slot is not used by this token).
    """
    U = logits.shape[-1]
    k_lo, frac, k = fractional_count(capacity, U)
    chosen = logits.topk(k, dim=-1).indices if k else logits.new_zeros((*logits.shape[:-1], 0), dtype=torch.long)
    kept = torch.ones_like(chosen, dtype=torch.bool)
    if k > k_lo:  # the last slot goes to the tokens whose position falls in the fraction
        if positions is None:
            positions = torch.arange(logits[..., 0].numel(), device=logits.device).view(logits.shape[:-1])
        kept[..., -1] = slot_phase(positions.to(torch.float64), layer) < frac  # (...)
    return chosen, kept


def fractional_count(capacity: float, U: int) -> tuple[int, float, int]:
    """capacity * U units, as (units every token gets, the fraction of tokens that get one more, slots: k_lo or
    k_lo + 1)."""
    count = min(float(U), max(0.0, capacity * U))
    k_lo = int(math.floor(count + 1e-6))
    frac = count - k_lo if count - k_lo > 1e-6 else 0.0
    return k_lo, frac, min(U, k_lo + (1 if frac > 0 else 0))


def best_first(scores: list[float]) -> list[int]:
    """Unit indices by score on the host, best first, as `topk` orders them."""
    return sorted(range(len(scores)), key=scores.__getitem__, reverse=True)


def one_token_units(logits: torch.Tensor | list[float], capacity: float, position: int, layer: int = 0) -> list[int]:
    """`fractional_top_units` for one token, decided on the host (decoding at batch 1: a list of units is what the
    caller needs, so no mask is built). logits: (U,) or (1, U), or a list of U floats already read to the host
    (`joint_one_token_logits`); position: its sequence index. -> sorted units."""
    k_lo, frac, k = fractional_count(capacity, len(logits) if isinstance(logits, list) else logits.shape[-1])
    if k == 0:
        return []
    # one host read of the U logits, then a sort in Python: no topk op on the decoding path
    chosen = best_first(logits if isinstance(logits, list) else logits.reshape(-1).tolist())[:k]
    if k > k_lo and not slot_phase(position, layer) < frac:  # the same rule, in Python's float64
        chosen.pop()
    return sorted(chosen)


def joint_one_token_logits(owner: nn.Module, x: torch.Tensor, nets: tuple[nn.Module, ...]) -> list[float] | None:
    """Decoding one token at batch 1: the logits of the routers of one sub-layer that read the same input (its token
    router and its head or expert router) as one LayerNorm and one matmul over their stacked last layers, read to
    the host at once, instead of a norm, a matmul and a host read per router. None unless every net is the plain
    `linear` kind (a LayerNorm without affine, then a Linear) with the same norm. The stacked weight is kept on
    `owner` while the routers' parameters stay the same tensors, unmodified (storage and version counter).
    x: (1, 1, C) or (1, C) -> the logits of each net, in order, concatenated."""
    linears = []
    for net in nets:
        plain = isinstance(net, nn.Sequential) and len(net) == 2 and isinstance(net[0], nn.LayerNorm) \
            and isinstance(net[1], nn.Linear) and not net[0].elementwise_affine
        if not plain or (net[0].normalized_shape, net[0].eps) != (nets[0][0].normalized_shape, nets[0][0].eps):
            return None
        linears.append(net[1])
    params = [t for lin in linears for t in (lin.weight, lin.bias)]
    key = tuple((t.data_ptr(), t._version) for t in params)
    kept = owner.__dict__.get("_joint_router")
    if kept is None or kept[0] != key:
        with torch.no_grad():
            weight = torch.cat([lin.weight for lin in linears])  # (sum of outputs, C)
            bias = torch.cat([lin.bias for lin in linears])
        kept = owner.__dict__["_joint_router"] = (key, weight, bias)
    norm = nets[0][0]
    z = nn.functional.layer_norm(x.reshape(1, -1), norm.normalized_shape, eps=norm.eps)  # (1, C)
    return nn.functional.linear(z, kept[1], kept[2])[0].tolist()


def slot_phase(position, layer: int):
    """Where a token falls in [0, 1) for the extra slot of a fractional count: a low-discrepancy sequence over its
    position (a float, or a float64 tensor of positions) and the layer. A token gets the slot when this is below the
    fraction."""
    return ((position + 1) * _GOLDEN + layer * _PLASTIC) % 1.0


_GOLDEN = 0.6180339887498949  # Weyl sequence steps: well spread over positions and over layers
_PLASTIC = 0.7548776662466927
