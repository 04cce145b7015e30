"""`FlextronModel`: a causal LM whose every MLP and attention runs at a width chosen per layer from a menu.

`get_flextron_model(model, FlextronConfig)` wraps the sub-layers in place (PEFT-like). Unlike ElastiFormer, the base
weights stay trainable: Flextron's elastic continued-training updates them, and `save_pretrained` writes a full
checkpoint (a standard Hugging Face folder plus `flextron_config.json`).

    fm = get_flextron_model(model, FlextronConfig())
    fm.set_choices(mlp=[2] * L, attn=[1] * L)        # a menu index per layer (0 = full width)
    fm.set_choices(mlp=[torch.tensor([0, 3])] * L)   # or per sequence: a LongTensor (B,) per layer
    out = fm(input_ids=ids); fm.last_stats()          # executed / dense FLOPs of the blocks
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..version import __version__
from ..arch import ArchSpec, get_arch_spec
from ..cache import atomic_dir
from ..errors import ConfigError, ElastiformerError, RouterFileError
from ..flops import attention_projection_flops, attention_score_flops, dense_attention_flops, lm_head_flops, mlp_flops
from ..artifacts import weight_fingerprint
from ..model import WrappedModel
from ..validation import read_saved_folder
from .config import FORMAT_VERSION, FlextronConfig, menu_counts
from .nested import Choice, FlextronState, NestedAttention, NestedMLP

logger = logging.getLogger(__name__)

CONFIG_NAME = "flextron_config.json"
SORTING_ATTR = "elastiformer_flextron_sorting"  # set on the base model by sort_by_importance_


class FlextronModel(WrappedModel):
    """A *ForCausalLM model with nested-elastic sub-layers. Build one with `get_flextron_model`."""

    def __init__(self, model: nn.Module, config: FlextronConfig):
        super().__init__()
        spec = get_arch_spec(model)
        self.base_model = model
        self.flextron_config = config
        self.spec: ArchSpec = spec
        self.dims = d = spec.dims(model.config)
        if d["H"] % d["KVH"]:
            raise ConfigError(f"{d['H']} heads do not divide into {d['KVH']} KV groups")
        n_rep = d["H"] // d["KVH"]
        self.mlp_sizes = menu_counts("mlp_widths", config.mlp_widths, d["I"], "MLP neurons")
        if config.head_granularity == "group":
            groups = menu_counts("head_widths", config.head_widths, d["KVH"], "KV groups")
            self.head_counts = tuple(g * n_rep for g in groups)
        else:
            self.head_counts = menu_counts("head_widths", config.head_widths, d["H"], "attention heads")
        self.kv_counts = tuple(math.ceil(h / n_rep) for h in self.head_counts)
        self.state = FlextronState(n_layers=d["L"])
        self.sorting: dict[str, Any] | None = getattr(model, SORTING_ATTR, None)
        self._inject()
        self._hook = model.register_forward_pre_hook(self._capture_context, with_kwargs=True)
        self.eval()

    def _inject(self) -> None:
        for i, block in enumerate(self.spec.layers(self.base_model)):
            attn, mlp = getattr(block, self.spec.attn_name), getattr(block, self.spec.mlp_name)
            if isinstance(attn, NestedAttention) or isinstance(mlp, NestedMLP):
                raise ConfigError("this model is already nested: call get_flextron_model on a fresh base model")
            setattr(block, self.spec.attn_name,
                    NestedAttention(attn, i, self.spec, self.dims, self.state, self.head_counts, self.kv_counts))
            setattr(block, self.spec.mlp_name, NestedMLP(mlp, i, self.spec, self.dims, self.state, self.mlp_sizes))

    def nested_layers(self) -> Iterator[tuple[NestedAttention, NestedMLP]]:
        for block in self.spec.layers(self.base_model):
            yield getattr(block, self.spec.attn_name), getattr(block, self.spec.mlp_name)

    @contextlib.contextmanager
    def unwrapped(self) -> Iterator[nn.Module]:
        """The base model with its original sub-layers in place for the duration of the block (e.g. to save it)."""
        blocks = list(self.spec.layers(self.base_model))
        wrappers = [(getattr(b, self.spec.attn_name), getattr(b, self.spec.mlp_name)) for b in blocks]
        for b, (a, m) in zip(blocks, wrappers):
            setattr(b, self.spec.attn_name, a.base_layer)
            setattr(b, self.spec.mlp_name, m.base_layer)
        try:
            yield self.base_model
        finally:
            for b, (a, m) in zip(blocks, wrappers):
                setattr(b, self.spec.attn_name, a)
                setattr(b, self.spec.mlp_name, m)

    def unload(self) -> nn.Module:
        """Put the original sub-layers back and return the base model (with whatever weights training left)."""
        for block, (a, m) in zip(self.spec.layers(self.base_model), list(self.nested_layers())):
            setattr(block, self.spec.attn_name, a.base_layer)
            setattr(block, self.spec.mlp_name, m.base_layer)
        self._hook.remove()
        return self.base_model

    @property
    def is_sorted(self) -> bool:
        return self.sorting is not None

    @property
    def n_layers(self) -> int:
        return self.dims["L"]

    # ------------------------------------------------------------------ choices
    def _check_choices(self, name: str, value, n_choices: int) -> list[Choice]:
        L = self.n_layers
        if value is None:
            return [0] * L
        if isinstance(value, torch.Tensor):  # the first dim is the layers: (L,) per layer, (L, B) per sequence
            if value.dim() == 0:
                value = int(value)
            elif value.shape[0] != L or value.dim() > 2:
                raise ConfigError(f"{name} is a tensor of shape {tuple(value.shape)}: pass ({L},) (a menu index per "
                                  f"layer) or ({L}, batch) (per layer and sequence), or a list of {L} entries")
            else:
                value = list(value.unbind(0))
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value] * L  # one entry for every layer
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{name}={value!r}: pass a menu index per layer ({L} entries), or one for every layer")
        value = list(value)
        if len(value) != L:
            raise ConfigError(f"{name} has {len(value)} entries but the model has {L} layers: pass one menu index "
                              "(or a per-sequence LongTensor) per layer")
        out: list[Choice] = []
        for i, c in enumerate(value):
            if isinstance(c, torch.Tensor):
                if c.dim() == 0:
                    c = int(c)
                elif c.dim() != 1 or c.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                    raise ConfigError(f"{name}[{i}] is a {c.dtype} tensor of shape {tuple(c.shape)}: per-sequence "
                                      "choices are an integer tensor of shape (batch,)")
                elif c.numel() and (int(c.min()) < 0 or int(c.max()) >= n_choices):
                    raise ConfigError(f"{name}[{i}] has menu index {int(c.min())}..{int(c.max())}: the menu has "
                                      f"{n_choices} entries, indices 0..{n_choices - 1}")
                else:
                    out.append(c.long())
                    continue
            if isinstance(c, bool) or not isinstance(c, int):
                raise ConfigError(f"{name}[{i}]={c!r}: pass an int menu index or a LongTensor (batch,)")
            if not 0 <= c < n_choices:
                raise ConfigError(f"{name}[{i}]={c} is not a menu index: the menu has {n_choices} entries, indices "
                                  f"0..{n_choices - 1} (0 = full width)")
            out.append(c)
        return out

    def set_choices(self, mlp=None, attn=None) -> "FlextronModel":
        """Choose a menu index per layer for MLPs and attentions (None: full width everywhere). Each is one int for
        every layer, a list of one entry per layer (an int for the whole batch, or a LongTensor (B,) per sequence),
        or a tensor whose first dim is the layers: (L,) or (L, B). Takes effect at the next forward."""
        m = self._check_choices("mlp", mlp, self.flextron_config.n_mlp_choices)
        a = self._check_choices("attn", attn, self.flextron_config.n_attn_choices)
        self.state.mlp, self.state.attn = m, a
        return self

    def get_choices(self) -> dict[str, list[Choice]]:
        return {"mlp": list(self.state.mlp), "attn": list(self.state.attn)}

    @contextlib.contextmanager
    def using(self, mlp=None, attn=None):
        """`with fm.using(mlp=..., attn=...):` run at those choices, then restore the previous ones."""
        saved = (self.state.mlp, self.state.attn)
        try:
            yield self.set_choices(mlp, attn)
        finally:
            self.state.mlp, self.state.attn = saved

    def full(self):
        """`with fm.full():` every layer at full width: the base model (the distillation teacher)."""
        return self.using(None, None)

    def smallest_choices(self) -> dict[str, list[int]]:
        L = self.n_layers
        return {"mlp": [self.flextron_config.n_mlp_choices - 1] * L, "attn": [self.flextron_config.n_attn_choices - 1] * L}

    # ------------------------------------------------------------------ forward
    def _capture_context(self, module, args, kwargs):
        st = self.state
        st.stats = []
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is not None:
            st.batch_size, st.n_tokens = int(ref.shape[0]), int(ref.shape[1])
        return None

    def train(self, mode: bool = True) -> "FlextronModel":
        """Continued training updates the base weights, but the base stays in eval mode (no dropout): the student
        must differ from the teacher only by the widths it runs at."""
        super().train(mode)
        self.base_model.eval()
        return self

    # ------------------------------------------------------------------ compute accounting
    def last_stats(self) -> dict[str, Any]:
        """FLOPs of the transformer blocks in the last forward, counted from what ran (like ElasticModel.last_stats).
        Anything else that ran per forward (a router) may append a SubLayerStats to `fm.state.stats`."""
        stats = self.state.stats
        dense = sum(s.dense_flops for s in stats)
        executed = sum(s.executed_flops for s in stats)
        out: dict[str, Any] = {
            "dense_flops": dense,
            "elastic_flops": executed,
            "flops_ratio": executed / dense if dense else 1.0,
            "router_flops": sum(s.router_flops for s in stats),
            "per_layer": [vars(s).copy() for s in stats],
        }
        for sub in ("attn", "mlp"):
            part = [s for s in stats if s.sublayer == sub]
            d, e = sum(s.dense_flops for s in part), sum(s.executed_flops for s in part)
            out[sub] = {"dense_flops": d, "elastic_flops": e, "flops_ratio": e / d if d else 1.0,
                        "width_fraction": sum(s.unit_fraction for s in part) / len(part) if part else 1.0}
        if stats and self.state.n_tokens:  # the whole model: blocks plus the LM head
            head = lm_head_flops(self.state.n_tokens * self.state.batch_size, self.dims["C"], self.dims["V"])
            out |= {"model_dense_flops": dense + head, "model_elastic_flops": executed + head,
                    "model_flops_ratio": (executed + head) / (dense + head)}
        return out

    def flops_table(self, seq_len: int = 128) -> dict[str, Any]:
        """FLOPs of one sequence of `seq_len` tokens (no cache) through each sub-layer at each menu index:
        `{"mlp": Tensor (L, n_mlp), "attn": Tensor (L, n_attn), "dense": float}` (every layer has the same row;
        a router multiplies its choice probabilities by these for an expected, differentiable compute)."""
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"seq_len={seq_len!r}: pass a positive number of tokens")
        d, T, L = self.dims, seq_len, self.n_layers
        gated = next(self.nested_layers())[1].gated
        mlp = torch.tensor([float(mlp_flops(T, d["C"], w, gated)) for w in self.mlp_sizes])
        attn = torch.tensor([float(attention_projection_flops(T, T, d["C"], h, g, d["D"]) +
                                   attention_score_flops(T, T, h, d["D"]))
                             for h, g in zip(self.head_counts, self.kv_counts)])
        dense = L * (float(mlp_flops(T, d["C"], d["I"], gated)) +
                     float(dense_attention_flops(1, T, T, d["C"], d["H"], d["KVH"], d["D"])))
        return {"mlp": mlp.expand(L, -1).clone(), "attn": attn.expand(L, -1).clone(), "dense": dense}

    def choices_flops(self, mlp=None, attn=None, seq_len: int = 128) -> float:
        """Predicted executed / dense block FLOPs of a configuration (same arguments as `set_choices`; per-sequence
        entries count the mean over the batch)."""
        m = self._check_choices("mlp", mlp, self.flextron_config.n_mlp_choices)
        a = self._check_choices("attn", attn, self.flextron_config.n_attn_choices)
        table = self.flops_table(seq_len)
        total = 0.0
        for layer in range(self.n_layers):
            for choice, row in ((m[layer], table["mlp"][layer]), (a[layer], table["attn"][layer])):
                total += float(row[choice].float().mean()) if isinstance(choice, torch.Tensor) else float(row[choice])
        return total / table["dense"]

    # ------------------------------------------------------------------ artifacts
    def base_identity(self) -> dict[str, Any]:
        cfg = self.base_model.config
        source = getattr(self.base_model, "elastiformer_source", None) or {}
        return {"model_type": cfg.model_type, "dims": self.dims, "fingerprint": weight_fingerprint(self.base_model),
                "name_or_path": source.get("name_or_path") or getattr(cfg, "_name_or_path", "") or ""}

    def save_pretrained(self, path: str | Path, tokenizer=None, extra: dict[str, Any] | None = None) -> Path:
        """Write a full checkpoint, atomically: the (continued-trained) weights as a standard Hugging Face folder
        (config.json + model.safetensors, loadable by AutoModelForCausalLM alone), `flextron_config.json` (menus,
        sorting permutations, base identity) and, if given, the tokenizer. `extra` is stored in the JSON too."""
        path = Path(path)
        meta = {"format_version": FORMAT_VERSION, "elastiformer_version": __version__,
                "flextron_config": self.flextron_config.to_dict(), "sorting": self.sorting,
                "base_model": self.base_identity(), "extra": extra or {}}
        try:
            with atomic_dir(path) as tmp, self.unwrapped() as model:
                model.save_pretrained(str(tmp), safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp))
                (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        except OSError as err:
            raise ElastiformerError(f"cannot write the checkpoint to {path}: {err.strerror}; pass a writable "
                                    "folder") from err
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | None = None) -> "FlextronModel":
        """Load a checkpoint written by `save_pretrained`: the weights, the menus and the sorting info."""
        from ..loading.models import load_model

        meta = read_flextron_config(path)
        model = load_model(str(path), device=device)
        saved = meta.get("base_model", {})
        if saved.get("dims") and saved["dims"] != get_arch_spec(model).dims(model.config):
            raise RouterFileError(f"{path}: its weights do not have the dims its {CONFIG_NAME} records: save the "
                                  "checkpoint again")
        setattr(model, SORTING_ATTR, meta.get("sorting"))
        return get_flextron_model(model, FlextronConfig.from_dict(meta["flextron_config"]))


    # ------------------------------------------------------------------ budgets (width routers: budget.py, routers.py)
    def attach_router(self, router) -> "FlextronModel":
        """Use `router` (a trained `FlextronRouter`) for `set_budget`."""
        from .routing.budget import attach_router

        attach_router(self, router)
        return self

    def load_router(self, path: str | Path, *, check_fingerprint: bool = True) -> "FlextronModel":
        """Load a router folder (`FlextronRouter.save_pretrained`, e.g. CHECKPOINT/router) and attach it."""
        from .routing.budget import load_router

        load_router(self, path, check_fingerprint=check_fingerprint)
        return self

    @property
    def router(self):
        from .routing.budget import get_router

        return get_router(self)

    def set_budget(self, relative_compute: float | None = None, latency_ms: float | None = None, *,
                   exact: bool = True) -> dict[str, Any]:
        """Pick every layer's width for a budget with the attached router: `relative_compute` (fraction of the
        full model's block FLOPs) or `latency_ms` (predicted from the latency table). The static router picks
        once; the input-adaptive one picks per sequence from its prompt, in the forward, and keeps that for the
        generation (budget.py's docstring has the rule). Returns what was picked."""
        from .routing.budget import set_budget

        return set_budget(self, relative_compute=relative_compute, latency_ms=latency_ms, exact=exact)

    def generate(self, *args, **kwargs):
        """Generation through the nested widths. With the input-adaptive router, every call decides each sequence's
        widths afresh from its prompt (its real tokens) and keeps them for every decode step, cached or not."""
        from .routing.budget import new_generation

        new_generation(self)
        return super().generate(*args, **kwargs)


def read_flextron_config(path: str | Path) -> dict[str, Any]:
    path, meta = read_saved_folder(path, CONFIG_NAME, (CONFIG_NAME, "config.json"), "Flextron checkpoint",
                                   "FlextronModel", "checkpoint")
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or "flextron_config" not in meta:
        raise RouterFileError(f"{path / CONFIG_NAME} is not a Flextron config: save the checkpoint again")
    if version > FORMAT_VERSION:
        raise RouterFileError(f"{path} was written in Flextron format {version}, newer than this elastiformer "
                              f"understands ({FORMAT_VERSION}): upgrade elastiformer")
    return meta


def get_flextron_model(model: nn.Module, config: FlextronConfig | None = None) -> FlextronModel:
    """Make every MLP and attention of `model` nested-elastic in place and return the wrapper (weights stay
    trainable; sort them first with `sort_by_importance_` so narrow widths keep the most important units)."""
    if isinstance(model, FlextronModel):
        raise ConfigError("this model is already a FlextronModel: pass the base model of a fresh load")
    config = FlextronConfig() if config is None else config
    if not isinstance(config, FlextronConfig):
        raise ConfigError(f"config must be a FlextronConfig, got {type(config).__name__}")
    return FlextronModel(model, config)
