"""`ElasticModel`: a pretrained Transformer (a causal LM, or a bidirectional encoder such as BERT or ViT) with
routers attached in place, and `get_elastic_model` to make one.

Like PEFT's `PeftModel`: the base model's attention and MLP modules are replaced by wrappers that own the original
module (`base_layer`) and its routers; the base weights are frozen and never modified; only router tensors are
saved. Like torchao, the transform happens in place from a config.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import artifacts, calibration, unit_latency
from .allocation import LEVELS, Allocation
from .arch import ArchSpec, get_arch_spec, get_dotted, set_dotted
from .config import BUDGET_KEYS, TOKEN_COMPONENTS, ElasticConfig, check_fraction
from .errors import BudgetError, ConfigError, DataError, NotCalibratedError
from .distill import POOLINGS, Embedding, cosine_distance, kl_teacher_student, pool_hidden
from .flops import lm_head_flops
from .layers import ElasticAttention, ElasticMLP, RoutingState
from .layers.lora import LoRALinear
from .layers.stand_in import StandIn
from .validation import check_token_ids, model_context
from .routers import ExpertRouter, HeadRouter, TokenRouter

logger = logging.getLogger(__name__)

# "norm_allocated": the norm score with the learned routers' fitted allocation (what learned scores add beyond it)
ROUTING_METHODS = ("learned", "random", "norm", "static", "norm_allocated")
TOKEN_SCORE_METHODS = ("norm", "norm_allocated")  # baselines that score tokens only


def _resolve_layers(indices: Iterable[int], n_layers: int) -> frozenset[int]:
    out = set()
    for i in indices:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ConfigError(f"dense_layers has {i}, but the model has {n_layers} layers: use indices in "
                              f"[-{n_layers}, {n_layers - 1}]")
        out.add(j)
    return frozenset(out)


GENERATION_TOTALS = ("dense_flops", "elastic_flops", "router_flops", "model_dense_flops", "model_elastic_flops")


class WrappedModel(nn.Module):
    """A wrapper around a Hugging Face model (`self.base_model`, its sub-layers replaced in place) that is called,
    generates and answers attribute lookups (`config`, `device`, ...) as the model it wraps."""

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """Generation through the wrapped sub-layers (routing or nested widths on)."""
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)


class _Handles(list):
    """Hook handles that are removed together (`unload`)."""

    def remove(self) -> None:
        for handle in self:
            handle.remove()


class ElasticModel(WrappedModel):
    """Wraps a model (a *ForCausalLM, or an encoder such as BertModel / ViTModel / ViTForImageClassification)
    whose sub-layers have been made elastic. Use `get_elastic_model` to build one. A model with several layer stacks
    (LLaVA: `spec.towers`, the vision tower beside the language model) holds one ElasticModel per extra tower;
    budgets, modes and stats cover every stack. `is_causal` says which kind:
    causal LMs distil on logits (KL) and route by calibrated thresholds at inference; encoders distil pooled
    embeddings (cosine, see `embed`) and route by top-k at inference."""

    def __init__(self, model: nn.Module, config: ElasticConfig):
        super().__init__()
        spec = get_arch_spec(model)
        self.base_model = model
        self.elastic_config = config
        self.trained_budgets: tuple[float, float] | None = None  # (lowest, highest) budget train_routers sampled
        self.spec: ArchSpec = spec
        self.dims = spec.dims(spec.stack_config(model.config))
        L = self.dims["L"]
        dense = _resolve_layers(config.dense_layers, L)
        self.state = RoutingState(
            n_layers=L,
            # a causal LM's layer 0 keeps full attention: transformers reads the KV-cache length from it
            dense_layers={k: dense | ({0} if k == "attn_tokens" and spec.causal else frozenset()) for k in BUDGET_KEYS},
            keep_first_token=config.keep_first_token,
            causal=spec.causal,
        )
        self._check_dims()
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self._vocab_size = getattr(embeddings, "num_embeddings", None) or self.dims.get("V")
        self._context = model_context(model.config)  # longer inputs are refused with a clear error, not a deep one
        # what each base parameter had before it was frozen, so that unload() gives the model back as it came
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.targeted_module_names: list[str] = []
        self.calibrating = False
        self._checked_budget: dict[str, float] | None = None  # the budget whose thresholds were last checked
        self._inject()
        # the model's other layer stacks (LLaVA's vision tower): each made elastic by its own ElasticModel (its spec,
        # routing state and per-forward context), run at this model's budget and modes; a plain list, not
        # submodules, because their modules already belong to `base_model`
        self._towers: list[ElasticModel] = [ElasticModel(model.get_submodule(path), config) for path in spec.towers]
        self.set_budget(**config.capacities())
        self._call_entry: nn.Module | None = None  # the entry point whose running call captured the context
        self._generation: dict[str, float] | None = None  # FLOP totals while generate() runs
        self._last_generation: dict[str, float] | None = None  # ... of the last generate(), until the next forward
        self._hook = self._hook_entry_points(model)
        self._backbone_output = None  # the backbone's output of the last forward (encoders: see `embed`)
        self._backbone_hook = None if spec.causal else \
            spec.backbone(model).register_forward_hook(self._capture_backbone_output)
        self.eval()

    @property
    def is_causal(self) -> bool:
        return self.spec.causal

    # ------------------------------------------------------------------ building
    def _check_dims(self) -> None:
        c, d = self.elastic_config, self.dims
        if c.mlp_experts is not None and d["I"] % c.mlp_experts:
            raise ConfigError(f"mlp_experts={c.mlp_experts} does not divide the MLP width {d['I']}: pick a "
                              f"divisor, e.g. {', '.join(str(e) for e in (2, 3, 4, 6, 8, 12, 16) if d['I'] % e == 0)}")
        if d["H"] % d["KVH"]:
            raise ConfigError(f"{d['H']} heads do not divide into {d['KVH']} KV groups")

    def _inject(self) -> None:
        c, d, st = self.elastic_config, self.dims, self.state
        kw = dict(kind=c.router, router_hidden=c.router_hidden)
        layers = self.spec.layers(self.base_model)
        prefix = self.spec.find_layers_path(self.base_model)

        def stand_in(rank: int, device) -> StandIn:  # (rank at most hidden / 16)
            return StandIn(d["C"], min(rank, max(1, d["C"] // 16))).to(device)

        for i, block in enumerate(layers):
            routed = lambda comp: getattr(c, comp) is not None and i not in st.dense_layers[comp]  # noqa: E731
            attn = getattr(block, self.spec.attn_name)
            mlp = self.spec.get_mlp(block)
            if isinstance(attn, ElasticAttention) or isinstance(mlp, ElasticMLP):
                raise ConfigError("this model already has routers: call get_elastic_model on a fresh base model")
            token_kw = kw | dict(norm_feature=c.router_norm_feature)
            token_attn = TokenRouter(d["C"], **token_kw) if routed("attn_tokens") else None
            heads = HeadRouter(d["C"], d["H"], d["KVH"], c.head_granularity, **kw) if routed("attn_heads") else None
            token_mlp = TokenRouter(d["C"], **token_kw) if routed("mlp_tokens") else None
            experts = (ExpertRouter(d["C"], c.mlp_experts, **kw, mlp_width=d["I"], clustered=c.expert_split == "cluster")
                       if routed("mlp_experts_active") else None)
            device = next(block.parameters()).device
            for r in (token_attn, heads, token_mlp, experts):
                if r is not None:
                    r.to(device)
            if c.lora_rank and any(r is not None for r in (token_attn, heads, token_mlp, experts)):
                for proj, conv1d in self.spec.lora_targets:  # adapters live inside the unmodified attention
                    set_dotted(attn, proj, LoRALinear(get_dotted(attn, proj), c.lora_rank, st, conv1d=conv1d))
            attn_stand_in = stand_in(c.attn_stand_in_rank, device) if token_attn is not None and c.attn_stand_in_rank \
                else None
            mlp_stand_in = stand_in(c.stand_in_rank, device) if token_mlp is not None and c.stand_in_rank else None
            setattr(block, self.spec.attn_name,
                    ElasticAttention(attn, i, self.spec, d, st, token_attn, heads, attn_stand_in))
            self.spec.set_mlp(block, ElasticMLP(mlp, i, self.spec, d, st, token_mlp, experts, mlp_stand_in))
            self.targeted_module_names += [f"{prefix}.{i}.{self.spec.attn_name}", f"{prefix}.{i}.{self.spec.mlp_name}"]
        if not any(True for _ in self.routers()):
            raise ConfigError("no layer is routed: dense_layers covers every layer of the model")
        logger.info("elastiformer: wrapped %d sub-layers, %d router parameters",
                    len(self.targeted_module_names), self.num_router_parameters())

    def unload(self) -> nn.Module:
        """Take the routers out: put the original modules back and return the base model (like PEFT's unload), each
        parameter's `requires_grad` as it was before wrapping. LoRA adapters are dropped: the model returned is the
        base model (what `disable_routers()` runs), not the adapted one."""
        for block in self.spec.layers(self.base_model):
            if isinstance(self.spec.get_mlp(block), ElasticMLP):  # a clustered split permuted its neurons: undo
                self.spec.get_mlp(block).set_weight_order(None)
            if isinstance(getattr(block, self.spec.attn_name), ElasticAttention):
                setattr(block, self.spec.attn_name, getattr(block, self.spec.attn_name).base_layer)
            if isinstance(self.spec.get_mlp(block), ElasticMLP):
                self.spec.set_mlp(block, self.spec.get_mlp(block).base_layer)
            attn = getattr(block, self.spec.attn_name)
            for proj, _ in self.spec.lora_targets:
                if isinstance(get_dotted(attn, proj), LoRALinear):
                    set_dotted(attn, proj, get_dotted(attn, proj).base_layer)
        self._hook.remove()
        if self._backbone_hook is not None:
            self._backbone_hook.remove()
        for tower in self._towers:
            tower.unload()
        for name, p in self.base_model.named_parameters():  # after the towers': theirs were recorded frozen
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        return self.base_model

    # ------------------------------------------------------------------ routers
    def named_routers(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, (TokenRouter, HeadRouter, ExpertRouter, StandIn)):  # what the artifact holds
                yield name, module

    def routers(self) -> Iterator[nn.Module]:
        return (m for _, m in self.named_routers())

    def named_adapters(self) -> Iterator[tuple[str, LoRALinear]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, LoRALinear):
                yield name, module

    def router_parameters(self) -> list[nn.Parameter]:
        """Everything that trains: the routers and, with lora_rank > 0, the LoRA adapters."""
        return [p for r in self.routers() for p in r.parameters()] + \
            [p for _, a in self.named_adapters() for p in a.trainable_state().values()]

    def num_router_parameters(self) -> int:
        return sum(p.numel() for p in self.router_parameters())

    def num_base_parameters(self) -> int:
        ids = {id(p) for p in self.router_parameters()}
        return sum(p.numel() for p in self.base_model.parameters() if id(p) not in ids)

    def router_state_dict(self) -> dict[str, torch.Tensor]:
        """Router parameters and calibration buffers (and LoRA adapters), keyed by their path in the base model."""
        out = {f"{name}.{k}": v.detach().contiguous() for name, r in self.named_routers()
               for k, v in r.state_dict().items()}
        out |= {f"{name}.{k}": v.detach().contiguous() for name, a in self.named_adapters()
                for k, v in a.trainable_state().items()}
        return out

    # ------------------------------------------------------------------ modes and budgets
    def train(self, mode: bool = True) -> "ElasticModel":
        """Training mode routes by top-k at the capacity. The base model stays in eval mode (no dropout), because
        the student must differ from the teacher only by what the routers chose."""
        super().train(mode)
        self.base_model.eval()
        for r in self.routers():
            r.train(mode)
        for st in self._states():
            st.topk = mode
        return self

    def set_budget(self, value: float | None = None, /, **budgets: float) -> "ElasticModel":
        """Set the budget: the fraction of the routed compute the model spends. Takes effect at the next forward;
        no retraining.

        `set_budget(mlp_tokens=0.6)`: a component's budget, the fraction of its work done in the whole model (the
        mean of its per-layer capacities). With a fitted allocation (`fit_allocation`, which `train_routers` runs)
        the layers' capacities are where that work costs least; without one every routed layer gets the same.
        `set_budget(0.6)`: one budget for the model. With one routed component it is that component's; with
        several and a fitted allocation, it is the fraction of the routed sub-layers' FLOPs, split between the
        components where it costs least (`get_budget()` shows the split); without an allocation, each component
        gets 0.6."""
        routed = self.elastic_config.components()
        if isinstance(value, dict):  # set_budget({"mlp_tokens": 0.6}) reads like set_budget(mlp_tokens=0.6)
            value, budgets = None, {**value, **budgets}
        if value is not None and not budgets and len(routed) > 1 and self.state.allocation is not None:
            value = check_fraction("budget", value)
            split = self.state.allocation.component_budgets(value)  # the joint budget, as each component's share
            budgets = {k: max(split.get(k, value), self.state.min_budget(k) + 1e-3, 1e-3) for k in routed}
        elif value is not None:
            budgets = {k: value for k in routed} | budgets
        if not budgets:
            raise BudgetError(f"set_budget needs a value: pass one fraction, or any of {', '.join(routed)}")
        new = {}
        for key, b in budgets.items():
            if key not in BUDGET_KEYS:
                raise BudgetError(f"unknown budget {key!r}: the budget keys are {', '.join(BUDGET_KEYS)}")
            if key not in routed:
                raise BudgetError(f"{key} is not routed in this model: configure it in ElasticConfig "
                                  f"(routed here: {', '.join(routed)})")
            b = check_fraction(key, b)
            lo = self.state.min_budget(key)
            if b < lo - 1e-9 or (b < 1.0 and math.isclose(b, lo)):
                raise BudgetError(f"{key}={b} is below what the dense layers need ({lo:.3f}): pass a budget above "
                                  f"{lo:.3f} or list fewer dense_layers")
            new[key] = b
        self.state.budget.update(new)
        for tower in self._towers:
            tower.set_budget(**new)
        return self

    def get_budget(self) -> dict[str, float]:
        return dict(self.state.budget)

    @contextlib.contextmanager
    def override(self, attr: str, value):
        """`with em.override("generator", g):` sets a field of the routing state (`layers.state.RoutingState`, of
        every layer stack) for the duration of a block; reentrant and exception-safe. What the modes above
        (`disable_routers`, `routing_method`, `budget`, ...) and the trainers and evaluators build on."""
        states = self._states()
        saved = [getattr(st, attr) for st in states]
        for st in states:
            setattr(st, attr, dict(value) if isinstance(value, dict) else value)
        try:
            yield self
        finally:
            for st, old in zip(states, saved):
                setattr(st, attr, old)

    def _states(self) -> list[RoutingState]:
        """The routing state of this layer stack and of every tower's."""
        return [self.state, *(st for tower in self._towers for st in tower._states())]

    def stack_routers(self) -> Iterator[tuple[str, nn.Module]]:
        """The routers of this layer stack only (not the towers'): what calibration and static pruning fit."""
        towers = tuple(f"{path}." for path in self.spec.towers)
        return ((name, r) for name, r in self.named_routers() if not name.startswith(towers))

    @contextlib.contextmanager
    def budget(self, value: float | None = None, /, **budgets: float):
        """`with em.budget(mlp_tokens=0.5): ...` runs at that budget, then restores the previous one."""
        with self.override("budget", dict(self.state.budget)):
            yield self.set_budget(value, **budgets)

    def disable_routers(self):
        """`with em.disable_routers():` the unmodified base model (the distillation teacher). With trained LoRA
        adapters (`lora_rank > 0`) this is the only way back to the base model: at full budget the adapters still act,
        so `set_budget(1.0)` is the adapted model (base + BA), not the base."""
        return self.override("enabled", False)

    def teacher_targets(self, enabled: bool = True):
        """During the teacher pass of training (routers disabled), also measure the importance of each token, head
        and expert and give the routers their supervised losses (`aux_losses()` after the forward)."""
        return self.override("teacher_targets", enabled)

    def teacher_sensitivities(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The teacher pass of training with sensitivity targets (`router_targets="sensitivity"`): run the base
        model, then one backward of a Fisher sample gives, for every routed token of every layer at once, how much
        the output distribution moves if that token's update is skipped: |g . delta|, with g the gradient of the
        log-likelihood of next tokens drawn from the teacher's own distribution (an encoder: of a random projection
        of its pooled embedding) with respect to the sub-layer's output, and delta what skipping removes. Its
        square estimates the KL increase to second order (the Fisher information), which the norm of the update
        does not: a large update in a direction the rest of the model ignores costs little.
        Returns (the teacher's output, detached; its auxiliary losses, with `token_importance` on these targets)."""
        st = self.state
        with self.disable_routers(), self.teacher_targets(True), self.override("sensitivity_probes", []), \
                torch.enable_grad():
            out = self.distill_target(batch)
            probes, grads = list(st.sensitivity_probes), ()
            aux = self.aux_losses()  # heads' / experts' targets, computed in the pass itself
            if probes:
                if self.is_causal:
                    logits = out.float()  # (B, T, V)
                    drawn = torch.multinomial(logits.detach().softmax(-1).flatten(0, 1), 1, generator=generator)
                    nll = F.cross_entropy(logits.flatten(0, 1), drawn.squeeze(1), reduction="none")  # (B*T,)
                    mask = batch.get("attention_mask")
                    loss = (nll * mask.flatten().to(nll.dtype)).sum() if mask is not None else nll.sum()
                else:
                    direction = torch.randn(out.shape, generator=generator, device="cpu").to(out)
                    loss = (out.float() * direction).sum()
                grads = torch.autograd.grad(loss, [p.probe for p in probes], allow_unused=True)
        losses = []
        for p, g in zip(probes, grads):
            if g is None:
                continue
            s = (g * p.change).sum(-1).abs()  # (B, T) first-order change of the sampled log-likelihood
            s = s / s[p.valid].mean().clamp(min=1e-20)  # one scale per layer: the loss standardizes its log anyway
            if st.student_targets is not None:  # router_inputs="student": taught in the student's forward
                st.student_targets[id(p.router)] = (s, p.valid, p.forced)
                continue
            if st.target_records is not None:  # train_routers' target phase: recomputed for each router update
                st.add_target_loss("token_importance", p.router, p.x, s, 1.0, p.valid, p.forced)
                continue
            with torch.enable_grad():
                loss = p.router.importance_loss(p.x, s, 1.0, p.valid, p.forced)
            if loss is not None:
                losses.append(loss)
        if losses:
            aux["token_importance"] = torch.stack(losses).mean()
        return out.detach(), aux

    def random_routing(self):
        """The random-routing baseline: every router chooses uniformly at random at the same capacity (and costs
        nothing), so its FLOPs match the learned routers' minus the routers themselves."""
        return self.override("method", "random")

    def routing_method(self, method: str):
        """`with em.routing_method(m):` route with the learned routers or a baseline at the same budget:
        "random"; "norm" (training-free: token score = norm of the sub-layer's input; thresholds from
        `calibrate(data, method="norm")`); "norm_allocated" (the same score, with the capacities of the fitted
        allocation instead of uniform ones; `calibrate(data, method="norm_allocated")`); "static" (drop whole
        least-important sub-layers for token components, the same least-important heads / experts for every token;
        chosen once by `fit_static(data)`). Only "learned" and "norm_allocated" use the fitted allocation; the other
        baselines share the budget uniformly between layers."""
        if method not in ROUTING_METHODS:
            raise ConfigError(f"unknown routing method {method!r}: pass one of {', '.join(ROUTING_METHODS)}")
        if method in TOKEN_SCORE_METHODS and any(k not in TOKEN_COMPONENTS for k in self.elastic_config.components()):
            raise ConfigError(f"the '{method}' baseline scores tokens only: use it on a model whose routed components "
                              "are mlp_tokens / attn_tokens")
        if method == "norm_allocated" and self.state.allocation is None:
            raise ConfigError("the 'norm_allocated' baseline uses the fitted allocation, and none is fitted: call "
                              "em.fit_allocation(data) (train_routers does it when it ends)")
        if method in ("norm", "norm_allocated", "static") and self._towers:
            raise ConfigError(f"the '{method}' baseline is fitted on one layer stack, and this {self.spec.name} model "
                              f"has towers ({', '.join(self.spec.towers)}): compare with method='random'")
        return self.override("method", method)

    # ------------------------------------------------------------------ forward
    def _hook_entry_points(self, model: nn.Module) -> "_Handles":
        """A call may enter by the model or by an inner model on the way to its blocks (LlamaModel, GPT2Model, ...):
        whichever a call enters by captures the routing context, and the end of that call clears it, so an inner
        model called on its own routes by its own padding mask and positions, never by the previous call's."""
        from transformers import PreTrainedModel

        path = self.spec.find_layers_path(model).split(".")
        inner = [model.get_submodule(".".join(path[:i])) for i in range(1, len(path))]
        handles = _Handles()
        for entry in [model, *(m for m in inner if isinstance(m, PreTrainedModel))]:
            handles.append(entry.register_forward_pre_hook(self._begin_call, with_kwargs=True))
            handles.append(entry.register_forward_hook(self._end_call, always_call=True))  # on errors too
        return handles

    def _begin_call(self, module, args, kwargs):
        if self._call_entry is None or module is self.base_model:  # not an inner model inside a running call
            self._call_entry = module
            self._capture_context(module, args, kwargs)
        return None

    def _end_call(self, module, args, output):
        if module is self._call_entry:
            if self._generation is not None:  # one forward of a generation (the prefill, or one decode step)
                stats = self._flop_totals(self._sublayer_stats())
                self._generation["forwards"] += 1
                for key in GENERATION_TOTALS:
                    self._generation[key] += stats.get(key, 0.0)
            self._call_entry = None
            self.state.in_call = False  # a layer run outside a call refuses to route: no stale mask is read
            self.state.pad_mask = None
        return None

    def _capture_context(self, module, args, kwargs):
        """At the start of a call (of the model or of an inner model): the wrappers need its padding mask and
        positions."""
        st = self.state
        st.in_call = False
        if self._generation is None:  # a plain forward: last_stats() describes it alone
            self._last_generation = None
        for each in self._states():  # a text-only call never reaches the towers: clear their last stats too
            each.reset_forward()
        main = getattr(module, "main_input_name", "input_ids")  # "pixel_values" for vision models
        first = kwargs.get(main, args[0] if args else None)
        ref = first if first is not None else kwargs.get("inputs_embeds")
        if ref is None:
            return None
        if not isinstance(ref, torch.Tensor):
            raise DataError(f"{main} must be a tensor, got {type(ref).__name__}: pass what the tokenizer / image "
                            "processor returns (return_tensors='pt')")
        tokens_known = main != "pixel_values" or ref is not first  # images: the patch count shows only inside
        if tokens_known and ref.dim() < 2:
            raise DataError(f"{main} of shape {tuple(ref.shape)}: the model takes a batch [batch, tokens]; use "
                            f"{main}[None] for one sequence")
        B = ref.shape[0]
        T = ref.shape[1] if tokens_known else None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if first is not None and main == "input_ids":
            check_token_ids(first, vocab_size=self._vocab_size, context=self._context, past=past)
        elif first is None and (ref.dim() != 3 or ref.shape[1] == 0 or (self._context and past + ref.shape[1] >
                                                                       self._context)):
            raise DataError(f"inputs_embeds of shape {tuple(ref.shape)} (after {past} cached tokens): pass [batch, "
                            f"1..{self._context} tokens, hidden]")
        st.past_len = past
        st.batch_size = B
        st.positions = torch.arange(past, past + T, device=ref.device) if T is not None else None
        mask = kwargs.get("attention_mask")
        if T is None:  # pixel_values: take a 2-D mask as it comes (the first sub-layer meets the token count)
            st.pad_mask = mask.bool() if mask is not None and mask.dim() == 2 and mask.shape[0] == B else None
        elif mask is not None and mask.dim() == 2 and mask.shape == (B, past + T):
            st.pad_mask = mask.bool()
        elif mask is not None and mask.dim() == 2 and mask.shape == (B, T) and past == 0:
            st.pad_mask = mask.bool()
        elif mask is None:
            st.pad_mask = None
        else:
            raise ConfigError(f"attention_mask of shape {tuple(mask.shape)} is not supported: pass a 2-D (batch, "
                              f"past + current tokens) mask of 0/1, as tokenizers and generate() produce")
        st.in_call = True
        if not st.topk and st.enabled and st.method == "learned" and not self.calibrating \
                and self._checked_budget != st.budget:  # once per budget, not on every decoded token
            self._check_calibrated()
            self._checked_budget = dict(st.budget)
        return None

    def _capture_backbone_output(self, module, args, output) -> None:
        self._backbone_output = output

    def _check_calibrated(self) -> None:
        if not self.is_causal:  # encoders route by top-k at inference: no thresholds needed
            return
        for key in ("mlp_tokens", "attn_tokens"):
            if self.state.budget.get(key, 1.0) < 1.0:
                for name, r in self.stack_routers():
                    if isinstance(r, TokenRouter) and not r.is_calibrated:
                        raise NotCalibratedError(
                            f"{key} routing at inference needs calibrated thresholds ({name} has none): call "
                            "em.calibrate(data) first (train_routers does it when it ends), or em.train() for top-k")

    # ------------------------------------------------------------------ calibration (see calibration.py)
    def calibrate(self, data: Iterable[dict[str, Any]] | torch.Tensor, max_batches: int | None = 2,
                  n_budgets: int = 12, method: str = "learned", progress: bool = False) -> "ElasticModel":
        """Fit the token routers' inference thresholds on `data`, so `set_budget` takes effect at once for any
        budget (`calibration.calibrate`; about `n_budgets` x `max_batches` forwards)."""
        calibration.calibrate(self, data, max_batches, n_budgets=n_budgets, method=method, progress=progress)
        return self

    def fit_allocation(self, data: Iterable[dict[str, Any]] | torch.Tensor, max_batches: int | None = 1, *,
                       min_budget: float = 0.5, levels: tuple[float, ...] = LEVELS, lookahead: int = 2,
                       max_lookahead: int = 8, progress: bool = True, pin: bool = True,
                       latency: dict[str, Any] | None = None) -> "ElasticModel":
        """Fit where the budget is spent: the per-layer allocation path (`calibration.fit_allocation`); `pin`: a
        layer's heads / experts may be lowered as the same set for every token where that costs less; `latency`: a
        table from `measure_unit_latency`, to rank the path's moves by loss per decoding time saved on this machine
        (else per FLOP saved). Call `calibrate` afterwards (`train_routers` does both when it ends)."""
        calibration.fit_allocation(self, data, max_batches, min_budget=min_budget, levels=levels,
                                   lookahead=lookahead, max_lookahead=max_lookahead, progress=progress, pin=pin,
                                   latency=latency)
        return self

    def measure_unit_latency(self, data: Iterable[dict[str, Any]] | torch.Tensor, *, prompt_len: int = 8,
                             new_tokens: int = 16, reps: int = 5, levels: tuple[float, ...] = LEVELS,
                             pin: bool = True, progress: bool = True) -> dict[str, Any]:
        """Time what a unit of each routed component saves per capacity level when decoding at batch 1 on this
        machine (`unit_latency.measure_unit_latency`): the table `fit_allocation(latency=...)` ranks moves by."""
        return unit_latency.measure_unit_latency(self, data, prompt_len=prompt_len, new_tokens=new_tokens,
                                                 reps=reps, levels=levels, pin=pin, progress=progress)

    def split_experts(self, data: Iterable[dict[str, Any]] | torch.Tensor, max_batches: int | None = 2,
                      seed: int = 0) -> "ElasticModel":
        """For `expert_split="cluster"`: group each routed MLP's hidden neurons into experts by co-activation
        (`calibration.split_experts`), before the expert routers train."""
        calibration.split_experts(self, data, max_batches, seed=seed)
        return self

    def fit_stand_ins(self, data: Iterable[dict[str, Any]] | torch.Tensor, max_batches: int | None = 8, *,
                      quantile: float = 0.3) -> "ElasticModel":
        """Fit what tokens that skip a routed MLP or attention get, a low-rank estimate of its update
        (`calibration.fit_stand_ins`); `train_routers` does it before training, so the routers, the allocation and
        the thresholds see it."""
        calibration.fit_stand_ins(self, data, max_batches, quantile=quantile)
        return self

    def fit_static(self, data: Iterable[dict[str, Any]] | torch.Tensor, max_batches: int | None = 1) -> "ElasticModel":
        """Choose, once, what the "static" pruning baseline drops (`calibration.fit_static`)."""
        calibration.fit_static(self, data, max_batches)
        return self

    @property
    def allocation(self) -> Allocation | None:
        """The fitted per-layer allocation (None: every routed layer gets the same capacity)."""
        return self.state.allocation

    def capacities(self) -> dict[str, list[float]]:
        """Per-layer capacities of each routed component under the current budget (learned routing)."""
        with self.override("method", "learned"), self.override("enabled", True):
            return self.state.capacities()

    @contextlib.contextmanager
    def original_weight_order(self) -> Iterator[None]:
        """The base MLPs in their original neuron order for the duration (a clustered split permutes them: same
        function, other tensors), e.g. for the weight fingerprint, which must match a freshly loaded base model."""
        mlps = [m for m in self.base_model.modules() if isinstance(m, ElasticMLP) and m.weight_order is not None]
        held = [m.weight_order for m in mlps]
        for m in mlps:
            m.set_weight_order(None)
        try:
            yield
        finally:
            for m, order in zip(mlps, held):
                m.set_weight_order(order)

    def distill_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What distillation compares: next-token logits (causal LMs) or the pooled embedding (encoders)."""
        return self.base_model(**batch).logits if self.is_causal else self.embed(batch).pooled

    def distill_distance(self, teacher: torch.Tensor, student: torch.Tensor, batch) -> torch.Tensor:
        if self.is_causal:
            return kl_teacher_student(teacher, student, batch.get("attention_mask"))
        return cosine_distance(teacher, student)

    @property
    def is_calibrated(self) -> bool:
        """Whether inference has what token routing needs (always, for encoders: they route by top-k)."""
        if not self.is_causal:
            return True
        return all(r.is_calibrated for _, r in self.stack_routers() if isinstance(r, TokenRouter))

    # ------------------------------------------------------------------ embeddings (encoders)
    def embed(self, batch: dict[str, torch.Tensor], pooling: str | None = None, *, forward=None) -> Embedding:
        """Run `batch` through the model (at the current budget / mode) and return its embedding: `pooled` (B, C)
        by `pooling` ("mean" over valid tokens, "cls" = the first token, "pooler" = the model's pooler output;
        default `spec.default_pooling`: mean for BERT, cls for ViT), and the final token states `tokens` (B, T, C)
        with their validity `mask` (B, T), and a classifier's `logits` (None for a bare encoder). `forward` is what
        to call instead of `self` (e.g. a DDP wrapper)."""
        if self.is_causal:
            raise ConfigError("embed() is for encoders (BERT, ViT): a causal LM distils and is evaluated on logits")
        pooling = pooling or self.spec.default_pooling
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling={pooling!r}: pass one of {', '.join(POOLINGS)}")
        self._backbone_output = None
        result = (forward or self)(**batch)
        out, self._backbone_output = self._backbone_output, None
        hidden = out.last_hidden_state  # (B, T, C)
        mask = batch.get("attention_mask")
        if mask is None or mask.shape != hidden.shape[:2]:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        pooler = getattr(out, "pooler_output", None)
        if pooling == "pooler" and pooler is None:
            raise ConfigError(f"pooling='pooler': this {type(self.base_model).__name__} has no pooler output; "
                              "pass pooling='mean' or 'cls'")
        logits = getattr(result, "logits", None) if out is not result else None
        return Embedding(pool_hidden(hidden, mask, pooling, pooler), hidden, mask.bool(), logits)

    # ------------------------------------------------------------------ accounting
    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward, averaged over layers. Student pass (training mode): `token_bce`
        against its own top-k (when there are no teacher targets) and `expert_balance` (Switch load balancing).
        Teacher pass under `teacher_targets()`: `token_importance` (regression onto the importance measured on the
        teacher), `head_rank`, `expert_rank` (against the top-k by importance on the teacher)."""
        merged = defaultdict(list)  # every layer stack's
        for st in self._states():
            for k, v in st.aux_losses.items():
                merged[k] += v
        return {k: torch.stack(v).mean() for k, v in merged.items() if v}

    def last_stats(self) -> dict[str, Any]:
        """FLOPs of the transformer blocks in the last forward (routers included), counted from what ran."""
        stats = self._sublayer_stats()
        out: dict[str, Any] = self._flop_totals(stats)
        out |= {
            "flops_ratio": out["elastic_flops"] / out["dense_flops"] if out["dense_flops"] else 1.0,
            "budget": self.get_budget(),
            "capacities": self.state.capacities(),  # per component, per layer (1.0 everywhere with routing off)
            "per_layer": [vars(s).copy() for s in stats],
        }
        for sub in ("attn", "mlp"):
            part = [s for s in stats if s.sublayer == sub]
            d, e = sum(s.dense_flops for s in part), sum(s.executed_flops for s in part)
            out[sub] = {"dense_flops": d, "elastic_flops": e, "flops_ratio": e / d if d else 1.0,
                        "token_fraction": _mean([s.token_fraction for s in part]),
                        "unit_fraction": _mean([s.unit_fraction for s in part])}
        if self._towers:  # each layer stack on its own (LLaVA: the language model, then the vision tower)
            out["stacks"] = {name: _flops_summary(st.stats) for name, st in
                             zip((self.spec.name, *self.spec.towers), (self.state, *(t.state for t in self._towers)))}
        if "model_dense_flops" in out:
            out["model_flops_ratio"] = out["model_elastic_flops"] / out["model_dense_flops"] \
                if out["model_dense_flops"] else 1.0
        if self._last_generation is not None:
            out["generation"] = dict(self._last_generation)
        return out

    def _sublayer_stats(self) -> list:
        """What each wrapped sub-layer ran in the last forward: this stack's and the towers'."""
        return [s for st in self._states() for s in st.stats]

    def _flop_totals(self, stats: list) -> dict[str, int]:
        """The FLOP sums of a forward's sub-layer `stats` (`GENERATION_TOTALS`): what `last_stats` reports, and what
        a generation adds up at every step without the per-layer report a step does not need."""
        dense = sum(s.dense_flops for s in stats)
        executed = sum(s.executed_flops for s in stats)
        out = {"dense_flops": dense, "elastic_flops": executed, "router_flops": sum(s.router_flops for s in stats)}
        n_tokens = int(self.state.positions.numel()) if self.state.positions is not None else 0
        if stats and n_tokens and self.is_causal:  # the whole model: blocks plus the LM head (lookups are free)
            head = lm_head_flops(n_tokens * self.state.batch_size, self.dims["C"], self.dims["V"])
            out["model_dense_flops"], out["model_elastic_flops"] = dense + head, executed + head
        elif stats:  # encoders: the blocks are the model (embeddings, pooler and a classifier are negligible)
            out["model_dense_flops"], out["model_elastic_flops"] = dense, executed
        return out

    def generate(self, *args, **kwargs):
        """Generation through the wrapped sub-layers. Afterwards `last_stats()` describes the last forward (one decode
        step) and, under "generation", the totals over every forward of the generation (prefill and decode steps):
        forwards, dense / elastic FLOPs of the blocks and of the whole model, and their ratios."""
        self._generation = {"forwards": 0, **{key: 0.0 for key in GENERATION_TOTALS}}
        try:
            out = self.base_model.generate(*args, **kwargs)
        finally:
            totals, self._generation = self._generation, None
        totals["flops_ratio"] = totals["elastic_flops"] / totals["dense_flops"] if totals["dense_flops"] else 1.0
        if totals["model_dense_flops"]:
            totals["model_flops_ratio"] = totals["model_elastic_flops"] / totals["model_dense_flops"]
        self._last_generation = totals
        return out

    # ------------------------------------------------------------------ artifacts
    def base_identity(self) -> dict[str, Any]:
        cfg = self.base_model.config
        source = getattr(self.base_model, "elastiformer_source", None) or {}
        return {
            "model_type": cfg.model_type,
            "architectures": list(getattr(cfg, "architectures", None) or [type(self.base_model).__name__]),
            "dims": self.dims,
            "fingerprint": self._original_fingerprint(),
            "name_or_path": source.get("name_or_path") or getattr(cfg, "_name_or_path", "") or "",
            "gguf_file": source.get("gguf_file"),
        }

    def _original_fingerprint(self) -> str:
        with self.original_weight_order():
            return artifacts.weight_fingerprint(self.base_model)

    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write `elastic_config.json` and `routers.safetensors` (routers and calibration only), atomically.
        A folder that already holds something is replaced only with `overwrite=True` (`artifacts.write_routers`)."""
        return artifacts.write_routers(self, path, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, model: nn.Module | str, path: str | Path, *, check_fingerprint: bool = True) -> "ElasticModel":
        """Re-attach saved routers to a freshly loaded base model (or the name / folder of one); refuses a
        different base model (`artifacts`)."""
        meta = artifacts.read_router_config(path)
        if isinstance(model, (str, Path)):
            from .loading.models import load_model

            model = load_model(str(model))
        em = get_elastic_model(model, artifacts.config_of(meta, path))
        artifacts.load_routers(em, path, meta, check_fingerprint=check_fingerprint)
        return em

def _flops_summary(stats) -> dict[str, float]:
    dense, executed = sum(s.dense_flops for s in stats), sum(s.executed_flops for s in stats)
    return {"dense_flops": dense, "elastic_flops": executed, "flops_ratio": executed / dense if dense else 1.0}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 1.0


def get_elastic_model(model: nn.Module, config: ElasticConfig) -> ElasticModel:
    """Attach routers to `model` in place (its modules are wrapped, its weights frozen) and return the wrapper."""
    if isinstance(model, ElasticModel):
        raise ConfigError("this model is already elastic: pass the base model (em.base_model) of a fresh load")
    if not isinstance(config, ElasticConfig):
        raise ConfigError(f"config must be an ElasticConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        from .errors import ModelLoadError

        raise ModelLoadError(f"get_elastic_model takes a loaded model, not a {type(model).__name__}: load it first "
                             "with ef.load_model(name_or_path)")
    return ElasticModel(model, config)
