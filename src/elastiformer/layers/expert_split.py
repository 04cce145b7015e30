"""Splitting a dense MLP's hidden neurons into equal-size experts by co-activation (`expert_split="cluster"`).

The paper splits the hidden neurons into contiguous slices, an arbitrary grouping. Grouping neurons that fire on the
same tokens should let a token's few chosen experts hold more of what it needs. Each neuron is described by its
activation magnitude on calibration tokens (a unit vector over tokens), and balanced k-means on those vectors (cosine
similarity; every cluster exactly I/E neurons, so experts keep equal cost) gives the groups.
"""

from __future__ import annotations

import torch


def balanced_assign(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each row (neuron) to a column (cluster), every column taking exactly `size` rows, greedily by
    similarity. similarity: (I, E) -> (I,) cluster index."""
    I, E = similarity.shape
    order = similarity.flatten().argsort(descending=True)  # (I*E,) best (neuron, cluster) pairs first
    assign = torch.full((I,), -1, dtype=torch.long)
    room = [size] * E
    left = I
    for flat in order.tolist():  # I*E pairs (a few tens of thousands), once per k-means iteration
        i, e = divmod(flat, E)
        if assign[i] < 0 and room[e]:
            assign[i] = e
            room[e] -= 1
            left -= 1
            if not left:
                break
    return assign


def cluster_neurons(activations: torch.Tensor, n_experts: int, iters: int = 8, seed: int = 0) -> torch.Tensor:
    """Balanced k-means of neurons by co-activation. activations: (N tokens, I) -> neuron order (I,) in which
    expert e owns positions [e*I/E, (e+1)*I/E)."""
    N, I = activations.shape
    size = I // n_experts
    feats = activations.abs().T.float()  # (I, N): each neuron's activation magnitude over the tokens
    feats = feats - feats.mean(dim=1, keepdim=True)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g = torch.Generator().manual_seed(seed)
    centroids = feats[torch.randperm(I, generator=g)[:n_experts]]  # (E, N)
    assign = torch.zeros(I, dtype=torch.long)
    for _ in range(iters):
        new = balanced_assign(feats @ centroids.T, size)  # (I, N) @ (N, E) -> (I, E)
        if torch.equal(new, assign):
            break
        assign = new
        centroids = torch.stack([feats[assign == e].mean(0) for e in range(n_experts)])  # (E, N)
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cat([(assign == e).nonzero().squeeze(1) for e in range(n_experts)])  # (I,), sorted within experts
