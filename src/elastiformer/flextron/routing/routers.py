"""Width routers (Flextron section 4): a budget -> a width per layer, statically or per input.

- `WidthRouter(feature_dim=0)` is the **static** router: relative budget b -> logits (L, Km) and (L, Ka).
- `WidthRouter(feature_dim=C)` is the **input-adaptive** router: b + the input's pooled embedding -> logits per
  sequence, so harder inputs can get wider layers at the same budget.

Training (`train_router`) samples budgets, draws Gumbel-softmax configurations from the logits and minimises the
frozen surrogate's predicted ΔLM loss plus a penalty on the soft configuration's expected cost (latency from the
table, or relative compute) missing the budget. `joint_finetune` then trains the routers through the real model
(soft nested widths, `soft.soft_widths`) against the full model's logits. At inference the argmax runs.

The adaptive router starts as a static one: its feature path is zero-initialised and stays frozen in the surrogate
phase (the surrogate does not see the input, so it cannot teach input dependence); the joint fine-tune, which runs
the real model on real inputs, trains it. Its features are standardised with the training inputs' statistics.

`FlextronRouter` bundles the router with its cost models and saves as `router.safetensors` + `router_config.json`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...version import __version__
from ...cache import atomic_dir
from ...distill import kl_teacher_student
from ...errors import ConfigError, RouterFileError
from .costs import Choices, CostModel

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router_config.json"
ROUTER_FORMAT_VERSION = 2  # 2: adaptive routers standardise their features with saved training statistics
N_FREQS = 4  # Fourier features of the budget: lets a tiny MLP switch a layer's width at a sharp budget threshold


class WidthRouter(nn.Module):
    """Budget (B,) [+ pooled features (B, C)] -> {"mlp": (B, L, Km), "attn": (B, L, Ka)} logits."""

    def __init__(self, n_layers: int, n_mlp: int, n_attn: int, *, feature_dim: int = 0, hidden: int = 64):
        super().__init__()
        self.n_layers, self.n_mlp, self.n_attn = n_layers, n_mlp, n_attn
        self.feature_dim, self.hidden = feature_dim, hidden
        self.budget_in = nn.Linear(1 + 2 * N_FREQS, hidden)
        if feature_dim:
            # features are standardised per dimension with the training inputs' mean / std (set_feature_stats), so
            # the feature path sees only how an input differs from the typical one, not the large part all share
            self.register_buffer("feature_mean", torch.zeros(feature_dim))
            self.register_buffer("feature_std", torch.ones(feature_dim))
            self.feature_in = nn.Linear(feature_dim, hidden)
            # zero init: the adaptive router starts as the static one and learns per-input deviations. Without it
            # the C-dim features swamp the 9 budget features and the router ignores the budget
            nn.init.zeros_(self.feature_in.weight)
            nn.init.zeros_(self.feature_in.bias)
        self.body = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                  nn.Linear(hidden, n_layers * (n_mlp + n_attn)))

    @property
    def adaptive(self) -> bool:
        return self.feature_dim > 0

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Standardise inputs with the mean / std of training features (N, C)."""
        self.feature_mean.copy_(features.float().mean(0))
        self.feature_std.copy_(features.float().std(0).clamp_min(1e-6) if features.shape[0] > 1 else
                               torch.ones_like(self.feature_std))

    def feature_parameters(self) -> list[nn.Parameter]:
        return list(self.feature_in.parameters()) if self.adaptive else []

    def spec(self) -> dict[str, int]:
        return {"n_layers": self.n_layers, "n_mlp": self.n_mlp, "n_attn": self.n_attn,
                "feature_dim": self.feature_dim, "hidden": self.hidden}

    def forward(self, budget: torch.Tensor, features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        b = budget.float()[:, None]  # (B, 1)
        freqs = math.pi * torch.arange(1, N_FREQS + 1, device=b.device, dtype=b.dtype)  # (F,)
        h = self.budget_in(torch.cat([b, torch.sin(b * freqs), torch.cos(b * freqs)], dim=-1))  # (B, hidden)
        if self.adaptive:
            if features is None:
                raise ConfigError("the input-adaptive router needs the input's features: pass features (B, C)")
            z = (features.float() - self.feature_mean) / self.feature_std  # (B, C)
            h = h + self.feature_in(z)
        out = self.body(h)  # (B, L*(Km+Ka))
        split = self.n_layers * self.n_mlp
        return {"mlp": out[:, :split].reshape(-1, self.n_layers, self.n_mlp),  # (B, L, Km)
                "attn": out[:, split:].reshape(-1, self.n_layers, self.n_attn)}  # (B, L, Ka)


def argmax_choices(logits: dict[str, torch.Tensor]) -> Choices:
    return {k: v.argmax(-1) for k, v in logits.items()}  # (B, L) each


def gumbel_probs(logits: dict[str, torch.Tensor], tau: float, hard: bool = False) -> dict[str, torch.Tensor]:
    return {k: F.gumbel_softmax(v, tau=tau, hard=hard, dim=-1) for k, v in logits.items()}


def budget_loss(cost: torch.Tensor, budget: torch.Tensor, full: float, over_weight: float = 4.0) -> torch.Tensor:
    """Squared relative miss of `cost` against `budget` (both as fractions of the full model's cost); spending
    over the budget costs `over_weight` times more than spending under it, since over is what a user can't accept."""
    miss = (cost / full - budget) / budget  # (B,)
    return (over_weight * miss.clamp(min=0) ** 2 + miss.clamp(max=0) ** 2).mean()


class FlextronRouter(nn.Module):
    """A trained width router with the cost models it was trained against and the identity of its model."""

    def __init__(self, router: WidthRouter, costs: dict[str, CostModel], metric: str,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        if metric not in costs:
            raise ConfigError(f"metric {metric!r} has no cost model: pass one of {sorted(costs)}")
        self.router, self.costs, self.metric = router, costs, metric
        self.meta = dict(meta or {})

    @property
    def cost(self) -> CostModel:
        """The cost the router's budget input is a fraction of."""
        return self.costs[self.metric]

    @property
    def adaptive(self) -> bool:
        return self.router.adaptive

    def min_budget(self) -> float:
        """The smallest relative budget any sub-network meets, in the router's own metric."""
        return self.cost.minimum / self.cost.full

    @torch.no_grad()
    def candidates(self, features: torch.Tensor | None = None, n: int = 256) -> Choices:
        """The router's argmax configuration at `n` budgets spanning [min_budget, 1]: (N, n, L) per sub-layer,
        N = 1 for the static router, one row per input for the adaptive one."""
        grid = torch.linspace(self.min_budget(), 1.0, n)  # (n,)
        if features is None:
            return {k: v[None] for k, v in argmax_choices(self.router(grid)).items()}  # (1, n, L)
        B = features.shape[0]
        feats = features[:, None, :].expand(B, n, features.shape[-1]).reshape(B * n, -1)  # (B*n, C)
        logits = self.router(grid.repeat(B), feats)
        return {k: v.reshape(B, n, -1) for k, v in argmax_choices(logits).items()}  # (B, n, L)

    @torch.no_grad()
    def choose(self, target: float, metric: str, features: torch.Tensor | None = None,
               exact: bool = True) -> Choices:
        """The configuration(s) for an absolute `target` in `metric` units: (L,) per sub-layer for the static
        router, (B, L) for the adaptive one.

        exact=False: the router's argmax at the relative budget. exact=True (default): of the configurations the
        router proposes across its budget range, the most expensive that does not exceed the target (the router
        spends slightly off its input budget; this makes the pick land on the target, per input)."""
        cost = self.costs[metric]
        rel = min(1.0, max(self.min_budget(), target / cost.full))  # the router's input: a fraction of full
        if not exact:
            rel_t = torch.full((1 if features is None else features.shape[0],), float(rel))
            picked = argmax_choices(self.router(rel_t, features))
        else:
            cands = self.candidates(features)  # (N, n, L)
            prices = cost.hard(cands)  # (N, n)
            fits = prices <= target * (1 + 1e-9)
            score = torch.where(fits, prices, torch.full_like(prices, -float("inf")))
            best = score.argmax(-1)  # (N,)
            none_fit = ~fits.any(-1)
            picked = {k: v[torch.arange(v.shape[0]), best] for k, v in cands.items()}  # (N, L)
            if none_fit.any():  # the router never goes this low: every layer at its cheapest width
                for k, table in (("mlp", cost.mlp), ("attn", cost.attn)):
                    picked[k][none_fit] = table.argmin(-1)
        return {k: v[0] for k, v in picked.items()} if features is None else picked

    # ------------------------------------------------------------------ artifacts
    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        config = {"format_version": ROUTER_FORMAT_VERSION, "elastiformer_version": __version__,
                  "router": self.router.spec(), "metric": self.metric,
                  "costs": {k: c.to_dict() for k, c in self.costs.items()}, "meta": self.meta}
        with atomic_dir(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.router.state_dict().items()},
                      str(tmp / ROUTER_WEIGHTS), metadata={"format_version": str(ROUTER_FORMAT_VERSION)})
            (tmp / ROUTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "FlextronRouter":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        for name in (ROUTER_CONFIG, ROUTER_WEIGHTS):
            if not (path / name).is_file():
                raise RouterFileError(f"{path} has no {name}: pass the folder FlextronRouter.save_pretrained wrote "
                                      "(`elastiformer flextron route` writes it as CHECKPOINT/router)")
        try:
            config = json.loads((path / ROUTER_CONFIG).read_text())
            router = WidthRouter(**{k: config["router"][k] for k in ("n_layers", "n_mlp", "n_attn")},
                                 feature_dim=config["router"]["feature_dim"], hidden=config["router"]["hidden"])
            costs = {k: CostModel.from_dict(c) for k, c in config["costs"].items()}
            metric = config["metric"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise RouterFileError(f"{path / ROUTER_CONFIG} is not a Flextron router config ({err!r}): route again") from err
        if config.get("format_version", 0) < 2 and config["router"].get("feature_dim"):
            raise RouterFileError(f"{path} is an input-adaptive router from an older elastiformer (format "
                                  f"{config.get('format_version', 0)}, without feature statistics): route again")
        if config.get("format_version", 0) > ROUTER_FORMAT_VERSION:
            raise RouterFileError(f"{path} is router format {config['format_version']}, newer than this elastiformer "
                                  f"reads ({ROUTER_FORMAT_VERSION}): upgrade elastiformer")
        try:
            state = load_file(str(path / ROUTER_WEIGHTS))
            router.load_state_dict(state)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise RouterFileError(f"{path / ROUTER_WEIGHTS} is corrupt or does not match its config: route again "
                                  f"({str(err).splitlines()[0]})") from err
        return cls(router.eval(), costs, metric, config.get("meta"))


# ---------------------------------------------------------------------------------------------- training
@dataclass
class RouterReport:
    phase: str
    steps: int
    seconds: float
    tokens: int = 0  # LM tokens seen (joint fine-tune only: the surrogate phase runs no LM)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sample_budgets(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def train_router(bundle: FlextronRouter, surrogate: nn.Module, *, features: torch.Tensor | None = None,
                 steps: int = 500, batch_size: int = 64, lr: float = 1e-2, tau: tuple[float, float] = (1.0, 0.2),
                 cost_weight: float = 200.0, budget_range: tuple[float, float] | None = None, seed: int = 0,
                 progress: bool = True) -> RouterReport:
    """Train the router through the frozen surrogate: loss = surrogate(Gumbel-softmax configuration) +
    cost_weight * budget_loss(expected cost, budget). Budgets are uniform in `budget_range` (default: from just
    above the smallest sub-network to 1); the Gumbel temperature anneals from tau[0] to tau[1] so the soft
    configurations end close to the one-hot ones the argmax runs. `features` (N, C): pooled inputs for the
    adaptive router, one drawn per sample."""
    router, cost = bundle.router, bundle.cost
    if router.adaptive and features is None:
        raise ConfigError("the input-adaptive router trains on input features: pass features (N, C) of "
                          "training sequences (routing.pooled_features)")
    lo, hi = budget_range or (bundle.min_budget() + 0.02, 1.0)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # the surrogate does not see the input, so it can only teach the budget -> widths map: an adaptive router's
    # feature path stays as it is here (zero at first) and learns in the joint fine-tune, through the real model
    frozen = {id(p) for p in router.feature_parameters()}
    opt = torch.optim.AdamW([p for p in router.parameters() if id(p) not in frozen], lr=lr, weight_decay=0.0)
    history = []
    t0 = time.perf_counter()
    router.train()
    for step in tqdm(range(steps), desc="training router (surrogate)", disable=not progress):
        frac = step / max(1, steps - 1)
        t = tau[0] * (tau[1] / tau[0]) ** frac  # geometric annealing
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
        b = _sample_budgets(batch_size, lo, hi, g)  # (B,)
        feats = None if features is None else features[torch.randint(0, features.shape[0], (batch_size,), generator=g)]
        probs = gumbel_probs(router(b, feats), t)
        quality = surrogate(probs).mean()
        miss = budget_loss(cost.soft(probs), b, cost.full)
        loss = quality + cost_weight * miss
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"loss": loss.item(), "surrogate": quality.item(), "budget_loss": miss.item(), "tau": t})
    router.eval()
    return RouterReport("surrogate", steps, time.perf_counter() - t0, 0, history)


def joint_finetune(fm, bundle: FlextronRouter, data: torch.Tensor, *, steps: int = 20, batch_size: int = 4,
                   lr: float = 1e-3, model_lr: float = 0.0, tau: float = 0.5, cost_weight: float = 200.0,
                   budget_range: tuple[float, float] | None = None, seed: int = 0,
                   progress: bool = True) -> RouterReport:
    """Short joint fine-tune through the real model: each sequence gets a budget and a Gumbel-softmax configuration
    from the router; the model runs that soft configuration (`soft_widths`, the exact probability-weighted mix of
    nested slices) and the loss is KL(full width || soft) + cost_weight * budget_loss. Routers always learn; the
    model's weights learn too when model_lr > 0 (the paper's joint fine-tune), else they stay as they are.

    data: token ids (N, T) of training text."""
    from ...training.routers import batch_at
    from .configurations import full_choices, menu_sizes, pooled_features, set_index_choices
    from .soft import soft_widths

    router, cost = bundle.router, bundle.cost
    lo, hi = budget_range or (bundle.min_budget() + 0.02, 1.0)
    n_layers = menu_sizes(fm)[0]
    g = torch.Generator().manual_seed(seed)
    device = next(fm.parameters()).device
    router.to(device)
    params = [{"params": list(router.parameters()), "lr": lr}]
    model_params = [p for p in fm.base_model.parameters()] if model_lr > 0 else []
    was_grad = {id(p): p.requires_grad for p in fm.base_model.parameters()}
    for p in fm.base_model.parameters():
        p.requires_grad_(bool(model_lr > 0))
    if model_params:
        params.append({"params": model_params, "lr": model_lr})
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    history, tokens = [], 0
    t0 = time.perf_counter()
    was_training = fm.training
    fm.train()
    router.train()
    try:
        for step in tqdm(range(steps), desc="joint fine-tune", disable=not progress):
            batch = {k: v.to(device) for k, v in batch_at(data, step, 0, batch_size, seed).items()}
            ids = batch["input_ids"]
            with torch.no_grad():
                set_index_choices(fm, full_choices(n_layers))
                teacher = fm(**batch).logits
            b = _sample_budgets(ids.shape[0], lo, hi, g).to(device)  # (B,)
            feats = pooled_features(fm, ids).detach() if router.adaptive else None
            probs = gumbel_probs(router(b, feats), tau)
            with soft_widths(fm, probs):
                student = fm(**batch).logits
            kl = kl_teacher_student(teacher, student)
            miss = budget_loss(cost.soft(probs), b, cost.full)
            loss = kl + cost_weight * miss
            opt.zero_grad()
            loss.backward()
            opt.step()
            tokens += ids.numel()
            history.append({"loss": loss.item(), "kl": kl.item(), "budget_loss": miss.item()})
    finally:
        for p in fm.base_model.parameters():
            p.requires_grad_(was_grad[id(p)])
        set_index_choices(fm, full_choices(n_layers))
        fm.train(was_training)
        router.eval()
    return RouterReport("joint", steps, time.perf_counter() - t0, tokens, history)
