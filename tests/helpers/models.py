"""Tiny random models built from configs (no hub): Llama with grouped-query attention, and GPT-2; their inputs."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import elastiformer as ef

VOCAB = 99
ALL_COMPONENTS = {
    "mlp_tokens": dict(mlp_tokens=0.5),
    "attn_tokens": dict(attn_tokens=0.6),
    "attn_heads": dict(attn_heads=0.5),
    "mlp_experts": dict(mlp_experts=4, mlp_experts_active=0.5),
    "combined": dict(mlp_tokens=0.5, attn_tokens=0.6, attn_heads=0.5, mlp_experts=4, mlp_experts_active=0.5),
}


def tiny_llama(seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, layers: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def make_elastic(arch: str, component: str, seed: int = 0, **overrides) -> ef.ElasticModel:
    cfg = ef.ElasticConfig(**(ALL_COMPONENTS[component] | overrides))
    return ef.get_elastic_model(MODELS[arch](seed), cfg)


def tokens(B: int = 2, T: int = 20, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, T), generator=g)


def pretrained_like(seed=0) -> LlamaForCausalLM:
    """A tiny Llama with a larger init, so that what the routers skip changes its predictions measurably."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()
