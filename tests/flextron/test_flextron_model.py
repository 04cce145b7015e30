"""Flextron: importance sorting, nested widths, per-sequence choices, checkpoints (tiny random Llama / GPT-2)."""

import json

import pytest
import torch

from helpers.models import MODELS, tokens
from elastiformer.errors import ConfigError, DataError, RouterFileError
from elastiformer.flextron import (FlextronConfig, FlextronModel, compute_importance, get_flextron_model,
                                   head_permutation, sort_by_importance_)


def sorted_flextron(arch: str, seed: int = 0, **cfg) -> FlextronModel:
    model = MODELS[arch](seed)
    sort_by_importance_(model, compute_importance(model, tokens(4, 16, seed=5), progress=False))
    return get_flextron_model(model, FlextronConfig(**cfg))


def test_sorting_preserves_logits_and_orders_units(arch):
    model = MODELS[arch]()
    ids = tokens(3, 16)
    ref = model(input_ids=ids).logits
    imp = compute_importance(model, tokens(4, 16, seed=5), progress=False)
    info = sort_by_importance_(model, imp)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
    after = compute_importance(model, tokens(4, 16, seed=5), progress=False)
    for i in range(len(after["mlp"])):
        assert torch.all(after["mlp"][i][:-1] >= after["mlp"][i][1:] - 1e-6)  # most important first
        torch.testing.assert_close(after["mlp"][i], imp["mlp"][i][torch.tensor(info["mlp_order"][i])])
        torch.testing.assert_close(after["heads"][i], imp["heads"][i][torch.tensor(info["head_order"][i])])
    assert all(sorted(o) == list(range(len(o))) for o in info["mlp_order"] + info["head_order"])


def test_sorting_twice_records_order_relative_to_the_original():
    model = MODELS["llama"]()
    first = sort_by_importance_(model, compute_importance(model, tokens(2, 16, seed=5), progress=False))
    imp2 = compute_importance(model, tokens(2, 16, seed=6), progress=False)
    second = sort_by_importance_(model, imp2)
    local = torch.argsort(imp2["mlp"][0], descending=True, stable=True)
    assert second["mlp_order"][0] == torch.tensor(first["mlp_order"][0])[local].tolist()


def test_head_permutation_is_group_major():
    imp = torch.tensor([1.0, 9.0, 0.5, 3.0, 2.0, 8.0])  # 3 groups of 2 heads: sums 10, 3.5, 10 -> stable order 0, 2, 1
    heads, groups = head_permutation(imp, 3)
    assert groups.tolist() == [0, 2, 1]
    assert heads.tolist() == [1, 0, 5, 4, 3, 2]  # each group's heads stay together, most important first


def test_full_width_is_the_base_model_and_widths_shrink_flops(arch):
    model = MODELS[arch]()
    ids = tokens(2, 12)
    ref = model(input_ids=ids).logits
    fm = get_flextron_model(model, FlextronConfig())
    assert torch.equal(fm(input_ids=ids).logits, ref)
    assert fm.last_stats()["flops_ratio"] == 1.0
    ratios = []
    for c in range(4):
        fm.set_choices(mlp=c, attn=c)
        out = fm(input_ids=ids).logits
        assert out.shape == ref.shape and torch.isfinite(out).all()
        stats = fm.last_stats()
        assert stats["flops_ratio"] == pytest.approx(fm.choices_flops(c, c, seq_len=12))
        assert stats["mlp"]["width_fraction"] == pytest.approx(fm.mlp_sizes[c] / fm.mlp_sizes[0])
        ratios.append(stats["flops_ratio"])
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] < 0.4


def test_narrow_widths_never_read_the_tail_of_the_weights(arch):
    """Poison every weight outside the leading slice: a width that used it (even times a zero mask) would give NaN."""
    fm = get_flextron_model(MODELS[arch](), FlextronConfig())
    ids = tokens(2, 10)
    c = 2
    with torch.no_grad():
        for attn, mlp in fm.nested_layers():
            w = fm.spec.mlp_weights(mlp.base_layer)
            width = mlp.widths[c]
            w.up_w[width:] = float("nan")
            w.down_w[:, width:] = float("nan")
            if w.gate_w is not None:
                w.gate_w[width:] = float("nan")
            a = fm.spec.attention_weights(attn.base_layer)
            D = fm.dims["D"]
            nq, ng = attn.head_counts[c], attn.kv_counts[c]
            a.q_w[nq * D:] = float("nan")
            a.k_w[ng * D:] = float("nan")
            a.v_w[ng * D:] = float("nan")
            a.o_w[:, nq * D:] = float("nan")
    fm.set_choices(mlp=c, attn=c)
    assert torch.isfinite(fm(input_ids=ids).logits).all()
    fm.set_choices(mlp=0, attn=0)
    assert torch.isnan(fm(input_ids=ids).logits).any()  # the full width does read them


def test_choices_as_tensors_whose_first_dim_is_the_layers():
    fm = get_flextron_model(MODELS["llama"](), FlextronConfig())
    fm.set_choices(mlp=torch.tensor([0, 1, 2, 3]), attn=torch.tensor([[0, 1]] * 4))
    choices = fm.get_choices()
    assert choices["mlp"] == [0, 1, 2, 3]
    assert all(torch.equal(c, torch.tensor([0, 1])) for c in choices["attn"])
    fm(input_ids=tokens(2, 5))


def test_per_layer_choices_mix(arch):
    fm = sorted_flextron(arch)
    L = fm.n_layers
    fm.set_choices(mlp=[0, 1, 2, 3][:L], attn=[3, 2, 1, 0][:L])
    fm(input_ids=tokens(2, 8))
    per_layer = fm.last_stats()["per_layer"]
    mlp_fracs = [s["unit_fraction"] for s in per_layer if s["sublayer"] == "mlp"]
    assert mlp_fracs == pytest.approx([fm.mlp_sizes[c] / fm.mlp_sizes[0] for c in [0, 1, 2, 3]])


def test_per_sequence_choices_equal_running_each_sequence_alone(arch):
    fm = sorted_flextron(arch)
    ids = tokens(3, 14)
    L = fm.n_layers
    g = torch.Generator().manual_seed(0)
    mlp = [torch.randint(0, 4, (3,), generator=g) for _ in range(L)]
    attn = [torch.randint(0, 4, (3,), generator=g) for _ in range(L)]
    fm.set_choices(mlp=mlp, attn=attn)
    batched = fm(input_ids=ids).logits
    flops = fm.last_stats()["elastic_flops"]
    alone_flops = 0
    for b in range(3):
        fm.set_choices(mlp=[int(m[b]) for m in mlp], attn=[int(a[b]) for a in attn])
        alone = fm(input_ids=ids[b:b + 1]).logits
        alone_flops += fm.last_stats()["elastic_flops"]
        torch.testing.assert_close(batched[b], alone[0], atol=1e-5, rtol=1e-5)
    assert flops == alone_flops  # each group ran at its own width, nothing more


def test_cached_generation_matches_uncached(arch):
    fm = sorted_flextron(arch)
    ids = tokens(2, 6)
    fm.set_choices(mlp=2, attn=[torch.tensor([1, 3])] * fm.n_layers)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(fm.generate(ids, use_cache=True, **kw), fm.generate(ids, use_cache=False, **kw))


def test_growing_attention_width_during_cached_decoding_is_refused():
    from transformers import DynamicCache

    fm = sorted_flextron("llama")
    ids = tokens(1, 6)
    cache = DynamicCache()
    fm.set_choices(attn=3)
    fm(input_ids=ids, cache=cache, use_cache=True)
    fm.set_choices(attn=0)
    with pytest.raises(ConfigError, match="more KV groups than its cache holds"):
        fm(input_ids=ids[:, -1:], cache=cache, use_cache=True)


def test_group_granularity_keeps_whole_kv_groups():
    fm = get_flextron_model(MODELS["llama"](), FlextronConfig(head_widths=(1.0, 0.5), head_granularity="group"))
    assert fm.head_counts == (4, 2) and fm.kv_counts == (2, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mlp_widths=(0.5, 0.25)), "must be 1.0"),
    (dict(mlp_widths=(1.0, 0.5, 0.75)), "strictly decreasing"),
    (dict(head_widths=(1.0, 1.5)), r"fraction in \(0, 1\]"),
    (dict(head_widths=()), "empty"),
    (dict(mlp_widths="1,0.5"), "sequence of fractions"),
    (dict(head_granularity="neuron"), "head_granularity"),
])
def test_bad_menus_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FlextronConfig(**kwargs)


def test_menu_that_rounds_to_duplicates_is_refused():
    with pytest.raises(ConfigError, match="both keep 2 of this model's 4 attention heads"):
        get_flextron_model(MODELS["llama"](), FlextronConfig(head_widths=(1.0, 0.5, 0.45)))


@pytest.mark.parametrize("choices, match", [
    (dict(mlp=[0, 1]), "has 2 entries but the model has 4 layers"),
    (dict(attn=7), "not a menu index"),
    (dict(mlp=[0, 0, 0, 1.5]), "pass an int menu index"),
    (dict(mlp=[torch.tensor([0, 9])] * 4), "menu index 0..9"),
    (dict(mlp=[torch.zeros(2, 2, dtype=torch.long)] * 4), "shape \\(batch,\\)"),
    (dict(attn=torch.zeros(3, dtype=torch.long)), r"pass \(4,\)"),
])
def test_bad_choices_are_refused(choices, match):
    fm = get_flextron_model(MODELS["llama"](), FlextronConfig())
    with pytest.raises(ConfigError, match=match):
        fm.set_choices(**choices)


def test_per_sequence_choices_of_the_wrong_batch_size_are_refused():
    fm = get_flextron_model(MODELS["gpt2"](), FlextronConfig())
    fm.set_choices(mlp=[torch.tensor([0, 1, 2])] * 4)
    with pytest.raises(ConfigError, match="batch has 2 sequences"):
        fm(input_ids=tokens(2, 5))


def test_importance_needs_data_and_matching_shapes():
    model = MODELS["llama"]()
    with pytest.raises(DataError):
        compute_importance(model, [], progress=False)
    with pytest.raises(ConfigError, match="importance"):
        sort_by_importance_(model, {"mlp": [torch.ones(3)], "heads": []})


def test_checkpoint_round_trip(arch, tmp_path):
    fm = sorted_flextron(arch, mlp_widths=(1.0, 0.5), head_widths=(1.0, 0.5, 0.25))
    with torch.no_grad():  # weights that differ from any fresh init, as after continued training
        next(fm.parameters()).add_(0.01)
    ids = tokens(2, 9)
    fm.set_choices(mlp=1, attn=2)
    ref = fm(input_ids=ids).logits
    fm.save_pretrained(tmp_path / "ckpt", extra={"note": "test"})
    meta = json.loads((tmp_path / "ckpt" / "flextron_config.json").read_text())
    assert meta["extra"] == {"note": "test"} and meta["sorting"]["mlp_order"]
    loaded = FlextronModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.flextron_config == fm.flextron_config and loaded.sorting == fm.sorting
    loaded.set_choices(mlp=1, attn=2)
    torch.testing.assert_close(loaded(input_ids=ids).logits, ref)
    # the saved weights are a plain Hugging Face model: the wrappers are still in place after saving
    assert all(type(a).__name__ == "NestedAttention" for a, _ in fm.nested_layers())


def test_checkpoint_errors(tmp_path):
    with pytest.raises(RouterFileError, match="no Flextron checkpoint"):
        FlextronModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    (tmp_path / "bad" / "flextron_config.json").write_text("{not json")
    with pytest.raises(RouterFileError, match="not valid JSON"):
        FlextronModel.from_pretrained(tmp_path / "bad")


def test_unload_restores_the_base_modules():
    model = MODELS["gpt2"]()
    fm = get_flextron_model(model, FlextronConfig())
    base = fm.unload()
    assert type(base.transformer.h[0].mlp).__name__ == "GPT2MLP"
    get_flextron_model(base, FlextronConfig())  # can be wrapped again


def test_padding_mask_is_respected_at_narrow_widths(arch):
    """A left-padded sequence at a narrow width gives the logits it gives alone, unpadded (Llama: rotary positions
    follow position_ids)."""
    fm = sorted_flextron(arch)
    ids = tokens(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # the second sequence is 6 real tokens, left-padded
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    fm.set_choices(mlp=2, attn=[torch.tensor([1, 2])] * fm.n_layers)
    batched = fm(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    fm.set_choices(mlp=2, attn=2)
    alone = fm(input_ids=ids[1:, 4:]).logits
    torch.testing.assert_close(batched[1, 4:], alone[0], atol=1e-4, rtol=1e-4)
