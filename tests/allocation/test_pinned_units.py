"""Pinned units: the allocation may lower a layer's heads / experts as the same set for every token (the ones that
matter most on the calibration text, no router run) instead of a per-token choice, whichever it measures cheaper.
Static pruning of heads / experts becomes a special case of the fitted path, as capacity 0 is for whole sub-layers.
"""

import json

import pytest
import torch

import elastiformer as ef
from elastiformer.allocation import Allocation, Move, fit_path

from helpers.models import make_elastic, pretrained_like, tokens


def test_the_path_pins_a_unit_where_pinning_costs_less_and_keeps_each_units_variant():
    """Heads of layer 0 cost 0.1 per unit of capacity pinned, 1.0 routed; layer 1 the other way round."""
    units = [("attn_heads", 0), ("attn_heads", 1)]
    price = {(0, True): 0.1, (0, False): 1.0, (1, True): 1.0, (1, False): 0.2}
    seen = []

    def measure(caps, pins=frozenset()):
        c = caps["attn_heads"]
        seen.append((tuple(c), pins))
        return sum(price[(i, ("attn_heads", i) in pins)] * (1 - c[i]) for i in range(2)), sum(c) / 2

    alloc = fit_path(measure, units, 2, ("attn_heads",), min_flops=0.3, pinnable=("attn_heads",))
    by_layer = {i: {m.pinned for m in alloc.moves if m.layer == i} for i in (0, 1)}
    assert by_layer == {0: {True}, 1: {False}}, alloc.moves  # the cheaper variant, and never both for one unit
    assert alloc.pinned_units() == {("attn_heads", 0)}
    assert alloc.cost[-1] == pytest.approx(sum(price[(m.layer, m.pinned)] * (m.start - m.end) for m in alloc.moves))
    plain = fit_path(measure, units, 2, ("attn_heads",), min_flops=0.3)  # not pinnable: routed only
    assert not plain.pinned_units()


def test_a_pinned_allocation_round_trips_and_a_pin_without_scores_is_refused():
    alloc = Allocation(n_layers=2, components=("attn_heads",), moves=[Move("attn_heads", 1, 1.0, 0.5, True)],
                       flops=[1.0, 0.8], cost=[0.0, 0.1], pinned={"attn_heads": {1: [0.3, 0.1, 0.9, 0.2]}})
    back = Allocation.from_dict(json.loads(json.dumps(alloc.to_dict())), 2, ("attn_heads",))
    assert back == alloc
    older = alloc.to_dict()  # an allocation saved before pinning existed: four fields per move, no scores
    older["moves"] = [m[:4] for m in older["moves"]]
    del older["pinned"]
    assert Allocation.from_dict(older, 2, ("attn_heads",)).pinned_units() == set()
    broken = alloc.to_dict()
    broken["pinned"] = {}
    with pytest.raises(ef.RouterFileError, match="does not fit"):
        Allocation.from_dict(broken, 2, ("attn_heads",))


def pinned_heads_model(capacity: float = 0.5) -> tuple[ef.ElasticModel, list[float]]:
    em = make_elastic("llama", "attn_heads", dense_layers=())
    scores = [0.3, 0.1, 0.9, 0.2]  # layer 1 keeps heads 2 and 0 at capacity 0.5
    em.state.set_allocation(Allocation(n_layers=4, components=("attn_heads",),
                                       moves=[Move("attn_heads", 1, 1.0, capacity, True)], flops=[1.0, 0.9],
                                       cost=[0.0, 0.1], pinned={"attn_heads": {1: scores}}))
    em.set_budget(attn_heads=1.0 - (1.0 - capacity) / 4)  # the move made in full
    return em, scores


def test_a_pinned_layer_runs_the_same_heads_for_every_token_without_its_router():
    em, _ = pinned_heads_model()
    assert em.capacities()["attn_heads"] == [1.0, 0.5, 1.0, 1.0]
    layer = em.base_model.model.layers[1].self_attn
    layer.head_router.net.register_forward_hook(lambda *a: pytest.fail("a pinned unit ran its router"))
    x = tokens(2, 12, seed=4)
    em.eval()
    with torch.no_grad():
        out = em(input_ids=x).logits
    stats = [s for s in em.last_stats()["per_layer"] if s["sublayer"] == "attn" and s["layer"] == 1][0]
    assert stats["router_flops"] == 0 and stats["unit_fraction"] == pytest.approx(0.5)
    # the reference: the base model with heads 1 and 3 of layer 1 removed from its output projection
    o = layer.base_layer.o_proj
    D = o.weight.shape[1] // 4
    saved = o.weight.detach().clone()
    with torch.no_grad():
        for h in (1, 3):
            o.weight[:, h * D:(h + 1) * D] = 0
        with em.disable_routers():
            ref = em(input_ids=x).logits
        o.weight.copy_(saved)
    assert torch.allclose(out, ref, atol=1e-5)


def test_pinned_heads_decode_one_token_as_the_whole_sequence_runs():
    em, _ = pinned_heads_model(capacity=0.75)  # 3 of 4 heads: a fraction of the tokens get the third by position
    em.eval()
    x = tokens(1, 10, seed=6)
    with torch.no_grad():
        full = em(input_ids=x).logits[:, -1]
        prefix = em(input_ids=x[:, :-1], use_cache=True)
        step = em(input_ids=x[:, -1:], cache=prefix.past_key_values, use_cache=True).logits[:, -1]
    assert torch.allclose(step, full, atol=1e-5)


def test_pinned_units_are_saved_with_the_routers(tmp_path):
    em, scores = pinned_heads_model()
    x = tokens(2, 12, seed=5)
    em.eval()
    with torch.no_grad():
        ref = em(input_ids=x).logits
    em.save_pretrained(tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "elastic_config.json").read_text())["allocation"]
    assert saved["pinned"] == {"attn_heads": {"1": scores}}
    back = ef.ElasticModel.from_pretrained(make_elastic("llama", "attn_heads", dense_layers=()).unload(),
                                           tmp_path / "r")
    back.set_budget(attn_heads=em.get_budget()["attn_heads"])
    back.eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, ref)


@pytest.mark.parametrize("component", ["attn_heads", "mlp_experts"])
def test_fit_allocation_pins_a_unit_whose_weakest_part_is_free_to_drop(component):
    """Layer 1's weakest head (or expert) is made to add nothing: pinning it away costs nothing, while the untrained
    router drops other heads / experts for some tokens. The path's first move must be that pinned unit; with
    pin=False nothing is pinned."""
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(
        **({"attn_heads": 0.5} if component == "attn_heads" else {"mlp_experts": 4, "mlp_experts_active": 0.5}),
        dense_layers=()))
    layer = em.base_model.model.layers[1]
    with torch.no_grad():
        if component == "attn_heads":
            o = layer.self_attn.base_layer.o_proj.weight
            o[:, 3 * (o.shape[1] // 4):] = 0  # head 3 adds nothing
        else:
            down = layer.mlp.base_layer.down_proj.weight
            down[:, 3 * (down.shape[1] // 4):] = 0  # expert 3 (the last contiguous slice) adds nothing
    key = "attn_heads" if component == "attn_heads" else "mlp_experts_active"
    calib = [{"input_ids": tokens(4, 16, seed=3)}]
    em.fit_allocation(calib, min_budget=0.85, progress=False)
    first = em.allocation.moves[0]
    assert (first.component, first.layer, first.end, first.pinned) == (key, 1, 0.75, True), em.allocation.moves
    assert em.allocation.cost[1] == pytest.approx(em.allocation.cost[0], abs=1e-6)
    assert em.allocation.pinned[key][1][3] == pytest.approx(0.0, abs=1e-6)  # the free part scored lowest
    em.fit_allocation(calib, min_budget=0.85, progress=False, pin=False)
    assert not em.allocation.pinned_units() and not em.allocation.pinned


def test_info_names_the_pinned_units(tmp_path, capsys):
    from helpers.cli import run

    em, _ = pinned_heads_model()
    em.save_pretrained(tmp_path / "r")
    code, out, err = run(["info", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert "pinned:         attn_heads of layers 1" in out
    code, out, _ = run(["info", str(tmp_path / "r"), "--json"], capsys)
    assert json.loads(out)["allocation"]["pinned"] == {"attn_heads": [1]}


def test_training_can_keep_every_unit_routed():
    from elastiformer.training.routers import train_routers

    def trained(**kw):
        em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(attn_heads=0.5, dense_layers=()))
        with torch.no_grad():
            o = em.base_model.model.layers[1].self_attn.base_layer.o_proj.weight
            o[:, 3 * (o.shape[1] // 4):] = 0  # head 3 of layer 1 adds nothing: pinning it away is free
        train_routers(em, tokens(8, 16, seed=3), steps=1, progress=False, allocation_floor=0.85,
                      calibration_data=[{"input_ids": tokens(4, 16, seed=3)}], **kw)
        return em.allocation

    assert trained().pinned_units()
    assert not trained(allocation_pin=False).pinned_units()


def pinned_experts_model(arch: str = "llama", capacity: float = 0.5, split: str = "contiguous"
                         ) -> tuple[ef.ElasticModel, dict[str, torch.Tensor]]:
    """Layer 1's experts pinned (scores keep experts 2 and 0 at capacity 0.5: not adjacent in the weights); also
    the base MLP weights of layer 1 before anything ran."""
    em = make_elastic(arch, "mlp_experts", dense_layers=(), expert_split=split)
    mlp = em.spec.get_mlp(em.spec.layers(em.base_model)[1])
    before = {k: v.detach().clone() for k, v in mlp.base_layer.state_dict().items()}
    em.state.set_allocation(Allocation(n_layers=4, components=("mlp_experts_active",),
                                       moves=[Move("mlp_experts_active", 1, 1.0, capacity, True)], flops=[1.0, 0.9],
                                       cost=[0.0, 0.1], pinned={"mlp_experts_active": {1: [0.3, 0.1, 0.9, 0.2]}}))
    em.set_budget(mlp_experts_active=1.0 - (1.0 - capacity) / 4)
    em.eval()
    return em, before


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pinned_experts_hold_their_weights_most_important_first_and_run_as_one_slice(arch):
    """The pinned unit's expert blocks are stored by importance (2, 0, 3, 1), so the experts it runs at any capacity
    are one contiguous slice: one matmul per projection. The function is the base model's with experts 1 and 3
    removed, on many tokens (no dispatch) and on one; unload() gives the base weights back exactly."""
    em, before = pinned_experts_model(arch)
    mlp = em.spec.get_mlp(em.spec.layers(em.base_model)[1])
    x = tokens(2, 12, seed=4)
    with torch.no_grad():
        out = em(input_ids=x).logits
    assert mlp.expert_slot == [1, 3, 0, 2]
    runs = list(mlp.__dict__["_views_per_weights"][1].values())
    assert [len(r) for r in runs] == [1]  # the pinned set {0, 2}: one run of blocks
    w = mlp.weights()
    width = w.down_w.shape[1] // 4
    saved = w.down_w.detach().clone()
    with torch.no_grad():  # the reference: experts 1 and 3 (blocks 3 and 2 of the stored layout) add nothing
        w.down_w[:, 2 * width:] = 0
        with em.disable_routers():
            ref = em(input_ids=x).logits
        w.down_w.copy_(saved)
    assert torch.allclose(out, ref, atol=1e-5)
    base = em.unload()
    mlp_after = (base.model.layers[1].mlp if arch == "llama" else base.transformer.h[1].mlp).state_dict()
    assert all(torch.equal(mlp_after[k], v) for k, v in before.items())


@pytest.mark.parametrize("split", ["contiguous", "cluster"])
def test_pinned_experts_at_a_fractional_capacity_match_the_routed_dispatch_and_decoding(split):
    """At capacity 0.75 every token runs the two most important experts and a fraction of the tokens (by position)
    the third: the many-token path (no dispatch), the generic dispatch (taken with autograd on) and decoding one
    token at batch 1 agree."""
    em, _ = pinned_experts_model(capacity=0.625, split=split)
    x = tokens(2, 12, seed=6)
    with torch.no_grad():
        fast = em(input_ids=x).logits
        ran = [s for s in em.last_stats()["per_layer"] if s["sublayer"] == "mlp" and s["layer"] == 1][0]
        prefix = em(input_ids=x[:1, :-1], use_cache=True)
        step = em(input_ids=x[:1, -1:], cache=prefix.past_key_values, use_cache=True).logits[:, -1]
    assert ran["router_flops"] == 0 and 0.5 < ran["unit_fraction"] < 0.75  # 2 experts, and 3 for some tokens
    with torch.enable_grad():
        generic = em(input_ids=x).logits.detach()
    assert torch.allclose(fast, generic, atol=1e-5)
    assert torch.allclose(step, fast[:1, -1], atol=1e-5)
