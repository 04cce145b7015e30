"""Soft width configurations for the joint fine-tune: the output of a probability-weighted mix of nested slices.

Each nested choice k of an MLP keeps its first n_k hidden neurons, and the MLP's output is the sum of its neurons'
contributions (down-projection columns times activations); likewise an attention's output is the sum of its query
heads' contributions through the o-projection. So `sum_k p_k * slice_k(x)` equals the full-width layer with unit j's
contribution scaled by `m_j = sum_k p_k [j < n_k]`, a monotone soft prefix mask. One full-width forward with these
masks (a multiply on the down / o-projection input) gives the exact mix, instead of one forward per choice.

Only training uses this (it runs every unit, as a mix must); at inference the router's argmax runs the real slice.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .configurations import full_choices, set_index_choices, unit_masks


def _projection_inputs(fm) -> list[tuple[nn.Module, nn.Module]]:
    """(MLP down-projection, attention o-projection) of every layer: the modules whose input holds one slot per
    hidden neuron / per head x head_dim."""
    spec = fm.spec
    out = []
    for nested_attn, nested_mlp in fm.nested_layers():
        mlp, attn = nested_mlp.base_layer, nested_attn.base_layer  # what menu index 0 (full width) runs
        down_w = spec.mlp_weights(mlp).down_w
        # the module owning that weight (GPT-2's Conv1D weight is read transposed: the same storage, another view)
        down = next(m for m in mlp.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                    and m.weight.data_ptr() == down_w.data_ptr())
        out.append((down, getattr(attn, spec.o_proj_name)))
    return out


@contextlib.contextmanager
def soft_widths(fm, probs: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, forwards of `fm` compute the p-weighted mix of nested slices.

    probs: {"mlp": (B, L, Km), "attn": (B, L, Ka)} per-sequence choice probabilities (differentiable).
    """
    masks = unit_masks(fm)
    n_layers = probs["mlp"].shape[1]
    mlp_mask = probs["mlp"] @ masks["mlp"].to(probs["mlp"])  # (B, L, I)
    head_mask = probs["attn"] @ masks["attn"].to(probs["attn"])  # (B, L, H)
    handles = []

    def scale(mask: torch.Tensor, repeat: int):
        def hook(module, args):
            x = args[0]  # (B, T, units * repeat)
            m = mask.repeat_interleave(repeat, dim=-1) if repeat > 1 else mask  # (B, units * repeat)
            return (x * m[:, None, :].to(x.dtype),) + tuple(args[1:])
        return hook

    set_index_choices(fm, full_choices(n_layers))  # every unit runs; the masks do the mixing
    try:
        for layer, (down, o_proj) in enumerate(_projection_inputs(fm)):
            n_heads = head_mask.shape[-1]
            head_dim = o_proj.weight.shape[1 if isinstance(o_proj, nn.Linear) else 0] // n_heads
            handles.append(down.register_forward_pre_hook(scale(mlp_mask[:, layer], 1)))
            handles.append(o_proj.register_forward_pre_hook(scale(head_mask[:, layer], head_dim)))
        yield
    finally:
        for h in handles:
            h.remove()
