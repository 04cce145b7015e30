"""What the ElastiFormer benchmarks route: one router configuration per bench setting, some of them variants of one
component (another router objective, or another expert split), and the baselines each one is measured against."""

from __future__ import annotations

from typing import Any

SETTINGS: dict[str, dict[str, Any]] = {
    "mlp_tokens": dict(mlp_tokens=0.8),
    # the router objective, side by side on the same tokens (see train_routers: router_targets / router_inputs)
    "mlp_tokens_paper": dict(mlp_tokens=0.8, train=dict(router_targets="self")),  # KL + top-k BCE (the paper)
    "mlp_tokens_sensitivity": dict(mlp_tokens=0.8, train=dict(router_targets="sensitivity")),
    "mlp_tokens_student": dict(mlp_tokens=0.8, train=dict(router_inputs="student")),
    # skipped tokens get nothing (the paper), not the fitted stand-in of the default
    "mlp_tokens_no_stand_in": dict(mlp_tokens=0.8, stand_in_rank=0),
    # the stand-ins kept as fitted by regression, not trained with the routers
    "mlp_tokens_fitted_stand_in": dict(mlp_tokens=0.8, train=dict(stand_in_lr_scale=0.0)),
    "attn_tokens": dict(attn_tokens=0.8),
    # attention-token routers that also learn what each token is worth to the others as a key / value (the default
    # for encoders), and ones that learn their token's own update only (the default for causal LMs)
    "attn_tokens_kv": dict(attn_tokens=0.8, train=dict(key_value_targets=True)),
    "attn_tokens_own_update": dict(attn_tokens=0.8, train=dict(key_value_targets=False)),
    # token routers that also see the log-norm of their input (starting as the norm baseline's ranking)
    "mlp_tokens_norm_feature": dict(mlp_tokens=0.8, router_norm_feature=True),
    "attn_tokens_norm_feature": dict(attn_tokens=0.8, router_norm_feature=True),
    "attn_heads": dict(attn_heads=0.75),
    "mlp_experts": dict(mlp_experts=8, mlp_experts_active=0.75),
    # the same experts and budgets, neurons grouped by co-activation instead of contiguous slices
    "mlp_experts_cluster": dict(mlp_experts=8, mlp_experts_active=0.75, expert_split="cluster"),
    "combined": dict(mlp_tokens=0.8, attn_tokens=0.8, attn_heads=0.75, mlp_experts=8, mlp_experts_active=0.75),
}


def component_of(setting: str) -> str:
    """The routed component a bench setting measures (settings may be variants of one component)."""
    for suffix in ("_cluster", "_paper", "_sensitivity", "_student", "_no_stand_in", "_fitted_stand_in",
                   "_norm_feature", "_kv", "_own_update"):
        setting = setting.removesuffix(suffix)
    return setting


TOKEN_BASELINES = ("random", "norm", "norm_allocated", "static")


def baselines_of(setting: str) -> list[str]:
    return list(TOKEN_BASELINES) if component_of(setting) in ("mlp_tokens", "attn_tokens") else ["random", "static"]
