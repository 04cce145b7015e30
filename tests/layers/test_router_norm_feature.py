"""Token routers that see the norm of their input (`ElasticConfig.router_norm_feature`).

Every router starts with a parameter-free LayerNorm, which removes the scale of its input: a plain router cannot
represent the training-free norm score at all. With the feature, the score adds the standardized log-norm of the
input with a weight that starts at 1, so an untrained router ranks tokens as that baseline does."""

import torch

import elastiformer as ef
from elastiformer.routers import TokenRouter
from elastiformer.routers.token import topk_mask
from elastiformer.training.routers import train_routers

from helpers.models import make_elastic, tiny_llama, tokens


def scaled_tokens(B=2, T=64, C=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g)
    return x * torch.rand(B, T, 1, generator=g).mul(3).exp()  # norms spread over e^0..e^3


def test_an_untrained_router_with_the_feature_ranks_tokens_as_the_norm_score():
    x = scaled_tokens()
    valid, forced = torch.ones(x.shape[:2], dtype=torch.bool), torch.zeros(x.shape[:2], dtype=torch.bool)
    by_norm = topk_mask(x.norm(dim=-1), 0.5, valid, forced)
    with_feature, plain = TokenRouter(16, norm_feature=True).train(), TokenRouter(16).train()
    with torch.no_grad():
        agree = (with_feature(x, 0.5, valid, forced, topk=True).selected == by_norm).float().mean()
        agree_plain = (plain(x, 0.5, valid, forced, topk=True).selected == by_norm).float().mean()
    assert agree > 0.95, agree
    assert agree_plain < 0.8, agree_plain  # blind to the scale: about chance


def test_norm_statistics_come_from_the_real_training_tokens_and_stay_fixed_at_inference():
    r = TokenRouter(16, norm_feature=True).train()
    x = scaled_tokens(seed=1)
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    valid[:, 40:] = False  # padding: does not count
    x[:, 40:] *= 1000.0
    with torch.enable_grad():
        r.score(x, valid)
    mean, var, n = r.norm_stats.tolist()
    log_norm = x[:, :40].norm(dim=-1).log()
    assert n == 80 and abs(mean - float(log_norm.mean())) < 1e-4 and abs(var - float(log_norm.var())) < 1e-3
    r.eval()
    with torch.no_grad():
        r.score(x * 5, valid)  # inference: statistics unchanged
    assert r.norm_stats[2] == 80


def test_routers_with_the_feature_train_save_and_load_to_the_same_outputs(tmp_path):
    em = make_elastic("llama", "mlp_tokens", router_norm_feature=True)
    data = tokens(8, 24, seed=3)
    train_routers(em, data, steps=3, progress=False, calibration_data=[{"input_ids": data}])
    routers = [r for _, r in em.stack_routers() if isinstance(r, TokenRouter)]
    assert routers and all(r.norm_stats[2] > 0 for r in routers)  # statistics gathered while training
    em.save_pretrained(tmp_path / "r")
    back = ef.ElasticModel.from_pretrained(tiny_llama(), tmp_path / "r")
    assert back.elastic_config.router_norm_feature
    em.eval(), back.eval()
    x = tokens(2, 20, seed=5)
    for b in (0.9, 0.6):
        em.set_budget(b), back.set_budget(b)
        with torch.no_grad():
            assert torch.equal(back(input_ids=x).logits, em(input_ids=x).logits)
    plain = make_elastic("llama", "mlp_tokens")
    r_plain = next(r for _, r in plain.stack_routers() if isinstance(r, TokenRouter))
    assert r_plain.flops(10) < routers[0].flops(10)  # the norm is counted in the router's own FLOPs
