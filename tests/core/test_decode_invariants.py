"""Decoding with a KV cache while the budget changes between steps, and the per-call routing context.

A layer whose tokens were routed keeps only the tokens it processed in its cache: every later step of that layer
(at full capacity, and with the routers disabled too) must attend by the cached tokens' sequence indices, so a
left-padded batch decodes exactly as each of its rows alone. And whichever module a call enters by (the model, or
its inner model) routes by that call's padding mask and positions, never by those of the call before.
"""

import contextlib

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import elastiformer as ef
from helpers.models import MODELS, make_elastic, tokens

COMPONENTS = ["mlp_tokens", "attn_tokens", "attn_heads", "mlp_experts", "combined"]
# (budget or "off" = em.disable_routers(), tokens fed at that step): the prompt at 0.6, then decode steps
SCHEDULE = [(0.6, None), (1.0, 1), (0.8, 1), ("off", 1), (1.0, 2), (0.6, 1), ("off", 2), (0.8, 1)]
PAD = 3


def _calibrated(arch: str, component: str) -> ef.ElasticModel:
    em = make_elastic(arch, component)
    em.calibrate({"input_ids": tokens(B=4, T=24, seed=7)})
    return em


def _at(em: ef.ElasticModel, budget):
    if budget == "off":
        return em.disable_routers()
    em.set_budget(budget)
    return contextlib.nullcontext()


def _decode(em: ef.ElasticModel, prompt: torch.Tensor, mask: torch.Tensor, fed: torch.Tensor) -> list[torch.Tensor]:
    """Prompt, then the tokens of `fed` (B, n) a few at a time, one DynamicCache, the budget of SCHEDULE at each
    step. -> the logits of every step: (B, tokens fed, V), or (B, 1, V) at the prompt's last token."""
    cache, ids, out, used = DynamicCache(), prompt, [], 0
    for budget, n in SCHEDULE:
        if n is not None:
            ids, used = fed[:, used:used + n], used + n
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        with _at(em, budget), torch.no_grad():
            logits = em(ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits
        out.append(logits if n is not None else logits[:, -1:])
    return out


@pytest.mark.parametrize("component", COMPONENTS)
def test_changing_budget_between_decode_steps_matches_each_row_alone(arch, component):
    """0.6 -> 1.0 -> 0.8 -> routers off -> ...: a left-padded batch decoded step by step equals each row decoded
    alone on the same schedule (no size mismatch, no key of another row's cache layout, no padding attended)."""
    em = _calibrated(arch, component)
    ids = tokens(B=2, T=9)
    fed = tokens(B=2, T=sum(n or 0 for _, n in SCHEDULE), seed=3)
    batch, mask = ids.clone(), torch.ones_like(ids)
    batch[0, :PAD], mask[0, :PAD] = 0, 0  # row 0: a 6-token prompt, left-padded
    together = _decode(em, batch, mask, fed)
    for row, prompt in ((0, ids[:1, PAD:]), (1, ids[1:])):
        alone = _decode(em, prompt, torch.ones_like(prompt), fed[row:row + 1])
        for step, (a, b) in enumerate(zip(together, alone)):
            assert torch.allclose(a[row], b[0], atol=1e-4), (row, step, SCHEDULE[step], (a[row] - b[0]).abs().max())


class _BudgetSchedule(LogitsProcessor):
    """Changes the budget (or turns the routers off) for the next decode step of generate()."""

    def __init__(self, em: ef.ElasticModel, budgets):
        self.em, self.budgets, self.step, self.ctx = em, budgets, 0, None

    def __call__(self, input_ids, scores):
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None
        budget = self.budgets[self.step % len(self.budgets)]
        self.step += 1
        self.ctx = _at(self.em, budget)
        self.ctx.__enter__()
        return scores

    def close(self):
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)


@pytest.mark.parametrize("component", ["attn_tokens", "combined"])
def test_generate_with_a_budget_changing_hook_matches_each_row_alone(arch, component):
    em = _calibrated(arch, component)
    ids = tokens(B=2, T=9)
    batch, mask = ids.clone(), torch.ones_like(ids)
    batch[0, :PAD], mask[0, :PAD] = 0, 0
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)  # no early end of sequence: every row decodes all 8 steps

    def generate(prompt, attention_mask):
        em.set_budget(0.6)
        hook = _BudgetSchedule(em, [1.0, 0.8, "off", 0.6])
        try:
            with torch.no_grad():
                out = em.generate(prompt, attention_mask=attention_mask, logits_processor=LogitsProcessorList([hook]),
                                  **kw)
        finally:
            hook.close()
        return out.sequences[:, -8:], torch.stack(out.scores, dim=1)  # (B, 8) new tokens, (B, 8, V)

    seq, scores = generate(batch, mask)
    for row, prompt in ((0, ids[:1, PAD:]), (1, ids[1:])):
        seq_alone, scores_alone = generate(prompt, torch.ones_like(prompt))
        assert torch.equal(seq[row], seq_alone[0]), row
        gap = (scores[row] - scores_alone[0]).abs().max()
        assert torch.allclose(scores[row], scores_alone[0], atol=1e-4), (row, gap)


# ---------------------------------------------------------------------- the per-call context
def _inner(em: ef.ElasticModel):
    return em.base_model.model if hasattr(em.base_model, "model") else em.base_model.transformer


def _padded_call(em: ef.ElasticModel) -> None:
    batch = tokens(B=2, T=14, seed=4)
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    batch[0, :5] = 0
    with torch.no_grad():
        em(batch, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))


@pytest.mark.parametrize("component", COMPONENTS)
def test_inner_model_called_after_a_padded_call_routes_by_its_own_context(arch, component):
    """The bare inner model (LlamaModel / GPT2Model), called after the full model ran a padded batch, equals a fresh
    model's inner call: it neither reuses the previous call's padding mask nor adds to its stats."""
    fresh = _calibrated(arch, component)
    ids = tokens(B=2, T=12)
    with torch.no_grad():
        ref = _inner(fresh)(input_ids=ids).last_hidden_state
    em = _calibrated(arch, component)
    _padded_call(em)
    with torch.no_grad():
        got = _inner(em)(input_ids=ids).last_hidden_state
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    n_layers = em.state.n_layers
    assert len(em.last_stats()["per_layer"]) == 2 * n_layers  # this call's attention and MLP of each layer only


def test_inner_model_called_with_padding_equals_the_model(arch):
    """The inner model captures its own padding mask: its padded call equals the full model's on the real tokens."""
    em = _calibrated(arch, "combined")
    batch = tokens(B=2, T=14, seed=4)
    mask = torch.ones_like(batch)
    mask[0, :5], batch[0, :5] = 0, 0
    kw = dict(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    with torch.no_grad():
        em(tokens(B=2, T=14))  # an unpadded call first: nothing of it may remain
        inner = em.base_model.lm_head(_inner(em)(input_ids=batch, **kw).last_hidden_state)
        full = em(batch, **kw).logits
    assert torch.allclose(inner[mask.bool()], full[mask.bool()], atol=1e-5), (inner - full)[mask.bool()].abs().max()


@pytest.mark.parametrize("component", ["mlp_tokens", "attn_tokens", "attn_heads"])
def test_a_block_called_on_its_own_refuses_to_route(arch, component):
    """A decoder block called alone has no padding mask or positions of its own call: it refuses to route (a clear
    error), instead of routing by the previous call's; with the routers off it runs as the base block."""
    em = _calibrated(arch, component)
    base = MODELS[arch](0)
    _padded_call(em)
    h = torch.randn(2, 14, 32)
    if arch == "llama":
        blocks, base_blocks = em.base_model.model.layers, base.model.layers
        kw = dict(position_embeddings=base.model.rotary_emb(h, torch.arange(14)[None]))
    else:
        blocks, base_blocks, kw = em.base_model.transformer.h, base.transformer.h, {}
    with torch.no_grad(), pytest.raises(ef.ElastiformerError, match="outside a call of the model"):
        blocks[1](h, **kw)
    with torch.no_grad(), em.disable_routers():
        out = blocks[1](h, **kw)
        ref = base_blocks[1](h, **kw)
    out, ref = (o[0] if isinstance(o, tuple) else o for o in (out, ref))
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ef.ElastiformerError):
        em(torch.full((1, 4), 10_000))  # a call that fails at its start leaves no context behind either
    with torch.no_grad(), pytest.raises(ef.ElastiformerError, match="outside a call of the model"):
        blocks[1](h, **kw)
