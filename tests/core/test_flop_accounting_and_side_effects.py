"""Issue 13, items 3 and 5: LoRA FLOPs counted and the adapted model explained, unload() restoring requires_grad,
evaluate() leaving the global RNG alone, and dense FLOPs of cached decoding counting the dense model's cache (the
bundled wheels' hash check and safe extraction, also item 5: tests/loading/test_bundled_wheels.py)."""

import pytest
import torch
from transformers import DynamicCache

import elastiformer as ef
from helpers.models import MODELS, tokens
from elastiformer.evaluation.lm import evaluate
from elastiformer.flops import dense_attention_flops
from elastiformer.layers.lora import LoRALinear


# ---------------------------------------------------------------------------------------------- LoRA
def lora_model(arch, **cfg):
    cfg = dict(attn_heads=0.5, lora_rank=2, dense_layers=()) | cfg
    em = ef.get_elastic_model(MODELS[arch](0), ef.ElasticConfig(**cfg))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, a in em.named_adapters():  # "trained" adapters: B nonzero
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.05)
    return em


def folded_base(arch, em):
    """The base model with every adapter folded into its weight (W + scale * B A): the adapted model, built another
    way."""
    base = MODELS[arch](0)
    modules = dict(base.named_modules())
    with torch.no_grad():
        for name, a in em.named_adapters():
            delta = (a.lora_B @ a.lora_A) * a.scale  # (out, in)
            target = modules[name.replace(".base_layer", "")]  # the adapter sits where the projection was
            target.weight += delta.T if a.conv1d else delta
    return base


def adapter_cost(em, n_rows: int) -> int:
    """2 x rows x r x (in + out), summed over the adapters (from their tensors' shapes)."""
    return sum(2 * n_rows * a.lora_A.shape[0] * (a.lora_A.shape[1] + a.lora_B.shape[0]) for _, a in em.named_adapters())


def test_full_budget_is_the_adapted_model_and_disabled_routers_the_base(arch):
    em = lora_model(arch)
    ids = tokens()
    base = MODELS[arch](0)(ids).logits
    with torch.no_grad():
        with em.disable_routers():
            assert torch.equal(em(ids).logits, base)  # the teacher: the base model, exactly
        em.set_budget(1.0)
        full = em(ids).logits
    assert not torch.allclose(full, base, atol=1e-4)  # the trained adapters act at full budget
    assert torch.allclose(full, folded_base(arch, em)(ids).logits, atol=1e-5)  # ... as base + BA


def test_lora_flops_are_executed_not_dense(arch):
    ids = tokens(B=2, T=20)
    em = lora_model(arch)
    plain = ef.get_elastic_model(MODELS[arch](0), ef.ElasticConfig(attn_heads=0.5, dense_layers=()))
    em.set_budget(1.0)
    plain.set_budget(1.0)
    with torch.no_grad():
        em(ids)
        with_lora = em.last_stats()
        plain(ids)
        without = plain.last_stats()
        with em.disable_routers():
            em(ids)
            teacher = em.last_stats()
    assert with_lora["dense_flops"] == without["dense_flops"] == teacher["dense_flops"]  # dense: the unmodified model
    assert with_lora["elastic_flops"] - without["elastic_flops"] == adapter_cost(em, 2 * 20)
    assert with_lora["attn"]["elastic_flops"] - with_lora["attn"]["dense_flops"] == adapter_cost(em, 2 * 20)
    assert with_lora["mlp"] == without["mlp"]
    assert teacher["elastic_flops"] == teacher["dense_flops"]  # adapters off under disable_routers


@pytest.mark.parametrize("component", ["attn_heads", "attn_tokens"])
def test_routed_paths_apply_and_count_the_adapters(arch, component):
    """Random routing from one seeded generator, so both models make the same choices: the adapted model through the
    per-head path (thin matmuls) or the token path equals the folded model, and costs more by its adapters' FLOPs."""
    ids = tokens(B=2, T=20)
    budget = {"attn_heads": dict(attn_heads=0.5), "attn_tokens": dict(attn_tokens=0.6, attn_heads=None)}[component]
    em = lora_model(arch, **budget)
    folded = ef.get_elastic_model(folded_base(arch, em), ef.ElasticConfig(**(dict(attn_heads=0.5, dense_layers=())
                                                                                | budget)))
    out, stats = [], []
    for model in (em, folded):
        model.train()  # top-k: no calibration needed
        model.state.generator = torch.Generator().manual_seed(3)
        with torch.no_grad(), model.routing_method("random"):
            out.append(model(ids).logits)
            stats.append(model.last_stats())
    assert torch.allclose(out[0], out[1], atol=1e-5)
    layers = em.spec.layers(em.base_model)
    routed = 0
    for a, b in zip(stats[0]["per_layer"], stats[1]["per_layer"]):
        assert a["dense_flops"] == b["dense_flops"]
        if a["sublayer"] == "attn":
            extra = a["executed_flops"] - b["executed_flops"]
            adapters = [m for m in layers[a["layer"]].modules() if isinstance(m, LoRALinear)]
            full_cost = sum(2 * 2 * 20 * m.lora_A.shape[0] * (m.lora_A.shape[1] + m.lora_B.shape[0]) for m in adapters)
            if not adapters:  # a dense layer of a token component has no adapters
                assert extra == 0
                continue
            assert 0 < extra <= full_cost  # the adapters on the tokens (and heads) that ran
            routed += a["unit_fraction"] < 1.0 or a["token_fraction"] < 1.0
        else:
            assert a["executed_flops"] == b["executed_flops"]
    assert routed  # the routed path ran


def test_head_path_does_not_rebuild_the_weight(monkeypatch):
    """The per-head path applies BA as thin matmuls: no (out, in) product B @ A is formed per forward."""
    em = lora_model("llama")
    em.train()
    products = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        if isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0] == 2:
            products.append((tuple(a.shape), tuple(b.shape)))
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    with torch.no_grad():
        em(tokens())
    assert products == []
    assert em.last_stats()["attn"]["unit_fraction"] < 1.0


# ---------------------------------------------------------------------------------------------- unload
def test_unload_restores_requires_grad():
    base = MODELS["llama"](0)
    base.get_input_embeddings().weight.requires_grad_(False)  # the user froze one, left the rest trainable
    before = {n: p.requires_grad for n, p in base.named_parameters()}
    assert any(before.values()) and not all(before.values())
    em = ef.get_elastic_model(base, ef.ElasticConfig(mlp_tokens=0.5, lora_rank=1))
    assert not any(p.requires_grad for n, p in em.base_model.named_parameters()
                   if "router" not in n and "lora_" not in n and "stand_in." not in n)
    out = em.unload()
    assert {n: p.requires_grad for n, p in out.named_parameters()} == before
    assert not any(isinstance(m, LoRALinear) for m in out.modules())


# ---------------------------------------------------------------------------------------------- evaluate's RNG
def test_evaluate_leaves_the_global_rng_alone_and_the_random_baseline_reproducible():
    em = ef.get_elastic_model(MODELS["llama"](0), ef.ElasticConfig(attn_heads=0.5, mlp_experts=4,
                                                                   mlp_experts_active=0.5))
    held = tokens(B=4, T=16, seed=5)
    runs = []
    for global_seed in (123, 456):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        ev = evaluate(em, held, budgets=[0.5], baselines=["random"], batch_size=2, timing_reps=1, progress=False)
        assert torch.equal(torch.get_rng_state(), state)  # no draw from, no reseed of the caller's RNG
        runs.append([r for r in ev["records"] if r["method"] == "random"][0])
    keys = ("delta_lm_loss", "kl", "top1_agreement", "block_flops_ratio")
    assert [runs[0][k] for k in keys] == [runs[1][k] for k in keys]  # whatever the global RNG was
    assert em.state.generator is None  # evaluate's generator does not outlive it
    # and the baseline really is random: another seed draws other choices
    other = evaluate(em, held, budgets=[0.5], baselines=["random"], batch_size=2, timing_reps=0, seed=1,
                     progress=False)
    assert [r for r in other["records"] if r["method"] == "random"][0]["kl"] != runs[0]["kl"]


# ---------------------------------------------------------------------------------------------- cached dense FLOPs
def test_dense_flops_of_cached_decoding_count_the_dense_models_cache():
    em = ef.get_elastic_model(MODELS["llama"](0), ef.ElasticConfig(attn_tokens=0.5, dense_layers=()))
    em.calibrate(tokens(B=4, seed=3))
    em.eval()
    ids = tokens(B=2, T=20)
    d = em.dims
    with torch.no_grad():
        cache = DynamicCache()
        out = em(input_ids=ids, cache=cache, use_cache=True)
        assert em.last_stats()["attn"]["token_fraction"] < 1.0  # routed layers cached fewer than 20 tokens
        em(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
    attn = [s for s in em.last_stats()["per_layer"] if s["sublayer"] == "attn"]
    expected = dense_attention_flops(2, 1, 21, d["C"], d["H"], d["KVH"], d["D"])  # 20 seen + this token
    assert [s["dense_flops"] for s in attn] == [expected] * d["L"]


def test_last_stats_after_generate_totals_every_forward_of_the_generation():
    from helpers.models import make_elastic

    em = make_elastic("llama", "mlp_tokens")
    em.calibrate(tokens(4, 16, seed=3))
    em.set_budget(0.5)
    prompt = tokens(1, 8, seed=4)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        em.generate(prompt, **kw)
    stats = em.last_stats()
    total = stats["generation"]
    assert total["forwards"] == 5  # the prefill and four decode steps
    assert total["dense_flops"] > 2 * stats["dense_flops"]  # more than the last step alone
    assert total["elastic_flops"] < total["dense_flops"] and 0 < total["flops_ratio"] < 1
    assert total["model_elastic_flops"] < total["model_dense_flops"]
    with torch.no_grad(), em.disable_routers():
        em.generate(prompt, **kw)
    assert em.last_stats()["generation"]["flops_ratio"] == 1.0  # routing off: everything ran
    with torch.no_grad():
        em(prompt)
    assert "generation" not in em.last_stats()  # a plain forward describes itself alone
