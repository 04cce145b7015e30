"""Rank-1 LoRA on the attention projections, trained with the routers; off whenever the routers are off."""

import torch

import elastiformer as ef
from elastiformer.layers.lora import LoRALinear
from helpers.models import MODELS, tokens


def lora_model(arch, **cfg):
    cfg = dict(attn_heads=0.5, mlp_tokens=0.5, lora_rank=1, dense_layers=()) | cfg
    return ef.get_elastic_model(MODELS[arch](0), ef.ElasticConfig(**cfg))


def perturb(em):
    with torch.no_grad():
        for _, a in em.named_adapters():
            a.lora_B.normal_(std=0.05)


def test_adapters_attach_to_attention_projections_and_start_as_identity(arch):
    em = lora_model(arch)
    n_proj = {"llama": 4, "gpt2": 2}[arch]
    assert len(list(em.named_adapters())) == 4 * n_proj
    ref = MODELS[arch](0)(tokens()).logits
    em.set_budget(1.0)
    assert torch.allclose(em(tokens()).logits, ref, atol=1e-5)  # B = 0: no change until trained


def test_teacher_is_the_base_model_with_trained_adapters(arch):
    em = lora_model(arch)
    perturb(em)
    ref = MODELS[arch](0)(tokens()).logits
    with em.disable_routers():
        assert torch.allclose(em(tokens()).logits, ref, atol=1e-5)
    em.set_budget(1.0)
    assert not torch.allclose(em(tokens()).logits, ref, atol=1e-4)  # the adapters act while routing is on


def test_custom_head_path_uses_the_adapted_weights(arch):
    em = lora_model(arch, mlp_tokens=None)
    perturb(em)
    em.set_budget(1.0)
    full = em(tokens()).logits  # base attention modules, adapters inside
    em.train()
    em.set_budget(0.999)  # every head active, through the per-head path that reads the weights itself
    assert torch.allclose(em(tokens()).logits, full, atol=1e-4)


def test_adapters_get_gradients_and_round_trip(tmp_path, arch):
    em = lora_model(arch)
    em.train()
    out = em(tokens()).logits.float().log_softmax(-1).mean()
    out.backward()
    for name, a in em.named_adapters():
        assert a.lora_A.grad is not None and a.lora_B.grad is not None, name
    perturb(em)
    em.calibrate(tokens(B=4, seed=3))
    em.eval()
    with torch.no_grad():
        ref = em(tokens()).logits
    em.save_pretrained(tmp_path / "r")
    em2 = ef.ElasticModel.from_pretrained(MODELS[arch](0), tmp_path / "r")
    with torch.no_grad():
        assert torch.equal(em2(tokens()).logits, ref)
    base = em2.unload()
    assert not any(isinstance(m, LoRALinear) for m in base.modules())
    assert torch.allclose(base(tokens()).logits, MODELS[arch](0)(tokens()).logits, atol=1e-6)
