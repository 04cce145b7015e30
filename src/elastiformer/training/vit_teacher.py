"""A small ViT teacher trained here on Fashion-MNIST, because no pretrained ViT installs on this machine.

The hub is out of reach and no ViT weights ship on PyPI, Debian or npm, so the vision path trains its own teacher:
a transformers `ViTForImageClassification` built from a `ViTConfig` (28x28 grey images, 7x7 patches -> 16 patch
tokens + CLS, hidden 128, 4 layers, 4 heads, MLP 512), trained with AdamW for 3 epochs on the 60k training
images (a few minutes on 2 CPU cores). It is kept as an ordinary Hugging Face folder (config.json,
model.safetensors, preprocessor_config.json with the normalisation) in `cache_dir()/models/vit-fashion-mnist/`,
written atomically with a marker last, and reused afterwards: `load_model("vit-fashion-mnist")` trains it on first
use. Any other local ViT folder works the same way with the elastic path.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cache import atomic_dir, cache_dir
from ..data.images import (FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, ImageFormat,
                          load_fashion_mnist, pixel_values_for)
from ..errors import ConfigError
from ..options import Option, defaults

logger = logging.getLogger(__name__)

VIT_TEACHER_NAME = "vit-fashion-mnist"
MARKER_FILE = "elastiformer-teacher.json"  # written last: a folder without it is an interrupted run
VIT_TEACHER_OPTIONS = {
    "epochs": Option(3, "Passes over the 60k training images."),
    "steps": Option(None, "Optimizer steps; overrides --epochs.", kind=int),
    "batch_size": Option(128, "Images per step."),
    "lr": Option(1e-3, "Peak AdamW learning rate."),
    "weight_decay": Option(0.05, "AdamW weight decay."),
    "warmup": Option(100, "Linear warmup steps."),
    "hidden_size": Option(128, "ViT hidden size (the MLP is 4x)."),
    "layers": Option(4, "Transformer layers."),
    "heads": Option(4, "Attention heads."),
    "patch_size": Option(7, "Patch size in pixels (7: 16 patches + CLS)."),
    "train_images": Option(None, "Train on only the first N training images.", kind=int),
    "test_images": Option(None, "Report accuracy on only the first N test images.", kind=int),
    "seed": Option(0, "Seed of initialisation and data order."),
}
VIT_TEACHER_DEFAULTS = defaults(VIT_TEACHER_OPTIONS)


def vit_teacher_config(hidden_size: int = 128, layers: int = 4, heads: int = 4, patch_size: int = 7):
    """The teacher's architecture: a plain ViT for 28x28 grey images with 10 classes, MLP 4x, no dropout."""
    from transformers import ViTConfig

    if hidden_size % heads:
        raise ConfigError(f"hidden_size={hidden_size} is not divisible by heads={heads}: pick sizes that divide")
    if 28 % patch_size:
        raise ConfigError(f"patch_size={patch_size} does not tile a 28x28 image: pick 2, 4, 7 or 14")
    return ViTConfig(
        image_size=28, patch_size=patch_size, num_channels=1, hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * hidden_size, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=10,
        id2label=dict(enumerate(FASHION_MNIST_CLASSES)), label2id={n: i for i, n in enumerate(FASHION_MNIST_CLASSES)},
    )


@torch.no_grad()
def accuracy(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of an image classifier on (N, C, S, S) pixel_values."""
    correct = 0
    for i in range(0, pixels.shape[0], batch_size):
        logits = model(pixel_values=pixels[i:i + batch_size]).logits  # (B, classes)
        correct += int((logits.argmax(-1) == labels[i:i + batch_size]).sum())
    return correct / max(1, pixels.shape[0])


def train_vit_teacher(output: str | Path, *, progress: bool = True, **options: Any) -> dict[str, Any]:
    """Train the teacher on Fashion-MNIST and save it (atomically) as a Hugging Face folder at `output`.

    Options (`VIT_TEACHER_DEFAULTS`): epochs, or steps (which wins); batch_size, lr, weight_decay, warmup; the
    architecture (hidden_size, layers, heads, patch_size); train_images / test_images (use only the first N, for
    quick runs); seed. Returns a report with the test accuracy, also written into the folder's marker file.
    """
    from transformers import ViTForImageClassification

    unknown = sorted(set(options) - set(VIT_TEACHER_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown teacher options {unknown}: the options are {', '.join(VIT_TEACHER_DEFAULTS)}")
    o = VIT_TEACHER_DEFAULTS | {k: v for k, v in options.items() if v is not None}
    for key in ("batch_size", "epochs", "hidden_size", "layers", "heads", "patch_size"):
        if int(o[key]) < 1:
            raise ConfigError(f"{key}={o[key]}: pass a positive integer")
    if o["steps"] is not None and int(o["steps"]) < 1:
        raise ConfigError(f"steps={o['steps']}: pass a positive number of optimizer steps")
    t0 = time.perf_counter()
    config = vit_teacher_config(int(o["hidden_size"]), int(o["layers"]), int(o["heads"]), int(o["patch_size"]))
    fmt = ImageFormat(28, 1, (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,))
    train = load_fashion_mnist("train", limit=o["train_images"])
    test = load_fashion_mnist("test", limit=o["test_images"])
    train_x, test_x = pixel_values_for(train.images, fmt), pixel_values_for(test.images, fmt)  # (N, 1, 28, 28)

    torch.manual_seed(int(o["seed"]))
    model = ViTForImageClassification(config)
    bs = int(o["batch_size"])
    per_epoch = max(1, math.ceil(len(train) / bs))
    steps = int(o["steps"]) if o["steps"] is not None else per_epoch * int(o["epochs"])
    warmup = min(int(o["warmup"]), max(1, steps // 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(o["lr"]), weight_decay=float(o["weight_decay"]))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) /
                                                                                   max(1, steps - warmup))))
    g = torch.Generator().manual_seed(int(o["seed"]))
    model.train()
    bar = tqdm(range(steps), desc="training the ViT teacher", disable=not progress)
    order, loss_ema = torch.randperm(len(train), generator=g), None
    for step in bar:
        pos = (step % per_epoch) * bs
        if step and pos == 0:
            order = torch.randperm(len(train), generator=g)  # a new epoch
        idx = order[pos:pos + bs]
        loss = F.cross_entropy(model(pixel_values=train_x[idx]).logits, train.labels[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}")
    bar.close()
    model.eval()
    test_acc = accuracy(model, test_x, test.labels)
    report = {"name": VIT_TEACHER_NAME, "steps": steps, "epochs": steps / per_epoch, "train_images": len(train),
              "test_images": len(test), "test_accuracy": test_acc, "final_train_loss": loss_ema,
              "seconds": time.perf_counter() - t0, "options": o,
              "note": "no pretrained ViT installs here (no hub access), so elastiformer trains its own teacher"}
    save_teacher(model, output, fmt, report)
    return report


def save_teacher(model: torch.nn.Module, output: str | Path, fmt: ImageFormat, report: dict[str, Any]) -> Path:
    """Write the model, its preprocessor config (the normalisation it was trained with) and, last, the marker."""
    output = Path(output)
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp)
        processor = {"image_processor_type": "ViTImageProcessor", "do_resize": False, "do_rescale": True,
                     "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(fmt.mean),
                     "image_std": list(fmt.std), "size": {"height": fmt.size, "width": fmt.size}}
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        (tmp / MARKER_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return output


def vit_teacher_dir(train_if_missing: bool = True) -> Path:
    """The cached teacher folder; trained first (with the defaults, a few minutes) if it is not there yet."""
    dest = cache_dir() / "models" / VIT_TEACHER_NAME
    if not (dest / MARKER_FILE).is_file():
        if not train_if_missing:
            raise ConfigError(f"no trained ViT teacher in {dest}: run `elastiformer vit-teacher` first")
        logger.warning("no pretrained ViT installs here, so elastiformer trains its own ViT teacher on Fashion-MNIST "
                       "first (a few minutes on a CPU); it is cached in %s", dest)
        train_vit_teacher(dest)
    return dest


def teacher_report(folder: str | Path) -> dict[str, Any] | None:
    """What `train_vit_teacher` recorded about a cached teacher (None for a ViT folder from elsewhere)."""
    marker = Path(folder) / MARKER_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None
