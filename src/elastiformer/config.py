"""`ElasticConfig`: which parts of a Transformer are routed, at what capacity, and with which routers.

One plain dataclass, validated in `__post_init__`, saved as JSON next to the routers (PEFT's `adapter_config.json`
pattern). Capacities are *global budgets*: the fraction of that component's work the whole model does, so layers
listed in `dense_layers` (always run in full) are paid for out of the same budget.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import BudgetError, ConfigError

# The four routed components, and the budget key that sets each one's capacity at inference.
TOKEN_COMPONENTS = ("mlp_tokens", "attn_tokens")
BUDGET_KEYS = ("mlp_tokens", "attn_tokens", "attn_heads", "mlp_experts_active")


def check_fraction(name: str, value: Any) -> float:
    """A capacity / budget must be a real number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BudgetError(f"{name}={value!r} is not a number: pass a fraction in (0, 1], e.g. {name}=0.8")
    value = float(value)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise BudgetError(f"{name}={value} is outside (0, 1]: pass a fraction of compute, e.g. {name}=0.8")
    return value


@dataclass
class ElasticConfig:
    mlp_tokens: float | None = field(
        default=None, metadata={"help": "Fraction of tokens each MLP processes (Mixture-of-Depths style). None: not routed."}
    )
    attn_tokens: float | None = field(
        default=None,
        metadata={"help": "Fraction of tokens each attention sub-layer processes; unselected tokens neither query "
                  "nor serve as keys/values there. Layer 0 always runs dense. None: not routed."},
    )
    attn_heads: float | None = field(
        default=None, metadata={"help": "Fraction of attention heads active per token. None: not routed."}
    )
    mlp_experts: int | None = field(
        default=None,
        metadata={"help": "Split each dense MLP exactly into this many experts (slices of its hidden neurons). "
                  "None: not split."},
    )
    mlp_experts_active: float | None = field(
        default=None, metadata={"help": "Fraction of the experts active per token (needs mlp_experts)."}
    )
    expert_split: str = field(
        default="contiguous",
        metadata={"help": "How the MLP's hidden neurons are split into experts: 'contiguous' slices (the paper), or "
                  "'cluster': neurons that fire together on calibration text share an expert (fitted by "
                  "ElasticModel.split_experts, which train_routers calls first)."},
    )
    stand_in_rank: int = field(
        default=32,
        metadata={"help": "Tokens that skip a token-routed MLP get a stand-in update: a rank-r linear estimate of "
                  "the MLP's output from its input, fitted on calibration tokens (ElasticModel.fit_stand_ins, which "
                  "train_routers calls first), at 4*hidden*r FLOPs per skipped token (r at most hidden/16, about "
                  "1.5% of a SwiGLU MLP). 0: skipped tokens get nothing, as in the paper."},
    )
    attn_stand_in_rank: int = field(
        default=8,
        metadata={"help": "The same for tokens that skip a token-routed attention: a rank-r linear estimate of the "
                  "attention's update from the token's own input (the part that does not depend on the context: "
                  "on SmolLM2 most of what a skipped token loses), 4*hidden*r FLOPs per skipped token (r at most "
                  "hidden/16). 0: skipped tokens get nothing, as in the paper."},
    )
    router: str = field(default="linear", metadata={"help": "Router network: 'linear' or 'mlp' (one hidden layer)."})
    router_hidden: int = field(default=32, metadata={"help": "Hidden width of 'mlp' routers."})
    router_norm_feature: bool = field(
        default=False,
        metadata={"help": "Token routers also see the log-norm of their input, which the LayerNorm in front of every "
                  "router removes (the norm is the training-free baseline's whole score); its weight starts at 1, so "
                  "a router starts as that baseline's ranking and learns what to add."},
    )
    lora_rank: int = field(default=0, metadata={"help": "Rank of LoRA trained with the routers (0: none)."})
    head_granularity: str = field(
        default="query",
        metadata={"help": "'query': route each query head; 'group': route whole grouped-query (KV) groups."},
    )
    dense_layers: tuple[int, ...] = field(
        default=(),
        metadata={"help": "Layer indices (negative counts from the end) that are never routed; they are paid for "
                  "out of the global budget."},
    )
    keep_first_token: bool = field(
        default=True,
        metadata={"help": "Token routing always processes each sequence's first token (it carries the huge "
                  "activations of the residual stream). False frees it in training only: at inference the first "
                  "token is always processed, so a threshold never leaves a sequence with no token."},
    )
    papers: tuple[str, ...] = field(default=("arXiv:2411.15281",), metadata={"help": "What this implements."})

    def __post_init__(self) -> None:
        for name in BUDGET_KEYS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, check_fraction(name, value))
        if self.mlp_experts is not None:
            if isinstance(self.mlp_experts, bool) or not isinstance(self.mlp_experts, int) or self.mlp_experts < 2:
                raise ConfigError(f"mlp_experts={self.mlp_experts!r}: pass an integer >= 2 (the number of experts "
                                  "the MLP is split into), or None")
            if self.mlp_experts_active is None:
                raise ConfigError("mlp_experts is set but mlp_experts_active is not: pass the fraction of experts "
                                  "active per token, e.g. mlp_experts_active=0.75")
        elif self.mlp_experts_active is not None:
            raise ConfigError("mlp_experts_active needs mlp_experts: pass the number of experts, e.g. mlp_experts=8")
        if self.expert_split not in ("contiguous", "cluster"):
            raise ConfigError(f"expert_split={self.expert_split!r}: pass 'contiguous' or 'cluster'")
        if self.router not in ("linear", "mlp"):
            raise ConfigError(f"router={self.router!r}: pass 'linear' or 'mlp'")
        if self.head_granularity not in ("query", "group"):
            raise ConfigError(f"head_granularity={self.head_granularity!r}: pass 'query' or 'group'")
        if isinstance(self.router_hidden, bool) or not isinstance(self.router_hidden, int) or self.router_hidden < 1:
            raise ConfigError(f"router_hidden={self.router_hidden!r}: pass a positive integer")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"lora_rank={self.lora_rank!r}: pass 0 (no LoRA) or a positive integer")
        if isinstance(self.stand_in_rank, bool) or not isinstance(self.stand_in_rank, int) or self.stand_in_rank < 0:
            raise ConfigError(f"stand_in_rank={self.stand_in_rank!r}: pass 0 (skipped MLP tokens get nothing) or a "
                              "positive rank, e.g. 32")
        if isinstance(self.attn_stand_in_rank, bool) or not isinstance(self.attn_stand_in_rank, int) \
                or self.attn_stand_in_rank < 0:
            raise ConfigError(f"attn_stand_in_rank={self.attn_stand_in_rank!r}: pass 0 (skipped attention tokens get "
                              "nothing) or a positive rank, e.g. 8")
        if not isinstance(self.router_norm_feature, bool):
            raise ConfigError(f"router_norm_feature={self.router_norm_feature!r}: pass True or False")
        if not isinstance(self.keep_first_token, bool):
            raise ConfigError(f"keep_first_token={self.keep_first_token!r}: pass True or False")
        if not isinstance(self.dense_layers, (list, tuple, range)) or any(
                isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in self.dense_layers):
            raise ConfigError(f"dense_layers={self.dense_layers!r}: pass a tuple of layer indices, e.g. (0, -1)")
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        self.papers = tuple(self.papers)
        if not self.components():
            raise ConfigError("ElasticConfig routes nothing: set at least one of mlp_tokens, attn_tokens, "
                              "attn_heads, mlp_experts")

    def components(self) -> tuple[str, ...]:
        """The budget keys of the routed components, in a fixed order."""
        return tuple(k for k in BUDGET_KEYS if getattr(self, k) is not None)

    def capacities(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.components()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        d["papers"] = list(self.papers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ElasticConfig":
        """Unknown keys (from a newer version) are dropped with a warning rather than failing the load."""
        if not isinstance(d, dict):
            raise ConfigError(f"an ElasticConfig is a mapping of field: value, not a {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"ignoring unknown ElasticConfig keys {unknown} (written by a newer elastiformer?)")
        # saved before stand-ins existed (of MLPs, then of attention): its skipped tokens got nothing
        d = {"stand_in_rank": 0, "attn_stand_in_rank": 0} | d
        return cls(**{k: v for k, v in d.items() if k in known})
