"""Self-distillation losses. The teacher is the same model with routers off; only the routers learn."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
