"""Issue 15: the faster execution paths compute what the straightforward ones did (same function, less work)."""

import pytest
import torch
import torch.nn.functional as F

import elastiformer as ef
from elastiformer.layers import ElasticMLP
from elastiformer.layers.mlp import dispatch_by_expert
from elastiformer.artifacts import weight_fingerprint
from helpers.models import MODELS, tokens


def _clustered(arch: str = "llama") -> ef.ElasticModel:
    em = ef.get_elastic_model(MODELS[arch](), ef.ElasticConfig(mlp_experts=4, mlp_experts_active=0.5,
                                                               expert_split="cluster"))
    return em


def _mlps(em):
    return [m for m in em.base_model.modules() if isinstance(m, ElasticMLP)]


def _gathered_experts(m: ElasticMLP, original, x: torch.Tensor, chosen: torch.Tensor, gate: torch.Tensor):
    """The pre-issue-15 computation: each expert gathers its cluster's rows of the original (unpermuted) weights."""
    up_w, up_b, gate_w, gate_b, down_w, down_b = original
    act = m.spec.mlp_weights(m.base_layer).act
    out = torch.zeros_like(x)
    for e in range(m.expert_router.n_experts):
        t, k = (chosen == e).nonzero(as_tuple=True)
        s = m.expert_router.expert_neurons(e)  # (I/E,) neuron indices in the original numbering
        h = F.linear(x[t], up_w[s], None if up_b is None else up_b[s])
        h = act(F.linear(x[t], gate_w[s], None if gate_b is None else gate_b[s])) * h if gate_w is not None else act(h)
        out.index_add_(0, t, F.linear(h, down_w[:, s]) * gate[t, k][:, None])
    return out if down_b is None else out + down_b


def _weights(m: ElasticMLP):
    w = m.spec.mlp_weights(m.base_layer)
    return [None if t is None else t.detach().clone() for t in (w.up_w, w.up_b, w.gate_w, w.gate_b, w.down_w, w.down_b)]


def test_clustered_experts_run_on_permuted_contiguous_weights_with_the_same_outputs():
    for arch in sorted(MODELS):
        em = _clustered(arch)
        originals = [_weights(m) for m in _mlps(em)]
        fingerprint = weight_fingerprint(em.base_model)
        ids = tokens(2, 24)
        em.split_experts([{"input_ids": ids}])
        for m, original in zip(_mlps(em), originals):
            order = m.expert_router.neuron_order
            assert m.expert_router.is_split and torch.equal(m.weight_order, order)
            up_now = m.spec.mlp_weights(m.base_layer).up_w
            assert torch.equal(up_now, original[0][order])  # permuted once, in place: experts are contiguous slices
            x = torch.randn(7, em.dims["C"])
            sel = m.expert_router(x, 0.5, with_aux=False, positions=torch.arange(7), layer=m.layer_idx)
            y, _, _ = m._run_experts(x, 0.5, torch.arange(7))
            torch.testing.assert_close(y, _gathered_experts(m, original, x, sel.chosen, sel.gate), atol=1e-5,
                                       rtol=1e-4)
        assert em.base_identity()["fingerprint"] == fingerprint  # the artifact still names the original weights
        assert weight_fingerprint(em.base_model) != fingerprint  # (while the model holds them permuted)
        fresh = MODELS[arch]().state_dict()
        base = em.unload()
        assert all(torch.equal(v, fresh[k]) for k, v in base.state_dict().items())  # unload: the original tensors


def test_clustered_artifact_loads_back_permuted_with_identical_logits(tmp_path):
    em = _clustered()
    ids = tokens(2, 16)
    em.split_experts([{"input_ids": ids}])
    em.set_budget(0.5)
    ref = em(input_ids=ids).logits
    em.save_pretrained(tmp_path / "r")
    em2 = ef.ElasticModel.from_pretrained(MODELS["llama"](), tmp_path / "r")  # fingerprint checked: must match
    em2.set_budget(0.5)
    torch.testing.assert_close(em2(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(m.weight_order, m.expert_router.neuron_order) for m in _mlps(em2))
    with em2.disable_routers():  # dense: the permuted MLPs are the same function
        dense = em2(input_ids=ids).logits
    torch.testing.assert_close(dense, MODELS["llama"]()(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_refitting_the_split_maps_back_to_the_original_numbering():
    em = _clustered()
    ids = tokens(2, 24)
    em.split_experts([{"input_ids": ids}])
    first = [m.expert_router.neuron_order.clone() for m in _mlps(em)]
    em.split_experts([{"input_ids": ids}])  # same data, now on permuted weights: the same split
    assert all(torch.equal(m.expert_router.neuron_order, order) for m, order in zip(_mlps(em), first))


def test_dispatch_by_expert_matches_one_nonzero_per_expert():
    g = torch.Generator().manual_seed(0)
    chosen = torch.randint(-1, 5, (30, 3), generator=g)
    token_idx, slot, counts = dispatch_by_expert(chosen, 5)
    begin = 0
    for e in range(5):
        t, k = (chosen == e).nonzero(as_tuple=True)
        assert counts[e] == t.numel()
        assert torch.equal(token_idx[begin:begin + counts[e]], t) and torch.equal(slot[begin:begin + counts[e]], k)
        begin += counts[e]
    assert begin == int((chosen >= 0).sum())


def _randomized(em: ef.ElasticModel, seed: int = 3) -> ef.ElasticModel:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in em.router_parameters():
            p.normal_(0, 0.5)
    return em


def test_batched_head_routing_equals_dense_attention_with_inactive_heads_zeroed():
    """The reference is the unmodified attention, run dense, with each token's inactive heads zeroed (times its
    gate) at the input of the output projection: what head routing means, computed without it."""
    from elastiformer.arch import get_dotted
    from elastiformer.layers import ElasticAttention

    for arch in sorted(MODELS):
        em = _randomized(ef.get_elastic_model(MODELS[arch](), ef.ElasticConfig(attn_heads=0.5)))
        em.set_budget(0.5)
        ids = tokens(3, 20)
        routed = em(input_ids=ids).logits
        assert em.last_stats()["flops_ratio"] < 0.95  # (the block FLOPs of what ran)
        hooks, H, D = [], em.dims["H"], em.dims["D"]
        for a in (m for m in em.base_model.modules() if isinstance(m, ElasticAttention)):
            cap = em.state.budget_capacity("attn_heads", a.layer_idx)
            if a.head_router is None or cap >= 1.0:
                continue
            chosen = {}

            def pick(module, args, kwargs, cap=cap, chosen=chosen):
                x = args[0] if args else kwargs["hidden_states"]
                B, T, _ = x.shape
                sel = module.head_router(x, cap, positions=torch.arange(T).expand(B, T), layer=module.layer_idx)
                chosen["heads"] = (sel.active.float() * sel.gate).repeat_interleave(D, dim=-1)  # (B, T, H*D)

            def zero_inactive(module, args, chosen=chosen):
                return (args[0] * chosen["heads"],)

            hooks.append(a.register_forward_pre_hook(pick, with_kwargs=True))
            hooks.append(get_dotted(a.base_layer, em.spec.o_proj_name).register_forward_pre_hook(zero_inactive))
        assert hooks
        try:
            with em.disable_routers():
                reference = em(input_ids=ids).logits
        finally:
            for h in hooks:
                h.remove()
        torch.testing.assert_close(routed, reference, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(routed, MODELS[arch]()(input_ids=ids).logits, atol=1e-3)  # heads really skipped


def test_contiguous_runs():
    from elastiformer.layers.mlp import contiguous_runs

    assert contiguous_runs([0, 1, 2, 5, 6, 9]) == [(0, 2), (5, 6), (9, 9)]
    assert contiguous_runs([]) == []


def test_one_token_expert_runs_equal_the_per_expert_dispatch():
    for arch in sorted(MODELS):
        em = _randomized(ef.get_elastic_model(MODELS[arch](), ef.ElasticConfig(mlp_experts=4, mlp_experts_active=0.5)))
        for m in (m for m in _mlps(em) if m.expert_router is not None):
            for seed in range(4):
                x = torch.randn(1, em.dims["C"], generator=torch.Generator().manual_seed(seed))
                for cap in (0.3, 0.5, 0.8):
                    with torch.no_grad():  # decoding: the runs of adjacent experts
                        fast, fast_flops, fast_frac = m._run_experts(x, cap, torch.tensor([seed]))
                    with torch.enable_grad():  # training: one matmul per expert, gated
                        ref, ref_flops, ref_frac = m._run_experts(x, cap, torch.tensor([seed]))
                    torch.testing.assert_close(fast, ref.detach(), atol=1e-5, rtol=1e-4)
                    assert (fast_flops, fast_frac) == (ref_flops, ref_frac)


def test_token_thresholds_are_cached_until_the_calibration_changes():
    em = _randomized(ef.get_elastic_model(MODELS["llama"](), ef.ElasticConfig(mlp_tokens=0.5)))
    em.calibrate([{"input_ids": tokens(4, 24)}], progress=False)
    r = next(r for r in em.routers() if isinstance(r, ef.routers.TokenRouter))
    first = r.threshold(0.5)
    assert isinstance(first, float) and first == float(r._lookup_threshold(0.5, "learned"))
    with torch.no_grad():
        r.calib_threshold.add_(1.0)  # what loading routers (copy_) or a new calibration does to the buffer
    assert r.threshold(0.5) == float(r._lookup_threshold(0.5, "learned")) != first
    em.calibrate([{"input_ids": tokens(4, 24, seed=5)}], progress=False)
    assert r.threshold(0.5) == float(r._lookup_threshold(0.5, "learned"))


def test_per_call_values_follow_the_padding_of_each_call():
    em = _randomized(ef.get_elastic_model(MODELS["llama"](), ef.ElasticConfig(mlp_tokens=0.5)))
    em.calibrate([{"input_ids": tokens(4, 24)}], progress=False)
    em.set_budget(0.5)
    ids = tokens(2, 12)
    padded = torch.ones_like(ids)
    padded[0, :4] = 0
    seen = []
    mlp = _mlps(em)[1]
    hook = mlp.register_forward_pre_hook(lambda m, a: seen.append(em.state.token_valid(2, 12, ids.device).clone()))
    with torch.no_grad():
        em(input_ids=ids, attention_mask=padded)
        em(input_ids=ids)
    hook.remove()
    assert not seen[0][0, :4].any() and seen[1].all()  # the second call did not reuse the first call's mask


def test_attention_layer_that_selects_no_token_runs_only_its_router():
    from elastiformer.layers import ElasticAttention

    em = _randomized(ef.get_elastic_model(MODELS["llama"](), ef.ElasticConfig(attn_tokens=0.5)))
    em.calibrate([{"input_ids": tokens(4, 24)}], progress=False)
    em.set_budget(0.5)
    layer = next(a for a in em.base_model.modules() if isinstance(a, ElasticAttention) and a.token_router is not None)
    with torch.no_grad():
        layer.token_router.calib_threshold.add_(1e6)  # this layer now keeps only the forced first token
        ids = tokens(1, 10)
        out = em(input_ids=ids[:, :9], use_cache=True)
        step = em(input_ids=ids[:, 9:], past_key_values=out.past_key_values, use_cache=True)  # one skipped token
        stats = [s for s in em.last_stats()["per_layer"] if s["layer"] == layer.layer_idx and s["sublayer"] == "attn"]
        assert stats[0]["token_fraction"] == 0.0 and stats[0]["executed_flops"] == stats[0]["router_flops"] > 0
        full = em(input_ids=ids).logits  # the same tokens without a cache: the same decision, the same logits
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)


def test_head_routed_decoding_equals_the_uncached_forward():
    """Decode steps (one token per row, the runs-of-heads path) against the full sequence without a cache (the
    bucket path): head routing looks at each token alone, so the logits agree at every step."""
    for arch in sorted(MODELS):
        for config in (dict(attn_heads=0.5), dict(attn_heads=0.6, head_granularity="group")):
            em = _randomized(ef.get_elastic_model(MODELS[arch](), ef.ElasticConfig(**config)))
            em.set_budget(0.5)
            for B in (1, 3):
                ids = tokens(B, 14)
                with torch.no_grad():
                    full = em(input_ids=ids).logits
                    out = em(input_ids=ids[:, :10], use_cache=True)
                    for t in range(10, 14):
                        out = em(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
                        torch.testing.assert_close(out.logits[:, -1], full[:, t], atol=2e-5, rtol=1e-4)
                        if B == 1:  # (at batch 3 the heads any row chose all run: their union may be all)
                            assert em.last_stats()["flops_ratio"] < 1.0


def test_one_token_mlp_routing_runs_the_mlp_on_the_token_or_reads_none_of_its_weights():
    """Decoding at batch 1 with token-routed MLPs: each layer either runs its base MLP on the token as it is or not at
    all (no gather / scatter), with the same logits as the batched path (the same rows in a batch of two)."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    em = ef.get_elastic_model(MODELS["llama"](), ef.ElasticConfig(mlp_tokens=0.5))
    em.calibrate({"input_ids": tokens(B=4, T=24, seed=7)})
    em.set_budget(0.5)
    calls = []
    hooks = [m.base_layer.register_forward_hook(lambda mod, a, out: calls.append(tuple(a[0].shape))) for m in _mlps(em)]
    prompt, fed = tokens(B=1, T=8, seed=5), tokens(B=1, T=6, seed=6)

    def decode(batch: int) -> tuple[torch.Tensor, list[dict]]:
        cache, steps, mlp_stats = DynamicCache(), [], []
        with torch.no_grad():
            em(prompt.expand(batch, -1), cache=cache, use_cache=True)
            for t in range(fed.shape[1]):
                calls.clear()
                steps.append(em(fed[:, t:t + 1].expand(batch, -1), cache=cache, use_cache=True).logits[0, -1])
                mlp = [s for s in em.last_stats()["per_layer"] if s["sublayer"] == "mlp"]
                mlp_stats.append((list(calls), mlp))
        return torch.stack(steps), mlp_stats

    one, one_stats = decode(1)
    two, _ = decode(2)
    for h in hooks:
        h.remove()
    assert torch.allclose(one, two, atol=1e-5)
    skipped = 0
    for shapes, mlp in one_stats:
        ran = [s for s in mlp if s["token_fraction"] == 1.0]
        assert len(shapes) == len(ran) and all(shape[:2] == (1, 1) for shape in shapes)  # the token as it is
        for s in mlp:
            if s["token_fraction"] == 0.0:  # skipped: only the router's FLOPs
                assert s["executed_flops"] == s["router_flops"] > 0
                skipped += 1
    assert skipped > 0  # the budget skips some of the decode steps' MLP work


def test_token_routed_decoding_at_batch_1_equals_the_uncached_forward(monkeypatch):
    """Batch-1 decoding of a token-routed attention takes its one-token path (one score decides; no mask at all
    without padding, the indexed mask with left padding): every step's logits equal the full sequence's, and steps
    both run and skip layers."""
    from elastiformer.layers import ElasticAttention

    one_token_calls = []
    original = ElasticAttention._one_token
    monkeypatch.setattr(ElasticAttention, "_one_token",
                        lambda self, *a: one_token_calls.append(self.layer_idx) or original(self, *a))
    for arch in sorted(MODELS):
        em = _randomized(ef.get_elastic_model(MODELS[arch](), ef.ElasticConfig(attn_tokens=0.5)))
        em.calibrate([{"input_ids": tokens(4, 24)}], progress=False)
        em.set_budget(0.5)
        fractions = []
        for pad in (0, 3):  # no padding; 3 pads on the left
            ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), tokens(1, 16)], dim=1)
            mask = (torch.arange(ids.shape[1]) >= pad).long()[None]  # (1, S)
            with torch.no_grad():
                full = em(input_ids=ids, attention_mask=mask).logits
                out = em(input_ids=ids[:, :10], attention_mask=mask[:, :10], use_cache=True)
                for t in range(10, ids.shape[1]):
                    out = em(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                             past_key_values=out.past_key_values, use_cache=True)
                    torch.testing.assert_close(out.logits[:, -1], full[:, t], atol=2e-5, rtol=1e-4)
                    layers = {a.layer_idx for a in em.base_model.modules()
                              if isinstance(a, ElasticAttention) and a.token_router is not None}
                    fractions += [s["token_fraction"] for s in em.last_stats()["per_layer"]
                                  if s["sublayer"] == "attn" and s["layer"] in layers]
        assert 0.0 in fractions and 1.0 in fractions  # both branches of the one-token path ran
    assert one_token_calls  # the decode steps took the one-token path


def test_one_token_head_choice_equals_the_batched_choice():
    """Batch-1 decoding decides a token's heads on the host (`one_token_heads`); it must be the batched router's
    choice, fractional counts included (the last slot goes by position and layer), per head and per KV group."""
    from elastiformer.routers import HeadRouter

    torch.manual_seed(0)
    for granularity in ("query", "group"):
        router = HeadRouter(16, 8, 2 if granularity == "group" else 8, granularity=granularity)
        with torch.no_grad():
            router.net[-1].weight.normal_()
        x = torch.randn(1, 24, 16)
        positions = torch.arange(24)[None]
        for capacity in (0.0, 0.3, 0.5, 0.6, 0.85, 1.0):
            for layer in (0, 3):
                with torch.no_grad():
                    batched = router(x, capacity, positions=positions, layer=layer).active  # (1, 24, H)
                    for t in range(24):
                        one = router.one_token_heads(x[:, t:t + 1], capacity, t, layer=layer)
                        assert one == batched[0, t].nonzero().squeeze(1).tolist(), (granularity, capacity, layer, t)


def test_batch_1_decoding_routes_tokens_with_heads_and_experts_on_the_one_token_paths(monkeypatch):
    """All four components at batch 1: a token-routed attention that also routes heads (an MLP that also routes
    experts) decides with one score and then runs the token's heads (experts) on the token as it is, without the
    batched gathers; every decode step's logits equal the uncached forward's (with LoRA and per-group heads too), and
    steps both run and skip layers with fewer heads / experts than the layer has."""
    from elastiformer.layers import ElasticAttention

    calls = {"attn": 0, "mlp": 0}
    for cls, key in ((ElasticAttention, "attn"), (ElasticMLP, "mlp")):
        original = cls._one_token
        monkeypatch.setattr(cls, "_one_token", lambda self, *a, _o=original, _k=key: calls.__setitem__(
            _k, calls[_k] + 1) or _o(self, *a))
    routed = dict(attn_tokens=0.6, attn_heads=0.6, mlp_tokens=0.6, mlp_experts=4, mlp_experts_active=0.5)
    for arch, extra in [(a, e) for a in sorted(MODELS) for e in ({}, dict(lora_rank=1), dict(head_granularity="group"))]:
        em = _randomized(ef.get_elastic_model(MODELS[arch](), ef.ElasticConfig(**routed, **extra)))
        em.calibrate([{"input_ids": tokens(4, 24)}], progress=False)
        em.set_budget(0.6)
        ids = tokens(1, 16)
        per_layer, router_calls = [], []
        nets = [m.token_router.net for m in em.base_model.modules()
                if isinstance(m, (ElasticAttention, ElasticMLP)) and m.token_router is not None]
        with torch.no_grad():
            full = em(input_ids=ids).logits
            out = em(input_ids=ids[:, :10], use_cache=True)
            hooks = [n.register_forward_hook(lambda *_: router_calls.append(1)) for n in nets]
            for t in range(10, ids.shape[1]):
                out = em(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
                torch.testing.assert_close(out.logits[:, -1], full[:, t], atol=2e-5, rtol=1e-4)
                per_layer += em.last_stats()["per_layer"]
            for h in hooks:
                h.remove()
        # a token router is scored with its layer's head / expert router, in one matmul
        assert not router_calls, (arch, extra)
        for sub in ("attn", "mlp"):
            ran = [s for s in per_layer if s["sublayer"] == sub and s["token_fraction"] == 1.0]
            assert any(s["token_fraction"] == 0.0 for s in per_layer if s["sublayer"] == sub)
            assert any(s["unit_fraction"] < 1.0 for s in ran)  # the token ran on part of the heads / experts
    assert calls["attn"] and calls["mlp"]


def test_decoding_weight_views_follow_the_weights():
    """The per-set weight views of batch-1 decoding are reused while the weights stay in place (changes in place
    show through them) and rebuilt once a weight is another tensor."""
    from elastiformer.layers.state import views_per_weights

    layer = torch.nn.Linear(4, 6)
    made = []

    def make():
        made.append(1)
        return layer.weight[2:4]

    first = views_per_weights(layer, (layer.weight,), (1,), make)
    assert views_per_weights(layer, (layer.weight,), (1,), make) is first and len(made) == 1
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the kept view reads the new values
    torch.testing.assert_close(first, layer.weight[2:4])
    layer.weight = torch.nn.Parameter(torch.randn(6, 4))  # another storage: the views are made again
    again = views_per_weights(layer, (layer.weight,), (1,), make)
    assert len(made) == 2 and torch.equal(again, layer.weight[2:4])


def test_one_token_heads_read_the_cache_per_group_in_every_layout():
    """Decoding at batch 1, the used heads attend as the queries of their KV groups (no per-head copy of the cache):
    every group, one run of groups (a view), scattered groups and groups with unused heads all give the logits of
    the uncached forward. 6 query heads on 3 KV groups, so all four layouts come up."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
                      intermediate_size=48, max_position_embeddings=128)
    torch.manual_seed(0)
    em = _randomized(ef.get_elastic_model(LlamaForCausalLM(cfg).eval(), ef.ElasticConfig(attn_heads=0.5)), seed=5)
    layouts = set()
    for budget in (0.35, 0.5, 0.7, 0.9):
        em.set_budget(budget)
        ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(int(budget * 10)))
        with torch.no_grad():
            full = em(input_ids=ids).logits
            out = em(input_ids=ids[:, :8], use_cache=True)
            for t in range(8, ids.shape[1]):
                out = em(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
                torch.testing.assert_close(out.logits[:, -1], full[:, t], atol=2e-5, rtol=1e-4)
        for module in em.base_model.modules():
            for plan in module.__dict__.get("_views_per_weights", (None, {}))[1].values():
                layouts.add(("all" if plan.kv_groups is None else type(plan.kv_groups).__name__,
                             plan.slots is not None))
    assert {"all", "slice", "Tensor"} <= {kind for kind, _ in layouts}
    assert any(partial for _, partial in layouts)  # a group whose heads did not all run


def test_joint_one_token_logits_stack_the_routers_of_a_sublayer():
    """A sub-layer's token router and head / expert router read the same input: one norm and one matmul give the
    logits each computes alone; the stacked weight follows in-place updates; a router net of another kind (with a
    hidden layer) is not stacked."""
    from elastiformer.routers import ExpertRouter, TokenRouter, joint_one_token_logits

    torch.manual_seed(0)
    owner = torch.nn.Module()
    token, expert = TokenRouter(16), ExpertRouter(16, 4)
    for p in list(token.parameters()) + list(expert.parameters()):
        torch.nn.init.normal_(p)
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        alone = torch.cat([token.net(x)[0, 0], expert.net(x)[0, 0]]).tolist()
        assert joint_one_token_logits(owner, x, (token.net, expert.net)) == pytest.approx(alone, abs=1e-5)
        expert.net[1].weight.mul_(-1)  # an optimizer step, a loaded state: the stacked copy is rebuilt
        alone = torch.cat([token.net(x)[0, 0], expert.net(x)[0, 0]]).tolist()
        assert joint_one_token_logits(owner, x, (token.net, expert.net)) == pytest.approx(alone, abs=1e-5)
    assert joint_one_token_logits(owner, x, (token.net, ExpertRouter(16, 4, kind="mlp").net)) is None


def test_attention_at_full_capacity_decodes_without_cache_index_bookkeeping(monkeypatch):
    """A layer held at full capacity runs the base module and nothing of the routed path's cache bookkeeping: it
    neither reads nor extends the cache's entry index (which only a layer whose cache a routed call thinned needs),
    so a decode step of a dense layer costs what the module costs. The same step routed does read it (the control:
    the patch below is where the routed path goes)."""
    from elastiformer.layers import ElasticAttention

    em = ef.get_elastic_model(MODELS["llama"](), ef.ElasticConfig(attn_heads=0.5))
    em.set_budget(0.5)
    ids = tokens(1, 8)
    with torch.no_grad():
        with em.disable_routers():
            full = em(input_ids=ids).logits
        prefix = em(input_ids=ids[:, :6], use_cache=True)  # (routed: the cache's index may be kept)

    def refuse(*args, **kwargs):
        raise AssertionError("the cache's entry index was read or extended")

    monkeypatch.setattr(ElasticAttention, "_cached_index", refuse)
    monkeypatch.setattr(ElasticAttention, "_remember_index", refuse)
    with torch.no_grad():
        with em.disable_routers():
            out = em(input_ids=ids[:, :6], use_cache=True)
            out = em(input_ids=ids[:, 6:7], past_key_values=out.past_key_values, use_cache=True)
        torch.testing.assert_close(out.logits[:, -1], full[:, 6], atol=2e-5, rtol=1e-4)
        with pytest.raises(AssertionError, match="entry index"):
            em(input_ids=ids[:, 6:7], past_key_values=prefix.past_key_values, use_cache=True)
