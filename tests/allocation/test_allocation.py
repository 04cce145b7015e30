"""One global budget, spent where it costs least: the per-layer allocation (issue: learned per-layer allocation).

The allocation is a path of moves fitted on calibration data; a budget is a point on it. These tests pin down the
path arithmetic (budgets are spent exactly, allocations are nested, FLOPs fall strictly), the fitting (cheap units
first, whole sub-layers dropped when that is cheapest: static pruning as a special case), and the model plumbing
(capacity 0 really skips, save / load keep the allocation, causal routing stays causal, heads / experts hit their
budget without rounding steps)."""

import json

import pytest
import torch

import elastiformer as ef
from elastiformer.allocation import Allocation, Move, fit_path
from elastiformer.evaluation.lm import evaluate
from elastiformer.training.routers import train_routers

from helpers.models import make_elastic, tiny_llama, tokens


def toy_allocation() -> Allocation:
    moves = [Move("mlp_tokens", 2, 1.0, 0.0), Move("attn_heads", 1, 1.0, 0.5), Move("mlp_tokens", 1, 1.0, 0.5),
             Move("mlp_tokens", 1, 0.5, 0.25)]
    return Allocation(n_layers=4, components=("mlp_tokens", "attn_heads"), moves=moves,
                      flops=[1.0, 0.8, 0.7, 0.6, 0.55], cost=[0.0, 0.1, 0.2, 0.3, 0.4])


def test_a_component_budget_is_spent_exactly_and_allocations_are_nested():
    alloc = toy_allocation()
    previous = None
    for b in torch.linspace(1.0, 0.2, 81).tolist():
        caps = alloc.capacities("mlp_tokens", b)
        assert sum(caps) / 4 == pytest.approx(b, abs=1e-9), (b, caps)  # the budget is the mean capacity
        assert all(0.0 <= c <= 1.0 for c in caps)
        if previous is not None:  # a lower budget never gives a layer more
            assert all(c <= p + 1e-9 for c, p in zip(caps, previous)), (b, caps, previous)
        previous = caps
    assert alloc.capacities("mlp_tokens", 0.75) == [1.0, 1.0, 0.0, 1.0]  # the first move: layer 2 dropped whole
    assert alloc.capacities("mlp_tokens", 0.625) == pytest.approx([1.0, 0.5, 0.0, 1.0])


def test_a_joint_budget_walks_the_path_by_measured_flops():
    alloc = toy_allocation()
    assert alloc.component_budgets(0.8) == pytest.approx({"mlp_tokens": 0.75, "attn_heads": 1.0})
    assert alloc.component_budgets(0.75) == pytest.approx({"mlp_tokens": 0.75, "attn_heads": 0.9375})  # half a move
    assert alloc.component_budgets(0.6) == pytest.approx({"mlp_tokens": 0.625, "attn_heads": 0.875})
    shares = [alloc.component_budgets(b) for b in torch.linspace(1.0, 0.3, 71).tolist()]
    for a, b in zip(shares, shares[1:]):
        assert all(b[k] <= a[k] + 1e-9 for k in a)


def test_saved_allocation_round_trips_and_a_foreign_one_is_refused():
    alloc = toy_allocation()
    back = Allocation.from_dict(json.loads(json.dumps(alloc.to_dict())), 4, ("mlp_tokens", "attn_heads"))
    assert back == alloc
    with pytest.raises(ef.RouterFileError, match="does not fit this model"):
        Allocation.from_dict(alloc.to_dict(), 6, ("mlp_tokens", "attn_heads"))
    with pytest.raises(ef.RouterFileError, match="malformed"):
        Allocation.from_dict({"moves": [["mlp_tokens", "x", 1, 0]]}, 4, ("mlp_tokens",))


def test_fit_path_spends_where_it_is_cheap_and_drops_whole_units_when_that_is_cheapest():
    """A synthetic cost model: unit 0 is expensive everywhere; unit 1 is cheap; unit 2 is expensive to thin out
    but free to drop entirely (like a whole attention sub-layer). Costs compound (x1.5 once others moved)."""
    units = [("mlp_tokens", 0), ("mlp_tokens", 1), ("mlp_tokens", 2)]
    curve = {0: lambda c: 5.0 * (1 - c), 1: lambda c: 0.1 * (1 - c), 2: lambda c: 0.0 if c == 0 else 3.0 * (1 - c)}
    calls = []

    def measure(caps, pins=frozenset()):
        calls.append(1)
        c = caps["mlp_tokens"]
        moved = sum(1 for v in c if v < 1)
        cost = sum(curve[i](v) for i, v in enumerate(c)) * (1.5 if moved > 1 else 1.0)
        return cost, sum(c) / 3

    alloc = fit_path(measure, units, 3, ("mlp_tokens",), min_flops=0.34)
    first = [(m.layer, m.end) for m in alloc.moves[:2]]
    assert first[0] == (2, 0.0)  # the free whole-unit drop comes first, straight from 1 to 0
    assert all(layer == 1 for layer, _ in first[1:])  # then the cheap unit
    assert all(m.layer != 0 for m in alloc.moves if alloc.flops[alloc.moves.index(m) + 1] > 0.34)
    assert alloc.flops == sorted(alloc.flops, reverse=True) and alloc.flops[-1] <= 0.34 + 1e-9
    assert len(calls) < 3 * 4 + 3 * len(alloc.moves) + 2


def test_fit_path_measures_on_while_an_unmeasured_move_may_still_be_cheaper():
    """Units 0-2 look cheapest alone but compound (each one dropped after the first costs +10); unit 3 looks
    dearer alone and does not compound. After the first drop, the two re-measured candidates (1 and 2) both cost
    far more than unit 3's estimate: the path must measure unit 3 too and take it, not the best of the first two."""
    units = [("mlp_tokens", i) for i in range(4)]

    def measure(caps, pins=frozenset()):
        c = caps["mlp_tokens"]
        group = sum(1 for i in range(3) if c[i] < 1)
        cost = sum(1.0 * (1 - c[i]) for i in range(3)) + 10.0 * max(0, group - 1) + 1.5 * (1 - c[3])
        return cost, sum(c) / 4

    alloc = fit_path(measure, units, 4, ("mlp_tokens",), min_flops=0.5, levels=(0.0,), lookahead=2)
    assert [m.layer for m in alloc.moves][:1] in ([0], [1], [2])  # one of the cheap-alone units first
    assert alloc.moves[1].layer == 3, alloc.moves  # then the unit that does not compound
    assert alloc.cost[2] == pytest.approx(2.5)
    stopped = fit_path(measure, units, 4, ("mlp_tokens",), min_flops=0.5, levels=(0.0,), lookahead=2,
                       max_lookahead=2)
    assert stopped.moves[1].layer != 3 and stopped.cost[2] == pytest.approx(12.0)  # what stopping at two gives


def test_heads_and_experts_are_not_dropped_whole_where_the_layers_tokens_are_routed():
    """Dropping a layer's experts (or heads) entirely saves what dropping its tokens saves, but the tokens' route
    gives skipped tokens the stand-in: the path takes a sub-layer to 0 only through its token component."""
    units = [("mlp_tokens", 0), ("mlp_experts_active", 0), ("mlp_experts_active", 1), ("attn_heads", 0)]
    seen = []

    def measure(caps, pins=frozenset()):
        seen.append({k: list(v) for k, v in caps.items()})
        cost = sum(0.1 * (1 - v) for c in caps.values() for v in c)  # every move equally cheap
        return cost, sum(sum(v) for v in caps.values()) / 8

    alloc = fit_path(measure, units, 2, ("mlp_tokens", "mlp_experts_active", "attn_heads"), min_flops=0.3)
    assert all(caps["mlp_experts_active"][0] > 0 for caps in seen)  # never even measured at 0
    assert any(caps["mlp_experts_active"][1] == 0 for caps in seen)  # layer 1 routes no MLP tokens: it may
    assert any(caps["attn_heads"][0] == 0 for caps in seen)  # no attention tokens routed: heads may go to 0
    assert any(m.component == "mlp_tokens" and m.end == 0.0 for m in alloc.moves)


def fitted(component: str, **overrides) -> ef.ElasticModel:
    em = make_elastic("llama", component, **overrides)
    data = tokens(8, 24, seed=3)
    train_routers(em, data, steps=3, progress=False, calibration_data=[{"input_ids": data}])
    return em


@pytest.mark.parametrize("component", ["mlp_tokens", "attn_tokens", "attn_heads", "mlp_experts", "combined"])
def test_training_fits_an_allocation_that_spends_the_budget(component):
    # (stand-ins shift the thresholds of this 3-step tiny model so that two nearby budgets can select the same
    # tokens of 40; tests/layers/test_stand_in.py covers them)
    em = fitted(component, stand_in_rank=0)
    assert em.allocation is not None and em.allocation.moves
    x = tokens(2, 20, seed=5)
    ratios = []
    for b in torch.linspace(1.0, 0.55, 10).tolist():
        em.set_budget(b)
        budgets = em.get_budget()
        caps = em.capacities()
        if component != "combined":  # a component's budget is its layers' mean capacity
            (key,) = budgets
            assert sum(caps[key]) / len(caps[key]) == pytest.approx(b, abs=1e-6)
        with torch.no_grad():
            em(input_ids=x)
        stats = em.last_stats()
        assert stats["capacities"] == caps
        ratios.append(stats["flops_ratio"])
    assert ratios[0] == 1.0 and all(b < a for a, b in zip(ratios, ratios[1:])), ratios


def test_a_joint_budget_is_the_fraction_of_routed_flops():
    em = fitted("combined")
    calib = tokens(8, 24, seed=3)
    for b in (0.9, 0.7):
        em.set_budget(b)
        split = em.get_budget()
        assert set(split) == {"mlp_tokens", "attn_tokens", "attn_heads", "mlp_experts_active"}
        with torch.no_grad(), em.routing_method("learned"):
            em.train()  # top-k, as the path was measured
            em(input_ids=calib)
            em.eval()
        assert em.last_stats()["flops_ratio"] == pytest.approx(b, abs=0.03)


def test_calibration_points_see_every_partial_level_of_the_path():
    moves = [Move("mlp_tokens", 0, 1.0, 0.75), Move("attn_heads", 1, 1.0, 0.5), Move("mlp_tokens", 1, 1.0, 0.5),
             Move("mlp_tokens", 0, 0.75, 0.25), Move("mlp_tokens", 2, 1.0, 0.0), Move("mlp_tokens", 1, 0.5, 0.25)]
    alloc = Allocation(n_layers=4, components=("mlp_tokens", "attn_heads"), moves=moves,
                       flops=[1.0, 0.9, 0.85, 0.8, 0.7, 0.6, 0.55], cost=[0.0] * 7)
    points = alloc.points_covering(["mlp_tokens"])
    # layer 0 holds 0.75 after 1 move until move 3, 0.25 from 4 on; layer 1 holds 0.5 at 3..5, 0.25 at 6
    assert points == [3, 6]
    held = {(i, c) for k in points for i, c in enumerate(alloc.capacities("mlp_tokens",
                                                                          alloc.component_fraction_after("mlp_tokens", k)))
            if 0.0 < c < 1.0}
    assert held == {(0, 0.75), (0, 0.25), (1, 0.5), (1, 0.25)}
    assert alloc.points_covering(["attn_tokens"]) == []



@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_fit_allocation_replays_the_blocks_before_each_candidates_layer_and_finds_the_same_path(arch):
    """A candidate differs from the current allocation in one layer; the blocks before it are replayed from the
    current allocation's forward (`block_replay`). The path, its costs and FLOPs must be what running every block
    gives, with fewer routed sub-layers run (fails if a replayed block's output or FLOPs were stale)."""
    from elastiformer import calibration
    from elastiformer.layers import ElasticMLP

    if arch == "bert":
        from transformers import BertConfig, BertModel
        torch.manual_seed(0)
        base = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
                                    initializer_range=0.2)).eval()
        cfg = ef.ElasticConfig(mlp_tokens=0.8, attn_tokens=0.8, attn_heads=0.8, mlp_experts=4,
                               mlp_experts_active=0.5)
        em = ef.get_elastic_model(base, cfg)
        mask = torch.ones(3, 14, dtype=torch.long)
        mask[-1, 9:] = 0  # padding: replayed blocks must keep the real tokens' FLOPs
        calib = [{"input_ids": torch.randint(3, 64, (3, 14), generator=torch.Generator().manual_seed(s)),
                  "attention_mask": mask} for s in (7, 8)]
    else:
        em = make_elastic(arch, "combined")
        data = tokens(8, 24, seed=3)
        train_routers(em, data, steps=2, progress=False, calibration_data=[{"input_ids": data}], allocation=False)
        calib = [{"input_ids": tokens(4, 24, seed=7)}, {"input_ids": tokens(4, 24, seed=8)}]
    runs = [0]
    hooks = [m.register_forward_hook(lambda *a: runs.__setitem__(0, runs[0] + 1))
             for m in em.base_model.modules() if isinstance(m, ElasticMLP)]
    paths = []
    for replay in (False, True):
        runs[0] = 0
        calibration.fit_allocation(em, calib, max_batches=2, min_budget=0.4, progress=False, replay=replay)
        paths.append((em.allocation.moves, em.allocation.flops, em.allocation.cost, runs[0]))
    for h in hooks:
        h.remove()
    (moves, flops, cost, full_runs), (r_moves, r_flops, r_cost, replay_runs) = paths
    assert len(moves) > 5 and r_moves == moves
    assert r_flops == pytest.approx(flops, abs=1e-9) and r_cost == pytest.approx(cost, abs=1e-6)
    assert replay_runs < 0.8 * full_runs, (replay_runs, full_runs)
    assert all("forward" not in vars(b) for b in em.spec.layers(em.base_model))  # every block's forward restored

def test_calibrated_thresholds_keep_each_layers_allocated_capacity():
    """At inference (thresholds, not top-k) each token-routed layer processes the fraction of the calibration
    tokens the allocation gives it, at every budget, with all four components routed (thresholds are taken where
    the path runs each layer at that capacity, heads and experts as they run there)."""
    em = fitted("combined", stand_in_rank=0, attn_stand_in_rank=0)
    calib = tokens(8, 24, seed=3)
    em.eval()
    for b in (0.9, 0.8, 0.7):
        em.set_budget(b)
        caps = em.capacities()
        with torch.no_grad():
            em(input_ids=calib)
        stats = em.last_stats()
        for s in stats["per_layer"]:
            key = "mlp_tokens" if s["sublayer"] == "mlp" else "attn_tokens"
            cap = caps[key][s["layer"]]
            if 0.0 < cap < 1.0:
                assert s["token_fraction"] == pytest.approx(cap, abs=0.06), (b, key, s["layer"], cap)
        assert stats["flops_ratio"] == pytest.approx(b, abs=0.03), b


def test_thresholds_hold_every_capacity_of_a_long_path_between_its_levels():
    """A path on 8 layers whose layers reach their levels between any evenly spaced budgets (layer 5 holds 0.75 only
    after move 4; layer 4 is part-way through its move at budget 0.7): each layer still processes its allocated
    fraction of the calibration tokens at inference. (Thresholds once came from a grid of budgets and were
    interpolated between the capacities seen there: layer 4 at capacity 0.85 processed 0.52 of the tokens.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers.models import VOCAB

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128, initializer_range=0.2)
    em = ef.get_elastic_model(LlamaForCausalLM(cfg).eval(), ef.ElasticConfig(mlp_tokens=0.8, dense_layers=(),
                                                                            stand_in_rank=0))
    order = [(0, 0.5), (1, 0.5), (2, 0.5), (5, 0.75), (3, 0.5), (4, 0.5), (6, 0.5), (7, 0.5)]
    moves = [Move("mlp_tokens", i, 1.0, end) for i, end in order]
    em.state.allocation = Allocation(n_layers=8, components=("mlp_tokens",), moves=moves,
                                     flops=[1.0 - 0.05 * k for k in range(9)], cost=[0.0] * 9)
    calib = tokens(8, 24, seed=3)
    em.calibrate(calib)
    em.eval()
    for b in (0.78125, 0.7, 0.6):
        em.set_budget(mlp_tokens=b)
        caps = em.capacities()["mlp_tokens"]
        with torch.no_grad():
            em(input_ids=calib)
        kept = [s["token_fraction"] for s in em.last_stats()["per_layer"] if s["sublayer"] == "mlp"]
        assert kept == pytest.approx(caps, abs=0.05), (b, caps, kept)


def test_capacity_zero_skips_the_sub_layer_for_every_token():
    em = fitted("mlp_tokens", stand_in_rank=0)  # (with a stand-in, see tests/layers/test_stand_in.py)
    em.state.capacity_override = {"mlp_tokens": [1.0, 0.0, 1.0, 1.0]}
    x = tokens(2, 16, seed=7)
    with torch.no_grad():
        out = em(input_ids=x).logits
    stats = [s for s in em.last_stats()["per_layer"] if s["sublayer"] == "mlp"]
    assert stats[1]["executed_flops"] == 0 and stats[0]["executed_flops"] == stats[0]["dense_flops"]
    em.state.capacity_override = None
    base = em.base_model.model.layers[1].mlp
    base.forward, saved = (lambda h, *a, **k: h.new_zeros(h.shape)), base.forward  # the MLP's output removed
    with torch.no_grad(), em.disable_routers():
        ref = em(input_ids=x).logits
    base.forward = saved
    assert torch.allclose(out, ref, atol=1e-5)


def test_save_and_load_keep_the_allocation(tmp_path):
    em = fitted("mlp_tokens")
    em.set_budget(0.7)
    x = tokens(2, 16, seed=8)
    with torch.no_grad():
        ref = em(input_ids=x).logits
    em.save_pretrained(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "elastic_config.json").read_text())
    assert meta["allocation"]["moves"] and meta["format_version"] == 2
    back = ef.ElasticModel.from_pretrained(make_elastic("llama", "mlp_tokens").unload(), tmp_path / "r")
    back.set_budget(0.7)
    assert back.capacities() == em.capacities()
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, ref)


def test_allocated_causal_routing_stays_causal():
    em = fitted("combined")
    em.set_budget(0.7)
    x = tokens(2, 20, seed=9)
    with torch.no_grad():
        full = em(input_ids=x).logits
        prefix = em(input_ids=x[:, :12]).logits
    assert torch.allclose(full[:, :12], prefix, atol=1e-5)


@pytest.mark.parametrize("component", ["attn_heads", "mlp_experts"])
def test_heads_and_experts_hit_their_budget_on_a_fine_grid(component):
    """4 heads / 4 experts per layer: without fractional counts, budgets 0.6 and 0.4 executed the same FLOPs."""
    em = make_elastic("llama", component)
    em.train()  # top-k everywhere (no calibration needed), uniform capacities (no allocation)
    x = tokens(2, 24, seed=4)
    ratios = []
    for b in torch.linspace(1.0, 0.3, 29).tolist():
        em.set_budget(b)
        with torch.no_grad():
            em(input_ids=x)
        ratios.append(em.last_stats()["flops_ratio"])
    routed = ratios[1:]  # (below 1.0 the routers run: on a 32-wide model they cost a few % of a layer)
    assert all(b < a for a, b in zip(routed, routed[1:])), ratios


def test_norm_allocated_baseline_uses_the_learned_allocation():
    em = fitted("mlp_tokens")
    calib = tokens(8, 24, seed=3)
    em.calibrate(calib, method="norm_allocated")
    em.set_budget(0.6)
    with torch.no_grad(), em.routing_method("norm_allocated"):
        em(input_ids=tokens(2, 24, seed=5))
        caps = em.last_stats()["capacities"]["mlp_tokens"]
    assert caps == em.capacities()["mlp_tokens"] and len(set(caps)) > 1  # not uniform
    with em.routing_method("norm"):
        assert len(set(em.state.capacities()["mlp_tokens"])) == 1  # the plain norm baseline stays uniform
    fresh = make_elastic("llama", "mlp_tokens")
    with pytest.raises(ef.ConfigError, match="fit_allocation"):
        fresh.routing_method("norm_allocated")


def test_fit_allocation_refuses_bad_options():
    em = make_elastic("llama", "mlp_tokens")
    with pytest.raises(ef.ConfigError, match="min_budget"):
        em.fit_allocation(tokens(2, 16), min_budget=1.5, progress=False)
    with pytest.raises(ef.ConfigError, match="levels"):
        em.fit_allocation(tokens(2, 16), levels=(1.2,), progress=False)
    with pytest.raises(ef.ElastiformerError, match="no data"):
        em.fit_allocation([], progress=False)


@pytest.mark.parametrize("targets,inputs", [("sensitivity", "teacher"), ("teacher", "student"),
                                            ("sensitivity", "student")])
def test_router_objectives_train_the_token_routers(targets, inputs):
    em = make_elastic("llama", "mlp_tokens")
    before = {k: v.clone() for k, v in em.router_state_dict().items() if k.endswith("weight")}
    report = train_routers(em, tokens(8, 24, seed=3), steps=3, progress=False, router_targets=targets,
                           router_inputs=inputs, allocation=False)
    assert all("token_importance" in h for h in report.history)
    after = em.router_state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
    with pytest.raises(ef.ConfigError, match="router_inputs"):
        train_routers(em, tokens(8, 24, seed=3), steps=1, progress=False, router_inputs="future")


def test_sensitivity_is_the_first_order_change_of_the_sampled_log_likelihood():
    """|g . delta| from one backward equals, to first order, what scaling one token's MLP update changes."""
    em = make_elastic("llama", "mlp_tokens")
    em.base_model.double()  # float64: the finite difference must not drown in rounding
    x = tokens(1, 12, seed=2)
    st = em.state

    with torch.no_grad(), em.disable_routers():
        logits = em(input_ids=x).logits
    drawn = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=torch.Generator().manual_seed(0))

    def loss_with(scale_layer, token, eps):
        mlp = em.base_model.model.layers[scale_layer].mlp.base_layer
        hook = mlp.register_forward_hook(lambda m, a, out: out.index_put((torch.tensor([0]), torch.tensor([token])),
                                                                          out[0, token] * (1 - eps)))
        with torch.no_grad(), em.disable_routers():
            lg = em(input_ids=x).logits
        hook.remove()
        return torch.nn.functional.cross_entropy(lg.flatten(0, 1), drawn.squeeze(1), reduction="sum").item()

    with em.override("sensitivity_probes", []), em.disable_routers(), em.teacher_targets(True), \
            torch.enable_grad():
        out = em.distill_target({"input_ids": x})
        probes = list(st.sensitivity_probes)
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), drawn.squeeze(1), reduction="sum")
        grads = torch.autograd.grad(loss, [p.probe for p in probes])
    layer, token, eps = 1, 5, 1e-3
    first_order = -(grads[layer][0, token] * probes[layer].change[0, token]).sum().item()
    numeric = (loss_with(layer, token, eps) - loss_with(layer, token, 0.0)) / eps
    assert first_order == pytest.approx(numeric, rel=0.01, abs=1e-7)


@pytest.mark.parametrize("component,targets", [("mlp_tokens", "teacher"), ("mlp_tokens", "sensitivity"),
                                               ("attn_heads", "teacher"), ("mlp_experts", "sensitivity")])
def test_the_target_phase_teaches_routers_to_rank_from_teacher_passes_alone(component, targets):
    """One teacher forward feeds several router updates: on the same batch (and the same Fisher samples: each call
    reseeds them) the rank loss after 30 updates is below the loss before any."""
    from elastiformer.training.routers import DEFAULT_AUX_WEIGHTS, fit_router_targets

    em = make_elastic("llama", component)
    base = {k: v.clone() for k, v in em.base_model.state_dict().items() if "router" not in k}
    data = [{"input_ids": tokens(4, 24, seed=5)}]
    kind = {"mlp_tokens": "token_importance", "attn_heads": "head_rank", "mlp_experts": "expert_rank"}[component]

    def phase(steps, repeats):
        return fit_router_targets(em, data, steps, repeats, batch_size=4, seed=0, lr=3e-3, router_targets=targets,
                                  weights=DEFAULT_AUX_WEIGHTS, loss_kind="kl", pooling=None, device="cpu",
                                  progress=False)

    heads = []
    hook = em.base_model.lm_head.register_forward_hook(lambda *a: heads.append(1))
    before = phase(1, 1)[0][kind]  # (the loss is recorded before the update)
    hook.remove()
    assert len(heads) == (targets == "sensitivity")  # teacher targets: the pass stops after the last routed layer
    assert len(phase(1, 30)) == 1
    after = phase(1, 1)[0][kind]
    assert after < before, (before, after)
    assert all(torch.equal(v, em.base_model.state_dict()[k]) for k, v in base.items())  # only routers move
    assert em.state.target_records is None  # the collection is switched off again


def test_train_routers_runs_the_target_phase_first_and_records_it(tmp_path):
    em = make_elastic("llama", "mlp_tokens")
    report = train_routers(em, tokens(8, 24, seed=3), steps=2, progress=False, allocation=False,
                           target_steps=3, target_repeats=2, output_dir=tmp_path / "run")
    assert report.steps == 2 and [h["step"] for h in report.target_history] == [1, 2, 3]
    assert all(h["tokens"] == 4 * 24 and "token_importance" in h for h in report.target_history)
    saved = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert len(saved["target_history"]) == 3
    with pytest.raises(ef.ConfigError, match="router_targets='self'"):
        train_routers(em, tokens(8, 24, seed=3), steps=1, progress=False, router_targets="self", target_steps=2)
    with pytest.raises(ef.ConfigError, match="target_steps"):
        train_routers(em, tokens(8, 24, seed=3), steps=1, progress=False, target_steps=-1)
