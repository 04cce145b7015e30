"""Attention-token targets that count a token's role as a key / value (`train_routers(key_value_targets=True)`)."""

import pytest
import torch
from transformers import BertConfig, BertModel

import elastiformer as ef
from elastiformer.arch import get_dotted
from elastiformer.layers import ElasticAttention
from elastiformer.training.routers import train_routers
from helpers.models import VOCAB, pretrained_like, tokens


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, pad_token_id=0, initializer_range=0.2)
    return BertModel(cfg).eval()


def padded_text(B: int = 3, T: int = 12) -> dict[str, torch.Tensor]:
    ids = tokens(B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, T - 4:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def captured_inputs(em: ef.ElasticModel, batch: dict, monkeypatch) -> list[tuple]:
    """(wrapper, x, kwargs, importance) of every attention layer's key / value importance in one teacher pass with
    key_value_targets on: the wrappers compute it there, and only there."""
    seen = []
    original = ElasticAttention.key_value_importance

    def spy(self, x, kwargs):
        value = original(self, x, kwargs)
        seen.append((self, x, dict(kwargs), value))
        return value

    monkeypatch.setattr(ElasticAttention, "key_value_importance", spy)
    em.train()
    with torch.no_grad(), em.disable_routers(), em.teacher_targets(True):
        em(**batch)
    assert not seen  # off by default
    with torch.no_grad(), em.disable_routers(), em.teacher_targets(True), em.override("key_value_targets", True):
        em(**batch)
    em.eval()
    return seen


def brute_force(wrapper: ElasticAttention, x: torch.Tensor, kwargs: dict, valid: torch.Tensor, causal: bool):
    """Remove each key j from every other query's attention (the module itself, through a mask), and sum over those
    queries and over heads the norm of what each head then adds differently. -> (B, T)"""
    B, T, C = x.shape
    H, D = wrapper.dims["H"], wrapper.dims["D"]
    o_w = wrapper.spec.attention_weights(wrapper.base_layer).o_w.view(C, H, D)
    o_proj = get_dotted(wrapper.base_layer, wrapper.spec.o_proj_name)
    allowed = valid[:, None, :].expand(B, T, T).clone()  # (B, Tq, Tk)
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()

    def heads(allow: torch.Tensor) -> torch.Tensor:  # (B, T, H, D) what each head hands to the output projection
        got = {}
        hook = o_proj.register_forward_pre_hook(lambda m, a: got.setdefault("h", a[0]))
        mask = torch.where(allow, 0.0, torch.finfo(x.dtype).min)[:, None]  # (B, 1, T, T)
        extra = {k: kwargs[k] for k in ("position_embeddings",) if kwargs.get(k) is not None}
        wrapper.base_layer(x, attention_mask=mask, **extra)
        hook.remove()
        return got["h"].view(B, T, H, D)

    base = heads(allowed)
    out = torch.zeros(B, T)
    for j in range(T):
        allow = allowed.clone()
        allow[:, :, j] &= torch.arange(T)[None, :].eq(j)  # key j hidden from every query but itself
        delta = torch.einsum("bthd,chd->bthc", heads(allow) - base, o_w).norm(dim=-1)  # (B, T, H)
        delta = delta * valid[:, :, None] * (torch.arange(T) != j)[None, :, None]  # other real queries
        out[:, j] = delta.sum(dim=(1, 2))
    return out


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_key_value_importance_is_what_removing_each_key_costs_the_other_queries(family, monkeypatch):
    """Exact for one key at a time: the closed form (softmax renormalised without key j, per-head norms through
    the Gram matrix) equals masking the key out of the module itself. Llama: causal, rotary, grouped KV; BERT:
    bidirectional, padded rows."""
    if family == "llama":
        em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(attn_tokens=0.5))
        batch, causal = {"input_ids": tokens(2, 10)}, True
    else:
        em = ef.get_elastic_model(tiny_bert(), ef.ElasticConfig(attn_tokens=0.5))
        batch, causal = padded_text(), False
    seen = captured_inputs(em, batch, monkeypatch)
    assert len(seen) == sum(isinstance(m, ElasticAttention) and m.token_router is not None
                            for m in em.base_model.modules())  # every routed layer
    valid = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones(2, 10, dtype=torch.bool)
    for wrapper, x, kwargs, value in seen[:2]:
        with torch.no_grad():
            expected = brute_force(wrapper, x, kwargs, valid, causal)
        torch.testing.assert_close(value[valid], expected[valid], rtol=2e-3, atol=2e-4)
        assert value[valid].std() > 0.05 * value[valid].mean()  # tokens differ: something to rank


def test_training_with_key_value_targets_teaches_other_scores():
    """The option reaches the targets of both phases: routers trained with it differ from routers trained without
    it from the same start; it needs the teacher's targets."""
    trained = []
    for kv in (False, True):
        em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(attn_tokens=0.5))
        train_routers(em, tokens(8, 16), steps=2, target_steps=2, batch_size=4, seed=0, progress=False,
                      key_value_targets=kv, allocation=False)
        trained.append({k: v for k, v in em.router_state_dict().items() if "threshold" not in k})
    assert any(not torch.equal(v, trained[1][k]) for k, v in trained[0].items())
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(attn_tokens=0.5))
    for bad in (dict(router_targets="sensitivity"), dict(router_targets="self", target_steps=0)):
        with pytest.raises(ef.ConfigError, match="key_value_targets"):
            train_routers(em, tokens(8, 16), steps=1, progress=False, key_value_targets=True, **bad)
    with pytest.raises(ef.ConfigError, match="key_value_targets"):
        train_routers(em, tokens(8, 16), steps=1, progress=False, key_value_targets="yes")


def test_key_value_targets_are_on_by_default_for_encoders_only(monkeypatch):
    """None (the default): an encoder's attention-token targets count the key / value role, a causal LM's do not;
    False turns it off for an encoder too."""
    calls = []
    original = ElasticAttention.key_value_importance
    monkeypatch.setattr(ElasticAttention, "key_value_importance",
                        lambda self, x, kw: calls.append(self.layer_idx) or original(self, x, kw))
    batch = padded_text(B=4, T=12)
    for make, data, kv, expect in ((tiny_bert, [batch], None, True), (tiny_bert, [batch], False, False),
                                   (pretrained_like, tokens(8, 16), None, False)):
        calls.clear()
        em = ef.get_elastic_model(make(), ef.ElasticConfig(attn_tokens=0.5))
        train_routers(em, data, steps=1, target_steps=1, batch_size=4, progress=False, allocation=False,
                      key_value_targets=kv, **({"loss": "cosine"} if make is tiny_bert else {}))
        assert bool(calls) == expect, (make.__name__, kv)
