"""FLOP formulas (2 x multiply-adds of the matmuls; norms, activations and softmax are not counted).

The wrappers call these with the shapes of what actually ran, so executed FLOPs are counted, not estimated.
"""

from __future__ import annotations


def attention_projection_flops(n_q: int, n_kv: int, C: int, H: int, KVH: int, D: int) -> int:
    """q and o projections for `n_q` (token, all-heads) rows, k and v projections for `n_kv` tokens."""
    return 2 * n_q * C * H * D * 2 + 2 * n_kv * C * KVH * D * 2


def attention_score_flops(n_q: int, kv_len: int, H: int, D: int) -> int:
    """QK^T and AV for `n_q` queries against `kv_len` keys, on `H` heads."""
    return 2 * 2 * n_q * H * kv_len * D


def dense_attention_flops(B: int, T: int, kv_len: int, C: int, H: int, KVH: int, D: int) -> int:
    return attention_projection_flops(B * T, B * T, C, H, KVH, D) + attention_score_flops(B * T, kv_len, H, D)


def mlp_flops(n_tokens: int, C: int, I: int, gated: bool) -> int:
    """up (+ gate) and down projections of an MLP with `I` hidden neurons."""
    return 2 * n_tokens * C * I * (3 if gated else 2)


def lm_head_flops(n_tokens: int, C: int, V: int) -> int:
    return 2 * n_tokens * C * V
