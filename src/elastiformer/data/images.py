"""Image data: Fashion-MNIST from the Debian package `dataset-fashion-mnist`, parsed from its idx files with numpy.

The Hugging Face hub (and torchvision's downloads) are out of reach here; Debian is not. When the package is
installed, its folder `/usr/share/datasets/fashion-mnist/` is read directly. Otherwise `apt-get download` fetches the
.deb (no root needed) into a temporary folder, `dpkg-deb -x` unpacks it, and the four idx files are kept in
`cache_dir()/data/fashion-mnist/` (written atomically, marker last).

`load_fashion_mnist` returns uint8 images [N, 28, 28] and labels [N]; `pixel_values_for` turns them into the
normalised `pixel_values` a given ViT expects (its image size, channels, mean and std), so any local ViT folder sees
Fashion-MNIST the way it was trained to see images.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import atomic_dir, atomic_write_json, cache_dir
from .text import last_line
from ..errors import DataError

logger = logging.getLogger(__name__)

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
# Mean and std of the training pixels in [0, 1]: what the teacher is trained with, saved in its preprocessor config.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_MARKER = "COMPLETE.json"
_APT_TIMEOUT_S = 300
# idx type codes (the third byte of the magic number) -> numpy dtype; multi-byte values are big-endian
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, H, W) uint8
    labels: torch.Tensor  # (N,) long

    def __len__(self) -> int:
        return int(self.labels.numel())


# --------------------------------------------------------------------------------------------- idx files


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an idx file (`.gz` or plain): magic 0x00 0x00 <type> <ndim>, ndim big-endian int32 sizes, then data."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read idx file {path} ({err}): delete it so it is fetched again") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number): delete it so it is fetched again")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(f"{path} holds {len(raw) - offset} data bytes, its header says {expected}: the file is "
                        "truncated; delete it so it is fetched again")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(tuple(dims)).astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------------------------------- fetching


def fashion_mnist_dir() -> Path:
    """The folder holding the four idx files: the installed package's, else the cache's (fetched if missing)."""
    if _has_files(FASHION_MNIST_SYSTEM_DIR):
        return FASHION_MNIST_SYSTEM_DIR
    target = cache_dir() / "data" / "fashion-mnist"
    if not (_has_files(target) and (target / _MARKER).is_file()):
        _fetch_fashion_mnist(target)
    return target


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FASHION_MNIST_FILES.values() for name in pair)


def _fetch_fashion_mnist(target: Path) -> None:
    """`apt-get download` the .deb, `dpkg-deb -x` it, and move its idx files into `target` atomically."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DataError(f"Fashion-MNIST is not installed and `{tool}` is missing to fetch it: install the "
                            f"Debian package {FASHION_MNIST_PACKAGE} (or copy its idx files into {target})")
    logger.info("fetching Fashion-MNIST (%s) with apt-get download into %s", FASHION_MNIST_PACKAGE, target)
    with tempfile.TemporaryDirectory(prefix="elastiformer-apt-") as tmp:
        tmp = Path(tmp)
        _run([shutil.which("apt-get"), "download", FASHION_MNIST_PACKAGE], cwd=tmp, what="apt-get download")
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise DataError(f"apt-get download {FASHION_MNIST_PACKAGE} wrote no .deb: install the Debian package "
                            f"{FASHION_MNIST_PACKAGE}")
        _run([shutil.which("dpkg-deb"), "-x", str(debs[0]), str(tmp / "root")], cwd=tmp, what="dpkg-deb -x")
        unpacked = tmp / "root" / FASHION_MNIST_SYSTEM_DIR.relative_to("/")
        if not _has_files(unpacked):
            raise DataError(f"the package {debs[0].name} lacks the Fashion-MNIST idx files: install the Debian "
                            f"package {FASHION_MNIST_PACKAGE} and report this to the elastiformer maintainers")
        with atomic_dir(target) as tmp_dir:
            for pair in FASHION_MNIST_FILES.values():
                for name in pair:
                    shutil.copyfile(unpacked / name, tmp_dir / name)
            atomic_write_json(tmp_dir / _MARKER, {"package": FASHION_MNIST_PACKAGE, "deb": debs[0].name})
    logger.info("Fashion-MNIST ready in %s", target)


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    hint = f"install the Debian package {FASHION_MNIST_PACKAGE} (apt-get install {FASHION_MNIST_PACKAGE})"
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise DataError(f"`{what}` took over {_APT_TIMEOUT_S} s fetching Fashion-MNIST: {hint}") from None
    except OSError as err:
        raise DataError(f"could not run {what} ({err}) to fetch Fashion-MNIST: {hint}") from None
    if proc.returncode != 0:
        detail = last_line(proc.stderr) or last_line(proc.stdout) or f"exit status {proc.returncode}"
        raise DataError(f"`{what}` failed fetching Fashion-MNIST ({detail}): {hint}")


# --------------------------------------------------------------------------------------------- loading


def load_fashion_mnist(split: str = "train", classes: Sequence[int] | None = None, limit: int | None = None,
                       folder: str | Path | None = None) -> ImageSet:
    """Fashion-MNIST images (uint8 [N, 28, 28]) and labels ([N], 0-9), optionally only `classes`, the first
    `limit` of them (in file order, which mixes the classes). `folder` overrides where the idx files are."""
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"split={split!r}: Fashion-MNIST has the splits {', '.join(FASHION_MNIST_FILES)}")
    root = Path(folder) if folder is not None else fashion_mnist_dir()
    image_file, label_file = (root / name for name in FASHION_MNIST_FILES[split])
    for f in (image_file, label_file):
        if not f.is_file():
            raise DataError(f"{f} is missing: pass the folder holding the Fashion-MNIST idx files, or install the "
                            f"Debian package {FASHION_MNIST_PACKAGE}")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{image_file} ({images.shape}) and {label_file} ({labels.shape}) do not pair up as images "
                        "[N, H, W] and labels [N]: delete them so they are fetched again")
    keep = np.ones(labels.shape[0], dtype=bool)
    if classes is not None:
        bad = [c for c in classes if not 0 <= int(c) < len(FASHION_MNIST_CLASSES)]
        if bad or not len(classes):
            raise DataError(f"classes={list(classes)}: pass class indices in 0-9 "
                            f"({', '.join(f'{i}={n}' for i, n in enumerate(FASHION_MNIST_CLASSES))})")
        keep = np.isin(labels, np.asarray(classes, dtype=labels.dtype))
    index = np.flatnonzero(keep)[:limit]
    return ImageSet(torch.from_numpy(images[index].copy()), torch.from_numpy(labels[index].astype(np.int64)))


def parse_classes(text: str | Sequence[int] | None) -> list[int] | None:
    """'0-4' / '5,6,7' / 'all' -> class indices (None for all)."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return None
    if not isinstance(text, str):
        return [int(c) for c in text]
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError as err:
        raise DataError(f"classes {text!r}: pass class indices like 0-4 or 0,2,5, or 'all'") from err
    return out


@dataclass(frozen=True)
class ImageFormat:
    """What a ViT expects as pixel_values: size, channels and per-channel normalisation."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ImageFormat":
        """From the model's config and, when it was loaded from a folder with one, its preprocessor_config.json
        (else the ViT image processor's defaults, mean = std = 0.5)."""
        cfg = getattr(model, "config", None)
        cfg = getattr(cfg, "vision_config", cfg)
        size = getattr(cfg, "image_size", 28)
        size = size[0] if isinstance(size, (list, tuple)) else int(size)
        channels = int(getattr(cfg, "num_channels", 1))
        mean, std = [0.5] * channels, [0.5] * channels
        processor = _model_folder(model) / "preprocessor_config.json" if _model_folder(model) else None
        if processor is not None and processor.is_file():
            meta = json.loads(processor.read_text())
            mean, std = meta.get("image_mean", mean), meta.get("image_std", std)
        mean = list(mean) if isinstance(mean, (list, tuple)) else [mean]
        std = list(std) if isinstance(std, (list, tuple)) else [std]
        if len(mean) == 1:
            mean, std = mean * channels, std * channels
        return cls(size, channels, tuple(float(m) for m in mean), tuple(float(s) for s in std))


def _model_folder(model: torch.nn.Module) -> Path | None:
    """The local folder a model was loaded from (`load_model` records it, a short name such as vit-fashion-mnist
    included; else the config's `_name_or_path` when that is a folder), or None."""
    name = getattr(model, "elastiformer_folder", None) or \
        getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def pixel_values_for(images: torch.Tensor, fmt: ImageFormat) -> torch.Tensor:
    """uint8 grey images (N, H, W) -> float pixel_values (N, channels, size, size), normalised for the model."""
    x = images.float()[:, None] / 255.0  # (N, 1, H, W) in [0, 1]
    if x.shape[-1] != fmt.size or x.shape[-2] != fmt.size:
        x = F.interpolate(x, size=(fmt.size, fmt.size), mode="bilinear", align_corners=False)
    x = x.expand(-1, fmt.channels, -1, -1)  # (N, C, S, S): grey repeated on every channel
    mean = torch.tensor(fmt.mean)[None, :, None, None]
    std = torch.tensor(fmt.std)[None, :, None, None]
    return (x - mean) / std

