"""Flextron's input-adaptive router in generation: a sequence's widths are decided once, from its prompt's real
tokens, and kept for every decode step, with and without a KV cache, whatever keyword the cache comes under."""

import contextlib

import pytest
import torch
from helpers.models import tiny_gpt2, tiny_llama, tokens
from transformers import DynamicCache

from elastiformer.flextron import FlextronConfig, get_flextron_model
from elastiformer.flextron.routing.budget import clear_budget, current_choices
from elastiformer.flextron.routing.routers import FlextronRouter, WidthRouter
from elastiformer.flextron.routing.configurations import compute_cost_model, pooled_features

L = 4
BUDGET = 0.6
NEW = 8  # tokens generated per test


def adaptive(model):
    """A Flextron model of `model` with an (untrained) input-adaptive router attached."""
    fm = get_flextron_model(model, FlextronConfig())
    with torch.no_grad():
        feats = pooled_features(fm, tokens(B=32, T=12, seed=12))
    torch.manual_seed(0)
    bundle = FlextronRouter(WidthRouter(L, 4, 4, feature_dim=32, hidden=32),
                            {"relative_compute": compute_cost_model(fm, 12)}, "relative_compute")
    bundle.router.set_feature_stats(feats)
    with torch.no_grad():  # a feature path that is not zero: the widths really depend on the input
        bundle.router.feature_in.weight.normal_(0.0, 1.0)
    fm.attach_router(bundle)
    return fm


@pytest.fixture(scope="module")
def fm():
    return adaptive(tiny_llama(layers=L))


@pytest.fixture()
def budget(fm):
    fm.set_budget(relative_compute=BUDGET)
    yield fm
    clear_budget(fm)


def decision(fm, ids, mask=None):
    """What the router picks for prompts `ids` (B, T) on their own: {"mlp": (B, L), "attn": (B, L)}."""
    with torch.no_grad():
        feats = pooled_features(fm, ids, mask)
    return fm.router.choose(BUDGET * fm.router.cost.full, "relative_compute", features=feats)


def ran(fm) -> dict[str, torch.Tensor]:
    """The choices the last forward ran at, as (B, L) per sub-layer."""
    out = {}
    for key, per_layer in fm.get_choices().items():
        assert all(isinstance(c, torch.Tensor) for c in per_layer), "the adaptive router sets per-sequence choices"
        out[key] = torch.stack([c.cpu() for c in per_layer], dim=1)
    return out


@contextlib.contextmanager
def recording(fm):
    """Every forward of the base model: (input length, choices it ran at, executed width fraction per sub-layer)."""
    log = []

    def after(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        fractions = [round(s["unit_fraction"], 6) for s in fm.last_stats()["per_layer"]]
        log.append((ids.shape[1], ran(fm), fractions))

    handle = fm.base_model.register_forward_hook(after, with_kwargs=True)
    try:
        yield log
    finally:
        handle.remove()


def same(a, b) -> bool:
    return all(torch.equal(a[k].cpu(), b[k].cpu()) for k in ("mlp", "attn"))


def generate(fm, ids, mask=None, use_cache=True):
    with torch.no_grad():
        out = fm.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)
    return out[:, ids.shape[1]:]


def prompts():
    """Prompts whose decisions differ, including in attention widths (so a width can grow after the prompt)."""
    return [tokens(B=1, T=10, seed=s) for s in (20, 23, 24, 29)]


def test_prompts_get_different_widths(budget):
    picks = [decision(budget, p) for p in prompts()]
    assert len({tuple(p["attn"][0].tolist()) for p in picks}) > 1
    assert len({tuple(p["mlp"][0].tolist()) for p in picks}) > 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_every_decode_step_runs_the_prompts_widths(budget, use_cache):
    for prompt in prompts():
        with recording(budget) as log:
            generate(budget, prompt, torch.ones_like(prompt), use_cache=use_cache)
        assert len(log) == NEW  # the prefill and NEW - 1 decode steps
        lengths = [n for n, _, _ in log]
        assert lengths == ([prompt.shape[1]] + [1] * (NEW - 1) if use_cache else
                           list(range(prompt.shape[1], prompt.shape[1] + NEW)))
        want = decision(budget, prompt)
        first_fractions = log[0][2]
        for n, choices, fractions in log:
            assert same(choices, want), f"a forward of {n} tokens ran other widths than the prompt's decision"
            assert fractions == first_fractions  # what executed, not only what was set
        assert same(current_choices(budget), want)


def test_cached_and_uncached_generate_give_the_same_tokens(budget):
    for prompt in prompts():
        cached = generate(budget, prompt, use_cache=True)
        uncached = generate(budget, prompt, use_cache=False)
        assert torch.equal(cached, uncached)
        # and both are the generation at the prompt's widths, held fixed
        want = decision(budget, prompt)
        clear_budget(budget)
        budget.set_choices(mlp=want["mlp"].T, attn=want["attn"].T)  # (L, B)
        fixed = generate(budget, prompt, use_cache=False)
        budget.set_budget(relative_compute=BUDGET)
        assert torch.equal(cached, fixed)


def test_gpt2_cached_and_uncached_generate_agree():
    fm = adaptive(tiny_gpt2(layers=L))
    fm.set_budget(relative_compute=BUDGET)
    for prompt in prompts():
        with recording(fm) as log:
            cached = generate(fm, prompt, use_cache=True)
        assert all(same(choices, decision(fm, prompt)) for _, choices, _ in log)
        assert torch.equal(cached, generate(fm, prompt, use_cache=False))


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_each_row_alone(budget, use_cache):
    long, short = tokens(B=1, T=10, seed=24), tokens(B=1, T=6, seed=21)
    alone = [generate(budget, p, use_cache=use_cache) for p in (long, short)]
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])  # left padding
    mask = torch.cat([torch.ones(1, 10, dtype=torch.long),
                      torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)])
    want = {k: torch.cat([decision(budget, long)[k], decision(budget, short)[k]]) for k in ("mlp", "attn")}
    assert not torch.equal(want["attn"][0], want["attn"][1])  # the rows really run at different widths
    with recording(budget) as log:
        batch = generate(budget, ids, mask, use_cache=use_cache)
    for n, choices, _ in log:  # each row at its own prompt's decision, made without its padding
        assert same(choices, want), f"a forward of {n} tokens ran other widths than each row's prompt's"
    assert torch.equal(batch[0], alone[0][0])
    assert torch.equal(batch[1], alone[1][0])


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_a_manual_cached_decode_keeps_the_widths_whatever_the_keyword(budget, keyword):
    prompt = prompts()[0]
    want = decision(budget, prompt)
    cache = DynamicCache()
    with torch.no_grad():
        out = budget(input_ids=prompt, use_cache=True, **{keyword: cache})
        for _ in range(NEW):
            nxt = out.logits[:, -1:].argmax(-1)  # (1, 1): its own decision may differ from the prompt's
            out = budget(input_ids=nxt, use_cache=True, **{keyword: cache})
            assert same(ran(budget), want)


def test_an_uncached_refeed_continues_and_a_new_prompt_decides_again(budget):
    a, b = prompts()[0], prompts()[1]
    assert not same(decision(budget, a), decision(budget, b))
    with torch.no_grad():
        budget(input_ids=a)
        assert same(ran(budget), decision(budget, a))
        seq = a
        budget.set_choices()  # choices set by hand in between: the continuation still runs the prompt's
        for _ in range(NEW):  # re-feeding the growing sequence, as generate without a cache does
            nxt = budget(input_ids=seq).logits[:, -1:].argmax(-1)
            assert same(ran(budget), decision(budget, a))
            seq = torch.cat([seq, nxt], dim=1)
        budget(input_ids=b)  # a new prompt: a new decision
        assert same(ran(budget), decision(budget, b))
    # generate always decides on its own prompt, even one that extends the last
    extended = torch.cat([b, a], dim=1)
    with recording(budget) as log:
        generate(budget, extended)
    assert same(log[0][1], decision(budget, extended))
