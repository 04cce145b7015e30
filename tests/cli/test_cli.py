"""The `elastiformer` command end to end on a tiny model folder, plus its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import elastiformer as ef
from elastiformer.cli import commands as cli_app, options as cli_options
from helpers.cli import run, train_args


def test_train_eval_info_end_to_end(workspace, tmp_path, capsys):
    code, out, err = run(train_args(workspace, tmp_path / "run", "--lora-rank", "1", "--stand-in-rank", "2"), capsys)
    assert code == 0, err
    assert "trained 4 steps" in out
    routers = tmp_path / "run" / "routers"
    assert sorted(p.name for p in routers.iterdir()) == ["elastic_config.json", "routers.safetensors"]
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["steps"] == 4 and len(log["history"]) == 4

    code, out, err = run(["eval", "--routers", routers, "--data",  # (the base model: the one the routers record)
                          workspace / "held.txt", "--budgets", "0.5,1.0", "--seq-len", "16", "--timing-reps", "1",
                          "--output", tmp_path / "eval.json", "--plot", tmp_path / "eval.png"], capsys)
    assert code == 0, err
    assert "random" in out and "learned" in out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert {(r["method"], r["budget"]) for r in result["records"]} == {
        (m, b) for m in ("learned", "random") for b in (0.5, 1.0)}
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"

    code, out, err = run(["eval", "--routers", routers, "--data", workspace / "held.txt", "--budgets", "0.3",
                          "--seq-len", "16", "--timing-reps", "0", "--baselines", ""], capsys)
    assert code == 0 and "below the range the routers were trained on (0.5-0.95)" in err, err

    code, out, _ = run(["info", routers, "--json"], capsys)
    assert code == 0 and json.loads(out)["elastic_config"]["mlp_tokens"] == 0.5
    assert json.loads(out)["trained_budgets"] == [0.5, 0.95]
    assert json.loads(out)["elastic_config"]["lora_rank"] == 1
    code, out, _ = run(["info", routers], capsys)  # the readable summary (no JSON)
    assert code == 0 and "budgets 0.5-0.95" in out and "LoRA rank 1" in out and "mlp_tokens 0.5" in out, out
    assert "rank-2 stand-in" in out
    assert not out.lstrip().startswith("{")
    code, out, _ = run(["info", "--model", workspace / "model"], capsys)
    assert code == 0 and "4 layers" in out
    code, out, _ = run(["info"], capsys)
    assert code == 0 and "smollm2-135m" in out and "llama" in out


def test_train_objective_and_allocation_options(workspace, tmp_path, capsys):
    args = train_args(workspace, tmp_path / "run", "--router-targets", "sensitivity", "--router-inputs", "student",
                      "--target-steps", "2", "--target-repeats", "2", "--no-allocation")
    code, out, err = run(args, capsys)
    assert code == 0, err
    code, out, err = run(train_args(workspace, tmp_path / "run_kv", "--attn-tokens", "0.6", "--key-value-targets",
                                    "--target-steps", "1", "--no-allocation"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run_kv" / "train_log.json").read_text())["finished"]
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert len(log["target_history"]) == 2 and "token_importance" in log["history"][0]
    code, out, _ = run(["info", tmp_path / "run" / "routers", "--json"], capsys)
    assert code == 0 and json.loads(out).get("allocation") in (None, {})  # --no-allocation: uniform capacities
    code, out, err = run(train_args(workspace, tmp_path / "run2", "--allocation-floor", "0.3",
                                    "--allocation-batches", "3", "--allocation-levels", "0.875,0.5,0"), capsys)
    assert code == 0, err
    code, out, _ = run(["info", tmp_path / "run2" / "routers", "--json"], capsys)
    assert code == 0 and json.loads(out)["allocation"]
    moves = ef.ElasticModel.from_pretrained(str(workspace / "model"), tmp_path / "run2" / "routers").allocation.moves
    assert moves and {m.end for m in moves} <= {0.875, 0.5, 0.0}  # every move lands on a level asked for
    assert json.loads(out)["allocation"]["calibration_tokens"] == 3 * 2 * 16  # 3 batches of 2 x 16 tokens
    code, out, _ = run(["info", tmp_path / "run2" / "routers"], capsys)
    assert code == 0 and "per-layer capacities" in out and "budget 0.80" in out, out
    code, out, err = run(train_args(workspace, tmp_path / "run_off", "--router-targets", "sensitivity",
                                    "--no-key-value-targets", "--steps", "1", "--no-allocation"), capsys)
    assert code == 0, err  # explicitly off: allowed with any objective
    for bad, message in ((["--router-targets", "self", "--target-steps", "2"], "--target-steps"),
                         (["--allocation-floor", "1.5"], "--allocation-floor"),
                         (["--allocation-batches", "0"], "--allocation-batches"),
                         (["--allocation-levels", "0.5,1"], "--allocation-levels"),
                         (["--key-value-targets", "--router-targets", "sensitivity"], "--key-value-targets"),
                         (["--router-inputs", "future"], "--router-inputs"),
                         (["--stand-in-rank", "-1"], "--stand-in-rank"),
                         (["--stand-in-lr-scale", "-0.1"], "--stand-in-lr-scale")):
        code, out, err = run(train_args(workspace, tmp_path / "bad", *bad), capsys)
        assert code == 2 and message in err and "Traceback" not in err, (bad, err)
        assert not (tmp_path / "bad").exists()


def test_yaml_config_and_command_line_precedence(workspace, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {workspace / 'model'}\ndata: {workspace / 'train.txt'}\nmlp-tokens: 0.6\nsteps: 3\n"
                   f"seq_len: 16\nbatch_size: 2\nbudget: 0.6\n")
    code, out, err = run(["train", "--config", cfg, "--steps", "2", "--output", tmp_path / "run"], capsys)
    assert code == 0, err
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["steps"] == 2 and log["history"][0]["budget_mlp_tokens"] == 0.6


def test_train_can_rank_the_allocation_by_decoding_time(workspace, tmp_path, capsys):
    code, out, err = run(train_args(workspace, tmp_path / "run", "--steps", "1", "--allocation-time"), capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "run" / "routers" / "elastic_config.json").read_text())
    assert set(meta["allocation"]["latency"]["saved"]) == {"mlp_tokens", "attn_heads"}  # the table it ranked by
    code, out, _ = run(["info", tmp_path / "run" / "routers"], capsys)
    assert code == 0 and "ranked by:      loss per decoding time saved" in out


def test_resume_from_the_command_line(workspace, tmp_path, capsys):
    assert run(train_args(workspace, tmp_path / "run"), capsys)[0] == 0
    code, out, err = run(train_args(workspace, tmp_path / "run", "--steps", "6", "--resume"), capsys)
    assert code == 0, err
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["resumed_from"] == 4 and log["steps"] == 6


@pytest.mark.parametrize("case", ["missing data", "empty data", "budget 0", "budget 1.5", "eval budget 1.5",
                                  "unknown key", "unknown model", "output exists", "unwritable", "no routers",
                                  "bad routers", "budget and range", "split without experts", "resume overwrite",
                                  "bench resume overwrite", "eval bad match", "bench bad match"])
def test_bad_input_gives_one_line_error(workspace, tmp_path, capsys, case):
    ws = workspace
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "something").write_text("")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("steps: 3\nlearning_rate: 0.1\n")
    args = {
        "missing data": train_args(ws, tmp_path / "o", "--data", tmp_path / "nope.txt"),
        "empty data": train_args(ws, tmp_path / "o", "--data", ws / "empty.txt"),
        "budget 0": train_args(ws, tmp_path / "o", "--budget", "0"),
        "budget 1.5": train_args(ws, tmp_path / "o", "--budget", "1.5"),
        "eval budget 1.5": ["eval", "--routers", tmp_path, "--budgets", "0.5,1.5"],
        "unknown key": ["train", "--config", bad_cfg],
        "unknown model": train_args(ws, tmp_path / "o", "--model", "not-a-model"),
        "output exists": train_args(ws, existing),
        "unwritable": train_args(ws, blocker / "sub"),
        "no routers": ["eval", "--routers", tmp_path / "nothing-here"],
        "bad routers": ["eval", "--routers", existing],
        "budget and range": train_args(ws, tmp_path / "o", "--budget", "0.6", "--budget-range", "0.5,0.9"),
        "split without experts": train_args(ws, tmp_path / "o", "--expert-split", "cluster"),
        "resume overwrite": train_args(ws, tmp_path / "o", "--resume", "--overwrite"),
        "bench resume overwrite": ["bench", "--resume", "--overwrite", "--output", tmp_path / "o" / "lm.json"],
        "eval bad match": ["eval", "--routers", tmp_path, "--match", "blocks"],
        "bench bad match": ["bench", "--match", "blocks", "--output", tmp_path / "o" / "lm.json"],
    }[case]
    expected = {
        "missing data": "nope.txt", "empty data": "empty", "budget 0": "(0, 1]", "budget 1.5": "(0, 1]",
        "eval budget 1.5": "(0, 1]", "unknown key": "unknown keys ['learning_rate']", "unknown model": "not-a-model",
        "output exists": "--overwrite", "unwritable": "writable", "no routers": "no router folder",
        "bad routers": "no elastic_config.json", "budget and range": "pass one of them",
        "split without experts": "--mlp-experts", "resume overwrite": "pass one of them",
        "bench resume overwrite": "pass one", "eval bad match": "'target'", "bench bad match": "'target'",
    }[case]
    code, out, err = run(args, capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing half-written, and no empty output folder left behind


@pytest.mark.parametrize("args, expected, where", [
    (["train", "--steps", "abc"], "Invalid value for '--steps'", "elastiformer train --help"),
    (["train", "--stepz", "3"], "No such option: --stepz", "elastiformer train --help"),
    (["flextron", "train", "--lr", "fast"], "Invalid value for '--lr'", "elastiformer flextron train --help"),
    (["bogus"], "No such command 'bogus'", "elastiformer --help"),
])
def test_option_type_errors_are_one_line(capsys, args, expected, where):
    """typer / click's own usage errors (a value of the wrong type, a typo) in one line that says where to look."""
    code, out, err = run(args, capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err and f"`{where}`" in err, err


def test_debug_flag_shows_the_traceback(workspace, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(ef.__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-m", "elastiformer", "--debug", "eval", "--routers", tmp_path / "x"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "RouterFileError" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "elastiformer", "eval", "--routers", tmp_path / "x"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("error: no router")


def test_help_on_every_command(capsys):
    for command in ([], ["train"], ["eval"], ["info"], ["demo"]):
        code, out, _ = run([*command, "--help"], capsys)
        assert code == 0 and "Usage" in out and "<bool>" not in out  # flags read as flags
    code, out, _ = run(["train", "--help"], capsys)
    flat = " ".join(out.split())
    for shown in ("[default: (200)]", "[default: (smollm2-135m)]", "[default: (runs/train)]", "[default: (0.002)]",
                  "--allocation / --no-allocation"):
        assert shown in flat, shown
    code, out, _ = run(["flextron", "sort", "--help"], capsys)
    assert code == 0 and "[default: (runs/flextron/sorted)]" in " ".join(out.split())


def test_exit_codes_version_and_a_bare_command(capsys, monkeypatch):
    code, out, err = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"elastiformer {ef.__version__}"
    code, out, err = run([], capsys)  # the help, not "error:  (see ...)"
    assert code == 2 and "Usage" in out and "train" in out and "error" not in err

    def interrupted(o):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_app, "run_train", interrupted)
    code, out, err = run(["train", "--steps", "1"], capsys)  # Ctrl-C: 130 and one line, never 0
    assert code == 130 and err.count("\n") == 1 and "--resume" in err

    def broken(o):
        raise RuntimeError("something inside went wrong\nsecond line")

    monkeypatch.setattr(cli_app, "run_train", broken)
    code, out, err = run(["train", "--steps", "1"], capsys)  # a bug: 1 and one line, the traceback with --debug
    assert code == 1 and err.count("\n") == 1 and "RuntimeError: something inside went wrong" in err
    assert "--debug" in err and "Traceback" not in err
    with pytest.raises(RuntimeError):
        run(["--debug", "train", "--steps", "1"], capsys)


def test_outputs_follow_the_umask_and_options_holding_paths_are_written(tmp_path):
    from elastiformer.cache import atomic_dir, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"output": tmp_path / "x.json"})
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a").write_text("")
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "r.json").read_text()) == {"output": str(tmp_path / "x.json")}
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


def test_readme_sections_are_written_to_the_clones_readme_only(tmp_path, monkeypatch):
    from elastiformer import validation

    assert validation.project_readme() == Path(__file__).resolve().parents[2] / "README.md"
    monkeypatch.setattr(validation, "__file__", str(tmp_path / "site-packages" / "elastiformer" / "validation.py"))
    with pytest.raises(ef.ConfigError, match="pip install -e"):  # a wheel install: no README of its own to edit
        validation.project_readme()


@pytest.mark.parametrize("yaml_text, expected", [
    ("overwrite: 'maybe'\n", "pass true or false"),
    ("dense_layers: [0, 'a']\n", "numbers only"),
    ("output: 5\n", "name or path"),
    ("data: [a.txt, b.txt]\n", "one name or path"),
    ("steps: true\n", "not true / false"),
    ("stepz: 3\n", "(did you mean steps?)"),
    ("steps: abc\n", "steps is 'abc': pass an integer, as --steps takes"),  # the option's declared type
    ("lr: fast\n", "lr is 'fast': pass a number"),
    ("batch_size: 2.5\n", "batch_size is 2.5: pass an integer"),
])
def test_yaml_values_are_checked_like_command_line_values(tmp_path, capsys, yaml_text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    code, out, err = run(["train", "--config", cfg, "--output", tmp_path / "o"], capsys)
    assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_yaml_false_strings_are_false(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("overwrite: 'false'\nbudgets: [0.5, 0.8]\ndense_layers: 0\n")
    from elastiformer.options import Option

    options = {"overwrite": Option(True, "."), "budgets": Option("0.9", "."), "dense_layers": Option("", ".")}
    merged = cli_options.merge_options(cfg, {}, options)
    assert merged == {"overwrite": False, "budgets": "0.5,0.8", "dense_layers": "0"}


def test_yaml_values_take_the_options_declared_types(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: '7'\nlr: '0.01'\nbatch_size: 2.0\ndense_layers: 0\n")
    merged = cli_options.merge_options(cfg, {}, cli_app.TRAIN_OPTIONS)
    assert (merged["steps"], merged["lr"], merged["batch_size"], merged["dense_layers"]) == (7, 0.01, 2, "0")
    assert type(merged["steps"]) is int and type(merged["lr"]) is float


def test_bench_speed_through_the_command_line(workspace, tmp_path, capsys, monkeypatch):
    """The whole CLI path of bench-speed on a tiny model (its options reach the JSON, which must serialise)."""
    out = tmp_path / "speed.json"
    cfg = tmp_path / "speed.yaml"
    cfg.write_text("batch_size: 2\nseq_len: 16\ntrain_sequences: 8\n")  # (settings without an option of their own)
    code, _, err = run(["bench-speed", "--model", workspace / "model", "--components", "mlp_tokens", "--budgets",
                        "0.8", "--steps", "1", "--allocation-sequences", "2", "--prefill-batch", "1", "--prefill-len",
                        "16", "--decode-tokens", "2", "--decode-batches", "1", "--reps", "1", "--no-flextron",
                        "--output", out, "--config", cfg], capsys)
    assert code == 0, err
    saved = json.loads(out.read_text())
    assert saved["settings"]["steps"] == 1 and {r["component"] for r in saved["records"]} == {"mlp_tokens"}
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:speed -->\nold\n<!-- /results:speed -->\n")
    monkeypatch.setattr(cli_app, "project_readme", lambda: readme)
    code, _, err = run(["bench-speed", "--readme", "--output", out], capsys)
    assert code == 0, err
    assert "old" not in readme.read_text() and "| elastiformer | mlp_tokens | 0.80 |" in readme.read_text()
