"""`elastiformer bench` end to end on a tiny model (the schema of bench/results/lm.json), and the README generator."""

import json

import pytest

from elastiformer.benchmarks.lm import BENCH_DEFAULTS, plot_lm_bench, results_markdown, run_lm_bench
from elastiformer.benchmarks.runner import update_readme

SCHEMA = {"method": str, "component": str, "budget": float, "lora_rank": int, "block_flops_ratio": float,
          "delta_lm_loss": float, "kl": float, "top1_agreement": float}


def test_bench_writes_the_result_schema_and_readme(workspace, tmp_path):
    out = tmp_path / "lm.json"
    o = dict(BENCH_DEFAULTS) | dict(model=str(workspace / "model"), components="mlp_tokens,combined",
                                    budgets="0.6,0.9", dense_layers="", steps=2, train_sequences=16,
                                    eval_sequences=2, eval_seq_len=32, seq_len=16, prefill_len=16, decode_tokens=3,
                                    timing_reps=1, lm_eval_docs=6, output=str(out))
    result = run_lm_bench(o, plot=plot_lm_bench, echo=lambda *_: None)
    saved = json.loads(out.read_text())
    assert saved["records"] == result["records"] and saved["eval_tokens"] == 64 and saved["train_tokens"] > 0
    for r in saved["records"]:
        for key, kind in SCHEMA.items():
            assert isinstance(r[key], kind), (key, r[key])
        timed = r["method"] == "learned"
        assert (r["prefill_time_ratio"] is not None) == timed and (r["decode_time_ratio"] is not None) == timed
        assert (r["last_word_acc"] is not None) == timed
    # the teacher's last-word numbers, computed another way: lm_eval on the plain model folder (no routers)
    from elastiformer.integrations.lm_eval import ElastiformerLM, evaluate_last_word, write_last_word_task

    teacher = evaluate_last_word(ElastiformerLM(pretrained=str(workspace / "model"), batch_size=8),
                                 write_last_word_task(n_docs=6))
    assert saved["teacher_last_word"]["acc"] == teacher["acc"]
    assert saved["teacher_last_word"]["perplexity"] == pytest.approx(teacher["perplexity"], rel=1e-5)
    methods = {(r["component"], r["method"]) for r in saved["records"]}
    assert methods == {("mlp_tokens", m) for m in ("learned", "random", "static", "norm", "norm_allocated")} | {
        ("combined", m) for m in ("learned", "random", "static")}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:lm -->\nold\n<!-- /results:lm -->\nafter\n")
    update_readme(saved, readme, "lm.png", marker="lm", render=results_markdown)
    text = readme.read_text()
    again = sum("learned_at_same_flops" in r for r in saved["records"] if r["setting"] == "mlp_tokens")
    assert "old" not in text and text.endswith("after\n") and text.count("| mlp_tokens |") == 10 + again
    assert text.count(" | learned @ ") == sum("learned_at_same_flops" in r for r in saved["records"])


def one_setting_bench(workspace, out, **overrides) -> dict:
    """Options of a one-step, one-budget `mlp_tokens` bench on the tiny workspace model."""
    return dict(BENCH_DEFAULTS) | dict(model=str(workspace / "model"), components="mlp_tokens", budgets="0.8",
                                       dense_layers="", steps=1, train_sequences=8, eval_sequences=2, eval_seq_len=32,
                                       batch_size=4, seq_len=16, prefill_len=16, decode_tokens=2, timing_reps=1,
                                       lm_eval_docs=0,
                                       output=str(out)) | overrides


def test_bench_append_keeps_other_settings(workspace, tmp_path):
    out = tmp_path / "lm.json"
    o = one_setting_bench(workspace, out, routers_dir=str(tmp_path / "routers"))
    run_lm_bench(o, echo=lambda *_: None)
    from elastiformer.artifacts import read_router_config  # the setting's routers, saved beside the results

    assert read_router_config(tmp_path / "routers" / "mlp_tokens")["elastic_config"]["mlp_tokens"] == 0.8
    run_lm_bench(o | dict(lora_rank=1, append=True), echo=lambda *_: None)
    records = json.loads(out.read_text())["records"]
    assert sorted({r["lora_rank"] for r in records}) == [0, 1]
    assert len(records) == 2 * 5  # learned, random, static, norm, norm_allocated at one budget, with and without LoRA


def test_bench_resume_runs_only_unfinished_settings(workspace, tmp_path):
    out = tmp_path / "lm.json"
    o = one_setting_bench(workspace, out, timing_reps=0)
    run_lm_bench(o, echo=lambda *_: None)  # (as if a longer run had been interrupted after its first setting)
    first = json.loads(out.read_text())
    said = []
    run_lm_bench(o | dict(components="mlp_tokens,attn_tokens", resume=True), echo=said.append)
    saved = json.loads(out.read_text())
    assert any("mlp_tokens already finished" in line for line in said), said
    assert not any(line.startswith("[mlp_tokens] training") for line in said), said  # not run again
    assert set(saved["components"]) == {"mlp_tokens", "attn_tokens"}
    mlp = [r for r in saved["records"] if r["setting"] == "mlp_tokens"]
    assert mlp == first["records"]  # kept as measured
    assert {r["setting"] for r in saved["records"]} == {"mlp_tokens", "attn_tokens"}


def test_bench_refits_the_allocation_of_routers_an_earlier_run_saved(workspace, tmp_path):
    """`--routers-from`: the routers of an earlier run's `--routers-dir`, not trained again; the allocation is fitted
    again on this run's calibration batches (here 3, so more than the two the thresholds take)."""
    import torch

    from elastiformer.errors import ConfigError
    from elastiformer.model import ElasticModel

    routers = tmp_path / "routers"
    run_lm_bench(one_setting_bench(workspace, tmp_path / "first.json", timing_reps=0, routers_dir=str(routers)),
                 echo=lambda *_: None)
    before = ElasticModel.from_pretrained(str(workspace / "model"), routers / "mlp_tokens")
    said = []
    out = tmp_path / "refit.json"
    o = one_setting_bench(workspace, out, timing_reps=0, routers_from=str(routers), allocation_batches=3,
                          routers_dir=str(tmp_path / "refit"), train_sequences=16)
    with pytest.raises(ConfigError, match="--allocation-batches 3 needs 3 calibration batches and the training data gave 2"):
        run_lm_bench(o | dict(train_sequences=8), echo=lambda *_: None)
    run_lm_bench(o, echo=said.append)
    assert not any("training routers" in line for line in said), said
    saved = json.loads(out.read_text())
    info = saved["components"]["mlp_tokens"]
    assert info["train_tokens"] == 0 and info["routers_from"] == str(routers / "mlp_tokens")
    assert info["allocation_tokens"] == 3 * 4 * 16  # 3 calibration batches of batch_size 4 x seq_len 16
    after = ElasticModel.from_pretrained(str(workspace / "model"), tmp_path / "refit" / "mlp_tokens")
    weights = lambda em: {k: v for k, v in em.router_state_dict().items() if "threshold" not in k}  # noqa: E731
    assert all(torch.equal(v, weights(after)[k]) for k, v in weights(before).items())  # the same routers
    assert after.allocation.tokens == 3 * before.allocation.tokens  # the allocation fitted again, on more text
    import shutil

    shutil.copytree(routers / "mlp_tokens", routers / "attn_tokens")  # routers of another setting under its name
    with pytest.raises(ConfigError, match="route mlp_tokens .* not this setting's attn_tokens"):
        run_lm_bench(one_setting_bench(workspace, tmp_path / "x.json", components="attn_tokens",
                                       routers_from=str(routers), timing_reps=0), echo=lambda *_: None)
    assert not (tmp_path / "x.json").exists()


def test_bench_allocation_levels_reach_the_fitted_path_and_bad_ones_are_refused_first(workspace, tmp_path):
    """--allocation-levels: the moves of the saved path land on the levels asked for (0.875 among them), and the
    path ends no lower than --allocation-floor allows; a bad level or floor is refused before any training."""
    from elastiformer.errors import ConfigError
    from elastiformer.model import ElasticModel

    out = tmp_path / "lm.json"
    for bad, match in ((dict(allocation_levels="0.9,1.5"), "--allocation-levels 0.9,1.5"),
                       (dict(allocation_floor=1.2), "--allocation-floor 1.2")):
        said = []
        with pytest.raises(ConfigError, match=match):
            run_lm_bench(one_setting_bench(workspace, out, timing_reps=0) | bad, echo=said.append)
        assert not said and not out.exists()
    run_lm_bench(one_setting_bench(workspace, out, timing_reps=0, routers_dir=str(tmp_path / "r"), budgets="0.85",
                                   allocation_levels="0.875,0.5,0", allocation_floor=0.75), echo=lambda *_: None)
    alloc = ElasticModel.from_pretrained(str(workspace / "model"), tmp_path / "r" / "mlp_tokens").allocation
    assert alloc.moves and {m.end for m in alloc.moves} <= {0.875, 0.5, 0.0}
    assert alloc.flops[-2] > 0.75 >= alloc.flops[-1]  # stopped once past the floor (0.85 - 0.05 is lower)
