"""The surrogate model (Flextron section 4.2): a small MLP that predicts how much LM loss a width configuration costs.

Training routers by back-propagating the LM loss through the whole network gives weak, noisy gradients; the paper
instead fits a cheap differentiable stand-in, `SM(router outputs) -> LM loss`, on configurations that were actually
measured, freezes it, and trains the routers through it. Here:

- `sample_configurations` draws configurations that cover the whole range of compute (each one draws its own mix
  of menu indices, so some are mostly full width, some mostly narrow);
- `measure_configurations` runs the nested model with a *different configuration per sequence* in one forward
  (`set_choices` takes a LongTensor (B,) per layer) and records each sequence's ΔLM loss against the full width;
- `fit_surrogate` fits the MLP on the one-hot encoding of the configurations and reports the held-out error beside
  a constant predictor (the mean of the training targets), so a surrogate that learned nothing shows it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...errors import ConfigError, DataError
from ...data.batches import as_batches
from .costs import Choices


def encode(config: Choices | dict[str, torch.Tensor], n_mlp: int, n_attn: int) -> torch.Tensor:
    """Index configurations (..., L) or choice probabilities (..., L, K) -> the surrogate's input (..., L*(Km+Ka))."""
    parts = []
    for key, k in (("mlp", n_mlp), ("attn", n_attn)):
        x = config[key]
        if not x.is_floating_point():
            x = F.one_hot(x.long(), k).float()  # (..., L, K)
        parts.append(x.flatten(-2))  # (..., L*K)
    return torch.cat(parts, dim=-1)


class Surrogate(nn.Module):
    """Two-layer MLP plus a linear path: encoded configuration (L*(Km+Ka)) -> predicted ΔLM loss (nats/token)
    against full width. The linear path is the per-layer, per-width additive cost that dominates ΔLM; the MLP
    learns how layers interact. With a few hundred measured configurations this generalises much better than
    the MLP alone, which memorises them."""

    def __init__(self, n_layers: int, n_mlp: int, n_attn: int, hidden: int = 64):
        super().__init__()
        self.n_layers, self.n_mlp, self.n_attn, self.hidden = n_layers, n_mlp, n_attn, hidden
        self.net = nn.Sequential(nn.Linear(n_layers * (n_mlp + n_attn), hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.linear = nn.Linear(n_layers * (n_mlp + n_attn), 1)
        # targets are standardized for the fit; the buffers undo it so forward returns nats/token
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def forward(self, config: Choices | dict[str, torch.Tensor]) -> torch.Tensor:
        return self.standardized(encode(config, self.n_mlp, self.n_attn)) * self.target_std + self.target_mean

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded configurations (N, L*(Km+Ka)) -> standardized predictions (N,)."""
        return (self.net(x) + self.linear(x)).squeeze(-1)

    def spec(self) -> dict[str, int]:
        return {"n_layers": self.n_layers, "n_mlp": self.n_mlp, "n_attn": self.n_attn, "hidden": self.hidden}


def sample_configurations(n: int, n_layers: int, n_mlp: int, n_attn: int, seed: int = 0) -> Choices:
    """`n` configurations {"mlp": (n, L), "attn": (n, L)}. Each draws its own distribution over the menu from a
    Dirichlet(0.5) (so the set spans mostly-full to mostly-narrow models), then draws every layer from it; the first
    configurations are the uniform ones (every layer at the same index), which the benchmark's baseline also uses."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, k in (("mlp", n_mlp), ("attn", n_attn)):
        probs = torch.randn(n, k, generator=g).square() / 2  # Gamma(0.5) draws (a chi-square(1) halved)
        probs = probs / probs.sum(-1, keepdim=True)  # (n, K) Dirichlet(0.5)
        out[key] = torch.multinomial(probs, n_layers, replacement=True, generator=g)  # (n, L)
    uniform = torch.arange(max(n_mlp, n_attn))[:n]
    out["mlp"][: len(uniform)] = uniform.clamp(max=n_mlp - 1)[:, None]
    out["attn"][: len(uniform)] = uniform.clamp(max=n_attn - 1)[:, None]
    return out


def sequence_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token NLL of each sequence: logits (B, T, V), ids (B, T) -> (B,)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    keep = torch.ones_like(nll) if mask is None else (mask[:, 1:] * mask[:, :-1]).to(nll)
    return (nll * keep).sum(1) / keep.sum(1).clamp(min=1)


def _per_layer(choices: torch.Tensor) -> list[torch.Tensor]:
    """(B, L) indices -> the per-layer list of (B,) that `set_choices` takes."""
    return [choices[:, layer] for layer in range(choices.shape[1])]


@torch.no_grad()
def measure_configurations(fm, data: Iterable[dict[str, torch.Tensor]] | torch.Tensor, n_configs: int, *,
                           per_sequence: bool = True, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """ΔLM loss of `n_configs` sampled configurations on calibration `data` (training text, never held-out).

    per_sequence=True: every sequence of a batch runs its own configuration, so a batch of B sequences measures B
    configurations in one forward (the batches are cycled until `n_configs` are measured); each target is that
    sequence's ΔLM, so it carries the sequence's own difficulty as noise. per_sequence=False: each configuration
    runs on every batch and its target is the mean ΔLM over all of them (n_configs x batches forwards; exact).
    Either way ΔLM is against the full width on the same sequences.
    Returns {"mlp": (N, L), "attn": (N, L), "delta": (N,)}.
    """
    from .configurations import full_choices, menu_sizes, set_index_choices

    batches = list(as_batches(data))
    if not batches:
        raise DataError("calibration data for the surrogate is empty: pass training sequences")
    if n_configs < 8:
        raise ConfigError(f"n_configs={n_configs}: measure at least 8 configurations to fit a surrogate")
    n_layers, n_mlp, n_attn = menu_sizes(fm)
    configs = sample_configurations(n_configs, n_layers, n_mlp, n_attn, seed=seed)
    device = _device(fm)
    was_training = fm.training
    fm.eval()
    full_nll = {}
    deltas, done = [], 0
    bar = tqdm(total=n_configs, desc="measuring configurations", disable=not progress)
    try:
        if not per_sequence:
            batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
            full = []
            for batch in batches:
                set_index_choices(fm, full_choices(n_layers))
                full.append(sequence_nll(fm(**batch).logits, batch["input_ids"], batch.get("attention_mask")))
            full_mean = torch.cat(full).mean()
            for i in range(n_configs):
                set_index_choices(fm, {k: v[i] for k, v in configs.items()})
                nll = torch.cat([sequence_nll(fm(**b).logits, b["input_ids"], b.get("attention_mask"))
                                 for b in batches])
                deltas.append((nll.mean() - full_mean).reshape(1).cpu())
                bar.update()
            done = n_configs
        while done < n_configs:
            for bi, batch in enumerate(batches):
                if done >= n_configs:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                ids, mask = batch["input_ids"], batch.get("attention_mask")
                if bi not in full_nll:
                    set_index_choices(fm, full_choices(n_layers, ids.shape[0]))
                    full_nll[bi] = sequence_nll(fm(**batch).logits, ids, mask)
                take = min(ids.shape[0], n_configs - done)
                idx = {k: v[done:done + take] for k, v in configs.items()}  # (take, L)
                batch = {k: v[:take] for k, v in batch.items()}
                set_index_choices(fm, idx)
                nll = sequence_nll(fm(**batch).logits, batch["input_ids"], batch.get("attention_mask"))
                deltas.append((nll - full_nll[bi][:take]).cpu())
                done += take
                bar.update(take)
    finally:
        bar.close()
        set_index_choices(fm, full_choices(n_layers))
        fm.train(was_training)
    return {"mlp": configs["mlp"], "attn": configs["attn"], "delta": torch.cat(deltas)}


@dataclass
class SurrogateReport:
    n_train: int
    n_heldout: int
    train_mse: float
    heldout_mse: float
    constant_heldout_mse: float  # predicting the mean training target for every held-out configuration
    heldout_r2: float  # 1 - heldout_mse / variance of the held-out targets
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_surrogate(samples: dict[str, torch.Tensor], *, heldout_fraction: float = 0.2, hidden: int = 64,
                  steps: int = 600, lr: float = 3e-3, weight_decay: float = 1e-2,
                  seed: int = 0) -> tuple[Surrogate, SurrogateReport]:
    """Fit a `Surrogate` on measured `samples` (from `measure_configurations`), holding out a fraction to report
    its fit against the constant predictor. Full-batch AdamW: the data are a few hundred rows."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction={heldout_fraction}: pass a fraction in (0, 1), e.g. 0.2")
    n = samples["delta"].shape[0]
    n_held = max(1, int(round(n * heldout_fraction)))
    if n - n_held < 4:
        raise DataError(f"{n} measured configurations are too few to fit a surrogate: measure at least 16")
    n_layers, n_mlp, n_attn = (samples["mlp"].shape[1], int(samples["mlp"].max()) + 1,
                               int(samples["attn"].max()) + 1)
    n_mlp, n_attn = samples.get("n_mlp", n_mlp), samples.get("n_attn", n_attn)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    held, train = order[:n_held], order[n_held:]
    pick = lambda rows: {"mlp": samples["mlp"][rows], "attn": samples["attn"][rows]}  # noqa: E731
    y = samples["delta"].float()
    torch.manual_seed(seed)
    sm = Surrogate(n_layers, int(n_mlp), int(n_attn), hidden=hidden)
    sm.target_mean.fill_(float(y[train].mean()))
    sm.target_std.fill_(float(y[train].std().clamp(min=1e-6)) if len(train) > 1 else 1.0)
    opt = torch.optim.AdamW(sm.parameters(), lr=lr, weight_decay=weight_decay)
    x_train = pick(train)
    target = (y[train] - sm.target_mean) / sm.target_std
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay: a smooth end for a full-batch fit
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        pred = sm.standardized(encode(x_train, sm.n_mlp, sm.n_attn))
        loss = F.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sm.eval()
    with torch.no_grad():
        train_mse = float(F.mse_loss(sm(x_train), y[train]))
        held_pred = sm(pick(held))
        held_mse = float(F.mse_loss(held_pred, y[held]))
        const_mse = float(((y[held] - y[train].mean()) ** 2).mean())
        var = float(y[held].var(unbiased=False)) if n_held > 1 else float("nan")
    for p in sm.parameters():
        p.requires_grad_(False)  # frozen from here on: the routers train through it
    report = SurrogateReport(n_train=len(train), n_heldout=n_held, train_mse=train_mse, heldout_mse=held_mse,
                             constant_heldout_mse=const_mse, heldout_r2=1 - held_mse / var if var > 0 else float("nan"),
                             steps=steps)
    return sm, report


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
