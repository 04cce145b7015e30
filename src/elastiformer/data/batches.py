"""Model input batches: whatever a user passes as data (a tensor of token ids or images, a dict, an iterable of
either) as a stream of `{input_ids | pixel_values, attention_mask?, token_type_ids?}` dicts with a batch dim."""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import DataError
from ..validation import check_token_ids

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")  # what batches pass to the model


def tensor_batch(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A bare tensor: token ids [T] / [B, T], or images [C, H, W] / [B, C, H, W] (floating point)."""
    return {"pixel_values" if t.is_floating_point() and t.dim() >= 3 else "input_ids": t}


def as_batches(data) -> Iterator[dict[str, torch.Tensor]]:
    """Accept a tensor ([N, T] / [T] token ids, or [N, C, H, W] images), a dict, or an iterable of dicts holding
    input_ids ([T] or [B, T]) or pixel_values ([C, H, W] or [B, C, H, W]); other keys but the model inputs
    (attention_mask, token_type_ids) are dropped, e.g. labels."""
    if isinstance(data, torch.Tensor):
        data = [tensor_batch(data)]
    elif isinstance(data, dict):
        data = [data]
    for batch in data:
        if isinstance(batch, torch.Tensor):
            batch = tensor_batch(batch)
        if not isinstance(batch, dict) or not ("input_ids" in batch or "pixel_values" in batch):
            raise DataError("data items must be dicts holding input_ids (one sequence [T] or a batch [B, T]) or "
                            "pixel_values ([C, H, W] or [B, C, H, W])")
        batch = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        if "input_ids" in batch:
            check_token_ids(batch["input_ids"])
            mask = batch.get("attention_mask")
            if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != batch["input_ids"].shape):
                raise DataError(f"attention_mask of shape {tuple(getattr(mask, 'shape', ()))} does not match "
                                f"input_ids {tuple(batch['input_ids'].shape)}: pass a 0/1 mask of the same shape")
        single = batch["input_ids"].dim() == 1 if "input_ids" in batch else batch["pixel_values"].dim() == 3
        if single:
            batch = {k: v[None] for k, v in batch.items()}
        yield batch
