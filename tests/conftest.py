"""Tiny random models built from configs (no hub): Llama with grouped-query attention, and GPT-2."""

import os

# Tiny models gain nothing from intra-op threads, and on a shared machine OpenMP threads spin-waiting for each other
# make a test run many times slower. Set before torch loads, so subprocesses the tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
torch.set_num_threads(1)

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import elastiformer as ef

hf_logging.set_verbosity_error()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(params=sorted(MODELS))
def arch(request):
    return request.param


@pytest.fixture(params=sorted(ALL_COMPONENTS))
def component(request):
    return request.param


def make_elastic(arch: str, component: str, seed: int = 0, **overrides) -> ef.ElasticModel:
    cfg = ef.ElasticConfig(**(ALL_COMPONENTS[component] | overrides))
    return ef.get_elastic_model(MODELS[arch](seed), cfg)


def tokens(B: int = 2, T: int = 20, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, T), generator=g)
