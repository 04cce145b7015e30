"""The speed bench end to end on a tiny model: its JSON (every component, budget and measurement, the machine) and
its PNG. Timings of a tiny model mean nothing; the shape of what is recorded does."""

import json

import pytest
import torch

from elastiformer.benchmarks.speed import SPEED_DEFAULTS, run_speed_bench, uniform_widths
from helpers.models import tiny_llama, tokens


def test_speed_bench_records_every_measurement_with_flops_and_machine(tmp_path):
    o = SPEED_DEFAULTS | dict(model="tiny-llama", components="mlp_tokens,attn_heads,mlp_experts_cluster",
                              budgets="0.6,0.9", steps=1, batch_size=2, prefill_batch=2, prefill_len=16,
                              decode_tokens=3, decode_batches="1,2", prompt_len=4, reps=1,
                              output=str(tmp_path / "speed.json"))
    lines = []
    models = []

    def new_model():  # every model the bench makes, to find the dense reference among them afterwards
        models.append(tiny_llama())
        model = models[-1]
        model.calls = []  # per forward: whether the model held elastiformer's wrappers when it ran
        model.register_forward_hook(lambda *a: model.calls.append(
            any(type(x).__module__.startswith("elastiformer") for x in model.modules())))
        return model

    result = run_speed_bench(o, echo=lines.append, new_model=new_model, data=(tokens(8, 16), tokens(4, 24, seed=2)))
    # the dense side of every ratio is a plain model that ran and was never wrapped (not the elastic model with its
    # routing off, whose wrappers cost time even then)
    plain = [m for m in models if m.calls and not any(m.calls)]
    assert len(plain) == 1 and "never wrapped" in result["dense"]
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["records"] == json.loads(json.dumps(result["records"]))
    assert saved["machine"]["torch_threads"] == torch.get_num_threads() and saved["machine"]["cpu_count"]
    assert (tmp_path / "speed.png").stat().st_size > 10_000
    # each ElastiFormer setting twice, on the same routers: its allocation ranked by FLOPs and by decoding time
    systems = {(r["system"], r["component"], r.get("ranking")) for r in saved["records"]}
    assert systems == {("elastiformer", c, ranking) for c in ("mlp_tokens", "attn_heads", "mlp_experts_cluster")
                       for ranking in ("flops", "time")} | {("flextron", "flextron (uniform widths)", None)}
    for setting in ("mlp_tokens", "attn_heads", "mlp_experts_cluster"):
        latency = saved["components"][setting]["latency"]  # the table the time-ranked allocation used
        assert set(latency["saved"]) == {"mlp_tokens" if setting == "mlp_tokens" else
                                         "attn_heads" if setting == "attn_heads" else "mlp_experts_active"}
    for system, comp, ranking in systems:
        for budget in (0.6, 0.9):
            rows = [r for r in saved["records"] if (r["component"], r.get("ranking"), r["budget"]) ==
                    (comp, ranking, budget)]
            assert sorted((r["kind"], r["batch"]) for r in rows) == [("decode", 1), ("decode", 2), ("prefill", 2)]
            for r in rows:
                assert r["time_ratio"] > 0 and r["dense_tokens_per_s"] > 0 and r["elastic_tokens_per_s"] > 0
                assert 0 < r["model_flops_ratio"] <= 1.0 + 1e-9
                assert r["heldout_kl"] >= -1e-6  # what the time was bought with, against the dense model
    kl = {(r["component"], r.get("ranking"), r["budget"]): r["heldout_kl"] for r in saved["records"]}
    assert kl[("mlp_tokens", "flops", 0.6)] > 1e-7  # skipped work changes the predictions (a tiny model's, a little)
    assert "(time-ranked)" in "\n".join(lines) and "KL" in "\n".join(lines)
    low = [r["model_flops_ratio"] for r in saved["records"] if r["budget"] == 0.6 and r["kind"] == "prefill"]
    assert max(low) < 1.0  # the work really falls at the lower budget
    assert len(lines) >= len(saved["records"])  # a summary line per record


def test_uniform_flextron_widths_fit_the_budget():
    from elastiformer.flextron import FlextronConfig, get_flextron_model
    from elastiformer.benchmarks.speed import FLEXTRON_MENUS

    fm = get_flextron_model(tiny_llama(), FlextronConfig(**FLEXTRON_MENUS))
    for budget in (0.5, 0.75, 0.9):
        picked = uniform_widths(fm, budget, 16)
        cost = fm.choices_flops(picked["mlp"], picked["attn"], seq_len=16)
        assert cost <= budget + 1e-9
        narrower = [fm.choices_flops(m, a, seq_len=16) for m in range(7) for a in range(4)]
        assert cost == pytest.approx(max(c for c in narrower if c <= budget + 1e-9))


def test_speed_bench_keeps_finished_settings_when_a_later_one_fails(tmp_path, monkeypatch):
    import elastiformer.flextron as flextron

    def broken(*args, **kwargs):
        raise RuntimeError("flextron failed")

    monkeypatch.setattr(flextron, "get_flextron_model", broken)
    o = SPEED_DEFAULTS | dict(model="tiny-llama", components="mlp_tokens", budgets="0.8", steps=1, batch_size=2,
                              prefill_batch=2, prefill_len=16, decode_tokens=2, decode_batches="1", prompt_len=4,
                              reps=1, output=str(tmp_path / "speed.json"))
    with pytest.raises(RuntimeError, match="flextron failed"):
        run_speed_bench(o, echo=lambda *_: None, new_model=tiny_llama, data=(tokens(8, 16), tokens(4, 24, seed=2)))
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert {r["component"] for r in saved["records"]} == {"mlp_tokens"}  # the finished setting is on disk


def test_speed_table_checks_the_targets():
    from elastiformer.benchmarks.speed import speed_markdown, target_check

    row = dict(system="elastiformer", component="mlp_tokens", budget=0.8, kind="prefill", batch=4,
               model_flops_ratio=0.85, time_ratio=0.88, elastic_tokens_per_s=10.0, dense_tokens_per_s=9.0)
    assert target_check(row) == "met"
    assert target_check(row | dict(time_ratio=0.95)) == "missed: > FLOPs + 0.05"
    assert target_check(row | dict(time_ratio=1.2)) == "missed: slower than dense, > FLOPs + 0.05"
    assert target_check(row | dict(kind="decode", batch=1, time_ratio=0.94)) == "met"
    assert target_check(row | dict(kind="decode", batch=8, time_ratio=2.0)) == ""  # no target at batch 8
    text = speed_markdown({"model": "m", "machine": {}, "settings": {}, "records": [row, row | dict(time_ratio=1.2)]})
    assert "Targets met in 1 of 2 checked rows." in text and text.count("| elastiformer |") == 2
    assert "| 0.880 | - |" in text  # a record without paired ratios (written before they were) shows none


def test_speed_records_keep_each_repetitions_paired_ratio():
    from elastiformer.benchmarks.speed import paired_range, timing_record

    r = timing_record("decode", 64, dense=[2.0, 4.0, 3.0], elastic=[1.0, 3.0, 3.3], flops_ratio=0.8)
    assert r["time_ratio"] == 3.0 / 3.0  # the ratio of the medians, as before
    assert r["paired_ratios"] == pytest.approx([0.5, 0.75, 1.1]) and paired_range(r) == "0.50-1.10"
    assert r["dense_tokens_per_s"] == 64 / 3.0


def test_an_unknown_ranking_is_refused_before_any_work():
    from elastiformer.errors import ConfigError

    o = SPEED_DEFAULTS | dict(model="tiny-llama", components="mlp_tokens", rankings="flops,speed")

    def never():
        raise AssertionError("no model is made for a bad option")

    with pytest.raises(ConfigError, match="rankings='flops,speed'"):
        run_speed_bench(o, echo=lambda *_: None, new_model=never, data=(tokens(8, 16), tokens(4, 24, seed=2)))
