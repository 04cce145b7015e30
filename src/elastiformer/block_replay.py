"""Start a forward part-way down the layer stack: blocks 0..d-1 return what they returned in a reference run.

`fit_allocation` measures hundreds of candidate allocations, and each differs from the current one (the
reference) in a single layer. A block's output depends only on its input and on its own layer's capacities, so the
blocks before the changed layer compute exactly what they computed for the reference: only the blocks from that
layer on need to run. With the routed units spread evenly over the layers, that is about half the block work of a
forward (embeddings, final norm and head still run every time).

Used with the model's own forward: each replayed block's `forward` is swapped, for the duration of one call, for
one that returns a copy of its recorded output (whatever the block returns: a tensor, or a tuple in older
layouts), so the model's own loop, masks and head run unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

Capacities = dict[str, list[float]]  # {component: per-layer capacities}


def _copy(value: Any) -> Any:
    """A block's output with fresh tensors (the model's loop may update a returned tensor in place)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v) for v in value)
    return value


class BlockReplay:
    """Recorded block outputs (and each block's executed FLOPs) of `n_batches` calibration batches under one
    reference capacity assignment."""

    def __init__(self, blocks: nn.ModuleList, n_batches: int):
        self.blocks = blocks
        self.reference: Capacities | None = None
        L = len(blocks)
        self.outputs: list[list[Any]] = [[None] * L for _ in range(n_batches)]  # [batch][block]
        self.flops: list[list[int]] = [[0] * L for _ in range(n_batches)]  # [batch][block] of its routed sub-layers

    def first_change(self, caps: Capacities) -> int:
        """The first block whose capacities (any component) differ from the reference's: where a forward with
        `caps` must start (0 with no reference yet)."""
        ref = self.reference
        if ref is None or set(ref) != set(caps):
            return 0
        for i in range(len(self.blocks)):
            if any(caps[k][i] != ref[k][i] for k in caps):
                return i
        return len(self.blocks)

    def prefix_flops(self, batch: int, start: int) -> int:
        """Executed FLOPs of the replayed blocks 0..start-1 of `batch` (as recorded)."""
        return sum(self.flops[batch][:start])

    @contextlib.contextmanager
    def replaying(self, batch: int, start: int, record: bool = False) -> Iterator[None]:
        """For one forward of `batch`: blocks before `start` return their recorded outputs; with `record`, the
        blocks from `start` on store theirs (the caller then stores their FLOPs with `record_flops` and sets
        `reference`)."""
        swapped: list[tuple[nn.Module, Any]] = []
        hooks = []
        try:
            for i in range(start):
                block = self.blocks[i]
                swapped.append((block, block.__dict__.get("forward")))
                out = self.outputs[batch][i]
                block.forward = lambda *args, _out=out, **kwargs: _copy(_out)
            if record:
                for i in range(start, len(self.blocks)):
                    def keep(module, args, output, _i=i):
                        self.outputs[batch][_i] = _copy(output)
                    hooks.append(self.blocks[i].register_forward_hook(keep))
            yield
        finally:
            for h in hooks:
                h.remove()
            for block, own in swapped:
                if own is None:
                    del block.forward
                else:
                    block.forward = own

    def record_flops(self, batch: int, start: int, per_block: dict[int, int]) -> None:
        for i in range(start, len(self.blocks)):
            self.flops[batch][i] = per_block.get(i, 0)
