"""LLaVA-style vision-language models on a tiny random config: routing in both towers (the CLIP vision tower and the
Llama language model), identity at full budget, skipped work in each tower, training, save / load round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import elastiformer as ef
from elastiformer.training.routers import train_routers

IMAGE_TOKEN = 100
COMBINED = dict(mlp_tokens=0.5, attn_tokens=0.6, attn_heads=0.5, mlp_experts=4, mlp_experts_active=0.5)


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7, num_channels=3, projection_dim=32)
    text = LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
                      vision_feature_select_strategy="full", image_seq_length=17)
    return LlavaForConditionalGeneration(cfg).eval()


def inputs(B: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Prompts of 30 tokens whose positions 2-18 hold the 17 image tokens (16 patches + CLS), and their images."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (B, 30), generator=g)
    ids[:, 2:19] = IMAGE_TOKEN
    return {"input_ids": ids, "pixel_values": torch.randn(B, 3, 28, 28, generator=g)}


def test_both_towers_are_routed_and_full_budget_is_the_base_model():
    base = tiny_llava()
    batch = inputs()
    with torch.no_grad():
        ref = base(**batch).logits
    em = ef.get_elastic_model(base, ef.ElasticConfig(**COMBINED))
    names = [n for n, _ in em.named_routers()]
    assert any(n.startswith("model.vision_tower.") for n in names)
    assert any(n.startswith("model.language_model.") for n in names)
    em.set_budget(1.0)
    with torch.no_grad():
        assert torch.equal(em(**batch).logits, ref)
    em.set_budget(0.5)
    with torch.no_grad(), em.disable_routers():
        assert torch.equal(em(**batch).logits, ref)  # the teacher is the base model, in both towers
    assert em.unload() is base
    with torch.no_grad():
        assert torch.equal(base(**batch).logits, ref)


def test_routing_skips_work_in_each_tower():
    em = ef.get_elastic_model(tiny_llava(), ef.ElasticConfig(**COMBINED))
    em.train()  # top-k routing (no calibration needed)
    em.set_budget(0.5)
    with torch.no_grad():
        em(**inputs())
    stats = em.last_stats()
    stacks = stats["stacks"]
    assert set(stacks) == {"llava", "model.vision_tower"}
    for name, s in stacks.items():
        assert 0 < s["flops_ratio"] < 0.8, name
    assert len(stats["per_layer"]) == 2 * (3 + 3)  # attention + MLP of 3 language and 3 vision layers
    with torch.no_grad():  # a text-only call never reaches the vision tower: its stats are cleared, not stale
        em(input_ids=torch.randint(3, 99, (2, 12)))
    assert em.last_stats()["stacks"]["model.vision_tower"]["dense_flops"] == 0


def test_training_moves_routers_of_both_towers_and_calibrates_the_language_model():
    em = ef.get_elastic_model(tiny_llava(), ef.ElasticConfig(mlp_tokens=0.5, attn_heads=0.5))
    before = {k: v.clone() for k, v in em.router_state_dict().items()}
    data = [inputs(seed=s) for s in range(3)]
    report = train_routers(em, data, steps=3, batch_size=2, checkpoint_every=None, progress=False,
                           budget_range=(0.5, 0.9))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in report.history)
    after = em.router_state_dict()
    moved = {k.split(".layers.")[0] for k in before if "weight" in k and not torch.equal(before[k], after[k])}
    assert moved == {"model.vision_tower.encoder", "model.language_model"}
    assert em.is_calibrated
    em.set_budget(0.6)
    with torch.no_grad():
        out = em(**inputs(seed=7)).logits  # inference: thresholds in the language model, top-k in the vision tower
    assert torch.isfinite(out).all() and em.last_stats()["flops_ratio"] < 1.0


def test_save_and_load_round_trip(tmp_path):
    em = ef.get_elastic_model(tiny_llava(), ef.ElasticConfig(**COMBINED))
    with torch.no_grad():
        for _, r in em.named_routers():
            for p in r.parameters():
                p.add_(torch.randn_like(p) * 0.5)  # routers that differ from a fresh init
    em.train()
    em.set_budget(0.5)
    batch = inputs()
    with torch.no_grad():
        out = em(**batch).logits
    em.save_pretrained(tmp_path / "routers")
    em2 = ef.ElasticModel.from_pretrained(tiny_llava(), tmp_path / "routers")
    em2.train()
    em2.set_budget(0.5)
    with torch.no_grad():
        assert torch.equal(em2(**batch).logits, out)
    with pytest.raises(ef.RouterFileError, match="other weights"):
        ef.ElasticModel.from_pretrained(tiny_llava(seed=3), tmp_path / "routers")


def test_a_local_llava_folder_loads_and_becomes_elastic(tmp_path):
    tiny_llava().save_pretrained(tmp_path / "llava")
    model = ef.load_model(tmp_path / "llava")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    batch = inputs()
    with torch.no_grad():
        ref = model(**batch).logits
    em = ef.get_elastic_model(model, ef.ElasticConfig(attn_heads=0.5))
    with torch.no_grad():
        em.set_budget(1.0)
        assert torch.equal(em(**batch).logits, ref)
        em.set_budget(0.5)
        em(**batch)
    assert all(s["flops_ratio"] < 1.0 for s in em.last_stats()["stacks"].values())


def test_fitted_baselines_are_refused_with_towers():
    em = ef.get_elastic_model(tiny_llava(), ef.ElasticConfig(mlp_tokens=0.5))
    with pytest.raises(ef.ConfigError, match="towers"):
        em.routing_method("static")
    with em.routing_method("random"), torch.no_grad():  # random routing covers both towers
        em.train()
        em(**inputs())
    assert all(s["flops_ratio"] < 1.0 for s in em.last_stats()["stacks"].values())
