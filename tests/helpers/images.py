"""Tiny Fashion-MNIST idx files with the real names (no download), for the data loader, `vit-teacher` and the vision
bench."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from elastiformer.data.images import FASHION_MNIST_FILES


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """The idx format by hand: magic 0 0 <type> <ndim>, big-endian int32 sizes, big-endian data."""
    code = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def fake_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """Tiny idx files with the real names: image i is filled with its label times 20, labels cycle 0-9."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.repeat(labels[:, None, None] * 20, 28 * 28).reshape(n, 28, 28).astype(np.uint8)
        images[:, :14] += 7  # top half brighter: a signal a classifier can use beside the class
        write_idx(folder / FASHION_MNIST_FILES[split][0], images)
        write_idx(folder / FASHION_MNIST_FILES[split][1], labels)
    (folder / "COMPLETE.json").write_text("{}")
    return folder
