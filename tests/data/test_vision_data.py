"""Fashion-MNIST: idx parsing on tiny files built here, class filtering, the fetch's one-line errors, pixel values
for a ViT, and the `vit-teacher` command on a small slice of data (tiny idx files in a cache folder of its own)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from elastiformer.data import images as data_images
from elastiformer.data.images import ImageFormat, load_fashion_mnist, parse_classes, pixel_values_for, read_idx
from elastiformer.errors import DataError
from helpers.cli import run as run_cli  # the console entry point, in-process
from helpers.images import fake_fashion_mnist, write_idx


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_every_type(tmp_path, compress):
    for array in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([-5, 70000], dtype=np.int32),
                  np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)):
        path = write_idx(tmp_path / ("x.gz" if compress else "x"), array, compress)
        out = read_idx(path)
        assert out.shape == array.shape and out.dtype.isnative
        np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(bad)
    short = write_idx(tmp_path / "short", np.arange(10, dtype=np.uint8), compress=False)
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)


def test_load_filters_classes_and_limits(tmp_path):
    folder = fake_fashion_mnist(tmp_path / "fm")
    full = load_fashion_mnist("train", folder=folder)
    assert full.images.shape == (40, 28, 28) and full.images.dtype == torch.uint8 and len(full) == 40
    low = load_fashion_mnist("test", classes=parse_classes("0-4"), folder=folder)
    assert set(low.labels.tolist()) == {0, 1, 2, 3, 4} and len(low) == 10
    assert torch.equal(low.images[:, 20, 20].long(), low.labels * 20)  # images stay paired with their labels
    few = load_fashion_mnist("train", classes=[7], limit=3, folder=folder)
    assert few.labels.tolist() == [7, 7, 7]
    assert parse_classes("all") is None and parse_classes("5,6,8-9") == [5, 6, 8, 9]
    with pytest.raises(DataError, match="class indices"):
        load_fashion_mnist("train", classes=[10], folder=folder)
    with pytest.raises(DataError, match="splits"):
        load_fashion_mnist("validation", folder=folder)


def test_pixel_values_normalise_resize_and_repeat_channels():
    images = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    x = pixel_values_for(images, ImageFormat(28, 1, (0.5,), (0.25,)))
    assert x.shape == (2, 1, 28, 28) and torch.allclose(x, torch.full_like(x, 2.0))
    y = pixel_values_for(images, ImageFormat(32, 3, (0.0, 0.5, 1.0), (1.0, 1.0, 1.0)))
    assert y.shape == (2, 3, 32, 32)
    assert torch.allclose(y[:, 1], torch.full_like(y[:, 1], 0.5)) and torch.allclose(y[:, 2], torch.zeros(2, 32, 32))


def test_fetch_without_apt_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("ELASTIFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_images, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(data_images.shutil, "which", lambda tool: None)
    with pytest.raises(DataError, match="install the Debian package dataset-fashion-mnist"):
        data_images.fashion_mnist_dir()
    assert not (tmp_path / "cache" / "data" / "fashion-mnist").exists()  # nothing half-written


def test_cached_folder_is_used_without_fetching(tmp_path, monkeypatch):
    monkeypatch.setenv("ELASTIFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_images, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    fake_fashion_mnist(tmp_path / "cache" / "data" / "fashion-mnist")
    monkeypatch.setattr(data_images, "_fetch_fashion_mnist", lambda target: pytest.fail("fetched again"))
    assert data_images.fashion_mnist_dir() == tmp_path / "cache" / "data" / "fashion-mnist"


def test_vit_teacher_command_trains_caches_and_reuses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ELASTIFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_images, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    fake_fashion_mnist(tmp_path / "cache" / "data" / "fashion-mnist", n_train=200, n_test=50)
    out = tmp_path / "teacher"
    args = ["vit-teacher", "--output", out, "--steps", "30", "--batch-size", "32", "--hidden-size", "32",
            "--layers", "2", "--heads", "2", "--lr", "3e-3"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "No pretrained ViT installs here" in stdout and "test accuracy" in stdout
    report = json.loads((out / "elastiformer-teacher.json").read_text())
    assert report["steps"] == 30 and report["test_images"] == 50
    assert report["test_accuracy"] > 0.3  # 10 classes told apart by brightness: far above chance after 30 steps
    assert (out / "model.safetensors").is_file() and json.loads((out / "preprocessor_config.json").read_text())[
        "image_mean"] == [pytest.approx(data_images.FASHION_MNIST_MEAN)]
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(out)
    assert model.config.num_labels == 10 and model.config.patch_size == 7
    code, stdout, _ = run_cli(args, capsys)  # a second run reuses the teacher
    assert code == 0 and "already in" in stdout


def test_vit_teacher_command_bad_option_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ELASTIFORMER_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(["vit-teacher", "--output", tmp_path / "t", "--hidden-size", "30", "--heads", "4"], capsys)
    assert code == 2 and err.startswith("error: hidden_size=30 is not divisible") and len(err.strip().splitlines()) == 1


def test_vit_teacher_command_keeps_a_foreign_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ELASTIFORMER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["vit-teacher", "--output", tmp_path / "mine", "--steps", "1"], capsys)
    assert code == 2 and "--overwrite" in err and (tmp_path / "mine" / "notes.txt").is_file()
