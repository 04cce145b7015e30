"""Self-distillation losses. The teacher is the same model with routers off; only the routers learn.

Causal LMs: KL(teacher || student) on next-token distributions. Encoders (BERT, ViT): cosine distance between the
teacher's and the student's pooled embeddings (the sentence embedding of a sentence-transformers model is the mean
of its final token states over valid tokens; a ViT's feature is its final [CLS] state), optionally plus the cosine
distance of every valid token's final state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSSES = ("kl", "cosine")
POOLINGS = ("mean", "cls", "pooler")

# Weights of the routers' auxiliary losses in the training objective (see train_routers):
#   token_importance  regresses each token score onto the standardized log-importance of its token measured on the
#                  teacher (the norm of what the sub-layer adds to the residual stream); causal inference thresholds
#                  are quantiles of these scores. The KL alone barely trains routers: a straight-through gate whose
#                  forward value is 1 measures the loss's slope at "keep", which is ~0 for every token near the teacher.
#   token_bce      (router_targets="self" only) BCE of each score towards its own top-k membership.
#   head_rank,     cross-entropy of the router's distribution against the top-k heads / experts by importance on
#   expert_rank    the teacher (the norm of each one's output).
#   expert_balance Switch-Transformer load balancing; 1.0 at a uniform load, so a small weight keeps it a tie-breaker.
DEFAULT_AUX_WEIGHTS = {"token_importance": 0.5, "token_bce": 0.1, "head_rank": 0.5, "expert_rank": 0.5,
                       "expert_balance": 0.01}


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None,
                       temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token on next-token distributions, averaged over `mask`ed positions.

    logits: (B, T, V). Scaled by temperature**2 so gradients keep their size as the temperature changes (Hinton).
    """
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(dim=-1)  # (B, T)
    if mask is not None:
        kl = kl[mask.bool()]
    return kl.mean() * temperature**2


class Embedding(NamedTuple):
    pooled: torch.Tensor  # (B, C)
    tokens: torch.Tensor  # (B, T, C) final token states
    mask: torch.Tensor  # (B, T) bool: valid (non-padding) tokens
    logits: torch.Tensor | None = None  # (B, labels) of a classifier model (ViTForImageClassification), else None


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, pooler_output: torch.Tensor | None = None
                ) -> torch.Tensor:
    """hidden: (B, T, C), mask: (B, T) -> (B, C). "mean": over valid tokens (sentence-transformers' pooling);
    "cls": the first token; "pooler": the model's own pooler output."""
    if pooling == "mean":
        m = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "pooler" and pooler_output is not None:
        return pooler_output
    raise ValueError(f"pooling={pooling!r}: pass one of {', '.join(POOLINGS)} (pooler needs a pooler output)")


def cosine_distance(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of 1 - cos(teacher, student) over the rows of (..., C) vectors (over `mask`ed rows when given)."""
    d = 1.0 - F.cosine_similarity(teacher.float(), student.float(), dim=-1)  # (...)
    if mask is not None:
        d = d[mask.bool()]
    return d.mean()


def embedding_distance(teacher: Embedding, student: Embedding, token_weight: float = 0.0) -> torch.Tensor:
    """Cosine distance of the pooled embeddings, plus `token_weight` x that of the valid tokens' final states."""
    loss = cosine_distance(teacher.pooled, student.pooled)
    if token_weight:
        loss = loss + token_weight * cosine_distance(teacher.tokens, student.tokens, teacher.mask)
    return loss
