"""Flextron: elastic continued-training, latency table, CLI (tiny random Llama / GPT-2)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers.cli import run
from helpers.models import MODELS, tokens
from elastiformer.errors import ConfigError, ElastiformerError
from elastiformer.flextron import FlextronModel, compute_importance, get_flextron_model, sort_by_importance_
from elastiformer.flextron.latency import (check_latency_prediction, load_latency_table, measure_latency_table,
                                           predict_latency, save_latency_table)
from elastiformer.flextron.training import frozen_teacher, sample_subnet, subnet_kl, train_flextron


def peaked(arch: str):
    """A tiny model with confident predictions (random init gives near-uniform logits, so every KL is ~0)."""
    model = MODELS[arch]()
    final_norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm  # GPT-2 ties its LM head: not there
    with torch.no_grad():
        final_norm.weight.mul_(20)
    sort_by_importance_(model, compute_importance(model, tokens(4, 16, seed=5), progress=False))
    return get_flextron_model(model)


def test_training_updates_weights_and_lowers_subnetwork_kl(arch, tmp_path):
    fm = peaked(arch)
    teacher = frozen_teacher(fm)
    data, held = tokens(16, 16, seed=3), tokens(4, 16, seed=9)
    small = fm.smallest_choices()
    before = subnet_kl(fm, held, small, teacher=teacher)
    w0 = fm.spec.mlp_weights(next(fm.nested_layers())[1].base_layer).up_w.detach().clone()
    report = train_flextron(fm, data, steps=15, lr=3e-4, warmup=1, progress=False, output_dir=tmp_path / "run",
                            checkpoint_every=8)
    after = subnet_kl(fm, held, small, teacher=teacher)
    assert after < 0.85 * before
    assert not torch.equal(w0, fm.spec.mlp_weights(next(fm.nested_layers())[1].base_layer).up_w)
    assert {"kl_full", "kl_smallest", "kl_random"} <= set(report.history[-1])
    assert report.tokens == 15 * 4 * 16
    assert fm.get_choices() == {"mlp": [0] * fm.n_layers, "attn": [0] * fm.n_layers}  # training restores them
    loaded = FlextronModel.from_pretrained(tmp_path / "run" / "model")
    assert loaded.is_sorted
    assert subnet_kl(loaded, held, small, teacher=teacher) == pytest.approx(after, rel=1e-4)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["finished"] and log["steps"] == 15


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    data = tokens(8, 12, seed=3)
    full = peaked("gpt2")
    train_flextron(full, data, steps=4, lr=1e-3, progress=False, subnets="smallest,random", checkpoint_every=2)
    cut = peaked("gpt2")
    train_flextron(cut, data, steps=4, lr=1e-3, progress=False, subnets="smallest,random", output_dir=tmp_path,
                   checkpoint_every=2, stop_after=2)
    resumed = peaked("gpt2")  # built the same way as at the start, so the frozen teacher is the same
    report = train_flextron(resumed, data, steps=4, lr=1e-3, progress=False, subnets="smallest,random",
                            output_dir=tmp_path, checkpoint_every=2, resume=True)
    assert report.resumed_from == 2
    for a, b in zip(full.base_model.parameters(), resumed.base_model.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ElastiformerError, match="other weights or settings"):
        train_flextron(peaked("gpt2"), data, steps=4, progress=False, subnets="full,smallest", output_dir=tmp_path,
                       resume=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(subnets="full,tiny"), "unknown|pass one or more"),
    (dict(teacher="copy"), "teacher="),
    (dict(steps=0), "steps"),
    (dict(teacher="self", subnets="full"), "KL to itself is zero"),
])
def test_bad_training_options(kwargs, match):
    fm = get_flextron_model(MODELS["llama"]())
    with pytest.raises(ConfigError, match=match):
        train_flextron(fm, tokens(4, 8), progress=False, **kwargs)


def test_sampled_subnets_are_reproducible():
    fm = get_flextron_model(MODELS["llama"]())
    a = sample_subnet(fm, "random", torch.Generator().manual_seed(3))
    b = sample_subnet(fm, "random", torch.Generator().manual_seed(3))
    assert a == b and len(a["mlp"]) == fm.n_layers
    u = sample_subnet(fm, "uniform", torch.Generator().manual_seed(1))
    assert len(set(u["mlp"])) == 1


def compute_bound_llama() -> FlextronModel:
    """Wide enough that matmuls, not Python overhead, dominate each sub-layer's time."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=256)
    return get_flextron_model(LlamaForCausalLM(cfg).eval())


@pytest.fixture
def one_thread():
    """Timing on a CPU shared with other work: one torch thread does not wait at OpenMP barriers for busy cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_latency_table_covers_every_layer_and_width_and_predicts(tmp_path, one_thread):
    fm = compute_bound_llama()
    table = measure_latency_table(fm, batch_size=2, seq_len=128, reps=7, progress=False)
    assert len(table["mlp_ms"]) == len(table["attn_ms"]) == fm.n_layers
    assert all(len(r) == 4 and all(t > 0 for t in r) for r in table["mlp_ms"] + table["attn_ms"])
    assert table["machine"]["cpu_model"] and table["machine"]["torch"] == torch.__version__
    for layer in table["mlp_ms"]:
        assert layer[-1] < layer[0]  # a quarter of the neurons is faster than all of them
    full = predict_latency(table, {"mlp": [0, 0], "attn": [0, 0]})
    assert full == pytest.approx(table["overhead_ms"] + sum(r[0] for r in table["mlp_ms"] + table["attn_ms"]))
    mixed = predict_latency(table, {"mlp": [torch.tensor([0, 3]), 1], "attn": None})
    assert mixed == pytest.approx(table["overhead_ms"] + sum(r[0] for r in table["attn_ms"]) +
                                  (table["mlp_ms"][0][0] + table["mlp_ms"][0][3]) / 2 + table["mlp_ms"][1][1])
    save_latency_table(table, tmp_path / "t.json")
    assert load_latency_table(tmp_path / "t.json")["mlp_ms"] == table["mlp_ms"]
    check = check_latency_prediction(fm, table, reps=7, progress=False)
    assert {r["name"] for r in check["records"]} >= {"full", "smallest"}
    by_name = {r["name"]: r for r in check["records"]}
    assert by_name["smallest"]["measured_ms"] < by_name["full"]["measured_ms"]
    assert check["mean_abs_rel_error"] < 0.6  # a shared, busy 2-core CPU: sane, not tight
    with pytest.raises(ConfigError, match="one menu index per layer"):
        predict_latency(table, {"mlp": [0]})
    with pytest.raises(ConfigError, match="not a menu index"):
        predict_latency(table, {"attn": [0, 9]})


def test_cli_sort_train_latency(workspace, tmp_path, capsys):
    """The three commands end to end on test_cli's tiny model folder and text, and their one-line errors."""
    ws = workspace
    sorted_dir = tmp_path / "sorted"
    code, out, err = run(["flextron", "sort", "--model", ws / "model", "--data", ws / "train.txt", "--output",
                          sorted_dir, "--seq-len", "16", "--calibration-sequences", "8"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "sorted_sort.json").read_text())["max_abs_logit_change"] < 1e-4
    code, out, err = run(["flextron", "train", "--model", sorted_dir, "--data", ws / "train.txt", "--output",
                          tmp_path / "run", "--steps", "2", "--seq-len", "16", "--eval-sequences", "0",
                          "--subnets", "smallest,random"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "train_result.json").read_text())["steps"] == 2
    code, out, err = run(["flextron", "latency", "--model", tmp_path / "run" / "model", "--seq-len", "8",
                          "--reps", "1", "--output", tmp_path / "lat.json"], capsys)
    assert code == 0, err
    assert len(json.loads((tmp_path / "lat.json").read_text())["mlp_ms"]) == 4
    for args, expected in (
        (["sort", "--model", ws / "model", "--output", sorted_dir], "--overwrite"),
        (["sort", "--model", ws / "model", "--mlp-widths", "0.5,0.25", "--output", tmp_path / "x"], "must be 1.0"),
        (["train", "--model", sorted_dir, "--subnets", "full,huge", "--output", tmp_path / "y"], "subnets="),
        (["latency", "--model", tmp_path / "nothing"], "nothing"),
    ):
        code, out, err = run(["flextron", *args], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, (args, err)


def test_latency_calibration_recovers_scale_and_overhead():
    """The end-to-end fit: measured = overhead + scale * cells is recovered exactly and applied to the cells."""
    from elastiformer.flextron.latency import _calibrate

    table = {"mlp_ms": [[4.0, 2.0], [4.0, 1.0]], "attn_ms": [[2.0, 1.0], [2.0, 1.0]], "overhead_ms": 5.0}
    configs = {"full": {"mlp": [0, 0], "attn": [0, 0]}, "small": {"mlp": [1, 1], "attn": [1, 1]},
               "mix": {"mlp": [0, 1], "attn": [1, 0]}}
    cells = {"full": 12.0, "small": 5.0, "mix": 8.0}
    measured = {n: 3.0 + 1.5 * c for n, c in cells.items()}  # the cells are 1.5x too fast, the overhead is 3 ms
    _calibrate(table, configs, measured)
    assert table["calibration"]["scale"] == pytest.approx(1.5)
    assert table["overhead_ms"] == pytest.approx(3.0) and table["calibration"]["raw_overhead_ms"] == 5.0
    assert table["calibration"]["fit_mean_abs_rel_error"] == pytest.approx(0.0, abs=1e-9)
    assert table["calibration"]["uncalibrated_mean_abs_rel_error"] > 0.1
    for name, choices in configs.items():
        assert predict_latency(table, choices) == pytest.approx(measured[name])
    assert table["raw_mlp_ms"] == [[4.0, 2.0], [4.0, 1.0]]
    # a fit with a negative overhead (impossible for a forward) goes through the origin instead
    table = {"mlp_ms": [[4.0, 2.0]], "attn_ms": [[2.0, 1.0]], "overhead_ms": 1.0}
    _calibrate(table, {"a": {"mlp": [0], "attn": [0]}, "b": {"mlp": [1], "attn": [1]}}, {"a": 5.0, "b": 1.0})
    assert table["overhead_ms"] == 0.0 and table["calibration"]["scale"] > 0
