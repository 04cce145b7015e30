"""Bad input gets a one-line error that names the problem and the fix."""

import math

import pytest
import torch
from torch import nn
from transformers import DistilBertConfig, DistilBertModel

import elastiformer as ef
from helpers.models import MODELS, make_elastic, tokens


@pytest.mark.parametrize("value", [0, 1.5, -0.2, math.nan, "half", True])
def test_bad_capacity_in_config(value):
    with pytest.raises(ef.BudgetError, match=r"\(0, 1\]|not a number"):
        ef.ElasticConfig(mlp_tokens=value)


@pytest.mark.parametrize("value", [0, 1.5, math.nan])
def test_bad_budget(value):
    em = make_elastic("llama", "mlp_tokens")
    with pytest.raises(ef.BudgetError, match=r"outside \(0, 1\]"):
        em.set_budget(mlp_tokens=value)


def test_budget_for_unknown_or_unrouted_component():
    em = make_elastic("llama", "mlp_tokens")
    with pytest.raises(ef.BudgetError, match="unknown budget 'mlp_token'"):
        em.set_budget(mlp_token=0.5)
    with pytest.raises(ef.BudgetError, match="attn_heads is not routed"):
        em.set_budget(attn_heads=0.5)


def test_budget_below_what_dense_layers_need():
    em = make_elastic("llama", "attn_tokens")  # layer 0 of 4 is always dense for attention tokens
    with pytest.raises(ef.BudgetError, match="below what the dense layers need"):
        em.set_budget(attn_tokens=0.2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "routes nothing"),
    (dict(mlp_experts=4), "mlp_experts_active"),
    (dict(mlp_experts_active=0.5), "needs mlp_experts"),
    (dict(mlp_experts=1, mlp_experts_active=0.5), "integer >= 2"),
    (dict(mlp_tokens=0.5, router="transformer"), "'linear' or 'mlp'"),
    (dict(mlp_tokens=0.5, head_granularity="kv"), "'query' or 'group'"),
    (dict(mlp_tokens=0.5, lora_rank=-1), "lora_rank"),
    (dict(mlp_tokens=0.5, router_norm_feature="yes"), "router_norm_feature"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ef.ConfigError, match=match):
        ef.ElasticConfig(**kwargs)


def test_config_that_does_not_fit_the_model():
    with pytest.raises(ef.ConfigError, match="does not divide the MLP width 48"):
        ef.get_elastic_model(MODELS["llama"](0), ef.ElasticConfig(mlp_experts=5, mlp_experts_active=0.4))
    with pytest.raises(ef.ConfigError, match="dense_layers has 9"):
        ef.get_elastic_model(MODELS["llama"](0), ef.ElasticConfig(mlp_tokens=0.5, dense_layers=(9,)))
    with pytest.raises(ef.ConfigError, match="no layer is routed"):
        ef.get_elastic_model(MODELS["llama"](0), ef.ElasticConfig(mlp_tokens=0.5, dense_layers=(0, 1, 2, 3)))


def test_unsupported_architecture():
    distilbert = DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=37))
    with pytest.raises(ef.UnsupportedArchitectureError, match="'distilbert'.*not supported"):
        ef.get_elastic_model(distilbert, ef.ElasticConfig(mlp_tokens=0.5))
    with pytest.raises(ef.UnsupportedArchitectureError, match="not supported"):
        ef.get_elastic_model(nn.Linear(3, 3), ef.ElasticConfig(mlp_tokens=0.5))


def test_wrapping_twice_is_refused():
    em = make_elastic("llama", "mlp_tokens")
    with pytest.raises(ef.ConfigError, match="already elastic"):
        ef.get_elastic_model(em, ef.ElasticConfig(mlp_tokens=0.5))
    with pytest.raises(ef.ConfigError, match="already has routers"):
        ef.get_elastic_model(em.base_model, ef.ElasticConfig(mlp_tokens=0.5))


def test_token_routing_at_inference_needs_calibration():
    em = make_elastic("llama", "mlp_tokens")
    with pytest.raises(ef.NotCalibratedError, match="calibrate"):
        em(tokens())
    em.train()
    em(tokens())  # top-k needs no thresholds
    em.eval()
    em.set_budget(1.0)
    em(tokens())  # full budget needs none either
    em.set_budget(0.5)
    em.calibrate({"input_ids": tokens()})
    em(tokens())


def test_parameter_routing_needs_no_calibration():
    """Head routing at inference runs without calibrate(): it skips heads (fewer FLOPs, other logits) at a budget
    below 1, and is the base model at 1."""
    em = make_elastic("llama", "attn_heads")
    assert not em.training
    with torch.no_grad():
        half = em(tokens()).logits
        assert em.last_stats()["attn"]["flops_ratio"] < 0.9
        em.set_budget(1.0)
        full = em(tokens()).logits
        assert torch.equal(full, MODELS["llama"](0)(tokens()).logits)
    assert not torch.allclose(half, full, atol=1e-4)


def test_calibrate_without_data():
    em = make_elastic("llama", "mlp_tokens")
    with pytest.raises(ef.ElastiformerError, match="no data"):
        em.calibrate([])
    with pytest.raises(ef.ElastiformerError, match="input_ids"):
        em.calibrate([{"text": "hello"}])
