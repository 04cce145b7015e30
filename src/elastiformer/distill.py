"""Self-distillation losses. The teacher is the same model with routers off; only the routers learn."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Weights of the routers' auxiliary losses in the training objective (see train_routers):
#   token_bce      teaches each token score, alone, to say whether its token is in the top-k: causal inference
#                  thresholds rely on it, and it is on the scale of the KL, so it gets a small weight.
#   expert_balance Switch-Transformer load balancing; 1.0 at a uniform load, so a small weight keeps it a tie-breaker.
DEFAULT_AUX_WEIGHTS = {"token_bce": 0.1, "expert_balance": 0.01}


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
