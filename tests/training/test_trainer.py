"""train_routers and evaluate on tiny models: training helps, resume reproduces, bad options are refused."""

import contextlib

import pytest
import torch

import elastiformer as ef
from elastiformer.distill import kl_teacher_student
from elastiformer.evaluation.lm import evaluate
from elastiformer.training.routers import train_routers
from helpers.models import pretrained_like, tokens


def held_out_kl(em, held, random=False) -> float:
    with torch.no_grad():
        with em.disable_routers():
            teacher = em(held).logits
        torch.manual_seed(0)
        with em.random_routing() if random else contextlib.nullcontext():
            student = em(held).logits
    return kl_teacher_student(teacher, student).item()


@pytest.mark.parametrize("component", ["mlp_tokens", "mlp_experts"])
def test_training_lowers_kl_below_untrained_and_random(component):
    model = pretrained_like()
    if component == "mlp_experts":
        cfg = ef.ElasticConfig(mlp_experts=4, mlp_experts_active=0.5)
        with torch.no_grad():  # give the experts structure to find: experts 0 and 1 (neurons 0-23) matter more
            for layer in model.model.layers:
                layer.mlp.down_proj.weight[:, :24] *= 3.0
        margin = 0.9
    else:
        cfg, margin = ef.ElasticConfig(mlp_tokens=0.5), 1.0
    em = ef.get_elastic_model(model, cfg)
    train, held = tokens(B=64, T=32, seed=3), tokens(B=16, T=32, seed=9)
    em.calibrate(train[:16])
    untrained, random = held_out_kl(em, held), held_out_kl(em, held, random=True)
    report = train_routers(em, train, steps=150, batch_size=8, budget=0.5, lr=5e-2, progress=False)
    assert not em.training and em.is_calibrated  # ends in inference mode, thresholds fitted
    trained = held_out_kl(em, held)
    assert trained < margin * untrained, (trained, untrained)
    assert trained < 0.9 * random, (trained, random)
    assert report.steps == 150 and report.tokens == 150 * 8 * 32
    assert report.history[-1]["kl"] < report.history[0]["kl"]


def test_budget_sampling_covers_the_range_and_fixed_budget_does_not():
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.8))
    r = train_routers(em, tokens(B=16, T=16), steps=20, batch_size=4, budget_range=(0.4, 0.9), progress=False)
    sampled = [h["budget_mlp_tokens"] for h in r.history]
    assert min(sampled) >= 0.4 and max(sampled) <= 0.9 and max(sampled) - min(sampled) > 0.2
    r = train_routers(em, tokens(B=16, T=16), steps=5, batch_size=4, budget=0.6, progress=False)
    assert {h["budget_mlp_tokens"] for h in r.history} == {0.6}


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    data = tokens(B=32, T=16, seed=4)
    kw = dict(steps=12, batch_size=4, lr=1e-2, seed=3, checkpoint_every=4, progress=False, grad_accum=2)
    whole = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.6, attn_heads=0.5))
    train_routers(whole, data, output_dir=tmp_path / "a", **kw)

    cut = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.6, attn_heads=0.5))
    train_routers(cut, data, output_dir=tmp_path / "b", stop_after=7, **kw)  # checkpoints at 4 and 7
    resumed = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.6, attn_heads=0.5))
    report = train_routers(resumed, data, output_dir=tmp_path / "b", resume=True, **kw)
    assert report.resumed_from == 7 and report.steps == 12
    a, b = whole.router_state_dict(), resumed.router_state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, ), k
    assert (tmp_path / "b" / "routers" / "routers.safetensors").is_file()
    assert (tmp_path / "b" / "train_log.json").is_file()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(data=torch.zeros(0, 8, dtype=torch.long)), ef.DataError, "shape"),
    (dict(data=[]), ef.DataError, "empty"),
    (dict(budget=0.0), ef.BudgetError, r"\(0, 1\]"),
    (dict(budget=1.5), ef.BudgetError, r"\(0, 1\]"),
    (dict(budget_range=(0.5, 1.2)), ef.ConfigError, "budget_range"),
    (dict(steps=0), ef.ConfigError, "steps"),
    (dict(lr=-1.0), ef.ConfigError, "learning rate"),
    (dict(resume=True), ef.ConfigError, "output_dir"),
    (dict(allocation_levels=(0.875, 1.0)), ef.ConfigError, "allocation_levels"),
    (dict(allocation_levels=()), ef.ConfigError, "allocation_levels"),
])
def test_bad_training_options(kwargs, error, match):
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.8))
    args = dict(data=tokens(B=8, T=16), steps=2, progress=False) | kwargs
    with pytest.raises(error, match=match):
        train_routers(em, **args)


def test_unwritable_output_and_missing_checkpoint(tmp_path):
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.8))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ef.ElastiformerError, match="cannot write to output folder"):
        train_routers(em, tokens(B=8, T=16), steps=2, output_dir=blocker / "x", progress=False)
    with pytest.raises(ef.ElastiformerError, match="no checkpoint"):
        train_routers(em, tokens(B=8, T=16), steps=2, output_dir=tmp_path / "new", resume=True, progress=False)


def test_evaluate_reports_learned_and_random_at_each_budget():
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.8, attn_heads=0.75))
    em.calibrate(tokens(B=8, T=32, seed=2))
    result = evaluate(em, tokens(B=8, T=32, seed=5), budgets=[1.0, 0.75, 0.5], timing_reps=1, progress=False)
    recs = {(r["method"], r["budget"]): r for r in result["records"]}
    assert set(recs) == {(m, b) for m in ("learned", "random") for b in (1.0, 0.75, 0.5)}
    full = recs[("learned", 1.0)]
    assert full["delta_lm_loss"] == 0 and full["kl"] == 0 and full["top1_agreement"] == 1 and full["block_flops_ratio"] == 1
    assert recs[("learned", 0.5)]["block_flops_ratio"] < recs[("learned", 0.75)]["block_flops_ratio"] < 1
    assert recs[("learned", 0.5)]["model_flops_ratio"] > recs[("learned", 0.5)]["block_flops_ratio"]  # LM head is dense
    assert recs[("learned", 0.5)]["kl"] > 0 and all(r["prefill_time_ratio"] > 0 for r in result["records"])
    assert result["tokens"] == 8 * 31 and 0 < result["router_param_fraction"] < 0.05
    assert em.get_budget() == {"mlp_tokens": 0.8, "attn_heads": 0.75}  # restored


def test_baselines_run_at_the_same_budget():
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.5, dense_layers=()))
    em.calibrate(tokens(B=8, T=32, seed=2))
    calib = tokens(B=8, T=32, seed=6)
    result = evaluate(em, tokens(B=8, T=32, seed=5), budgets=[0.5], baselines=("random", "norm", "static"),
                      calibration_data=calib, timing_reps=0, progress=False, match="budget")
    ratios = {r["method"]: r["block_flops_ratio"] for r in result["records"]}
    assert set(ratios) == {"learned", "random", "norm", "static"}
    assert all(abs(v - ratios["random"]) < 0.06 for v in ratios.values()), ratios  # equal compute, roughly
    # static drops whole MLP sub-layers: 2 of 4 at budget 0.5, in the order fit_static measured
    em.set_budget(0.5)
    with torch.no_grad(), em.routing_method("static"):
        em(tokens(B=2, T=16))
    mlp = [s["token_fraction"] for s in em.last_stats()["per_layer"] if s["sublayer"] == "mlp"]
    assert sorted(mlp) == [0.0, 0.0, 1.0, 1.0]
    assert [i for i, f in enumerate(mlp) if f == 0.0] == sorted(em.state.static_layer_order["mlp_tokens"][:2])


def test_baselines_run_at_the_learned_routers_flops():
    """match="flops" (the default) bisects each baseline's budget until it executes the learned routers' block FLOPs;
    static pruning, whose FLOPs move in whole layers, gets at least as many."""
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.5, dense_layers=()))
    calib = tokens(B=8, T=32, seed=6)
    train_routers(em, tokens(B=16, T=32, seed=3), steps=4, progress=False, calibration_data=calib)
    result = evaluate(em, tokens(B=8, T=32, seed=5), budgets=[0.7, 0.5], calibration_data=calib, timing_reps=0,
                      baselines=("random", "norm", "norm_allocated", "static"), progress=False)
    stepped = []
    for b in (0.7, 0.5):
        recs = {r["method"]: r for r in result["records"] if r["budget"] == b}
        learned = recs["learned"]["block_flops_ratio"]
        for m in ("random", "norm", "norm_allocated"):
            assert abs(recs[m]["block_flops_ratio"] - learned) < 0.03, (b, m, recs[m], learned)
        assert recs["static"]["block_flops_ratio"] >= learned - 0.02
        assert recs["learned"]["method_budget"] == b
        assert any(recs[m]["method_budget"] != b for m in ("random", "norm", "static"))  # they were moved
        again = recs["static"].get("learned_at_same_flops")  # learned, measured again at static's FLOPs
        if recs["static"]["block_flops_ratio"] > learned + 0.01:
            assert again is not None and abs(again["block_flops_ratio"] - recs["static"]["block_flops_ratio"]) < 0.03
            assert again["method_budget"] > b
        stepped.append(again is not None)
    assert any(stepped)  # with 4 layers, static's whole-layer steps miss the learned FLOPs at one budget at least


def test_match_target_runs_every_method_at_the_budget_read_as_block_flops():
    """match="target": the learned routers are bisected too, so "0.85" means 15% of the block FLOPs removed, whatever
    budget each method needs for it (with only the MLP's tokens routed, a block-FLOPs ratio of 0.85 takes a lower
    MLP budget)."""
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(mlp_tokens=0.5, dense_layers=()))
    calib = tokens(B=8, T=32, seed=6)
    train_routers(em, tokens(B=16, T=32, seed=3), steps=2, progress=False, calibration_data=calib)
    result = evaluate(em, tokens(B=8, T=32, seed=5), budgets=[0.85], calibration_data=calib, timing_reps=0,
                      baselines=("random", "norm"), progress=False, match="target")
    recs = {r["method"]: r for r in result["records"]}
    for m in ("learned", "random", "norm"):
        assert abs(recs[m]["block_flops_ratio"] - 0.85) < 0.03, (m, recs[m])
        assert recs[m]["budget"] == 0.85 and recs[m]["method_budget"] < 0.85  # MLP budget below the block target
    with pytest.raises(ef.ConfigError, match="'target'"):
        evaluate(em, tokens(B=2, T=8), budgets=[0.5], match="blocks", progress=False)


def test_summary_pairs_static_with_the_learned_routers_at_its_own_flops():
    from elastiformer.benchmarks.runner import summarize

    def rec(method, flops, loss, **extra):
        return {"setting": "attn_tokens", "component": "attn_tokens", "lora_rank": 0, "budget": 0.9,
                "method": method, "block_flops_ratio": flops, "delta_lm_loss": loss} | extra

    learned = rec("learned", 0.970, 0.09)
    static = rec("static", 0.980, 0.08)
    assert summarize([learned, static])["won"] == 0  # more FLOPs and a lower loss: the baseline wins that pair
    again = {"block_flops_ratio": 0.980, "delta_lm_loss": 0.07}
    assert summarize([learned, static | {"learned_at_same_flops": again}])["won"] == 1
    worse = {"block_flops_ratio": 0.980, "delta_lm_loss": 0.085}
    lost = summarize([learned, static | {"learned_at_same_flops": worse}])["lost"]
    assert lost[0]["learned"] == [0.980, 0.085]


def test_static_baseline_keeps_the_most_important_experts():
    model = pretrained_like()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 12:36] *= 5.0  # experts 1 and 2 of 4 matter most
    em = ef.get_elastic_model(model, ef.ElasticConfig(mlp_experts=4, mlp_experts_active=0.5))
    em.fit_static(tokens(B=4, T=32, seed=6))
    for _, router in em.named_routers():
        assert sorted(router.static_importance.topk(2).indices.tolist()) == [1, 2]


def test_unknown_or_unfitted_baselines_are_refused():
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(attn_heads=0.5))
    with pytest.raises(ef.ConfigError, match="baselines are random, norm, norm_allocated, static"):
        evaluate(em, tokens(B=2, T=8), budgets=[0.5], baselines=("oracle",), progress=False)
    with pytest.raises(ef.ConfigError, match="calibration_data"):
        evaluate(em, tokens(B=2, T=8), budgets=[0.5], baselines=("static",), progress=False)
    with pytest.raises(ef.ConfigError, match="scores tokens only"):
        em.routing_method("norm")
    with pytest.raises(ef.NotCalibratedError, match="fit_static"):
        with torch.no_grad(), em.routing_method("static"):
            em(tokens(B=2, T=8))
