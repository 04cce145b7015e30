"""Issue 16: the decoder LM families people use, each on a tiny random config (2 layers, hidden 64, 4 heads, 2 KV
heads where the family has them), through the contract of every ElastiFormer component and of Flextron:

- full budget (and routers off) == the base model's logits; the routed path with everything selected == the base;
- executed FLOPs fall with the budget and equal what torch's FLOP counter sees the forward multiply;
- prefix logits unchanged when tokens are appended; cached == uncached generation, left padding included;
- save / load round trip; LoRA through the routed path;
- Flextron: importance sorting leaves the logits unchanged, nested widths shrink FLOPs, routing runs.

Family configs exercise each variant where it matters: short sliding windows (Mistral, StarCoder 2, and Gemma 2 / 3
mixed with global layers) so windows bite within the test sequences, Gemma 2's logit soft-capping set low enough to
change the result, QK-norm (Qwen3, Gemma 3, OLMo 2 over the whole projection), partial rotary (Phi, StableLM,
GPT-NeoX), parallel blocks (GPT-NeoX, Phi), post-sub-layer norms (Gemma 2 / 3, OLMo 2), Granite's multipliers,
SmolLM3's layers without rotary, and biases (Qwen2, Phi, StarCoder 2).
"""

import copy
import functools

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

import elastiformer as ef
from elastiformer.flextron import FlextronConfig, compute_importance, get_flextron_model, sort_by_importance_
from elastiformer.flextron.routing.routers import FlextronRouter, WidthRouter, joint_finetune
from elastiformer.flextron.routing.configurations import compute_cost_model, set_index_choices
from elastiformer.flextron.routing.soft import soft_widths

VOCAB = 128
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP_WIDTH = 64, 2, 4, 2, 16, 96
WINDOW = 6  # shorter than the test sequences, so sliding-window layers really drop keys

COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, intermediate_size=MLP_WIDTH, max_position_embeddings=256,
              head_dim=HEAD_DIM, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=0.5, final_logit_softcapping=3.0,
                   query_pre_attn_scalar=HEAD_DIM // 2),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "phi3": {},
    "phi": {},
    "olmo2": {},
    "smollm3": dict(no_rope_layers=[1, 0]),
    "granite": dict(attention_multiplier=0.2, residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=2.0),
    "starcoder2": dict(sliding_window=WINDOW),
    "gpt_neox": dict(num_key_value_heads=None, use_parallel_residual=True),
    "stablelm": {},
    "gpt2": None,  # its own config names (below)
}
COMPONENTS = {
    "attn_tokens": dict(attn_tokens=0.6),
    "attn_heads": dict(attn_heads=0.5),
    "mlp_tokens": dict(mlp_tokens=0.5),
    "mlp_experts": dict(mlp_experts=4, mlp_experts_active=0.5),
}


def tiny(family: str, seed: int = 0):
    """A fresh copy of the family's tiny random model (built once per family and seed: most tests need several)."""
    model = copy.deepcopy(_built(family, seed))
    torch.manual_seed(seed)  # routers built next start from the same draws whichever test asks
    return model


@functools.lru_cache(maxsize=None)
def _built(family: str, seed: int):
    if family == "gpt2":
        config = CONFIG_MAPPING["gpt2"](vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=MLP_WIDTH,
                                        n_positions=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        kw = {k: v for k, v in (COMMON | FAMILIES[family]).items() if v is not None}
        config = CONFIG_MAPPING[family](**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norm weights and biases, so a mistake in any of them shows in the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens(B: int = 2, T: int = 20, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, T), generator=g)


def elastic(family: str, component: str, **overrides) -> ef.ElasticModel:
    return ef.get_elastic_model(tiny(family), ef.ElasticConfig(**(COMPONENTS[component] | overrides)))


def calibrated(family: str, component: str) -> ef.ElasticModel:
    em = elastic(family, component)
    em.calibrate({"input_ids": tokens(B=4, T=16, seed=7)})
    return em


family = pytest.mark.parametrize("family", sorted(FAMILIES))
component = pytest.mark.parametrize("component", sorted(COMPONENTS))


# ------------------------------------------------------------------------------------------------ ElastiFormer
@family
@component
def test_full_budget_and_everything_selected_are_the_base_model(family, component):
    ids = tokens()
    ref = tiny(family)(ids).logits
    em = elastic(family, component, dense_layers=())
    with torch.no_grad():
        with em.disable_routers():
            torch.testing.assert_close(em(ids).logits, ref, atol=1e-5, rtol=1e-5)
        em.set_budget(1.0)
        torch.testing.assert_close(em(ids).logits, ref, atol=1e-5, rtol=1e-5)
        assert em.last_stats()["elastic_flops"] == em.last_stats()["dense_flops"]
        em.train()  # top-k: k = round(0.999 n) = n, through gather, per-head attention and expert dispatch
        em.set_budget(0.999)
        torch.testing.assert_close(em(ids).logits, ref, atol=1e-4, rtol=1e-4)


def counted_flops(model, ids) -> int:
    """Matmul / attention FLOPs torch's counter sees in one forward (attention through the math backend, which the
    counter sees as matmuls; it does not count the CPU's fused attention kernel)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids)
    return counter.get_total_flops()


@family
@component
def test_flops_fall_with_the_budget_and_match_the_flop_counter(family, component):
    em = elastic(family, component, dense_layers=())
    ids = tokens(B=1, T=16)
    em.train()
    flops = []
    with torch.no_grad():
        key = "mlp_experts_active" if component == "mlp_experts" else component
        floor = em.state.min_budget(key)  # a causal LM's layer 0 always attends to every token
        for capacity in (1.0, 0.5, 0.25):  # 4 heads / 4 experts: 4, 2, 1 active
            budget = floor + (1.0 - floor) * capacity  # the routed layers run at `capacity`
            em.set_budget(budget)
            counted = counted_flops(em, ids)
            stats = em.last_stats()
            assert counted == stats["model_elastic_flops"], (capacity, counted, stats["model_elastic_flops"])
            flops.append(stats["elastic_flops"])
    assert all(a > b for a, b in zip(flops, flops[1:])), flops


@family
@component
def test_prefix_logits_do_not_change_when_tokens_are_appended(family, component):
    em = calibrated(family, component)
    ids = tokens(B=2, T=24)
    with torch.no_grad():
        full = em(ids).logits
        stats = em.last_stats()
        prefix = em(ids[:, :10]).logits
    torch.testing.assert_close(full[:, :10], prefix, atol=1e-5, rtol=1e-5)
    assert any(s["token_fraction"] < 1.0 or s["unit_fraction"] < 1.0 for s in stats["per_layer"])  # routing ran


@family
@component
def test_cached_generation_equals_uncached_with_left_padding(family, component):
    em = calibrated(family, component)
    prompt = tokens(B=2, T=8)
    prompt[0, :3] = 0
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0  # the first row is left-padded
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = em.generate(prompt, use_cache=True, **kw)
        uncached = em.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, 14)


@family
def test_left_padding_gives_the_same_logits_as_no_padding(family):
    em = calibrated(family, "attn_tokens")
    ids = tokens(B=1, T=12)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.ones_like(padded)
    mask[0, :4] = 0
    with torch.no_grad():
        alone = em(ids).logits
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        together = em(padded, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(together[0, 4:], alone[0], atol=1e-4, rtol=1e-4)


@family
def test_save_load_round_trip_with_lora(family, tmp_path):
    cfg = ef.ElasticConfig(attn_tokens=0.6, attn_heads=0.5, mlp_tokens=0.5, mlp_experts=4, mlp_experts_active=0.5,
                           lora_rank=2)
    em = ef.get_elastic_model(tiny(family), cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, adapter in em.named_adapters():  # "trained" adapters
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.05)
    em.calibrate({"input_ids": tokens(B=4, T=24, seed=7)})
    ids = tokens(B=2, T=16)
    with torch.no_grad():
        before = em(ids).logits
        em.save_pretrained(tmp_path / "routers")
        back = ef.ElasticModel.from_pretrained(tiny(family), tmp_path / "routers")
        after = back(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert back.last_stats()["elastic_flops"] < back.last_stats()["dense_flops"]


def test_a_model_that_cannot_be_understood_gets_one_line_naming_what_is_missing():
    model = tiny("mistral")
    for block in model.model.layers:
        del block.mlp.up_proj  # a gated MLP without its up projection: neither gated nor plain
    with pytest.raises(ef.UnsupportedArchitectureError) as err:
        ef.get_elastic_model(model, ef.ElasticConfig(mlp_tokens=0.5))
    message = str(err.value)
    assert "\n" not in message and "'mistral'" in message and "the MLP MistralMLP has none of" in message


def test_a_post_norm_that_does_not_map_zero_to_zero_is_refused():
    """Skipping a sub-layer wrapped by a post-norm leaves the residual alone only if norm(0) == 0 (RMSNorm): a
    biased LayerNorm there is refused by name rather than routed wrongly."""
    model = tiny("gemma2")
    for block in model.model.layers:
        norm = torch.nn.LayerNorm(HIDDEN)
        torch.nn.init.normal_(norm.bias)
        block.post_feedforward_layernorm = norm
    with pytest.raises(ef.UnsupportedArchitectureError) as err:
        ef.get_elastic_model(model, ef.ElasticConfig(mlp_tokens=0.5))
    assert "post_feedforward_layernorm" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gpt_neox"])
def test_a_copy_of_a_wrapped_model_is_understood_through_its_wrappers(family):
    em = ef.get_elastic_model(tiny(family), ef.ElasticConfig(attn_heads=0.5, mlp_tokens=0.5, lora_rank=2))
    copied = copy.deepcopy(em.base_model)  # a new object: its layout is discovered again, wrappers and adapters on
    assert ef.arch.get_arch_spec(copied).dims(copied.config) == em.dims


def test_supported_model_types_name_every_tested_family():
    assert set(FAMILIES) <= set(ef.arch.supported_model_types())


@family
@pytest.mark.parametrize("component", ["attn_heads", "attn_tokens"])
def test_lora_through_the_routed_paths_equals_the_folded_adapters(family, component):
    """Trained adapters (fused q / k / v projections included, their update split like the weight) applied on the
    per-head and the token path equal the base model with the adapters folded into its weights, under the same
    random routing."""
    cfg = dict(COMPONENTS[component], dense_layers=())
    em = ef.get_elastic_model(tiny(family), ef.ElasticConfig(**cfg, lora_rank=2))
    folded = tiny(family)
    modules = dict(folded.named_modules())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, adapter in em.named_adapters():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.05)
            delta = (adapter.lora_B @ adapter.lora_A) * adapter.scale  # (out, in)
            modules[name.replace(".base_layer", "")].weight += delta.T if adapter.conv1d else delta
    folded = ef.get_elastic_model(folded, ef.ElasticConfig(**cfg))
    ids = tokens(B=2, T=16)
    out = []
    for model in (em, folded):
        model.train()  # top-k: no calibration
        model.state.generator = torch.Generator().manual_seed(3)
        with torch.no_grad(), model.routing_method("random"):
            out.append(model(ids).logits)
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gpt_neox", "olmo2", "phi3"])
def test_router_training_steps_run(family):
    """A few distillation steps with every component and LoRA on the families whose layout differs most from Llama
    (soft-capping and post-norms, fused per-head qkv with parallel blocks, whole-projection QK-norm, fused qkv and
    gate_up): the teacher's targets, the student's losses and the adapters' updates all go through."""
    from elastiformer.training.routers import train_routers

    cfg = ef.ElasticConfig(attn_tokens=0.6, attn_heads=0.5, mlp_tokens=0.5, mlp_experts=4, mlp_experts_active=0.5,
                           lora_rank=2)
    em = ef.get_elastic_model(tiny(family), cfg)
    before = [p.detach().clone() for p in em.router_parameters()]
    train_routers(em, tokens(B=8, T=16), steps=2, batch_size=4, budget=0.6, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, em.router_parameters()))
    with torch.no_grad():
        assert torch.isfinite(em(tokens(B=2, T=10)).logits).all()


# post-sub-layer norms: the norm each family applies to a sub-layer's output before the residual add; a skipped
# sub-layer adds nothing, so the block must act as if sub-layer and norm were both absent (their RMSNorm of zero is
# zero: the routed model gets this for free, the reference below removes both explicitly)
POST_NORMS = {
    "gemma2": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    "gemma3_text": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    "olmo2": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
}


class Absent(torch.nn.Module):
    """A sub-layer that is not there: adds nothing (attention modules also return no weights)."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states, *args, **kwargs):
        zero = torch.zeros_like(hidden_states)
        return (zero, None) if self.attention else zero


@family
@pytest.mark.parametrize("sublayer", ["attn", "mlp"])
def test_skipping_a_sub_layer_is_the_block_without_it(family, sublayer):
    """Every token skips the routed sub-layers (capacity 0): the model equals the base model with those sub-layers
    (and any norm around their output) removed, whatever the block's residual structure (pre-norm, post-norm,
    parallel attention + MLP, Granite's residual multiplier)."""
    component = {"attn": "attn_tokens", "mlp": "mlp_tokens"}[sublayer]
    em = elastic(family, component, dense_layers=())
    routed = [i for i in range(LAYERS) if i not in em.state.dense_layers[component]]
    em.state.capacity_override = {component: [0.0] * LAYERS}
    em.train()  # top-k (no thresholds to calibrate); the tiny configs have no dropout
    reference = tiny(family)
    spec = em.spec
    for i in routed:
        block = spec.layers(reference)[i]
        name = spec.attn_name if sublayer == "attn" else spec.mlp_name
        setattr(block, name, Absent(attention=sublayer == "attn"))
        post = POST_NORMS.get(family, {}).get(sublayer)
        if post is not None:
            setattr(block, post, torch.nn.Identity())
    ids = tokens(B=2, T=12)
    with torch.no_grad():
        torch.testing.assert_close(em(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert em.last_stats()[sublayer]["elastic_flops"] < em.last_stats()[sublayer]["dense_flops"]


# ------------------------------------------------------------------------------------------------ GGUF
GGUF_TOKENS = ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", "ab"]  # a byte-level BPE vocabulary


GPT2_TRANSPOSED = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")  # llama.cpp stores these Conv1D weights (out, in)


def write_gguf_of(model, arch: str, path):
    """The tiny model as a float32 GGUF file of llama.cpp architecture `arch`: tensors named by gguf-py's name map,
    the metadata transformers' GGUF loader reads, and the inverse of what that loader does to a family's tensors
    (Gemma's norms are stored as 1 + weight, GPT-2's Conv1D weights transposed)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    dims = ef.arch.get_arch_spec(model).dims(config)
    writer.add_block_count(dims["L"])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(dims["C"])
    writer.add_feed_forward_length(dims["I"])
    writer.add_head_count(dims["H"])
    writer.add_head_count_kv(dims["KVH"])
    writer.add_key_length(dims["D"])
    writer.add_value_length(dims["D"])
    writer.add_rope_dimension_count(dims["D"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_layer_norm_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    writer.add_vocab_size(len(GGUF_TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(GGUF_TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(GGUF_TOKENS) - 3))
    writer.add_token_merges(["a b"])
    for key, value in (("bos", 1), ("eos", 2), ("unk", 0), ("pad", 0)):
        getattr(writer, f"add_{key}_token_id")(value)
    for name, tensor in model.state_dict().items():
        module, _, kind = name.rpartition(".")
        array = tensor.float().numpy().copy()
        name = names.get_name(module)
        if arch.startswith("gemma") and "norm" in module:
            array = array + 1
        if arch == "gpt2" and kind == "weight" and name.rpartition(".")[2] in GPT2_TRANSPOSED:
            array = array.T.copy()
        writer.add_tensor(f"{name}.{kind}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_layout_gguf(family: str, **kw):
    def write(path):
        from helpers.loading import write_tiny_gguf

        return write_tiny_gguf(path, arch=family, **kw)
    return write


def converted_gguf(family: str, arch: str):
    def write(path):
        if family == "gpt2":  # transformers reads neither the MLP width nor the context of a GPT-2 GGUF: defaults
            config = CONFIG_MAPPING["gpt2"](vocab_size=len(GGUF_TOKENS), n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
        else:
            config = CONFIG_MAPPING[family](**{k: v for k, v in (COMMON | FAMILIES[family]).items() if v is not None}
                                            | dict(vocab_size=len(GGUF_TOKENS)))
        torch.manual_seed(0)
        return write_gguf_of(AutoModelForCausalLM.from_config(config).eval(), arch, path)
    return write


# the families transformers loads from GGUF (gguf-py has no mistral architecture: such files say llama)
GGUF_FAMILIES = {
    "llama": llama_layout_gguf("llama"),
    "qwen2": llama_layout_gguf("qwen2", qkv_bias=True),
    "qwen3": llama_layout_gguf("qwen3", qk_norm=True, head_dim=128),  # transformers reads no head_dim from it
    "phi3": converted_gguf("phi3", "phi3"),
    "starcoder2": converted_gguf("starcoder2", "starcoder2"),
    "stablelm": converted_gguf("stablelm", "stablelm"),
    "gemma2": converted_gguf("gemma2", "gemma2"),
    "gemma3_text": converted_gguf("gemma3_text", "gemma3"),
    "gpt2": converted_gguf("gpt2", "gpt2"),
}


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_gguf_files_load_and_route(family, tmp_path):
    path = GGUF_FAMILIES[family](tmp_path / f"{family}.gguf")
    base = ef.load_model(str(path))
    assert base.config.model_type == family
    cfg = ef.ElasticConfig(attn_tokens=0.6, attn_heads=0.5, mlp_tokens=0.5, mlp_experts=4, mlp_experts_active=0.5)
    em = ef.get_elastic_model(ef.load_model(str(path)), cfg)
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        em.set_budget(1.0)
        torch.testing.assert_close(em(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)
        em.set_budget(0.6)
        em.calibrate({"input_ids": torch.randint(3, vocab, (4, 16), generator=torch.Generator().manual_seed(2))})
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(em.generate(ids[:, :6], use_cache=True, **kw), em.generate(ids[:, :6], use_cache=False, **kw))
    assert any(s["token_fraction"] < 1.0 or s["unit_fraction"] < 1.0 for s in em.last_stats()["per_layer"])


# ------------------------------------------------------------------------------------------------ Flextron
@family
def test_flextron_sorting_nested_widths_and_routing(family):
    model = tiny(family)
    ids = tokens(B=2, T=12)
    with torch.no_grad():
        ref = model(ids).logits
        sort_by_importance_(model, compute_importance(model, tokens(4, 16, seed=5), progress=False))
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
        fm = get_flextron_model(model, FlextronConfig())
        torch.testing.assert_close(fm(ids).logits, ref, atol=1e-4, rtol=1e-4)
        ratios = []
        for c in range(len(fm.mlp_sizes)):
            fm.set_choices(mlp=c, attn=c)
            out = fm(ids).logits
            assert torch.isfinite(out).all()
            ratios.append(fm.last_stats()["flops_ratio"])
        assert ratios == sorted(ratios, reverse=True) and ratios[-1] < ratios[0]
        # per-sequence choices (what a router gives): the row at index 0 runs the sliced path at full width, which
        # must be the base model (QK-norm, soft-capping, windows and partial rotary on the sliced path)
        both = [torch.tensor([0, 1])] * fm.n_layers
        fm.set_choices(mlp=both, attn=both)
        torch.testing.assert_close(fm(ids).logits[0], ref[0], atol=1e-4, rtol=1e-4)
        fm.set_choices(mlp=1, attn=[torch.tensor([1, 2])] * fm.n_layers)
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(fm.generate(ids[:, :6], use_cache=True, **kw), fm.generate(ids[:, :6], use_cache=False, **kw))


@family
def test_flextron_narrow_slices_equal_masked_units_and_a_router_runs(family):
    """Each narrow slice (the sliced q / k / v with their QK-norm, windows, soft-capping) equals the full-width layer
    with the left-out heads and neurons masked at the output / down projection input (what the joint fine-tune's soft
    widths compute); a width router picks per-sequence widths at a budget, and one joint fine-tune step runs."""
    fm = get_flextron_model(tiny(family), FlextronConfig())
    L, n_mlp, n_attn = fm.n_layers, len(fm.mlp_sizes), len(fm.head_counts)
    ids = tokens(B=2, T=12)
    g = torch.Generator().manual_seed(4)
    choice = {"mlp": torch.randint(0, n_mlp, (2, L), generator=g), "attn": torch.randint(1, n_attn, (2, L), generator=g)}
    with torch.no_grad():
        set_index_choices(fm, choice)
        hard = fm(input_ids=ids).logits
        probs = {k: torch.nn.functional.one_hot(v, n).float() for (k, v), n in zip(choice.items(), (n_mlp, n_attn))}
        with soft_widths(fm, probs):
            soft = fm(input_ids=ids).logits
        fm.set_choices()
    torch.testing.assert_close(hard, soft, atol=1e-4, rtol=1e-4)
    bundle = FlextronRouter(WidthRouter(L, n_mlp, n_attn, hidden=16),
                            {"relative_compute": compute_cost_model(fm, 12)}, "relative_compute")
    fm.attach_router(bundle)
    fm.set_budget(relative_compute=0.6)
    with torch.no_grad():
        assert torch.isfinite(fm(input_ids=ids).logits).all()
    assert fm.last_stats()["flops_ratio"] <= 1.0
    report = joint_finetune(fm, bundle, tokens(B=4, T=12, seed=7), steps=1, batch_size=2, progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in report.history)


@family
def test_packed_token_attention_equals_the_padded_rows_and_projects_only_real_tokens(family, monkeypatch):
    """Rows that selected different numbers of tokens: the packed path (projections on the real tokens only) gives
    the padded path's logits, cached decoding included, and torch's FLOP counter sees exactly the FLOPs it reports,
    fewer than the padded rows run."""
    from elastiformer.layers.attention import ElasticAttention

    em = calibrated(family, "attn_tokens")
    prompt = tokens(B=3, T=16)
    mask = torch.ones_like(prompt)
    mask[0, :5] = 0  # left padding: the rows hold different numbers of real tokens
    prompt[0, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    runs = {}
    for packed in (True, False):
        monkeypatch.setattr(ElasticAttention, "pack_rows", packed)
        with torch.no_grad():
            logits = em(prompt, attention_mask=mask).logits
            stats = em.last_stats()
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                em(prompt, attention_mask=mask)
            runs[packed] = (logits, stats, counter.get_total_flops(), em.generate(prompt, use_cache=True, **kw))
    (logits, stats, counted, generated), (ref_logits, ref_stats, _, ref_generated) = runs[True], runs[False]
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(generated, ref_generated)
    assert counted == stats["model_elastic_flops"]
    assert [s["token_fraction"] for s in stats["per_layer"]] == [s["token_fraction"] for s in ref_stats["per_layer"]]
    assert stats["elastic_flops"] < ref_stats["elastic_flops"]
