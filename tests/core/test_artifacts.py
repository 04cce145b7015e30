"""save_pretrained / from_pretrained: only routers are written, and a mismatched or corrupt artifact is refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

import elastiformer as ef
from helpers.models import MODELS, make_elastic, tokens


def test_round_trip_gives_identical_outputs(tmp_path, arch):
    em = make_elastic(arch, "combined")
    em.train()
    em(tokens()).logits.sum().backward()
    with torch.no_grad():  # move the routers away from their init so the test means something
        for p in em.router_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    em.calibrate({"input_ids": tokens(B=4, seed=3)})
    em.eval()
    with torch.no_grad():
        ref = em(tokens()).logits
    em.save_pretrained(tmp_path / "r")

    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["elastic_config.json", "routers.safetensors"]
    saved = load_file(tmp_path / "r" / "routers.safetensors")
    assert sum(v.numel() for k, v in saved.items() if "calib_" not in k and not k.endswith(".stand_in.fitted")) == \
        em.num_router_parameters()  # (the stand-ins' weights are parameters: they train with the routers)
    meta = json.loads((tmp_path / "r" / "elastic_config.json").read_text())
    assert meta["base_model"]["model_type"] == MODELS[arch](0).config.model_type

    em2 = ef.ElasticModel.from_pretrained(MODELS[arch](0), tmp_path / "r")
    with torch.no_grad():
        assert torch.equal(em2(tokens()).logits, ref)
    assert em2.elastic_config == em.elastic_config


def test_router_file_for_another_model_is_refused(tmp_path):
    make_elastic("llama", "mlp_tokens").save_pretrained(tmp_path / "r")
    with pytest.raises(ef.RouterFileError, match="trained for a llama"):
        ef.ElasticModel.from_pretrained(MODELS["gpt2"](0), tmp_path / "r")
    with pytest.raises(ef.RouterFileError, match="other weights"):
        ef.ElasticModel.from_pretrained(MODELS["llama"](seed=1), tmp_path / "r")
    # the same architecture with other weights loads when the user says so
    ef.ElasticModel.from_pretrained(MODELS["llama"](seed=1), tmp_path / "r", check_fingerprint=False)


def test_corrupt_or_missing_files_are_refused(tmp_path):
    make_elastic("llama", "mlp_tokens").save_pretrained(tmp_path / "r")
    with pytest.raises(ef.RouterFileError, match="no router folder"):
        ef.ElasticModel.from_pretrained(MODELS["llama"](0), tmp_path / "nope")
    weights = tmp_path / "r" / "routers.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ef.RouterFileError, match="corrupt"):
        ef.ElasticModel.from_pretrained(MODELS["llama"](0), tmp_path / "r")
    weights.unlink()
    with pytest.raises(ef.RouterFileError, match="no routers.safetensors"):
        ef.ElasticModel.from_pretrained(MODELS["llama"](0), tmp_path / "r")


def test_config_from_a_newer_format_is_refused(tmp_path):
    make_elastic("llama", "mlp_tokens").save_pretrained(tmp_path / "r")
    cfg = tmp_path / "r" / "elastic_config.json"
    meta = json.loads(cfg.read_text())
    meta["format_version"] = 99
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ef.RouterFileError, match="upgrade elastiformer"):
        ef.ElasticModel.from_pretrained(MODELS["llama"](0), tmp_path / "r")
    cfg.write_text("{not json")
    with pytest.raises(ef.RouterFileError, match="not valid JSON"):
        ef.ElasticModel.from_pretrained(MODELS["llama"](0), tmp_path / "r")


def test_save_replaces_atomically_and_reports_unwritable(tmp_path):
    em = make_elastic("llama", "mlp_tokens")
    em.save_pretrained(tmp_path / "r")
    with pytest.raises(ef.ConfigError, match="overwrite=True"):  # a previous save is never replaced silently
        em.save_pretrained(tmp_path / "r")
    em.save_pretrained(tmp_path / "r", overwrite=True)  # replacing a previous save leaves one complete folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ef.ElastiformerError, match="cannot write routers"):
        em.save_pretrained(blocker / "r")
