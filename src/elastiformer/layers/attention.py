"""`ElasticAttention`: token routing and head routing around an unmodified attention module.

Token routing: the selected tokens of each sequence are gathered (order kept, padded to the longest selection in
the batch), the attention runs on them alone with their original rotary positions, and the result is scattered
back; unselected tokens neither query nor serve as keys / values in this layer, and get the layer's stand-in (a
fitted low-rank estimate of the attention's update from their own input, `layers.stand_in`; nothing while it is
unfitted, or with `attn_stand_in_rank=0`). When the rows selected different
numbers of tokens, the q / k / v and output projections run on the real tokens of the whole batch packed together,
and only the attention itself on the padded rows (`_packed`); otherwise the module itself runs on the rows. With a KV cache, this layer's cache
holds only the tokens it processed, so the wrapper keeps, on the cache object, the sequence index of every cached
entry (`-1` for batch padding) and builds the mask from those indices. Once a layer's cache holds such a routed set,
every later call of that layer attends through this mask, at full capacity and with routing disabled too:
transformers' mask describes a cache that holds every past token, which this one no longer does.

Head routing: K and V are computed for every processed token (later tokens may need them), but each query head runs
only on the tokens that chose it: q projection, attention and its slice of the output projection.

Layer 0 always runs dense under token routing: transformers reads the cache length from layer 0.

Attention variants (read from the module by the spec, `AttentionWeights`): a sliding-window layer's masks built here
also drop keys `window` or more positions back, and its cache (which keeps only its latest entries) is indexed by the
entries it still holds; the head-routed path applies the module's softmax scale, logit soft-capping, QK-norm (per
head, or over the whole projection, for which every head's query of a token is computed), partial rotary and layers
that take no rotary at all, as the module's own forward does, and so does the packed token path.

Non-causal models (encoders, `spec.causal=False`) attend with the padding mask only, no causal mask. Post-LN
sub-layers (`spec.post_norm`, BERT) return LayerNorm(input + attention) themselves: a skipped token comes out
unchanged (LayerNorm(input + stand-in) with a stand-in), and the head-routed path applies that LayerNorm to what the
active heads add.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from ..arch import ArchSpec, get_dotted
from ..flops import attention_projection_flops, attention_score_flops, dense_attention_flops
from .lora import HeadPathLoRA, LoRALinear
from ..routers import HeadRouter, TokenRouter
from .mlp import contiguous_runs
from .stand_in import StandIn
from .state import ElasticSubLayer, RoutingState, SubLayerStats, views_per_weights

_CACHE_INDEX_ATTR = "_elastiformer_kv_index"  # {layer_idx: (B, P) long} sequence index of each cached entry
_CACHE_ROUTED_ATTR = "_elastiformer_kv_routed"  # {layer_idx}: layers whose cache skips tokens (or pads rows)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, T, ...), idx: (B, m) -> (B, m, ...)."""
    view = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return x.gather(1, view)


def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of each row, in order, padded to the longest row.

    mask: (B, T) bool -> idx (B, m) long, slot_valid (B, m) bool (False where a row ran out of True entries).
    """
    counts = mask.sum(dim=1)  # (B,)
    m = int(counts.max()) if mask.numel() else 0
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :m]  # selected first, original order
    slot_valid = torch.arange(m, device=mask.device)[None, :] < counts[:, None]
    return idx, slot_valid


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (transformers' `rotate_half` convention). x: (B, heads, m, D), cos/sin: (B, m, R).

    Partial rotary (Phi, StableLM, GPT-NeoX): cos / sin cover the first R < D features, the rest pass unchanged."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return torch.cat([rotate(x[..., :R], cos, sin), x[..., R:]], dim=-1)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def norm_heads(x: torch.Tensor, D: int, norm: nn.Module | None, per_head: bool) -> torch.Tensor:
    """Projected q or k, x: (B, m, heads*D) -> (B, m, heads, D), QK-normed as the family's attention does it: each
    head's D features (Qwen3, Gemma 3), or the whole projection before the split into heads (OLMo 2)."""
    if norm is not None and not per_head:
        x = norm(x)
    x = x.unflatten(-1, (-1, D))  # (B, m, heads, D)
    return norm(x) if norm is not None and per_head else x


def keys_values(x: torch.Tensor, w, lora: HeadPathLoRA, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K (QK-normed where the family does) and V of every token of x (..., C), adapters included.
    -> (..., KVH, D) each."""
    k = norm_heads(lora.add(F.linear(x, w.k_w, w.k_b), "k"), D, w.k_norm, w.qk_norm_per_head)
    v = lora.add(F.linear(x, w.v_w, w.v_b), "v").unflatten(-1, (-1, D))
    return k, v


def attend(q, k, v, mask, scaling: float, softcap: float | None) -> torch.Tensor:
    """softmax(q k^T * scaling [soft-capped] + mask) v. q: (B, h, m, D), k / v: (B, h, kv, D), mask: (B, 1, m, kv),
    or None: every key for every query."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    logits = q @ k.transpose(-1, -2) * scaling  # (B, h, m, kv)
    logits = torch.tanh(logits / softcap) * softcap  # Gemma 2 caps the logits before the mask
    logits = logits if mask is None else logits + mask
    return logits.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


class ElasticAttention(ElasticSubLayer):
    # token routing over rows that selected different numbers of tokens: project only the real tokens, packed
    # (False: the module runs on the rows padded to the longest selection, as before; the same function)
    pack_rows = True

    def __init__(self, base_layer: nn.Module, layer_idx: int, spec: ArchSpec, dims: dict[str, int],
                 state: RoutingState, token_router: TokenRouter | None, head_router: HeadRouter | None,
                 stand_in: StandIn | None = None):
        super().__init__(base_layer, layer_idx, spec, dims, state)
        self.token_router = token_router
        self.head_router = head_router
        self.stand_in = stand_in  # what a token that skips this attention gets (None, or unfitted: nothing)
        # the adapters inside the unmodified attention (set before it is wrapped), found once, not per call
        self._adapters: tuple[LoRALinear, ...] = tuple(m for m in base_layer.modules() if isinstance(m, LoRALinear))
        # this layer's window (sliding-window layers, alone or mixed with global ones): the masks built here apply it
        self.sliding_window = spec.attention_weights(base_layer).sliding_window

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs):
        # BERT and ViT pass the mask positionally, Llama and GPT-2 by name: from here on it is a keyword
        kwargs["attention_mask"] = attention_mask
        st = self.state
        d = self.dims
        x = hidden_states  # (B, T, C)
        B, T, C = x.shape
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "layer_past") if kwargs.get(k) is not None), None)
        cache = getattr(cache, "self_attention_cache", cache)  # GPT-2 may wrap it in an EncoderDecoderCache
        dense = dense_attention_flops(B, T, st.past_len + T, C, d["H"], d["KVH"], d["D"])
        tok_cap = st.layer_capacity("attn_tokens", self.layer_idx) if self.token_router is not None else 1.0
        head_cap = st.layer_capacity("attn_heads", self.layer_idx) if self.head_router is not None else 1.0

        if st.teacher_targets and not st.enabled:
            if cache is not None:
                self._remember_index(cache, self._cached_index(cache, B, x.device),
                                     st.current_positions(T, x.device).expand(B, T))
            st.stats.append(SubLayerStats(self.layer_idx, "attn", dense, dense))
            return self._teacher_with_targets(x, args, kwargs)
        self.learn_on_student(x)
        if st.method == "static" and self.token_router is not None and tok_cap < 1.0:
            if st.statically_dropped("attn_tokens", self.layer_idx):  # baseline: the whole sub-layer is skipped
                if cache is not None:
                    self._remember_nothing(cache, B, x.device)
                st.stats.append(SubLayerStats(self.layer_idx, "attn", dense, self.skip_flops(B * T), 0, 0.0, 0.0))
                return self.skipped_output(x), None
            tok_cap = 1.0
        if tok_cap <= 0.0 or head_cap <= 0.0:  # allocated nothing: the sub-layer is skipped for every token
            if cache is not None:
                self._remember_nothing(cache, B, x.device)
            st.stats.append(SubLayerStats(self.layer_idx, "attn", dense, self.skip_flops(B * T), 0, 0.0, 0.0))
            return self.skipped_output(x), None
        skip_padding = st.skips_padding(B, T, x.device)  # non-causal and padded: no cache, nothing to remember
        if tok_cap >= 1.0 and head_cap >= 1.0 and not skip_padding:  # full capacity: the base sub-layer, untouched
            return self._full_capacity(hidden_states, args, kwargs, cache, dense)
        # the cached entries' indices, looked up only where they are used: a layer at full capacity needs them only
        # if its cache keeps them (`_full_capacity`), so a decode step of a dense layer costs the module's own
        past = self._cached_index(cache, B, x.device)  # (B, P)

        if B * T == 1 and tok_cap < 1.0 and not st.topk and not torch.is_grad_enabled() \
                and self.token_router.calibration_log is None:
            return self._one_token(x, args, kwargs, cache, past, tok_cap, head_cap, dense)

        # ---- which tokens this layer processes ----
        positions = st.current_positions(T, x.device).expand(B, T)  # (B, T) sequence index of each token
        valid = st.token_valid(B, T, x.device)
        router_flops = 0
        if tok_cap < 1.0:
            sel = self.token_router(x, tok_cap, valid, st.forced_tokens(B, T, x.device), topk=st.route_topk,
                                    method=st.method, self_target=st.topk and not st.teacher_targets,
                                    generator=st.generator)
            router_flops += self.token_router.flops(B * T) if st.method == "learned" else 0
            if sel.aux_loss is not None:
                st.aux_losses["token_bce"].append(sel.aux_loss)
            idx, slot_valid = compact(sel.selected)  # (B, m)
            x_sub = gather_rows(x, idx)  # (B, m, C)
            gate = gather_rows(sel.gate, idx)[..., None]  # (B, m, 1)
            n_real = int(slot_valid.sum())  # the processed tokens, one host read
            token_fraction = n_real / max(1, st.n_valid(B, T, x.device))
            compacted = True
        elif skip_padding:  # every real token, none of the padding
            idx, slot_valid = st.per_call(("real_rows", B, T, x.device), lambda: compact(valid))  # (B, m)
            x_sub, gate, token_fraction, compacted = gather_rows(x, idx), None, 1.0, True  # (B, m, C)
            n_real = st.n_valid(B, T, x.device)
        else:
            idx = slot_valid = None  # every token, in order, every slot real
            x_sub, gate, token_fraction, compacted = x, None, 1.0, False
            n_real = B * T
        m = x_sub.shape[1]
        if m == 0:  # no token chose this layer (e.g. a skipped decode step): nothing attends, nothing is cached
            return self._none_selected(x, cache, past, dense, router_flops, valid)
        # (B, m) sequence index of each processed token, -1 marks batch padding
        q_pos = torch.where(slot_valid, positions.gather(1, idx), -1) if compacted else positions
        kv_len = past.shape[1] + m  # the keys: the cached entries and this call's
        # (B, 1, m, P + m); None: one query at batch 1 that may attend to every key (decoding without padding)
        mask = None if self._attends_to_every_key(B, m) else \
            self._additive_mask(q_pos, torch.cat([past, q_pos], dim=1), x.dtype)  # keys' sequence index (B, P + m)

        kw = dict(kwargs)
        kw["attention_mask"] = mask
        if compacted and kw.get("position_embeddings") is not None:  # (not compacted: every token, in order)
            cos, sin = kw["position_embeddings"]  # (B or 1, T, D)
            kw["position_embeddings"] = (gather_rows(cos.expand(B, -1, -1), idx), gather_rows(sin.expand(B, -1, -1), idx))
        if compacted and kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"].expand(B, -1).gather(1, idx)

        if head_cap < 1.0:
            out_sub, flops, unit_fraction = self._head_routed(x_sub, slot_valid, mask, kw, cache, head_cap, q_pos)
            out_sub = self.finish(out_sub, x_sub, self.weights().norm)
            router_flops += self.unit_router_flops("attn_heads", self.head_router, B * m)
        elif n_real < B * m and self.pack_rows:  # rows of different lengths: no projection on the padding slots
            out_sub, flops = self._packed(x_sub, slot_valid, mask, kw, cache)
            out_sub = self.finish(out_sub, x_sub, self.weights().norm)
            unit_fraction = 1.0
        else:
            out_sub = self.base_layer(x_sub, *args, **kw)[0]  # (B, m, C)
            flops = attention_projection_flops(B * m, B * m, C, d["H"], d["KVH"], d["D"]) + \
                attention_score_flops(B * m, kv_len, d["H"], d["D"]) + self.adapter_flops(B * m)
            unit_fraction = 1.0
        if cache is not None:
            self._remember_index(cache, past, q_pos, routed=gate is not None)

        if compacted:  # scatter the processed tokens back; skipped ones get the stand-in (or leave the stream alone)
            if gate is not None:
                out_sub = self.apply_gate(out_sub, x_sub, gate)
            flat = (idx + torch.arange(B, device=x.device)[:, None] * T)[slot_valid]  # (n,) into (B*T)
            skipped = valid & ~sel.selected if tok_cap < 1.0 else None  # (B, T) the skipped real tokens
            out, stand_in_flops = self.scatter(x.reshape(B * T, C), flat, out_sub[slot_valid], skipped)
            out, flops = out.view(B, T, C), flops + stand_in_flops
        else:
            out = out_sub
        st.stats.append(SubLayerStats(self.layer_idx, "attn", dense, flops + router_flops, router_flops,
                                      token_fraction, unit_fraction))
        return out, None

    def adapter_flops(self, n_rows: int) -> int:
        """FLOPs of the active adapters when each projection of the attention runs on `n_rows` rows."""
        return sum(m.flops(n_rows) for m in self._adapters)

    def _remember_nothing(self, cache, B: int, device) -> None:
        """A call that skipped this layer for every token added no entry to its cache: its index says so."""
        past = self._cached_index(cache, B, device)  # (B, P)
        self._remember_index(cache, past, past[:, :0])

    def _full_capacity(self, hidden_states: torch.Tensor, args, kwargs, cache, dense: int):
        """The base sub-layer, untouched, on every token. Its cached entries' indices are read and extended only
        where the cache keeps them (an earlier routed call of this layer cached a subset); else the cache holds
        every token in order and nothing is looked up: the cost of a decode step of a layer held dense is the
        module's own."""
        st = self.state
        B, T, _ = hidden_states.shape
        if cache is not None and self._keeps_index(cache):
            past = self._cached_index(cache, B, hidden_states.device)  # (B, P)
            current = st.current_positions(T, hidden_states.device).expand(B, T)  # (B, T)
            if self._cache_routed(cache):  # the unmodified sub-layer must attend through the cached indices
                kwargs["attention_mask"] = self._cached_entries_mask(past, current, hidden_states.dtype)
            self._remember_index(cache, past, current)
        st.stats.append(SubLayerStats(self.layer_idx, "attn", dense, dense + self.adapter_flops(B * T)))
        return self.base_layer(hidden_states, *args, **kwargs)

    def _one_token(self, x, args, kwargs, cache, past, capacity: float, head_capacity: float, dense: int):
        """Decoding one token (batch 1) with token routing: one score and one host read decide whether the attention
        runs on `x` as it is (the module itself, or its routed heads) or not at all, without the gathers, index
        bookkeeping and mask of the batched path. At batch 1 every cached entry is a real earlier token, so the
        query may attend to all of them: no mask is built unless the call has padding or the layer a sliding
        window. x: (1, 1, C)."""
        st = self.state
        d = self.dims
        selected, head_logits = self.one_token_choice(x, capacity, "attn_heads", self.head_router, head_capacity)
        router_flops = self.token_router.flops(1) if st.method == "learned" else 0
        if not selected:  # skipped: only the stand-in's weights (if any) are read, nothing is cached
            return self._none_selected(x, cache, past, dense, router_flops)
        current = st.current_positions(1, x.device).expand(1, 1)  # (1, 1)
        unit_fraction = 1.0
        if head_capacity < 1.0:  # the token's heads only (they update the cache themselves)
            mask = self._cached_entries_mask(past, current, x.dtype)  # (1, 1, 1, P + 1), or None: every key
            out, flops, unit_fraction = self._head_routed(x, None, mask, kwargs, cache, head_capacity, current,
                                                          head_logits)
            out = self.finish(out, x, self.weights().norm)  # (1, 1, C)
            router_flops += self.unit_router_flops("attn_heads", self.head_router, 1)
        else:
            if self._cache_routed(cache):  # transformers' mask assumes every past token is cached, in order
                kwargs["attention_mask"] = self._cached_entries_mask(past, current, x.dtype)
            out = self.base_layer(x, *args, **kwargs)[0]  # (1, 1, C)
            flops = attention_projection_flops(1, 1, d["C"], d["H"], d["KVH"], d["D"]) + \
                attention_score_flops(1, past.shape[1] + 1, d["H"], d["D"]) + self.adapter_flops(1)
        if cache is not None:
            self._remember_index(cache, past, current, routed=True)
        st.stats.append(SubLayerStats(self.layer_idx, "attn", dense, flops + router_flops, router_flops, 1.0,
                                      unit_fraction))
        return out, None

    def _none_selected(self, x, cache, past, dense: int, router_flops: int, valid: torch.Tensor | None = None):
        """Token routing chose no token of the batch: only the router ran (and the stand-in, on the real tokens); no
        mask, rotary or projection is built. valid: (B, T) the real tokens (None: every token)."""
        if cache is not None:
            self._remember_index(cache, past, past[:, :0], routed=True)
        B, T, C = x.shape
        if valid is None or not self.stands_in():
            out, stand_in_flops = self.skipped_output(x), self.skip_flops(B * T)
        else:
            none = torch.zeros(0, dtype=torch.long, device=x.device)  # (0,) no processed token
            out, stand_in_flops = self.scatter(x.reshape(B * T, C), none, x.new_zeros(0, C), valid)
            out = out.view(B, T, C)
        self.state.stats.append(SubLayerStats(self.layer_idx, "attn", dense, router_flops + stand_in_flops,
                                              router_flops, 0.0, 1.0))
        return out, None

    # ---- training targets, measured on the teacher ----
    def _teacher_with_targets(self, x, args, kwargs):
        """Teacher pass of training: the dense attention, plus what each token and each head adds to the residual
        stream, turned into the routers' supervised targets."""
        st = self.state
        B, T, _ = x.shape
        head_cap = st.budget_capacity("attn_heads", self.layer_idx) if self.head_router is not None else 1.0
        if st.importance_log is not None and self.head_router is not None:
            head_cap = min(head_cap, 0.5)  # fit_static wants every head's importance, whatever the budget
        captured = {}
        hook = None
        if head_cap < 1.0:  # the heads' outputs, side by side, are the input of the output projection
            o_proj = get_dotted(self.base_layer, self.spec.o_proj_name)
            hook = o_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("heads", a[0]))
        try:
            out = self.base_layer(x, *args, **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        if self.token_router is not None:  # what skipping would remove: the output, less what a skipped token gets
            extra = None
            if st.key_value_targets and st.sensitivity_probes is None and st.importance_log is None \
                    and st.past_len == 0:
                extra = self.key_value_importance(x, kwargs)
            out = (self.teach_token_router(x, out[0], out[0] - self.skipped_output(x), extra), *out[1:])
        with torch.enable_grad():
            if head_cap < 1.0:
                H, D = self.dims["H"], self.dims["D"]
                o_w = self.weights().o_w  # (C, H*D)
                heads = captured["heads"].view(B, T, H, D)
                share = torch.einsum("bthd,chd->bthc", heads, o_w.view(-1, H, D))  # (B, T, H, C) each head's output
                importance = share.norm(dim=-1)  # (B, T, H)
                if st.importance_log is not None:
                    r = self.head_router  # static baseline: one importance per head (or KV group)
                    per_unit = importance.unflatten(-1, (r.n_units, r.n_rep)).sum(-1) if r.n_rep > 1 else importance
                    st.importance_log[id(r)].append(per_unit.flatten(0, 1).mean(0))
                else:
                    st.add_target_loss("head_rank", self.head_router, x.detach(), importance.detach(), head_cap)
        return out

    @torch.no_grad()
    def key_value_importance(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """What each token is worth to the other tokens as a key / value, in the units of an update's norm: a token
        this layer skips is no key for anyone, so each query i that attended to it (weight a_ij, per head) moves by
        a_ij / (1 - a_ij) * (o_i - v_j) (the softmax renormalised without j), projected by that head's slice of the
        output projection. Summed over heads and over the other real queries. Its own update is not counted here
        (the caller adds it). On the teacher, dense attention recomputed in float32 (q, k, v, rotary, QK-norm,
        grouped KV, soft-capping, sliding window, causal and padding masks as the layer applies them); the norms
        after the projection come from each head's Gram matrix W_o^T W_o (D x D), so no (T, T, C) tensor is built.
        x: (B, T, C) -> (B, T)."""
        st = self.state
        B, T, C = x.shape
        H, KVH, D = self.dims["H"], self.dims["KVH"], self.dims["D"]
        w = self.weights()
        lora = HeadPathLoRA(w, x)
        q = norm_heads(lora.add(F.linear(x, w.q_w, w.q_b), "q"), D, w.q_norm, w.qk_norm_per_head)  # (B, T, H, D)
        k, v = keys_values(x, w, lora, D)  # (B, T, KVH, D) each
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, heads, T, D)
        cos_sin = kwargs.get("position_embeddings") if self.spec.rotary and w.rotary else None
        if cos_sin is not None:
            cos, sin = (t.float() for t in cos_sin)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = (t.repeat_interleave(H // KVH, dim=1) for t in (k, v))  # (B, KVH, T, D) -> (B, H, T, D)
        logits = q @ k.transpose(-1, -2) * self._scaling(w)  # (B, H, T, T)
        if w.softcap is not None:
            logits = torch.tanh(logits / w.softcap) * w.softcap
        positions = st.current_positions(T, x.device).expand(B, T)
        a = (logits + self._additive_mask(positions, positions, torch.float32)).softmax(-1)  # (B, H, Tq, Tk)
        o = a @ v  # (B, H, T, D)
        w_o = w.o_w.float().view(C, H, D).transpose(0, 1)  # (H, C, D) each head's columns of the projection
        gram = w_o.transpose(1, 2) @ w_o  # (H, D, D)
        o_g, v_g = o @ gram, v @ gram  # (B, H, T, D)
        # |(o_i - v_j) W_o|^2 = o_i G o_i + v_j G v_j - 2 o_i G v_j
        dist2 = (o_g * o).sum(-1)[..., :, None] + (v_g * v).sum(-1)[..., None, :] - 2 * o_g @ v.transpose(-1, -2)
        weight = a / (1 - a).clamp(min=1e-3)  # (B, H, Tq, Tk) how far query i moves per unit of (o_i - v_j)
        weight = weight * st.token_valid(B, T, x.device)[:, None, :, None]  # real queries only
        weight = weight.masked_fill(torch.eye(T, dtype=torch.bool, device=x.device), 0.0)  # not its own query
        return (weight * dist2.clamp(min=0).sqrt()).sum(dim=(1, 2))  # (B, Tk)

    def weights(self):
        """The attention's weights (`ArchSpec.attention_weights`), looked up once per model call: a decode step
        would otherwise rebuild them two or three times in every layer (views and adapters, a few dozen attribute
        reads each)."""
        return self.state.per_call(("attention_weights", self.layer_idx),
                                   lambda: self.spec.attention_weights(self.base_layer))

    def output_norm(self) -> nn.Module | None:
        return self.weights().norm

    def _scaling(self, w) -> float:
        """The softmax scale the module applies (BERT keeps it on its inner `self`, not on the wrapped module)."""
        return w.scaling or getattr(self.base_layer, "scaling", None) or self.dims["D"] ** -0.5

    # ---- token routing across a batch: projections on the selected tokens only, packed ----
    def _packed(self, x, slot_valid, mask, kw, cache) -> tuple[torch.Tensor, int]:
        """The attention of compacted rows that hold different numbers of tokens, without projecting the padding
        slots: q / k / v and the output projection run on the real tokens of the whole batch packed together
        (n of the B*m slots); only the attention itself runs on the padded rows, whose padding the mask hides.
        Padding slots get zero keys and values (marked -1 in the cache index, never attended).
        x: (B, m, C), slot_valid: (B, m), mask: (B, 1, m, kv). -> what the sub-layer adds (output projection with
        its bias, before any post-LN), (B, m, C); the FLOPs that ran."""
        d = self.dims
        B, m, C = x.shape
        H, KVH, D = d["H"], d["KVH"], d["D"]
        w = self.weights()
        rows = slot_valid.flatten().nonzero().squeeze(1)  # (n,) the real slots among B*m
        n = rows.numel()
        xp = x.reshape(B * m, C).index_select(0, rows)  # (n, C)
        lora = HeadPathLoRA(w, xp)  # q / k / v adapters on the packed tokens (a fused c_attn shares one A)
        q = norm_heads(lora.add(F.linear(xp, w.q_w, w.q_b), "q"), D, w.q_norm, w.qk_norm_per_head)  # (n, H, D)
        k, v = keys_values(xp, w, lora, D)  # (n, KVH, D) each

        def padded(t: torch.Tensor) -> torch.Tensor:  # (n, h, D) -> (B, h, m, D), zeros in the padding slots
            return t.new_zeros(B * m, *t.shape[1:]).index_copy(0, rows, t).view(B, m, *t.shape[1:]).transpose(1, 2)

        q, k, v = padded(q), padded(k), padded(v)
        cos_sin = kw.get("position_embeddings") if self.spec.rotary and w.rotary else None
        if cos_sin is not None:  # (B, m, R) already gathered for the compacted rows
            q, k = rotate(q, *cos_sin), rotate(k, *cos_sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, KVH, P + m, D)
        kv_len = k.shape[2]
        if KVH != H:  # grouped-query attention: each KV head serves H // KVH query heads
            k, v = k.repeat_interleave(H // KVH, dim=1), v.repeat_interleave(H // KVH, dim=1)  # (B, H, kv, D)
        o = attend(q, k, v, mask, self._scaling(w), w.softcap)  # (B, H, m, D)
        o = o.transpose(1, 2).reshape(B * m, H * D).index_select(0, rows)  # (B, H, m, D) -> (n, H*D)
        out = F.linear(o, w.o_w, w.o_b)  # (n, C)
        flops = attention_projection_flops(n, n, C, H, KVH, D) + attention_score_flops(B * m, kv_len, H, D) + lora.flops
        if w.o_lora is not None:
            out = out + w.o_lora(o).to(out.dtype)
            flops += w.o_lora.flops(n)
        return out.new_zeros(B * m, C).index_copy(0, rows, out).view(B, m, C), flops

    # ---- head routing: each query head runs only on the tokens that chose it ----
    def _head_routed(self, x, slot_valid, mask, kw, cache, capacity, q_pos, logits: list[float] | None = None):
        """What the active heads add (output projection with its bias), before any post-LN. -> (B, m, C). logits:
        decoding one token at batch 1, the head router's logits already on the host (see `_one_token`).

        The heads run together, not one by one: the tokens that chose each used head are packed into buckets, heads
        whose buckets have about the same length share one batched q projection, attention and output projection
        (see `head_buckets`), so the mask rows are gathered once per group of heads, not per head."""
        d = self.dims
        B, m, C = x.shape
        H, KVH, D = d["H"], d["KVH"], d["D"]
        w = self.weights()
        scaling = self._scaling(w)
        st = self.state
        whole_q_norm = w.q_norm is not None and not w.qk_norm_per_head  # OLMo 2: over the whole q projection
        pinned = st.pinned_scores("attn_heads", self.layer_idx)  # (U,) the same heads for every token, or None
        # decoding one token per row: the runs-of-heads path (a whole-projection QK-norm needs every head's query)
        one_token = m == 1 and not torch.is_grad_enabled() and w.q_lora is None and w.o_lora is None \
            and not whole_q_norm
        if one_token and B == 1:  # the token's heads as a list, decided on the host: no (B, m, H) mask is built
            position = st.per_call(("one_token_position",), lambda: int(st.real_positions(q_pos)))  # one host read
            if pinned is not None and logits is None:  # a pinned unit: its scores, already on the host
                logits = st.pinned_host_scores("attn_heads", self.layer_idx)
            used = self.head_router.one_token_heads(x, capacity, position, method=st.method, generator=st.generator,
                                                    layer=self.layer_idx, logits=logits, pinned=pinned)
            heads = active = None
        else:
            used = None
            heads = self.head_router(x, capacity, method=st.method, generator=st.generator,
                                     positions=st.real_positions(q_pos), layer=self.layer_idx,
                                     pinned=pinned)  # (B, m, H)
        lora = HeadPathLoRA(w, x)  # the adapters' updates (if any), as thin matmuls, and their FLOPs
        k, v = (t.transpose(1, 2) for t in keys_values(x, w, lora, D))  # (B, KVH, m, D) each
        cos_sin = kw.get("position_embeddings") if self.spec.rotary and w.rotary else None
        if cos_sin is not None:
            k = rotate(k, *cos_sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, KVH, P + m, D)
        if heads is not None:
            active = heads.active if slot_valid is None else heads.active & slot_valid[..., None]  # (B, m, H)
        flops = attention_projection_flops(0, B * m, C, H, KVH, D)
        q_all = None  # a norm over the whole q projection (OLMo 2) needs every head's query of the token
        if whole_q_norm:
            q_all = norm_heads(lora.add(F.linear(x, w.q_w, w.q_b), "q"), D, w.q_norm, False)  # (B, m, H, D)
            flops += 2 * B * m * C * H * D
        unit_fraction = None
        if one_token:
            out, head_flops, n_used = self._one_token_heads(x, w, k, v, mask, cos_sin, active, scaling, used)
            flops += head_flops
            if B == 1:  # the row's heads are the used ones: no host read of the active mask
                unit_fraction = n_used / H
        else:
            out = x.new_zeros(B * m + 1, C)  # (B*m + 1, C): the last row takes the bucket padding, then is dropped
            for bk in head_buckets(active):  # a few groups of heads with similar token counts, never one per token
                flops += self._run_head_bucket(bk, x, w, lora, k, v, mask, cos_sin, heads.gate, scaling, out, q_all)
            out = out[:-1]
        out = lora.finish_output(out)
        flops += lora.flops
        if w.o_b is not None:
            out = out + w.o_b
        if unit_fraction is None:
            n_slots = B * m if slot_valid is None else int(slot_valid.sum())
            unit_fraction = float(active.sum()) / max(1, n_slots * H)
        return out.view(B, m, C), flops, unit_fraction

    def _one_token_heads(self, x, w, k, v, mask, cos_sin, active, scaling, heads: list[int] | None = None
                         ) -> tuple[torch.Tensor, int, int]:
        """Decoding, one token per row: the heads some row chose, taken in runs of adjacent heads, each a contiguous
        slice of the q rows and o columns (views: no weight is copied); a row's heads it did not choose are zeroed
        before the output projection. x: (B, 1, C), k / v: (B, KVH, kv, D), mask: (B, 1, 1, kv), active: (B, 1, H).
        -> (B, C) what the heads add (no bias), FLOPs, how many heads ran."""
        B, _, C = x.shape
        D = self.dims["D"]
        if heads is None:  # the heads some row chose: one read per layer
            heads = active[:, 0].any(dim=0).nonzero().squeeze(1).tolist()
        if not heads:
            return x.new_zeros(B, C), 0, 0
        U, kv_len = len(heads), k.shape[2]
        plan = self._head_runs(w, heads, x.device)
        xf = x.view(B, C)  # (B, 1, C) -> (B, C)
        q = [F.linear(xf, q_w, q_b) for q_w, q_b in plan.q]  # per run of heads: (B, run*D)
        q = q[0] if len(q) == 1 else torch.cat(q, dim=1)  # (B, U*D)
        q = q.view(B, U, 1, D)  # (B, U*D) -> (B, U, 1, D)
        if w.q_norm is not None:  # (per head here: a whole-projection norm takes the bucket path)
            q = w.q_norm(q)
        if cos_sin is not None:
            q = rotate(q, *cos_sin)
        # the heads of one KV group attend together, as the group's queries (transformers' `pack_gqa`): the cache is
        # read once per used group, never copied per head; a used group's unused heads get zero queries, dropped
        n_rep, G = self.dims["H"] // self.dims["KVH"], plan.n_groups
        if plan.slots is not None:  # (B, U, 1, D) -> (B, G*n_rep, D), zeros for the unused heads
            q = q.new_zeros(B, G * n_rep, D).index_copy(1, plan.slots, q.view(B, U, D))
        q = q.reshape(B, G, n_rep, D)  # (B, G*n_rep, D) -> (B, G, n_rep, D)
        k_g, v_g = (t if plan.kv_groups is None else t[:, plan.kv_groups] if isinstance(plan.kv_groups, slice)
                    else t.index_select(1, plan.kv_groups) for t in (k, v))  # (B, G, kv, D): views unless scattered
        o = attend(q, k_g, v_g, mask, scaling, w.softcap)  # (B, G, n_rep, D)
        o = o.reshape(B, G * n_rep, D)  # (B, G, n_rep, D) -> (B, G*n_rep, D)
        if plan.slots is not None:
            o = o.index_select(1, plan.slots)  # (B, U, D)
        if B > 1:  # a head another row chose runs here too: its output is dropped
            o = o * active[:, 0, heads].to(o.dtype)[:, :, None]
        o = o.reshape(B, U * D)  # (B, U, D) -> (B, U*D)
        out, start = None, 0
        for o_w in plan.o:
            width = o_w.shape[1]
            part = F.linear(o[:, start:start + width], o_w)  # (B, C)
            out = part if out is None else out + part
            start += width
        return out, 2 * B * U * C * D * 2 + attention_score_flops(B * plan.n_groups * n_rep, kv_len, 1, D), U

    def _head_runs(self, w, heads: list[int], device) -> "HeadRuns":
        """The weight views and KV groups of one set of heads (sorted), made once per set and reused (see
        `views_per_weights`): a decode step would otherwise slice the q rows and o columns of every run and build
        the group tensor again in every layer."""
        def make() -> HeadRuns:
            H, KVH, D = self.dims["H"], self.dims["KVH"], self.dims["D"]
            n_rep = H // KVH
            runs = [slice(a * D, (b + 1) * D) for a, b in contiguous_runs(heads)]  # q rows / o columns of each run
            groups = sorted({h // n_rep for h in heads})  # the KV groups the heads read
            group_runs = contiguous_runs(groups)
            if len(groups) == KVH:
                kv_groups = None  # every group: the cache as it is
            elif len(group_runs) == 1:
                kv_groups = slice(group_runs[0][0], group_runs[0][1] + 1)  # one run of groups: a view
            else:
                kv_groups = torch.tensor(groups, device=device)  # (G,) scattered groups: one small copy per step
            slot_of = {g: i for i, g in enumerate(groups)}
            slots = [slot_of[h // n_rep] * n_rep + h % n_rep for h in heads]  # each head's place among G*n_rep
            return HeadRuns(q=[(w.q_w[r], None if w.q_b is None else w.q_b[r]) for r in runs],
                            o=[w.o_w[:, r] for r in runs], n_groups=len(groups), kv_groups=kv_groups,
                            slots=None if slots == list(range(len(groups) * n_rep))
                            else torch.tensor(slots, device=device))
        return views_per_weights(self, (w.q_w, w.o_w), tuple(heads), make)

    def _run_head_bucket(self, bk: "HeadBuckets", x, w, lora, k, v, mask, cos_sin, gate, scaling, out,
                         q_all=None) -> int:
        """Heads `bk.heads` on their tokens: q projection, attention, gate and output projection as batched matmuls
        over the heads, added into `out` (B*m + 1, C; its last row takes the bucket padding). x: (B, m, C), k / v:
        (B, KVH, kv, D), mask: (B, 1, m, kv), gate: (B, m, H); q_all: (B, m, H, D) every head's query when the
        family normalises the whole q projection (else each head's q is projected here). -> the FLOPs that ran
        (bucket padding included)."""
        B, m, C = x.shape
        H, KVH, D = self.dims["H"], self.dims["KVH"], self.dims["D"]
        U, L, kv_len = bk.n_heads, bk.length, k.shape[2]
        flat = bk.flat_tokens()  # (U*B*L,) into (B*m), head-major
        if q_all is None:
            q = head_query(x.reshape(B * m, C).index_select(0, flat).view(U, B * L, C), w, bk.heads, D)  # (U, B*L, D)
            q = lora.add_query_heads(q, flat, bk.heads)
            q = q if w.q_norm is None else w.q_norm(q)  # per-head QK-norm (Qwen3, Gemma 3)
        else:
            head_of_slot = bk.heads.repeat_interleave(B * L)  # (U*B*L,) head-major, as `flat`
            q = q_all.reshape(B * m, H, D)[flat, head_of_slot].view(U, B * L, D)
        if cos_sin is not None:
            R = cos_sin[0].shape[-1]  # rotary features (R < D: partial rotary, the rest pass unchanged)
            cos, sin = (t.expand(B, -1, -1).reshape(B * m, R).index_select(0, flat).view(U, B * L, R) for t in cos_sin)
            q = torch.cat([q[..., :R] * cos + rotate_half(q[..., :R]) * sin, q[..., R:]], dim=-1)
        q = q.view(U, B, L, D).transpose(0, 1)  # (U, B*L, D) -> (B, U, L, D)
        groups = bk.heads // (H // KVH)  # (U,) the KV group of each head
        k_u, v_u = k.index_select(1, groups), v.index_select(1, groups)  # (B, U, kv, D)
        rows = bk.idx.reshape(B, U * L)  # (B, U*L) every slot's token: one gather of the mask rows for all U heads
        batch = torch.arange(B, device=x.device)[:, None]  # (B, 1)
        if mask is None:  # (one query at batch 1 that attends to every key: see _attends_to_every_key)
            mask = x.new_zeros(B, 1, m, kv_len)
        mask_u = mask[:, 0][batch, rows].view(B, U, L, kv_len)  # whole rows copied (faster than an element gather)
        o = attend(q, k_u, v_u, mask_u, scaling, w.softcap)  # (B, U, L, D)
        if torch.is_grad_enabled():  # each head's straight-through gate: forward value 1, the router's gradient
            o = o * bk.gather(gate)[..., None]
        o = o.transpose(0, 1).reshape(U, B * L, D)  # (B, U, L, D) -> (U, B*L, D)
        contrib = torch.bmm(o, used_heads(w.o_w, bk.heads, H, 1).transpose(1, 2))  # (U, B*L, D) @ (U, D, C)
        keep = bk.valid.transpose(0, 1).reshape(-1)  # (U*B*L,) real slots, not bucket padding
        # bucket padding adds into the spare last row of `out` (no copy of the real slots' rows to leave it out)
        out.index_add_(0, torch.where(keep, flat, B * m), contrib.reshape(U * B * L, C).to(out.dtype))
        lora.add_heads_output(o, bk.heads, flat[keep], keep)
        n_slots = B * U * L  # what ran, bucket padding included
        projections = 1 if q_all is not None else 2  # (q_all's projection is counted by the caller)
        return 2 * n_slots * C * D * projections + attention_score_flops(n_slots, kv_len, 1, D)

    # ---- bookkeeping for the KV cache ----
    def _cached_index(self, cache, B: int, device) -> torch.Tensor:
        """(B, P) sequence index of each entry already in this layer's cache (-1: batch padding)."""
        if cache is None:
            return torch.zeros(B, 0, dtype=torch.long, device=device)
        index = getattr(cache, _CACHE_INDEX_ATTR, {}).get(self.layer_idx)
        layers = getattr(cache, "layers", [])
        layer = layers[self.layer_idx] if self.layer_idx < len(layers) else None
        if index is not None:
            if getattr(layer, "is_sliding", False):  # a sliding-window cache keeps only its latest entries
                return index[:, index.shape[1] - self._held(layer):]
            return index
        P = cache.get_seq_length(self.layer_idx) if layer is not None else 0  # tokens seen
        held = self._held(layer) if getattr(layer, "is_sliding", False) else P
        # every token in order (nothing routed this layer's cache yet): the same for such layers, made once per call
        return self.state.per_call(("in_order_index", P - held, P, B, device),
                                   lambda: torch.arange(P - held, P, device=device).expand(B, held))

    @staticmethod
    def _held(layer) -> int:
        """Entries a cache layer holds now (a sliding-window layer: at most its window, not every token seen)."""
        keys = getattr(layer, "keys", None)
        return 0 if not getattr(layer, "is_initialized", False) or keys is None or keys.numel() == 0 else keys.shape[-2]

    def _remember_index(self, cache, past: torch.Tensor, new: torch.Tensor, routed: bool = False) -> None:
        """Append the sequence indices of the entries this call added to the layer's cache. `routed` (token routing
        chose them), or a call that added none (the layer was skipped): from now on the cache may miss tokens or
        hold batch padding, and every later call of the layer attends by these indices. Until then the layer's
        entries are every token in order, which `_cached_index` reads off the cache's length: nothing is kept (a
        concatenation per layer and step saved)."""
        if not routed and new.shape[1] > 0 and not self._keeps_index(cache):
            return
        if not hasattr(cache, _CACHE_INDEX_ATTR):
            setattr(cache, _CACHE_INDEX_ATTR, {})
        getattr(cache, _CACHE_INDEX_ATTR)[self.layer_idx] = torch.cat([past, new], dim=1)
        if routed or new.shape[1] == 0:
            if not hasattr(cache, _CACHE_ROUTED_ATTR):
                setattr(cache, _CACHE_ROUTED_ATTR, set())
            getattr(cache, _CACHE_ROUTED_ATTR).add(self.layer_idx)

    def _keeps_index(self, cache) -> bool:
        """Whether the cache keeps this layer's entry indices (see `_remember_index`)."""
        return self.layer_idx in getattr(cache, _CACHE_INDEX_ATTR, ())

    def _cache_routed(self, cache) -> bool:
        """Whether this layer's cache holds a routed set of entries (not every past token, in order)."""
        return cache is not None and self.layer_idx in getattr(cache, _CACHE_ROUTED_ATTR, ())

    def _attends_to_every_key(self, B: int, m: int) -> bool:
        """One query at batch 1 (decoding), no padding in the call and no sliding window: every cached entry is a
        real earlier token (batch padding needs a batch), so the query may attend to all of them and no mask is
        needed. A host read of the padding mask, once per call."""
        st = self.state
        if B * m != 1 or self.sliding_window is not None:
            return False
        return st.per_call(("no_padding",), lambda: st.pad_mask is None or bool(st.pad_mask.all()))

    def _cached_entries_mask(self, past: torch.Tensor, current: torch.Tensor, dtype) -> torch.Tensor | None:
        """The mask for the unmodified sub-layer over a routed cache: `current` (B, T) queries against the cached
        entries `past` (B, P) and themselves (None where one query may attend to every key)."""
        if self._attends_to_every_key(*current.shape):
            return None
        return self._additive_mask(current, torch.cat([past, current], dim=1), dtype)

    def _additive_mask(self, q_pos: torch.Tensor, kv_pos: torch.Tensor, dtype) -> torch.Tensor:
        """Causal by sequence index (causal models only), no padding keys, no batch-padding slots.
        -> (B, 1, m, kv) float."""
        st = self.state
        allowed = (kv_pos[:, None, :] >= 0).expand(-1, q_pos.shape[1], -1)  # (B, m, kv)
        if st.causal:
            allowed = allowed & (kv_pos[:, None, :] <= q_pos[:, :, None])
        if self.sliding_window is not None:  # transformers' sliding-window overlay: kv > q - window
            allowed = allowed & (kv_pos[:, None, :] > q_pos[:, :, None] - self.sliding_window)
        if st.pad_mask is not None and st.pad_mask.shape[0] == kv_pos.shape[0]:
            real = st.pad_mask.gather(1, kv_pos.clamp(min=0).clamp(max=st.pad_mask.shape[1] - 1))  # (B, kv)
            allowed = allowed & real[:, None, :]
        zero = torch.zeros((), dtype=dtype, device=q_pos.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


class HeadRuns(NamedTuple):
    """One set of heads taken in runs of adjacent heads (decoding): views of the weights, no copies."""
    q: list[tuple[torch.Tensor, torch.Tensor | None]]  # per run: q rows (run*D, C), q bias (run*D,) or None
    o: list[torch.Tensor]  # per run: o columns (C, run*D)
    n_groups: int  # G, the KV groups the heads read
    kv_groups: torch.Tensor | slice | None  # which: None every group, a slice one run of them, else (G,) long
    slots: torch.Tensor | None  # (U,) long, each head's place among the G*n_rep queries; None: all of them, in order


# heads share a bucket length when theirs is at least this fraction of the longest: fewer, larger matmuls for
# at most ~3% padding (exact lengths would give a group per head in a long prefill)
BUCKET_LENGTH_SHARE = 1 - 1 / 32


def head_buckets(active: torch.Tensor) -> list["HeadBuckets"]:
    """Group the used heads by how many tokens chose them. active: (B, m, H) bool.

    A head's bucket in row b holds the tokens of row b that chose it, in order; every bucket of a group is padded to
    the group's longest. Heads no token chose are left out (at batch 1 decoding only the active heads run); heads
    whose longest bucket is within `BUCKET_LENGTH_SHARE` of the group's longest join it, so a balanced routing runs
    as one group and an unbalanced one (some heads chosen by nearly every token, others by few) as a few groups
    rather than all heads padded to the most popular one."""
    B, m, H = active.shape
    per_row = active.sum(dim=1)  # (B, H) tokens of each row that chose each head
    longest = per_row.amax(dim=0).tolist() if B else [0] * H  # (H,) one read on the host per layer
    groups: list[list[int]] = []
    for h in sorted((h for h in range(H) if longest[h] > 0), key=lambda h: -longest[h]):
        if groups and longest[h] >= BUCKET_LENGTH_SHARE * longest[groups[-1][0]]:
            groups[-1].append(h)
        else:
            groups.append([h])
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)  # (B, m, H) per head: its tokens first
    out = []
    for group in groups:
        heads = torch.tensor(sorted(group), device=active.device)  # (U,)
        L = longest[group[0]]
        idx = order.index_select(2, heads)[:, :L].transpose(1, 2)  # (B, L, U) -> (B, U, L)
        valid = torch.arange(L, device=active.device) < per_row.index_select(1, heads)[..., None]  # (B, U, L)
        out.append(HeadBuckets(heads, idx, valid, m))
    return out


class HeadBuckets(NamedTuple):
    """A group of heads and, per row and head, the tokens that chose it (padded to the group's longest list)."""
    heads: torch.Tensor  # (U,) long, the heads some token chose
    idx: torch.Tensor  # (B, U, L) long, token index within the row (padding slots point at some token)
    valid: torch.Tensor  # (B, U, L) bool, False for bucket padding
    row_len: int  # m, the tokens of each row

    @property
    def n_heads(self) -> int:
        return self.heads.numel()

    @property
    def length(self) -> int:
        return self.idx.shape[2]

    def flat_tokens(self) -> torch.Tensor:
        """(U*B*L,) index of each slot's token among the B*m tokens, head-major (the layout of the batched matmuls)."""
        row_start = torch.arange(self.idx.shape[0], device=self.idx.device)[:, None, None] * self.row_len  # (B,1,1)
        return (self.idx + row_start).transpose(0, 1).reshape(-1)  # (B, U, L) -> (U, B, L) -> (U*B*L,)

    def gather(self, per_head: torch.Tensor) -> torch.Tensor:
        """per_head: (B, m, H) -> (B, U, L), the value of each slot's token for its head."""
        chosen = per_head.index_select(2, self.heads).transpose(1, 2)  # (B, U, m)
        return chosen.gather(2, self.idx)


def used_heads(weight: torch.Tensor, heads: torch.Tensor, n_heads: int, dim: int) -> torch.Tensor:
    """The slices of a projection weight that belong to `heads` (U,): `weight` split into `n_heads` equal parts along
    `dim` -> those parts stacked first, (U, ...). No copy when every head is used."""
    parts = weight.unflatten(dim, (n_heads, -1)).movedim(dim, 0)  # (H, ...) a view
    return parts if heads.numel() == n_heads else parts.index_select(0, heads)


def head_query(x: torch.Tensor, w, heads: torch.Tensor, D: int) -> torch.Tensor:
    """Query projection of each used head on its own tokens. x: (U, n, C) -> (U, n, D)."""
    H = w.q_w.shape[0] // D
    q = torch.bmm(x, used_heads(w.q_w, heads, H, 0).transpose(1, 2))  # (U, n, C) @ (U, C, D)
    return q if w.q_b is None else q + used_heads(w.q_b, heads, H, 0)[:, None]
