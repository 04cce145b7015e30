"""The tiny trainable modules. Each returns its selection *and* its auxiliary loss (lucidrains style);
training behaviour (top-k at the capacity) and inference behaviour (calibrated threshold) live side by side."""

from .expert import ExpertRouter, ExpertSelection
from .head import HeadRouter, HeadSelection
from .net import joint_one_token_logits, make_router_net, straight_through_gate
from .token import TokenRouter, TokenSelection

__all__ = [
    "ExpertRouter",
    "ExpertSelection",
    "HeadRouter",
    "HeadSelection",
    "TokenRouter",
    "TokenSelection",
    "joint_one_token_logits",
    "make_router_net",
    "straight_through_gate",
]
