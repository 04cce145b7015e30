"""The `elastiformer` command in-process, its usual train arguments, and the tiny model folder it runs on (the
`workspace` fixture of tests/conftest.py builds one per test module)."""

import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from elastiformer import cli

WORDS = ("the a cat dog sat ran on under mat house far away and then came back home big small red blue green "
         "tree river walked slept quickly slowly over with without night day sun moon").split()


def make_workspace(root: Path) -> Path:
    """A tiny Llama + word-level tokenizer saved as a Hugging Face folder, and train / held-out text files."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                         initializer_range=0.2))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    (root / "train.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    (root / "held.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(800)))
    (root / "empty.txt").write_text("")
    return root


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the console entry point in-process; returns (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["elastiformer", *map(str, args)]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def train_args(ws: Path, output: Path, *extra) -> list:
    return ["train", "--model", ws / "model", "--data", ws / "train.txt", "--output", output, "--mlp-tokens", "0.5",
            "--attn-heads", "0.5", "--steps", "4", "--seq-len", "16", "--batch-size", "2", "--checkpoint-every", "2",
            *extra]
