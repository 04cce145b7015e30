"""`NestedMLP` / `NestedAttention`: a sub-layer that runs at a menu width using the leading slice of its own weights.

After importance sorting the most important MLP neurons and attention heads come first, so a narrower choice is a
leading slice of every projection: MLP width w uses rows [:w] of up / gate and columns [:w] of down; n query heads
use rows [:n*D] of q, the first ceil(n / n_rep) KV groups of k / v, and columns [:n*D] of o. Only that slice is
multiplied (no masks): FLOPs are counted from the shapes that ran.

Choice index 0 is the full layer and calls the unmodified base module, so a model at all-zero choices *is* the base
model. A choice is one int for the whole batch, or a LongTensor (B,) of per-sequence choices: the layer groups the
batch by choice and runs each group at its width (the input-adaptive router needs that).

KV cache: a narrow layer caches K / V for the groups it computed, zero-filled up to the full KVH so the cache keeps
one shape; the cache remembers, per sequence, how many groups every cached entry has, and a later step that needs
more groups than were cached is refused (keep a sequence's attention width from growing during a generation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import ConfigError
from ..flops import attention_projection_flops, attention_score_flops, dense_attention_flops, mlp_flops
from ..layers.attention import norm_heads, rotate
from ..layers.state import SubLayerStats, SubLayerWrapper

Choice = int | torch.Tensor  # a menu index for the whole batch, or a LongTensor (B,) of per-sequence indices
_CACHE_GROUPS_ATTR = "_flextron_kv_groups"  # {layer_idx: (B,) long} KV groups every cached entry of a row holds
_LAYER_KWARGS = ("hidden_states", "position_embeddings", "attention_mask", "cache", "past_key_values", "layer_past",
                 "position_ids", "use_cache", "output_attentions")


@dataclass
class FlextronState:
    """What every nested sub-layer of one model shares: the current choices and what the last forward ran."""

    n_layers: int
    mlp: list[Choice] = field(default_factory=list)  # per layer
    attn: list[Choice] = field(default_factory=list)
    stats: list[SubLayerStats] = field(default_factory=list)  # appended by the sub-layers (and routers) per forward
    batch_size: int = 0
    n_tokens: int = 0  # current tokens per sequence in the last forward

    def __post_init__(self) -> None:
        self.mlp = self.mlp or [0] * self.n_layers
        self.attn = self.attn or [0] * self.n_layers


def batch_groups(choice: Choice, B: int, where: str) -> list[tuple[torch.Tensor | None, int]]:
    """[(rows or None for the whole batch, menu index)]: the batch grouped by choice."""
    if isinstance(choice, int):
        return [(None, choice)]
    if choice.shape != (B,):
        raise ConfigError(f"{where}: per-sequence choices have shape {tuple(choice.shape)} but the batch has {B} "
                          f"sequences: pass a LongTensor of shape ({B},) or one int for the whole batch")
    values = torch.unique(choice).tolist()
    if len(values) == 1:
        return [(None, int(values[0]))]
    return [((choice == c).nonzero().squeeze(1), int(c)) for c in values]  # rows: (b_c,)


def _rows(t: torch.Tensor | None, rows: torch.Tensor | None, B: int) -> torch.Tensor | None:
    """The rows of a batch-leading tensor; tensors broadcast over the batch (leading 1) pass through."""
    if t is None or rows is None or t.shape[0] != B:
        return t
    return t.index_select(0, rows)


class NestedSubLayer(SubLayerWrapper):
    """Flextron's attention and MLP wrappers: a SubLayerWrapper whose state (FlextronState) holds the menu index."""


class NestedMLP(NestedSubLayer):
    def __init__(self, base_layer, layer_idx, spec, dims, state, widths: tuple[int, ...]):
        super().__init__(base_layer, layer_idx, spec, dims, state)
        self.widths = widths  # hidden neurons at each menu index; widths[0] = I
        self.gated = spec.mlp_weights(base_layer).gate_w is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        groups = batch_groups(self.state.mlp[self.layer_idx], B, f"MLP of layer {self.layer_idx}")
        dense = mlp_flops(B * T, C, self.dims["I"], self.gated)
        executed, units = 0, 0.0
        out = None
        for rows, c in groups:
            xg = x if rows is None else x.index_select(0, rows)  # (b, T, C)
            y = self.base_layer(xg) if c == 0 else self._sliced(xg, self.widths[c])
            n = xg.shape[0]
            executed += mlp_flops(n * T, C, self.widths[c], self.gated)
            units += n * self.widths[c] / self.widths[0]
            out = y if rows is None else (torch.zeros_like(x) if out is None else out).index_copy(0, rows, y)
        self.state.stats.append(SubLayerStats(self.layer_idx, "mlp", dense, executed, unit_fraction=units / B))
        return out

    def _sliced(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """The MLP on its first `width` hidden neurons only. x: (b, T, C) -> (b, T, C)."""
        w = self.spec.mlp_weights(self.base_layer)
        h = F.linear(x, w.up_w[:width], None if w.up_b is None else w.up_b[:width])  # (b, T, width)
        if self.gated:
            h = w.act(F.linear(x, w.gate_w[:width], None if w.gate_b is None else w.gate_b[:width])) * h
        else:
            h = w.act(h)
        return F.linear(h, w.down_w[:, :width], w.down_b)  # (b, T, C)


class _AttentionView:
    """The base attention as transformers' attention functions see it, with the K / V repetition of the slice."""

    def __init__(self, base: nn.Module, num_key_value_groups: int):
        self._base = base
        self.num_key_value_groups = num_key_value_groups

    def __getattr__(self, name: str):
        return getattr(self._base, name)


class NestedAttention(NestedSubLayer):
    def __init__(self, base_layer, layer_idx, spec, dims, state, head_counts: tuple[int, ...],
                 kv_counts: tuple[int, ...]):
        super().__init__(base_layer, layer_idx, spec, dims, state)
        self.head_counts = head_counts  # query heads at each menu index; head_counts[0] = H
        self.kv_counts = kv_counts  # KV groups those heads read: ceil(heads / n_rep)
        self.n_rep = dims["H"] // dims["KVH"]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        x = hidden_states  # (B, T, C)
        B, T, C = x.shape
        d = self.dims
        groups = batch_groups(self.state.attn[self.layer_idx], B, f"attention of layer {self.layer_idx}")
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "layer_past") if kwargs.get(k) is not None), None)
        cache = getattr(cache, "self_attention_cache", cache)  # GPT-2 may wrap it in an EncoderDecoderCache
        past = cache.get_seq_length(self.layer_idx) if cache is not None and self._cached(cache) else 0
        dense = dense_attention_flops(B, T, past + T, C, d["H"], d["KVH"], d["D"])
        if cache is not None:
            self._check_cache_groups(cache, groups, B, x.device)
        if groups == [(None, 0)]:  # full width: the base sub-layer, untouched
            self.state.stats.append(SubLayerStats(self.layer_idx, "attn", dense, dense))
            return self.base_layer(hidden_states, *args, **kwargs)
        if args:
            raise ConfigError(f"{type(self.base_layer).__name__} was called with positional arguments besides the "
                              "hidden states; nested attention needs them as keywords (an unsupported transformers "
                              "version?)")
        out, executed, units = self._sliced(x, groups, cache, past, kwargs)
        self.state.stats.append(SubLayerStats(self.layer_idx, "attn", dense, executed, unit_fraction=units / B))
        return out, None

    def _sliced(self, x, groups, cache, past: int, kwargs):
        B, T, C = x.shape
        D, KVH = self.dims["D"], self.dims["KVH"]
        w = self.spec.attention_weights(self.base_layer)
        cos_sin = kwargs.get("position_embeddings") if self.spec.rotary and w.rotary else None
        mask = kwargs.get("attention_mask")  # the model's own mask for this layer (its sliding window included)
        extra = {k: v for k, v in kwargs.items() if k not in _LAYER_KWARGS}
        if w.softcap is not None:  # the family's attention function caps the logits (Gemma 2)
            extra["softcap"] = w.softcap
        whole_norm = w.q_norm is not None and not w.qk_norm_per_head  # OLMo 2: QK-norm spans every head
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.base_layer.config._attn_implementation, None)
        if attend is None:  # eager: the family's own function, as the base module would call it
            attend = self._eager()

        # ---- q / k / v of each group, on its slice of the projections ----
        parts = []
        for rows, c in groups:
            xg = x if rows is None else x.index_select(0, rows)  # (b, T, C)
            b, nq, ng = xg.shape[0], self.head_counts[c], self.kv_counts[c]
            if whole_norm:  # the norm needs the whole projection: computed in full, then sliced
                q = norm_heads(F.linear(xg, w.q_w, w.q_b), D, w.q_norm, False)[:, :, :nq]  # (b, T, nq, D)
                k = norm_heads(F.linear(xg, w.k_w, w.k_b), D, w.k_norm, False)[:, :, :ng]  # (b, T, ng, D)
            else:
                q = norm_heads(F.linear(xg, w.q_w[:nq * D], None if w.q_b is None else w.q_b[:nq * D]), D, w.q_norm,
                               True)  # (b, T, nq, D)
                k = norm_heads(F.linear(xg, w.k_w[:ng * D], None if w.k_b is None else w.k_b[:ng * D]), D, w.k_norm,
                               True)  # (b, T, ng, D)
            v = F.linear(xg, w.v_w[:ng * D], None if w.v_b is None else w.v_b[:ng * D])
            q = q.transpose(1, 2)  # (b, nq, T, D)
            k = k.transpose(1, 2)  # (b, ng, T, D)
            v = v.view(b, T, ng, D).transpose(1, 2)
            if cos_sin is not None:
                cos, sin = (_rows(t, rows, B) for t in cos_sin)  # (b or 1, T, D)
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            parts.append([rows, c, q, k, v])

        # ---- the cache holds every row's K / V at the full KVH (zero where a group was not computed) ----
        if cache is not None:
            k_all = x.new_zeros(B, KVH, T, D)
            v_all = x.new_zeros(B, KVH, T, D)
            for rows, c, _, k, v in parts:
                ng = self.kv_counts[c]
                if rows is None:
                    k_all, v_all = F.pad(k, (0, 0, 0, 0, 0, KVH - ng)), F.pad(v, (0, 0, 0, 0, 0, KVH - ng))
                else:
                    k_all = k_all.index_copy(0, rows, F.pad(k, (0, 0, 0, 0, 0, KVH - ng)))
                    v_all = v_all.index_copy(0, rows, F.pad(v, (0, 0, 0, 0, 0, KVH - ng)))
            k_all, v_all = cache.update(k_all, v_all, self.layer_idx)  # (B, KVH, past + T, D)
            for part in parts:
                rows, c = part[0], part[1]
                ng = self.kv_counts[c]
                part[3] = _rows(k_all, rows, B)[:, :ng]
                part[4] = _rows(v_all, rows, B)[:, :ng]

        # ---- attention and the output projection, per group ----
        out, executed, units = None, 0, 0.0
        for rows, c, q, k, v in parts:
            b, nq, ng = q.shape[0], self.head_counts[c], self.kv_counts[c]
            if nq % self.n_rep:  # a partial last group: give each query head its own copy of its group's K / V
                head_group = torch.arange(nq, device=x.device) // self.n_rep  # (nq,)
                k, v = k.index_select(1, head_group), v.index_select(1, head_group)  # (b, nq, S, D)
                view = _AttentionView(self.base_layer, 1)
            else:
                view = _AttentionView(self.base_layer, self.n_rep)
            o, _ = attend(view, q, k, v, _rows(mask, rows, B), dropout=0.0, scaling=self.base_layer.scaling, **extra)
            o = o.reshape(b, T, nq * D)  # (b, T, nq, D) -> heads side by side
            y = F.linear(o, w.o_w[:, :nq * D], w.o_b)  # (b, T, C)
            out = y if rows is None else (x.new_zeros(B, T, C) if out is None else out).index_copy(0, rows, y)
            executed += attention_projection_flops(b * T, b * T, C, nq, ng, D) + \
                attention_score_flops(b * T, k.shape[2], nq, D)
            if whole_norm:  # the q / k rows of the heads left out, computed for the norm
                executed += 2 * b * T * C * D * (self.head_counts[0] - nq + self.kv_counts[0] - ng)
            units += b * nq / self.head_counts[0]
        return out, executed, units

    def _eager(self):
        module = __import__(type(self.base_layer).__module__, fromlist=["eager_attention_forward"])
        return module.eager_attention_forward

    # ---- bookkeeping for the KV cache ----
    def _cached(self, cache) -> bool:
        return self.layer_idx < len(getattr(cache, "layers", []))

    def _check_cache_groups(self, cache, groups, B: int, device) -> None:
        need = torch.empty(B, dtype=torch.long, device=device)
        for rows, c in groups:
            if rows is None:
                need.fill_(self.kv_counts[c])
            else:
                need[rows] = self.kv_counts[c]
        store = getattr(cache, _CACHE_GROUPS_ATTR, None)
        if store is None:
            store = {}
            setattr(cache, _CACHE_GROUPS_ATTR, store)
        held = store.get(self.layer_idx)
        if held is not None and held.shape == need.shape and self._cached(cache):
            if bool((need > held).any()):
                raise ConfigError(f"attention of layer {self.layer_idx} needs more KV groups than its cache holds "
                                  "(a sequence's width grew during a cached generation): keep each sequence's "
                                  "attention width from growing after the prompt, or generate without a cache")
            need = torch.minimum(need, held)
        store[self.layer_idx] = need
