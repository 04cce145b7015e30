"""Stand-ins: what a token that skips a token-routed MLP or attention gets (a fitted low-rank estimate of the
sub-layer's update from the token's input)."""

import json

import pytest
import torch

import elastiformer as ef
from elastiformer.layers import ElasticAttention, ElasticMLP
from elastiformer.layers.stand_in import RegressionStats, StandIn
from helpers.models import MODELS, make_elastic, tokens


def _fitted(component: str = "mlp_tokens", **overrides) -> ef.ElasticModel:
    em = make_elastic("llama", component, **overrides)
    em.fit_stand_ins([{"input_ids": tokens(4, 24, seed=3)}, {"input_ids": tokens(4, 24, seed=4)}])
    return em


def _mlps(em) -> list[ElasticMLP]:
    return [m for m in em.base_model.modules() if isinstance(m, ElasticMLP)]


def _routed(em, component: str) -> list:
    """The sub-layers whose tokens `component` routes (MLPs or attentions), in layer order."""
    kind = ElasticMLP if component == "mlp_tokens" else ElasticAttention
    return [m for m in em.base_model.modules() if isinstance(m, kind) and m.token_router is not None]


def test_the_fit_recovers_a_low_rank_affine_map():
    torch.manual_seed(0)
    C, r = 24, 3
    A, B, c = torch.randn(C, r), torch.randn(r, C), torch.randn(C)
    x = torch.randn(500, C) * 2 + 1
    stats = RegressionStats(C)
    stats.add(x, x @ A @ B + c)
    s = StandIn(C, r)
    assert not s.is_fitted and torch.equal(s(x), torch.zeros_like(x))  # unfitted: nothing
    s.fit(stats, ridge=1e-9)
    assert s.is_fitted
    torch.testing.assert_close(s(x), x @ A @ B + c, atol=1e-3, rtol=1e-3)
    assert s.flops(10) == 2 * 10 * C * r * 2


@pytest.mark.parametrize("component", ["mlp_tokens", "attn_tokens"])
def test_a_fit_reduces_the_error_of_skipping_on_the_tokens_it_was_fitted_on(component):
    """(On a random tiny model the sub-layer has no structure that carries to other text: the gain on held-out text
    of a real model is what the LM bench measures.)"""
    em = make_elastic("llama", component)
    x = tokens(8, 24, seed=11)
    em.fit_stand_ins([{"input_ids": x}])
    inputs, updates, hooks = {}, {}, []
    subs = _routed(em, component)
    for i, m in enumerate(subs):  # each sub-layer's input, and its update (an attention's: its output projection's)
        hooks.append(m.register_forward_pre_hook(
            lambda mod, a, kw, i=i: inputs.update({i: kw.get("hidden_states", a[0] if a else None)}), with_kwargs=True))
        out = m.base_layer if component == "mlp_tokens" else m.base_layer.o_proj
        hooks.append(out.register_forward_hook(lambda mod, a, o, i=i: updates.update({i: o})))
    with torch.no_grad(), em.disable_routers():
        em(input_ids=x)
    for h in hooks:
        h.remove()
    assert subs and len(inputs) == len(updates) == len(subs)
    for i, m in enumerate(subs):
        h, y = (t.reshape(-1, t.shape[-1]) for t in (inputs[i], updates[i]))
        low = y.norm(dim=-1) <= y.norm(dim=-1).quantile(0.3)  # the smallest updates: the ones it is fitted on
        with torch.no_grad():
            err = (m.stand_in(h[low]) - y[low]).pow(2).sum(-1).mean()
        assert err < 0.9 * y[low].pow(2).sum(-1).mean(), i  # well below skipping with nothing


def test_skipped_tokens_get_the_stand_in_and_their_flops_are_counted():
    em = _fitted()
    em.train()  # top-k: a known number of tokens per row
    em.set_budget(0.5)
    m = _mlps(em)[1]
    seen = {}
    hook = m.register_forward_hook(lambda mod, a, o: seen.update(x=a[0], out=o))
    with torch.no_grad():
        em(input_ids=tokens(2, 10, seed=8))
    hook.remove()
    x, out = seen["x"], seen["out"]
    s = em.last_stats()["per_layer"][2 * 1 + 1]  # layer 1's MLP (attention, MLP per layer)
    s = type("Stats", (), s)
    n = round(s.token_fraction * 20)
    assert 0 < n < 20
    with torch.no_grad():
        full, est = m.base_layer(x), m.stand_in(x)  # (2, 10, C)
    processed = (out - full).abs().amax(-1) < 1e-5  # (2, 10)
    skipped = (out - est).abs().amax(-1) < 1e-5
    assert int(processed.sum()) == n and bool((processed | skipped).all())
    mlp_flops = 2 * 3 * em.dims["C"] * em.dims["I"]  # per token, gated
    router = m.token_router.flops(20)
    assert s.executed_flops == n * mlp_flops + m.stand_in.flops(20 - n) + router


def test_tokens_that_skip_attention_get_its_stand_in_and_its_flops_are_counted():
    em = _fitted("attn_tokens")
    em.train()  # top-k: a known number of tokens per row
    em.set_budget(0.5)
    m = next(a for a in _routed(em, "attn_tokens") if a.layer_idx == 1)
    ids = tokens(2, 10, seed=8)

    def run():  # layer 1's input and output, and its executed FLOPs
        seen = {}
        hook = m.register_forward_hook(lambda mod, a, kw, o: seen.update(x=kw.get("hidden_states", a[0] if a else None),
                                                                        out=o[0]), with_kwargs=True)
        with torch.no_grad():
            em(input_ids=ids)
        hook.remove()
        flops = next(s for s in em.last_stats()["per_layer"] if s["layer"] == 1 and s["sublayer"] == "attn")
        return seen["x"], seen["out"], flops

    x, out, stats = run()
    with torch.no_grad():
        est = m.stand_in(x)  # (2, 10, C)
    skipped = (out - est).abs().amax(-1) < 1e-6  # (2, 10)
    n = round(stats["token_fraction"] * 20)
    assert int(skipped.sum()) == 20 - n and 0 < n < 20
    m.stand_in.fitted.fill_(False)  # the same routing (layer 0 runs dense), skipped tokens get nothing
    x0, out0, stats0 = run()
    assert torch.equal(x0, x) and bool((out0[skipped] == 0).all())
    torch.testing.assert_close(out0[~skipped], out[~skipped])  # the processed tokens are untouched
    assert stats["executed_flops"] - stats0["executed_flops"] == m.stand_in.flops(20 - n)


@pytest.mark.parametrize("component", ["mlp_tokens", "attn_tokens"])
def test_a_layer_at_capacity_zero_runs_only_its_stand_in(component):
    em = _fitted(component)
    em.calibrate([{"input_ids": tokens(4, 24, seed=5)}])
    em.state.capacity_override = {component: [1.0, 0.0, 1.0, 1.0]}
    x = tokens(2, 16, seed=7)
    with torch.no_grad():
        out = em(input_ids=x).logits
    sub = "mlp" if component == "mlp_tokens" else "attn"
    stats = [s for s in em.last_stats()["per_layer"] if s["sublayer"] == sub]
    stand_in = next(m for m in _routed(em, component) if m.layer_idx == 1).stand_in
    assert stats[1]["executed_flops"] == stand_in.flops(32)
    em.state.capacity_override = None
    layer = em.base_model.model.layers[1]
    if component == "mlp_tokens":  # the sub-layer replaced by its stand-in
        base = layer.mlp
        base.forward, saved = (lambda h, *a, **k: stand_in(h)), base.forward
    else:
        base = layer.self_attn.base_layer
        base.forward, saved = (lambda h, *a, **k: (stand_in(h), None)), base.forward
    with torch.no_grad(), em.disable_routers():
        ref = em(input_ids=x).logits
    base.forward = saved
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("component", ["mlp_tokens", "attn_tokens"])
def test_budget_one_is_the_base_model_and_decoding_equals_the_uncached_forward(component):
    em = _fitted(component)
    em.calibrate([{"input_ids": tokens(4, 24, seed=5)}])
    ids = tokens(2, 12)
    with torch.no_grad():
        with em.disable_routers():
            ref = em(ids).logits
        em.set_budget(1.0)
        torch.testing.assert_close(em(ids).logits, ref, atol=1e-5, rtol=1e-5)
        em.set_budget(0.5)
        routed = em(ids).logits
        assert not torch.allclose(routed, ref, atol=1e-3)
        for prompt in (ids[:1], ids):  # batch 1 takes the one-token path, batch 2 the batched one
            kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(em.generate(prompt, use_cache=True, **kw), em.generate(prompt, use_cache=False, **kw))


@pytest.mark.parametrize("component", ["mlp_tokens", "attn_tokens"])
def test_stand_ins_are_saved_with_the_routers_and_old_artifacts_load_without(tmp_path, component):
    em = _fitted(component)
    em.calibrate([{"input_ids": tokens(4, 24, seed=5)}])
    em.set_budget(0.5)
    ids = tokens(2, 12)
    with torch.no_grad():
        ref = em(ids).logits
    em.save_pretrained(tmp_path / "r")
    back = ef.ElasticModel.from_pretrained(MODELS["llama"](), tmp_path / "r")
    assert _routed(back, component) and all(m.stand_in.is_fitted for m in _routed(back, component))
    back.set_budget(0.5)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, atol=1e-6, rtol=1e-6)
    # an artifact saved before stand-ins existed: no stand_in_rank in its config, no stand-in tensors
    meta = json.loads((tmp_path / "r" / "elastic_config.json").read_text())
    del meta["elastic_config"]["stand_in_rank"], meta["elastic_config"]["attn_stand_in_rank"]
    old = ef.ElasticConfig.from_dict(meta["elastic_config"])
    assert old.stand_in_rank == 0 and old.attn_stand_in_rank == 0


def test_only_skipped_tokens_send_the_stand_ins_a_gradient():
    em = _fitted()
    em.train()
    ids = tokens(2, 10, seed=8)
    em.set_budget(1.0)  # every token processed: neither the stand-ins nor the routers are on the output's path
    assert not em(input_ids=ids).logits.requires_grad
    em.set_budget(0.5)
    em(input_ids=ids).logits.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in _mlps(em) for p in m.stand_in.parameters())


def test_train_routers_trains_the_fitted_stand_ins_unless_told_to_keep_them():
    from elastiformer.training.routers import _split_batches, batch_at

    data = tokens(16, 16, seed=2)
    options = dict(steps=4, batch_size=4, warmup=1, target_steps=2, allocation=False, checkpoint_every=None,
                   progress=False)
    kept, trained, fitted = (make_elastic("llama", "mlp_tokens") for _ in range(3))
    ef.train_routers(kept, data, stand_in_lr_scale=0.0, **options)
    ef.train_routers(trained, data, stand_in_lr_scale=0.5, **options)
    fitted.fit_stand_ins(_split_batches([batch_at(data, 0, i, 4, 0 + 3) for i in range(8)]))  # what training fits
    for k, t, f in zip(_mlps(kept), _mlps(trained), _mlps(fitted)):
        for name in ("down", "up", "bias"):
            assert torch.equal(getattr(k.stand_in, name), getattr(f.stand_in, name)), name  # kept as fitted
            assert not torch.allclose(getattr(t.stand_in, name), getattr(f.stand_in, name)), name  # trained
        assert all(p.requires_grad for p in t.stand_in.parameters()) and t.stand_in.is_fitted
    with pytest.raises(ef.ConfigError, match="stand_in_lr_scale"):
        ef.train_routers(make_elastic("llama", "mlp_tokens"), data, stand_in_lr_scale=-1, **options)


def test_bad_stand_in_options_are_refused():
    with pytest.raises(ef.ConfigError, match="stand_in_rank"):
        ef.ElasticConfig(mlp_tokens=0.5, stand_in_rank=-1)
    with pytest.raises(ef.ConfigError, match="attn_stand_in_rank"):
        ef.ElasticConfig(attn_tokens=0.5, attn_stand_in_rank=1.5)
    with pytest.raises(ef.ConfigError, match="no stand-in"):
        make_elastic("llama", "attn_tokens", attn_stand_in_rank=0).fit_stand_ins([{"input_ids": tokens()}])
    with pytest.raises(ef.ConfigError, match="no stand-in"):
        make_elastic("llama", "attn_heads").fit_stand_ins([{"input_ids": tokens()}])
    with pytest.raises(ef.ConfigError, match="quantile"):
        make_elastic("llama", "mlp_tokens").fit_stand_ins([{"input_ids": tokens()}], quantile=0)
    gpt2 = make_elastic("gpt2", "mlp_tokens")  # pre-LN too: it gets stand-ins
    assert all(m.stand_in is not None for m in _mlps(gpt2))
    assert all(m.stand_in is None for m in _mlps(make_elastic("llama", "mlp_tokens", stand_in_rank=0)))
