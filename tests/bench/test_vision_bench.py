"""The vision benchmark on a tiny random ViT classifier: accuracy evaluation beside baselines, the domain gaps, and
the README subsection generated from the result."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

import elastiformer as ef
from elastiformer.benchmarks import vision as bench_vision
from elastiformer.benchmarks.vision import domain_gaps, update_vision_readme, vision_results_markdown
from elastiformer.evaluation.vision import evaluate_images
from elastiformer.errors import ConfigError


def tiny_vit(seed: int = 0, layers: int = 3) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=layers,
                    num_attention_heads=4, intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg).eval()


def images(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_evaluate_images_at_full_budget_matches_the_teacher_and_skips_work_below():
    em = ef.get_elastic_model(tiny_vit(), ef.ElasticConfig(mlp_tokens=0.5, attn_heads=0.5))
    x, y = images()
    ev = evaluate_images(em, x, y, [1.0, 0.5], baselines=("random", "static"), calibration_data=[{"pixel_values": x}],
                         batch_size=10, progress=False)
    with torch.no_grad():
        teacher = (em.base_model(pixel_values=x).logits.argmax(-1) == y).float().mean().item()
    assert ev["teacher_accuracy"] == pytest.approx(teacher)
    rec = {(r["method"], r["budget"]): r for r in ev["records"]}
    assert set(rec) == {(m, b) for m in ("learned", "random", "static") for b in (1.0, 0.5)}
    full = rec[("learned", 1.0)]
    assert full["accuracy"] == pytest.approx(teacher) and full["agreement"] == 1.0
    assert full["cosine"] == pytest.approx(1.0, abs=1e-5) and full["block_flops_ratio"] == pytest.approx(1.0)
    for m in ("learned", "random", "static"):
        assert rec[(m, 0.5)]["block_flops_ratio"] < 0.85  # half the tokens and heads: the work really shrinks
        assert rec[(m, 0.5)]["cosine"] < 0.9999
    static, learned = rec[("static", 0.5)], rec[("learned", 0.5)]
    again = static.get("learned_at_same_flops")  # static moves in whole steps: learned measured at its FLOPs
    assert (again is not None) == (static["block_flops_ratio"] > learned["block_flops_ratio"] + 1e-3)
    if again is not None:
        assert abs(again["block_flops_ratio"] - static["block_flops_ratio"]) < 0.05  # (bisected on the first batch)
    assert em.get_budget() == {"mlp_tokens": 0.5, "attn_heads": 0.5}  # restored


def test_evaluate_images_needs_a_classifier():
    from transformers import ViTModel

    torch.manual_seed(0)
    backbone = ViTModel(tiny_vit().config, add_pooling_layer=False).eval()
    em = ef.get_elastic_model(backbone, ef.ElasticConfig(mlp_tokens=0.5))
    x, y = images(4)
    with pytest.raises(ConfigError, match="image classifier"):
        evaluate_images(em, x, y, [0.5], progress=False)


def domain_records():
    acc = {("all", "all"): 0.80, ("all", "0-4"): 0.78, ("all", "5-9"): 0.82, ("0-4", "all"): 0.79,
           ("0-4", "0-4"): 0.785, ("0-4", "5-9"): 0.795, ("5-9", "all"): 0.80, ("5-9", "0-4"): 0.77,
           ("5-9", "5-9"): 0.83}
    return [{"train_classes": t, "eval_classes": e, "budget": 0.7, "accuracy": a, "teacher_accuracy": 0.85,
             "agreement": 0.9, "block_flops_ratio": 0.68} for (t, e), a in acc.items()]


def test_domain_gaps_compare_each_half_with_routers_trained_on_all_classes():
    gaps = {g["train_classes"]: g for g in domain_gaps(domain_records())}
    assert gaps["0-4"]["gap_unseen_half"] == pytest.approx(0.795 - 0.82)
    assert gaps["0-4"]["gap_own_half"] == pytest.approx(0.785 - 0.78)
    assert gaps["5-9"]["gap_unseen_half"] == pytest.approx(0.77 - 0.78)
    assert gaps["5-9"]["gap_all_classes"] == pytest.approx(0.0)


def test_readme_subsection_is_generated_between_its_own_markers(tmp_path):
    result = {"model": "vit-fashion-mnist", "teacher_accuracy": 0.85, "test_images": 100, "train_images": 600,
              "machine": {"cpu_count": 2, "processor": "x86_64", "torch": "2.x"},
              "settings": {"steps": 10, "batch_size": 8, "domain_steps": 10}, "components": {"mlp_tokens": {"steps": 10}},
              "records": [{"method": "learned", "component": "mlp_tokens", "budget": 0.7, "accuracy": 0.84,
                           "teacher_accuracy": 0.85, "agreement": 0.95, "cosine": 0.99, "block_flops_ratio": 0.7,
                           "time_ratio": 0.8}],
              "domain": {"component": "combined", "steps": 10, "records": domain_records(),
                         "gaps": domain_gaps(domain_records())}}
    text = vision_results_markdown(result)
    assert "| mlp_tokens | 0.70 | learned | 0.700 | 84.00% | -1.00 |" in text
    assert "worst -2.50" in text
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:lm -->\nLM\n<!-- /results:lm -->\n<!-- results:vision -->\nold\n"
                      "<!-- /results:vision -->\ntail\n")
    update_vision_readme(result, readme, "bench/results/vision.png")
    new = readme.read_text()
    assert "old" not in new and "LM" in new and new.endswith("tail\n") and "vision.png" in new
    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="results:vision"):
        update_vision_readme(result, readme, "x.png")


def test_unknown_component_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="unknown vision bench components"):
        bench_vision.run_vision_bench(dict(bench_vision.VISION_BENCH_DEFAULTS, components="mlp_tokens,wings"))


@pytest.mark.parametrize("component", ["mlp_tokens", "attn_tokens", "attn_heads", "mlp_experts", "combined"])
def test_vit_identity_at_full_budget_and_fewer_flops_below(component):
    settings = bench_vision.VISION_SETTINGS[component]
    base = tiny_vit()
    x, _ = images(6)
    with torch.no_grad():
        ref = base(pixel_values=x).logits
    em = ef.get_elastic_model(base, ef.ElasticConfig(**{k: (4 if k == "mlp_experts" else v) for k, v in settings.items()}))
    em.set_budget(1.0)
    with torch.no_grad():
        assert torch.equal(em(pixel_values=x).logits, ref)
    ratios = {}
    for b in (0.8, 0.6):
        em.set_budget(b)
        with torch.no_grad():  # inference on a bidirectional model: top-k, no calibration needed
            out = em(pixel_values=x).logits
        ratios[b] = em.last_stats()["flops_ratio"]
    assert ratios[0.6] < ratios[0.8] < 1.0 and not torch.equal(out, ref)


def test_short_name_loads_the_cached_teacher_with_its_normalisation(tmp_path, monkeypatch):
    from elastiformer.data.images import ImageFormat
    from elastiformer.training.vit_teacher import save_teacher

    monkeypatch.setenv("ELASTIFORMER_CACHE", str(tmp_path))
    fmt = ImageFormat(28, 1, (0.25,), (0.5,))
    save_teacher(tiny_vit(), tmp_path / "models" / "vit-fashion-mnist", fmt, {"test_accuracy": 0.1})
    model = ef.load_model("vit-fashion-mnist")
    assert type(model).__name__ == "ViTForImageClassification"
    assert ImageFormat.of(model) == fmt
    em = ef.get_elastic_model(model, ef.ElasticConfig(mlp_tokens=0.5))
    em.save_pretrained(tmp_path / "routers")
    em2 = ef.ElasticModel.from_pretrained("vit-fashion-mnist", tmp_path / "routers")  # found again by its name
    x, _ = images(3)
    with torch.no_grad():
        assert torch.equal(em2(pixel_values=x).logits, em(pixel_values=x).logits)


def test_the_vision_bench_runs_end_to_end_on_a_tiny_teacher(tmp_path, monkeypatch):
    """Training, evaluation beside the baselines at matched FLOPs and the domain runs, on tiny idx files and a tiny
    cached teacher: every method has a record, and every domain run its records."""
    import json

    from elastiformer.data import images as data_images
    from elastiformer.data.images import ImageFormat
    from elastiformer.training.vit_teacher import save_teacher
    from helpers.images import fake_fashion_mnist

    monkeypatch.setenv("ELASTIFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_images, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    fake_fashion_mnist(tmp_path / "cache" / "data" / "fashion-mnist", n_train=96, n_test=20)
    save_teacher(tiny_vit(), tmp_path / "cache" / "models" / "vit-fashion-mnist", ImageFormat(28, 1, (0.29,), (0.35,)),
                 {"test_accuracy": 0.1})
    out = tmp_path / "vision.json"
    o = dict(bench_vision.VISION_BENCH_DEFAULTS, components="mlp_tokens,attn_tokens", budgets="0.7", steps=2,
             batch_size=16, train_images=96, test_images=20, domain_budgets="0.7", domain_steps=1, timing_reps=0,
             output=out)
    bench_vision.run_vision_bench(o, echo=lambda *_: None)
    result = json.loads(out.read_text())
    methods = {(r["component"], r["method"]) for r in result["records"]}
    assert {(c, m) for c in ("mlp_tokens", "attn_tokens") for m in ("learned", "random", "norm", "static")} <= methods
    assert {r["train_classes"] for r in result["domain"]["records"]} == {"0-4", "5-9", "all"}
