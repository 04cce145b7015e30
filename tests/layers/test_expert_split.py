"""Co-activation clustering of MLP neurons into experts (`expert_split="cluster"`)."""

import pytest
import torch

import elastiformer as ef
from elastiformer.layers import ElasticMLP
from elastiformer.layers.expert_split import balanced_assign, cluster_neurons
from helpers.models import MODELS, tokens


def test_balanced_assign_fills_every_cluster_exactly():
    sim = torch.randn(12, 3)
    assign = balanced_assign(sim, 4)
    assert sorted(assign.bincount().tolist()) == [4, 4, 4]


def test_clustering_recovers_planted_groups():
    g = torch.Generator().manual_seed(0)
    N, E, size = 400, 4, 6
    drivers = torch.rand(N, E, generator=g) ** 4  # each group fires on its own tokens
    group = torch.randperm(E * size, generator=g) % E  # neurons of a group are scattered over the layer
    acts = drivers[:, group] + 0.05 * torch.rand(N, E * size, generator=g)
    order = cluster_neurons(acts, E)
    assert sorted(order.tolist()) == list(range(E * size))  # a permutation
    for e in range(E):
        members = order[e * size:(e + 1) * size]
        assert len(set(group[members].tolist())) == 1  # every expert is one planted group


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_clustered_experts_still_sum_to_the_dense_mlp(arch):
    em = ef.get_elastic_model(MODELS[arch](), ef.ElasticConfig(mlp_experts=4, mlp_experts_active=0.5,
                                                               expert_split="cluster"))
    ids = tokens(2, 24)
    with em.disable_routers():
        ref = em(input_ids=ids).logits
    em.split_experts([{"input_ids": ids}])
    mlps = [m for m in em.base_model.modules() if isinstance(m, ElasticMLP)]
    assert all(m.expert_router.is_split for m in mlps)
    x = torch.randn(5, em.dims["C"])
    for m in mlps:
        w = em.spec.mlp_weights(m.base_layer)
        total = m._expert_outputs(x).sum(0) + (0 if w.down_b is None else w.down_b)
        torch.testing.assert_close(total, m.base_layer(x), atol=1e-5, rtol=1e-4)
    em.set_budget(1.0)
    torch.testing.assert_close(em(input_ids=ids).logits, ref)
    em.set_budget(0.5)
    out = em(input_ids=ids).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)


def test_split_is_saved_trained_and_refused_for_contiguous(tmp_path):
    em = ef.get_elastic_model(MODELS["llama"](), ef.ElasticConfig(mlp_experts=4, mlp_experts_active=0.5,
                                                                  expert_split="cluster"))
    data = tokens(16, 16)
    ef.train_routers(em, data, steps=2, batch_size=4, progress=False, checkpoint_every=None)
    orders = [r.neuron_order.clone() for r in em.routers() if getattr(r, "neuron_order", None) is not None]
    assert orders and all(r.is_split for r in em.routers())  # train_routers fitted the split first
    em.save_pretrained(tmp_path / "r")
    em2 = ef.ElasticModel.from_pretrained(MODELS["llama"](), tmp_path / "r")
    again = [r.neuron_order for r in em2.routers() if getattr(r, "neuron_order", None) is not None]
    assert all(torch.equal(a, b) for a, b in zip(orders, again))
    em2.set_budget(0.5)
    ids = tokens(2, 12)
    em.set_budget(0.5)
    torch.testing.assert_close(em2(input_ids=ids).logits, em(input_ids=ids).logits)
    plain = ef.get_elastic_model(MODELS["llama"](), ef.ElasticConfig(mlp_experts=4, mlp_experts_active=0.5))
    with pytest.raises(ef.errors.ConfigError, match="cluster"):
        plain.split_experts([{"input_ids": ids}])
    with pytest.raises(ef.errors.ConfigError, match="expert_split"):
        ef.ElasticConfig(mlp_experts=4, mlp_experts_active=0.5, expert_split="kmeans")
