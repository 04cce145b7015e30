"""Property-based fuzzing of the public surface (hypothesis) on tiny models: for random valid configurations, budgets,
shapes and padding masks the invariants of DESIGN.md section 2 hold; random invalid input gets an ElastiformerError.

Invariants checked: identity at full budget (and with routers disabled), causality at inference (a prefix's logits
do not change when tokens are appended), executed FLOPs monotone in the budget, no NaN / inf in the real tokens'
logits. Examples are few and derandomized (set ELASTIFORMER_FUZZ_SEED=random to draw new ones), so the module stays
within a few seconds on two cores.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import elastiformer as ef
from helpers.models import MODELS, VOCAB
from elastiformer.layers.lora import LoRALinear

LAYERS = 3
CONTEXT = 128
FUZZ = settings(max_examples=int(os.environ.get("ELASTIFORMER_FUZZ_EXAMPLES", "8")), deadline=None,
                derandomize=os.environ.get("ELASTIFORMER_FUZZ_SEED") != "random", database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# the base models, built once per module; every example wraps a fresh copy of their weights
_BASES = {arch: MODELS[arch](0, layers=LAYERS) for arch in MODELS}
_STATES = {arch: {k: v.clone() for k, v in model.state_dict().items()} for arch, model in _BASES.items()}


def fresh_base(arch: str):
    model = MODELS[arch](0, layers=LAYERS)
    model.load_state_dict(_STATES[arch])
    return model


fraction = st.floats(min_value=0.05, max_value=1.0)


@st.composite
def configs(draw) -> dict:
    """Valid ElasticConfig keyword arguments: any non-empty set of routed components, any router options."""
    kw = {}
    if draw(st.booleans()):
        kw["mlp_tokens"] = draw(fraction)
    if draw(st.booleans()):
        kw["attn_tokens"] = draw(st.floats(min_value=0.4, max_value=1.0))  # layer 0 is dense: 1/3 of the budget
    if draw(st.booleans()):
        kw["attn_heads"] = draw(fraction)
    if draw(st.booleans()) or not kw:
        kw["mlp_experts"] = draw(st.sampled_from([2, 4, 8]))  # divide both models' MLP widths (48 and 128)
        kw["mlp_experts_active"] = draw(fraction)
    kw["router"] = draw(st.sampled_from(["linear", "mlp"]))
    kw["head_granularity"] = draw(st.sampled_from(["query", "group"]))
    kw["keep_first_token"] = draw(st.booleans())
    kw["lora_rank"] = draw(st.sampled_from([0, 0, 1]))
    return kw


@st.composite
def batches(draw, max_len: int = 24) -> dict:
    """Token ids [B, T] with a random padding mask: each row left-, right- or not padded, at least one real token."""
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, max_len))
    seed = draw(st.integers(0, 2**16))
    ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, T, dtype=torch.long)
    for row in range(B):
        pad = draw(st.integers(0, T - 1))
        if pad and draw(st.booleans()):
            mask[row, :pad] = 0  # left
        elif pad:
            mask[row, T - pad:] = 0  # right
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


def elastic(arch: str, kw: dict, adapters: bool = True) -> ef.ElasticModel:
    """Routers with opinions, so routing decisions differ between tokens, and (if `adapters`) trained-looking LoRA,
    which by design acts whenever routing is on, even at full budget."""
    torch.manual_seed(0)
    em = ef.get_elastic_model(fresh_base(arch), ef.ElasticConfig(**kw))
    params = em.router_parameters() if adapters else [p for r in em.routers() for p in r.parameters()]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.2)
    return em


def calibration() -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(123))


def budgets_for(em: ef.ElasticModel, value: float) -> dict[str, float]:
    """`value` for every routed component, lifted just above what the dense layers need."""
    return {k: max(value, em.state.min_budget(k) + 0.02) for k in em.elastic_config.components()}


@pytest.mark.parametrize("arch", sorted(MODELS))
@FUZZ
@given(kw=configs(), batch=batches())
def test_identity_at_full_budget(arch, kw, batch):
    em = elastic(arch, kw, adapters=False)
    em.set_budget(1.0)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        routed = em(**batch).logits
        with em.disable_routers():
            teacher = em(**batch).logits
        base = _BASES[arch](**batch).logits
    assert torch.allclose(routed[real], base[real], atol=1e-5)
    assert torch.allclose(teacher[real], base[real], atol=1e-5)
    assert em.last_stats()["flops_ratio"] == 1.0


@pytest.mark.parametrize("arch", sorted(MODELS))
@FUZZ
@given(kw=configs(), budget=fraction, T=st.integers(2, 24), cut=st.floats(0.0, 1.0), B=st.integers(1, 3))
def test_causal_and_finite_at_inference(arch, kw, budget, T, cut, B):
    em = elastic(arch, kw)
    em.calibrate(calibration())
    em.set_budget(**budgets_for(em, budget))
    ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(T))
    prefix = max(1, min(T - 1, round(cut * T)))
    with torch.no_grad():
        full = em(ids).logits
        head = em(ids[:, :prefix]).logits
    assert torch.isfinite(full).all()
    assert torch.allclose(full[:, :prefix], head, atol=1e-4), (full[:, :prefix] - head).abs().max()


@pytest.mark.parametrize("arch", sorted(MODELS))
@FUZZ
@given(kw=configs(), batch=batches(), budgets=st.lists(fraction, min_size=2, max_size=4))
def test_flops_are_monotone_in_the_budget_and_logits_finite(arch, kw, batch, budgets):
    """In training mode (top-k) each layer's share is a monotone function of its capacity, so the executed FLOPs
    must be too while routers run (budgets below 1; at 1 no router runs and the FLOPs are the dense ones, which on
    a one-token input can be fewer than a routed pass: the router then costs more than the heads it skips). At
    inference (thresholds) logits of the real tokens stay finite at every budget."""
    em = elastic(arch, kw)
    em.calibrate(calibration())
    real = batch["attention_mask"].bool()
    # the adapters on every token: executed, not dense
    lora = sum(m.flops(batch["input_ids"].numel()) for m in em.base_model.modules() if isinstance(m, LoRALinear))
    flops = []
    for b in sorted(budgets) + [1.0]:
        em.set_budget(**budgets_for(em, b))
        em.train()
        with torch.no_grad():
            em(**batch)
        stats = em.last_stats()
        flops.append(stats["elastic_flops"])
        assert stats["elastic_flops"] - stats["router_flops"] <= stats["dense_flops"] + lora  # never more than dense
        em.eval()
        with torch.no_grad():
            out = em(**batch).logits
        assert torch.isfinite(out[real]).all()
    routed = [f for b, f in zip(sorted(budgets), flops) if b < 1.0]
    assert all(lo <= hi for lo, hi in zip(routed, routed[1:])), (sorted(budgets), flops)
    assert flops[-1] == em.last_stats()["dense_flops"] + lora  # full budget: exactly the dense (+ adapted) model


# ------------------------------------------------------------------------------------------------ invalid input
bad_fraction = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0.0 < x <= 1.0),
    st.integers().filter(lambda x: x != 1),
    st.text(max_size=4), st.none(), st.booleans(), st.lists(fraction, max_size=2),
)


@FUZZ
@given(key=st.sampled_from(["mlp_tokens", "attn_tokens", "attn_heads", "mlp_experts_active"]), value=bad_fraction)
def test_invalid_capacities_are_clear_errors(key, value):
    kw = {key: value} | ({"mlp_experts": 4} if key == "mlp_experts_active" else {})
    with pytest.raises(ef.ConfigError) as err:
        ef.ElasticConfig(**kw)
    assert "\n" not in str(err.value) and key in str(err.value)


@FUZZ
@given(value=bad_fraction, key=st.one_of(st.sampled_from(["mlp_tokens", "attn_heads"]), st.text(min_size=1, max_size=8)))
def test_invalid_budgets_are_clear_errors_and_change_nothing(value, key):
    em = _SHARED_EM
    before = em.get_budget()
    with pytest.raises(ef.BudgetError) as err:
        em.set_budget(**{key: value})
    assert "\n" not in str(err.value)
    assert em.get_budget() == before


@FUZZ
@given(extra=st.integers(1, 40), low=st.integers(-50, -1), high=st.integers(VOCAB, VOCAB + 1000),
       which=st.sampled_from(["too long", "below vocab", "above vocab", "float", "empty"]))
def test_invalid_token_ids_are_clear_errors(extra, low, high, which):
    em = _SHARED_EM
    ids = torch.randint(3, VOCAB, (1, 8))
    if which == "too long":
        ids = torch.randint(3, VOCAB, (1, CONTEXT + extra))
    elif which == "below vocab":
        ids[0, extra % 8] = low
    elif which == "above vocab":
        ids[0, extra % 8] = high
    elif which == "float":
        ids = ids.float()
    else:
        ids = ids[:, :0]
    with pytest.raises(ef.DataError) as err, torch.no_grad():
        em(ids)
    assert "\n" not in str(err.value)


_SHARED_EM = ef.get_elastic_model(fresh_base("llama"), ef.ElasticConfig(mlp_tokens=0.5, attn_heads=0.5))
_SHARED_EM.calibrate(calibration())
