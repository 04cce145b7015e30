"""The invariants of DESIGN.md section 2 on tiny Llama (GQA) and GPT-2 models, for every routed component."""

import pytest
import torch

import elastiformer as ef
from elastiformer.layers.stand_in import StandIn
from helpers.models import ALL_COMPONENTS, MODELS, make_elastic, tokens


def test_disabled_routers_and_full_budget_equal_base(arch, component):
    ids = tokens()
    ref = MODELS[arch](0)(ids).logits
    em = make_elastic(arch, component)
    with em.disable_routers():
        assert torch.allclose(em(ids).logits, ref, atol=1e-5)
    em.set_budget(1.0)
    assert torch.allclose(em(ids).logits, ref, atol=1e-5)
    assert em.last_stats()["elastic_flops"] == em.last_stats()["dense_flops"]


def test_routed_path_with_everything_selected_equals_base(arch, component):
    """A budget just under 1 keeps every token / head / expert but goes through gather, expert dispatch and the
    per-head attention: those code paths must reproduce the dense computation exactly."""
    ids = tokens()
    ref = MODELS[arch](0)(ids).logits
    em = make_elastic(arch, component, dense_layers=())
    em.train()  # top-k: k = round(0.999 * n) = n
    em.set_budget(0.999)
    out = em(ids).logits
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    assert em.last_stats()["elastic_flops"] >= em.last_stats()["dense_flops"]  # routers cost a little


def test_base_weights_are_not_modified_and_are_frozen(arch, component):
    base = MODELS[arch](0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    em = ef.get_elastic_model(base, ef.ElasticConfig(**ALL_COMPONENTS[component]))
    em.train()
    em(tokens()).logits.sum().backward()
    ids = {id(p) for p in em.router_parameters()}
    assert all(not p.requires_grad for p in base.parameters() if id(p) not in ids)
    after = {k: v for k, v in em.base_model.state_dict().items() if "router" not in k and "stand_in" not in k}
    after = {k.replace(".base_layer", ""): v for k, v in after.items()}
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradients_reach_every_router_parameter_and_no_base_parameter(arch, component):
    em = make_elastic(arch, component)
    if any(isinstance(r, StandIn) for r in em.routers()):  # (unfitted, a stand-in is off the path: nothing to train)
        em.fit_stand_ins([{"input_ids": tokens(4, 20, seed=9)}])
    em.train()
    out = em(tokens())
    loss = out.logits.float().log_softmax(-1).mean() + sum(em.aux_losses().values(), torch.zeros(()))
    loss.backward()
    for name, router in em.named_routers():
        for pname, p in router.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    router_ids = {id(p) for p in em.router_parameters()}
    assert all(p.grad is None for p in em.base_model.parameters() if id(p) not in router_ids)


def test_aux_losses_are_reported_in_training(arch):
    em = make_elastic(arch, "combined")
    em.train()
    em(tokens())
    aux = em.aux_losses()
    assert set(aux) == {"token_bce", "expert_balance"}  # student pass; teacher targets come from teacher_targets()
    assert all(torch.isfinite(v) and v > 0 for v in aux.values())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_flops_fall_strictly_as_budget_falls(arch, component, mode):
    em = make_elastic(arch, component, dense_layers=())
    ids = tokens(B=1, T=40)
    if mode == "eval":
        em.calibrate({"input_ids": tokens(B=8, T=40, seed=5)})
        em.eval()
    else:
        em.train()
    flops = []
    with torch.no_grad():
        for b in (1.0, 0.75, 0.5, 0.3):  # 4 heads / 4 experts: 4, 3, 2, 1 active
            em.set_budget(b)
            em(ids)
            flops.append(em.last_stats()["elastic_flops"])
    assert all(a > b for a, b in zip(flops, flops[1:])), flops


def test_flops_match_hand_count():
    """Llama, C=32, I=48, H=4, KVH=2, D=8, one sequence of 8 tokens, 4 layers."""
    em = ef.get_elastic_model(MODELS["llama"](0), ef.ElasticConfig(mlp_tokens=0.5))
    em.train()
    em(tokens(B=1, T=8))
    s = em.last_stats()
    dense_mlp = 2 * 8 * 32 * 48 * 3  # gate, up, down on 8 tokens
    dense_attn = 2 * 8 * 32 * 32 * 2 + 2 * 8 * 32 * 16 * 2 + 4 * 8 * 4 * 8 * 8  # q,o + k,v + QK^T, AV
    assert s["dense_flops"] == 4 * (dense_mlp + dense_attn)
    routed_mlp = 2 * 4 * 32 * 48 * 3 + 2 * 8 * 32  # 4 of 8 tokens, plus the Linear(32 -> 1) router on all 8
    assert s["mlp"]["elastic_flops"] == 4 * routed_mlp
    assert s["attn"]["elastic_flops"] == 4 * dense_attn
    assert s["mlp"]["token_fraction"] == 0.5


def test_expert_flops_hand_count():
    em = ef.get_elastic_model(MODELS["llama"](0), ef.ElasticConfig(mlp_experts=4, mlp_experts_active=0.5))
    em(tokens(B=1, T=8))
    s = em.last_stats()
    # each token runs 2 of 4 experts of 12 neurons: 8 tokens x 2 x (3 matmuls of 32 x 12), plus the 32 -> 4 router
    assert s["mlp"]["elastic_flops"] == 4 * (8 * 2 * 2 * 32 * 12 * 3 + 2 * 8 * 32 * 4)


@pytest.mark.parametrize("with_cache", [True, False])
def test_causal_at_inference_prefix_logits_do_not_change(arch, component, with_cache):
    em = make_elastic(arch, component)
    em.calibrate({"input_ids": tokens(B=4, T=24, seed=7)})
    ids = tokens(B=2, T=24)
    with torch.no_grad():
        full = em(ids).logits
        prefix = em(ids[:, :10]).logits
    assert torch.allclose(full[:, :10], prefix, atol=1e-5)
    assert em.last_stats()["elastic_flops"] < em.last_stats()["dense_flops"]


def test_generate_with_and_without_cache_gives_same_tokens(arch, component):
    em = make_elastic(arch, component)
    em.calibrate({"input_ids": tokens(B=4, T=24, seed=7)})
    prompt = tokens(B=2, T=6)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = em.generate(prompt, use_cache=True, **kw)
        b = em.generate(prompt, use_cache=False, **kw)
    assert torch.equal(a, b)
    assert a.shape == (2, 18)


def test_left_padding_gives_the_same_logits_as_no_padding(arch, component):
    """Routing decisions at inference are per token, so padding a sequence must not change its real tokens' logits."""
    em = make_elastic(arch, component)
    em.calibrate({"input_ids": tokens(B=4, T=24, seed=7)})
    ids = tokens(B=2, T=12)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids[:1]], dim=1)  # (1, 16), 4 pads on the left
    batch = torch.cat([padded, torch.cat([ids[1:], ids[1:, :4]], dim=1)], dim=0)  # (2, 16)
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        alone = em(ids[:1]).logits
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # GPT-2's absolute positions must skip the padding
        together = em(batch, attention_mask=mask, position_ids=positions).logits
    assert torch.allclose(together[0, 4:], alone[0], atol=1e-4), (together[0, 4:] - alone[0]).abs().max()


def test_budget_context_manager_restores(arch):
    em = make_elastic(arch, "combined")
    before = em.get_budget()
    with em.budget(0.9):
        assert set(em.get_budget().values()) == {0.9}
    assert em.get_budget() == before


def test_global_budget_spends_dense_layers_first():
    em = ef.get_elastic_model(MODELS["llama"](0, layers=4), ef.ElasticConfig(mlp_tokens=0.5, dense_layers=(0,)))
    em.train()
    em(tokens(B=1, T=30))
    per_layer = [s["token_fraction"] for s in em.last_stats()["per_layer"] if s["sublayer"] == "mlp"]
    assert per_layer[0] == 1.0
    assert all(abs(f - 1 / 3) < 0.05 for f in per_layer[1:])  # (0.5 * 4 - 1) / 3 of the tokens elsewhere
    assert abs(sum(per_layer) / 4 - 0.5) < 0.03


def test_unload_restores_the_base_model(arch):
    base = MODELS[arch](0)
    ids = tokens()
    ref = base(ids).logits
    em = ef.get_elastic_model(base, ef.ElasticConfig(mlp_tokens=0.5, attn_heads=0.5))
    assert em.unload() is base
    assert torch.equal(base(ids).logits, ref)
    ef.get_elastic_model(base, ef.ElasticConfig(mlp_tokens=0.5))  # and it can be made elastic again


def test_teacher_targets_give_every_router_a_supervised_gradient(arch):
    em = make_elastic(arch, "combined", dense_layers=())
    em.train()
    with torch.no_grad(), em.disable_routers(), em.teacher_targets():
        teacher = em(tokens()).logits
    aux = em.aux_losses()
    assert set(aux) == {"token_importance", "head_rank", "expert_rank"}
    sum(aux.values()).backward()
    for name, router in em.named_routers():
        if isinstance(router, StandIn):  # the targets are measured, never moved: no supervised gradient reaches it
            assert all(p.grad is None for p in router.parameters()), name
            continue
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters()), name
    assert torch.allclose(teacher, MODELS[arch](0)(tokens()).logits, atol=1e-5)  # the teacher is still the base


@pytest.mark.parametrize("component", ["mlp_tokens", "attn_tokens"])
def test_calibrated_thresholds_spend_the_budget(arch, component):
    """Thresholds are fitted with routing on, so the tokens processed at inference match the requested budget."""
    em = make_elastic(arch, component, dense_layers=())
    em.calibrate([{"input_ids": tokens(B=8, T=32, seed=s)} for s in (11, 12)])
    sub = "mlp" if component == "mlp_tokens" else "attn"
    for budget in (0.9, 0.7, 0.5):
        em.set_budget(budget)
        with torch.no_grad():
            em(tokens(B=8, T=32, seed=13))  # unseen text of the same kind
        fractions = [s["token_fraction"] for s in em.last_stats()["per_layer"] if s["sublayer"] == sub]
        assert abs(sum(fractions) / len(fractions) - budget) < 0.08, (budget, fractions)
