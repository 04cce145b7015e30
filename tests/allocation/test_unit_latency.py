"""Latency-ranked allocation: a unit latency table measured on the machine (what each capacity level of a unit saves
when decoding at batch 1), and a path that spends the FLOPs budget where it buys time first."""

import json

import pytest
import torch

import elastiformer as ef
from elastiformer.allocation import Allocation, Move, check_latency_table, fit_path, level_time_saved, \
    move_time_saved

from helpers.models import make_elastic, pretrained_like, tokens

# partial heads cost time (more small ops than the rows they skip), a skipped attention saves its whole step
HEADS_COST_TIME = {"saved": {"attn_heads": {"routed": {"0.75": -0.002, "0.5": -0.001, "0.25": -0.0005,
                                                       "0.0": 0.01},
                                            "pinned": {"0.75": 0.001, "0.5": 0.002, "0.25": 0.003}}}}


def test_table_lookups_interpolate_between_levels_and_pinned_at_zero_is_routed_at_zero():
    t = HEADS_COST_TIME
    assert level_time_saved(t, "attn_heads", False, 1.0) == 0.0
    assert level_time_saved(t, "attn_heads", False, 0.5) == pytest.approx(-0.001)
    assert level_time_saved(t, "attn_heads", False, 0.625) == pytest.approx(-0.0015)  # halfway 0.5 .. 0.75
    assert level_time_saved(t, "attn_heads", False, 0.875) == pytest.approx(-0.001)  # halfway 0.75 .. dense
    assert level_time_saved(t, "attn_heads", True, 0.0) == pytest.approx(0.01)
    assert move_time_saved(t, "attn_heads", False, 0.75, 0.0) == pytest.approx(0.012)
    assert move_time_saved(t, "attn_heads", False, 1.0, 0.75) == pytest.approx(-0.002)
    assert move_time_saved(t, "attn_heads", True, 1.0, 0.75) == pytest.approx(0.001)


def path(time_saved=None):
    """Four head units: a partial move costs loss 0.1 per unit of capacity, a drop (to 0) 0.3 per unit, the same
    in every layer; FLOPs fall with capacity."""
    units = [("attn_heads", i) for i in range(4)]

    def measure(caps, pins=frozenset()):
        c = caps["attn_heads"]
        return sum(0.3 if x == 0.0 else 0.1 * (1 - x) for x in c), sum(c) / 4

    return fit_path(measure, units, 4, ("attn_heads",), min_flops=0.5, time_saved=time_saved)


def test_a_latency_ranked_path_takes_the_moves_that_save_time_first():
    by_flops = path()
    assert by_flops.moves[0].end > 0.0, by_flops.moves  # per FLOP, a partial move is cheaper
    by_time = path(lambda c, pinned, start, end: move_time_saved(HEADS_COST_TIME, c, pinned, start, end))
    ends = [m.end for m in by_time.moves]
    assert ends[:2] == [0.0, 0.0], by_time.moves  # only drops save time: they come first
    assert by_time.flops[-1] <= 0.5 + 1e-9  # and the path still reaches its floor


def test_moves_that_save_no_time_come_after_every_move_that_does():
    """Nothing but partial moves is allowed (levels without 0): none saves time, so the path falls back to loss per
    FLOP and still reaches its floor."""
    units = [("attn_heads", i) for i in range(2)]
    calls = []

    def measure(caps, pins=frozenset()):
        c = caps["attn_heads"]
        calls.append(tuple(c))
        return 0.1 * (1 - c[0]) + 0.5 * (1 - c[1]), sum(c) / 2

    alloc = fit_path(measure, units, 2, ("attn_heads",), min_flops=0.6, levels=(0.75, 0.5),
                     time_saved=lambda c, pinned, start, end: move_time_saved(HEADS_COST_TIME, c, pinned, start, end))
    assert alloc.moves[0].layer == 0 and alloc.flops[-1] <= 0.6 + 1e-9


def test_a_table_without_a_component_or_malformed_is_refused():
    with pytest.raises(ef.ConfigError, match="no entry for mlp_tokens"):
        check_latency_table(HEADS_COST_TIME, ("attn_heads", "mlp_tokens"))
    with pytest.raises(ef.ConfigError, match="malformed"):
        check_latency_table({"saved": {"attn_heads": {"routed": {"1.5": 0.1}}}}, ("attn_heads",))
    with pytest.raises(ef.ConfigError, match="no 'saved' entry"):
        check_latency_table([], ("attn_heads",))
    for broken in ({"routed": {"half": 0.1}}, {"routed": {"0.5": "fast"}}, {"sideways": {"0.5": 0.1}}, [0.1]):
        with pytest.raises(ef.ConfigError, match="attn_heads/.* entry is malformed"):
            check_latency_table({"saved": {"attn_heads": broken}}, ("attn_heads",))


def test_the_table_is_saved_with_the_allocation_and_a_broken_one_refused():
    alloc = Allocation(n_layers=2, components=("attn_heads",), moves=[Move("attn_heads", 1, 1.0, 0.0)],
                       flops=[1.0, 0.5], cost=[0.0, 0.1], latency=HEADS_COST_TIME)
    back = Allocation.from_dict(json.loads(json.dumps(alloc.to_dict())), 2, ("attn_heads",))
    assert back == alloc and back.latency == HEADS_COST_TIME
    broken = alloc.to_dict()
    broken["latency"] = {"saved": {}}
    with pytest.raises(ef.RouterFileError, match="malformed"):
        Allocation.from_dict(broken, 2, ("attn_heads",))


def test_measure_unit_latency_times_every_level_and_variant_and_restores_the_model():
    em = make_elastic("llama", "combined", dense_layers=())
    calib = [{"input_ids": tokens(2, 16, seed=3)}]
    budget = dict(em.state.budget)
    table = em.measure_unit_latency(calib, new_tokens=2, reps=1, progress=False)
    components = em.elastic_config.components()
    check_latency_table(table, components)
    for k in components:
        variants = table["saved"][k]
        assert set(variants) == ({"routed", "pinned"} if k in ("attn_heads", "mlp_experts_active") else {"routed"})
        levels = set(variants["routed"])
        # heads / experts never go to 0 where the layer's tokens are routed too (dropped through those)
        assert levels == ({"0.75", "0.5", "0.25"} if k in ("attn_heads", "mlp_experts_active")
                          else {"0.75", "0.5", "0.25", "0.0"})
        assert all(abs(v) < 1.0 for per in variants.values() for v in per.values())
    assert table["n_units"] == {k: 4 - len(em.state.dense_layers[k]) for k in components}
    assert table["reference_s"] > 0
    assert table["regime"] == "decode" and table["batch"] == 1 and "torch_threads" in table["machine"]
    st = em.state
    assert st.capacity_override is None and st.pin_override is None and st.budget == budget and not st.topk


def test_measure_unit_latency_refuses_what_it_cannot_time():
    from transformers import BertConfig, BertModel

    em = make_elastic("llama", "attn_heads")
    with pytest.raises(ef.ConfigError, match="reps=0"):
        em.measure_unit_latency([{"input_ids": tokens(1, 8)}], reps=0)
    with pytest.raises(ef.ElastiformerError, match="got no data"):
        em.measure_unit_latency([])
    with pytest.raises(ef.ConfigError, match="causal language model"):
        bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48, max_position_embeddings=64))
        ef.get_elastic_model(bert, ef.ElasticConfig(attn_heads=0.5)).measure_unit_latency(
            [{"input_ids": tokens(1, 8) % 64}])


def test_fit_allocation_with_a_table_ranks_by_time_and_keeps_it_with_the_routers(tmp_path, capsys):
    """A table that says partial heads cost time and a skipped attention saves it: the fitted path drops whole
    attentions before any partial move, and the table is saved with the routers."""
    em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(attn_heads=0.5, dense_layers=()))
    calib = [{"input_ids": tokens(4, 16, seed=3)}]
    em.fit_allocation(calib, min_budget=0.5, progress=False, latency=HEADS_COST_TIME)
    alloc = em.allocation
    first_partial = next((n for n, m in enumerate(alloc.moves) if m.end > 0.0), len(alloc.moves))
    drops = [n for n, m in enumerate(alloc.moves) if m.end == 0.0]
    assert drops and max(drops) < first_partial, alloc.moves
    assert alloc.latency == HEADS_COST_TIME
    em.save_pretrained(tmp_path / "r")
    back = ef.ElasticModel.from_pretrained(pretrained_like(), tmp_path / "r")
    assert back.allocation.latency == HEADS_COST_TIME and back.allocation.moves == alloc.moves
    from helpers.cli import run

    code, out, err = run(["info", str(tmp_path / "r")], capsys)
    assert code == 0 and "ranked by:      loss per decoding time saved" in out, err
    code, out, _ = run(["info", str(tmp_path / "r"), "--json"], capsys)
    assert json.loads(out)["allocation"]["ranked_by"] == "time"
    with pytest.raises(ef.ConfigError, match="no entry for attn_heads"):
        em.fit_allocation(calib, progress=False, latency={"saved": {"mlp_tokens": {"routed": {"0.5": 0.1}}}})


def test_train_routers_measures_the_table_or_takes_one():
    from elastiformer.training.routers import train_routers

    def trained(latency):
        em = ef.get_elastic_model(pretrained_like(), ef.ElasticConfig(attn_heads=0.5, dense_layers=()))
        train_routers(em, tokens(8, 16, seed=3), steps=1, progress=False, allocation_floor=0.85,
                      calibration_data=[{"input_ids": tokens(4, 16, seed=3)}], allocation_latency=latency)
        return em.allocation

    assert trained(HEADS_COST_TIME).latency == HEADS_COST_TIME
    measured = trained(True).latency
    check_latency_table(measured, ("attn_heads",))
    assert trained(None).latency is None
    for bad in ("yes", 1):  # 1 == True, but is not the flag: refused rather than read as FLOPs ranking
        with pytest.raises(ef.ConfigError, match=f"allocation_latency={bad!r}"):
            trained(bad)
