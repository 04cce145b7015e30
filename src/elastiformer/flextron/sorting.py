"""Importance sorting: rank MLP neurons and attention heads on calibration text, then permute the weights in place so
the most important come first (a narrower nested width then keeps the most important units).

- MLP neuron importance: mean absolute activation of the hidden unit (`act(gate x) * up x`, or `act(up x)`).
- Head importance: mean norm of the head's output, i.e. of its share of the output projection `o_w[:, head] @ o_h`.
- Grouped-query attention: KV groups are ranked by the summed importance of their query heads, and query heads within
  each group; the permutation is group-major, so a head never changes group and the permuted model computes exactly
  the same function (up to float summation order).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from ..arch import get_arch_spec
from ..errors import ConfigError, DataError
from ..data.batches import as_batches


def _base_sublayers(model) -> tuple[Any, list[tuple[Any, Any]]]:
    """(base model, [(attention, mlp)] per layer) with nested wrappers unwrapped."""
    from .model import FlextronModel

    base = model.base_model if isinstance(model, FlextronModel) else model
    spec = get_arch_spec(base)
    pairs = []
    for block in spec.layers(base):
        attn, mlp = getattr(block, spec.attn_name), getattr(block, spec.mlp_name)
        pairs.append((getattr(attn, "base_layer", attn), getattr(mlp, "base_layer", mlp)))
    return base, pairs


@torch.no_grad()
def compute_importance(model, data: Iterable[dict[str, torch.Tensor]] | torch.Tensor, max_batches: int | None = 8,
                       progress: bool = True) -> dict[str, Any]:
    """Importance of every MLP neuron and attention head, measured at full width on `data`.

    model: a *ForCausalLM model or a FlextronModel (run at full width). data: token ids [N, T] or an iterable of
    dicts holding `input_ids` (and optionally `attention_mask`; padding is not counted).
    Returns `{"mlp": [Tensor (I,)] per layer, "heads": [Tensor (H,)] per layer, "tokens": int}`.
    """
    from .model import FlextronModel

    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ConfigError(f"max_batches={max_batches!r}: pass a positive number of batches, or None for all")
    base, pairs = _base_sublayers(model)
    spec = get_arch_spec(base)
    d = spec.dims(base.config)
    H, D = d["H"], d["D"]
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        data = [{"input_ids": data[i:i + 8]} for i in range(0, data.shape[0], 8)]  # (<=8, T) batches
    batches = [b for _, b in zip(range(max_batches or 10**9), as_batches(data))]
    if not batches:
        raise DataError("compute_importance got no data: pass calibration token ids [N, T] or batches of input_ids")
    mlp_sum = [torch.zeros(d["I"], dtype=torch.float64) for _ in pairs]
    head_sum = [torch.zeros(H, dtype=torch.float64) for _ in pairs]
    valid: dict[str, torch.Tensor | None] = {"mask": None}

    def weighted_sum(t: torch.Tensor) -> torch.Tensor:
        """t: (B, T, U) -> (U,) summed over the real (non-padding) tokens."""
        m = valid["mask"]
        if m is not None:
            t = t * m[..., None].to(t.dtype)
        return t.flatten(0, 1).sum(0).double().cpu()

    def mlp_hook(i):
        def hook(module, args):
            x = args[0]  # (B, T, C)
            w = spec.mlp_weights(pairs[i][1])
            h = torch.nn.functional.linear(x, w.up_w, w.up_b)  # (B, T, I)
            if w.gate_w is not None:
                h = w.act(torch.nn.functional.linear(x, w.gate_w, w.gate_b)) * h
            else:
                h = w.act(h)
            mlp_sum[i].add_(weighted_sum(h.abs()))
        return hook

    def head_hook(i):
        def hook(module, args):
            heads = args[0]  # (B, T, H*D): the heads' outputs side by side, before the output projection
            B, T, _ = heads.shape
            o_w = spec.attention_weights(pairs[i][0]).o_w  # (C, H*D)
            share = torch.einsum("bthd,chd->bthc", heads.view(B, T, H, D), o_w.view(-1, H, D))  # (B, T, H, C)
            head_sum[i].add_(weighted_sum(share.norm(dim=-1)))
        return hook

    handles = []
    for i, (attn, mlp) in enumerate(pairs):
        handles.append(mlp.register_forward_pre_hook(mlp_hook(i)))
        handles.append(getattr(attn, spec.o_proj_name).register_forward_pre_hook(head_hook(i)))
    device = next(base.parameters()).device
    tokens = 0
    ctx = model.full() if isinstance(model, FlextronModel) else contextlib.nullcontext()
    try:
        with ctx:
            for batch in tqdm(batches, desc="importance", disable=not progress):
                batch = {k: v.to(device) for k, v in batch.items()}
                mask = batch.get("attention_mask")
                valid["mask"] = mask.bool() if mask is not None else None
                tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
                base(**batch)
    finally:
        for h in handles:
            h.remove()
    return {"mlp": [(s / max(1, tokens)).float() for s in mlp_sum],
            "heads": [(s / max(1, tokens)).float() for s in head_sum], "tokens": tokens}


def _expand(order: torch.Tensor, block: int) -> torch.Tensor:
    """A permutation of units of `block` rows each -> the permutation of the rows. (U,) -> (U * block,)"""
    return (order[:, None] * block + torch.arange(block)[None, :]).flatten()


def head_permutation(importance: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-major order of the query heads: groups by summed importance, heads by importance within each group.
    importance: (H,) -> head order (H,), KV group order (KVH,)."""
    H = importance.numel()
    n_rep = H // kv_heads
    per_group = importance.view(kv_heads, n_rep)  # (KVH, n_rep)
    group_order = torch.argsort(per_group.sum(-1), descending=True, stable=True)
    head_order = torch.cat([g * n_rep + torch.argsort(per_group[g], descending=True, stable=True)
                            for g in group_order.tolist()])
    return head_order, group_order


@torch.no_grad()
def sort_by_importance_(model, importance: dict[str, Any]) -> dict[str, Any]:
    """Permute the weights of `model` (a *ForCausalLM or a FlextronModel) in place so the most important MLP
    neurons and heads come first; the permuted model gives the same logits. Returns the sorting info (each layer's
    order relative to the original weights, composed with any earlier sort), which is also recorded on the model
    and saved with a Flextron checkpoint."""
    from .model import SORTING_ATTR, FlextronModel

    base, pairs = _base_sublayers(model)
    spec = get_arch_spec(base)
    d = spec.dims(base.config)
    L, H, KVH, D, I = d["L"], d["H"], d["KVH"], d["D"], d["I"]
    for key, size in (("mlp", I), ("heads", H)):
        got = importance.get(key) if isinstance(importance, dict) else None
        if got is None or len(got) != L or any(tuple(t.shape) != (size,) for t in got):
            raise ConfigError(f"importance[{key!r}] must hold {L} tensors of shape ({size},) for this model: pass "
                              "what compute_importance returned for it")
    previous = getattr(base, SORTING_ATTR, None)
    info: dict[str, Any] = {"mlp_order": [], "head_order": [], "kv_group_order": [],
                            "calibration_tokens": int(importance.get("tokens", 0))}
    for i, (attn, mlp) in enumerate(pairs):
        # ---- MLP: rows of up / gate, columns of down ----
        order = torch.argsort(importance["mlp"][i], descending=True, stable=True)  # (I,)
        w = spec.mlp_weights(mlp)
        dev = w.up_w.device
        o = order.to(dev)
        for t in (w.up_w, w.up_b, w.gate_w, w.gate_b):
            if t is not None:
                t.copy_(t.index_select(0, o))
        w.down_w.copy_(w.down_w.index_select(1, o))
        # ---- attention: q rows / o columns by head, k / v rows by KV group ----
        head_order, group_order = head_permutation(importance["heads"][i].float(), KVH)
        rows_q, rows_kv = _expand(head_order, D).to(dev), _expand(group_order, D).to(dev)
        a = spec.attention_weights(attn)
        if spec.permute_heads is not None:  # q / k / v are not views of the weights (GPT-NeoX): the spec reorders
            spec.permute_heads(attn, head_order, group_order)
        else:
            for t, rows in ((a.q_w, rows_q), (a.q_b, rows_q), (a.k_w, rows_kv), (a.k_b, rows_kv), (a.v_w, rows_kv),
                            (a.v_b, rows_kv)):
                if t is not None:
                    t.copy_(t.index_select(0, rows))
            a.o_w.copy_(a.o_w.index_select(1, rows_q))
        if a.q_norm is not None and not a.qk_norm_per_head:  # a norm over the whole projection (OLMo 2) has one
            for norm, rows in ((a.q_norm, rows_q), (a.k_norm, rows_kv)):  # weight per row: it moves with the rows
                norm.weight.copy_(norm.weight.index_select(0, rows))
        # ---- record, relative to the original weights ----
        if previous is not None:  # sorted before: this order indexes the previous order
            order = torch.tensor(previous["mlp_order"][i])[order]
            head_order = torch.tensor(previous["head_order"][i])[head_order]
            group_order = torch.tensor(previous["kv_group_order"][i])[group_order]
        info["mlp_order"].append(order.tolist())
        info["head_order"].append(head_order.tolist())
        info["kv_group_order"].append(group_order.tolist())
    setattr(base, SORTING_ATTR, info)
    if isinstance(model, FlextronModel):
        model.sorting = info
    return info
