"""A real training run in its own process, for the kill-and-resume test (tests/core/test_hardening.py).

`python tests/helpers/train_worker.py OUTPUT [--resume] [--step-delay SECONDS]` trains the routers of a tiny random
Llama (built from a config and a seed, so every process builds the same one) with a checkpoint after every step. The
delay (a sleep in a forward hook) stretches the run so that the test can SIGKILL it at a step of its choosing.
One CPU thread, so this process and the test's own in-process runs compute bit for bit the same numbers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `helpers`

STEPS = 10
OPTIONS = dict(steps=STEPS, batch_size=4, lr=1e-2, seed=3, checkpoint_every=1, grad_accum=2, progress=False)


def build():
    """The tiny elastic model and its data, identical in every process."""
    import elastiformer as ef
    from helpers.models import pretrained_like, tokens

    em = ef.get_elastic_model(pretrained_like(seed=0), ef.ElasticConfig(mlp_tokens=0.6, attn_heads=0.5))
    return em, tokens(B=32, T=16, seed=4)


def train(output: Path, resume: bool = False, step_delay: float = 0.0):
    from elastiformer.training.routers import train_routers

    em, data = build()
    if step_delay:
        em.base_model.register_forward_hook(lambda *_: time.sleep(step_delay))
    train_routers(em, data, output_dir=output, resume=resume, **OPTIONS)
    return em


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    delay = float(args[args.index("--step-delay") + 1]) if "--step-delay" in args else 0.0
    train(Path(args[0]), resume="--resume" in args, step_delay=delay)
