"""Session setup shared by every test folder, and the fixtures used across them.

Helpers that are not fixtures (tiny model builders, inputs, the in-process command line) live in tests/helpers/.
"""

import os

# Tiny models gain nothing from intra-op threads, and on a shared machine OpenMP threads spin-waiting for each other
# make a test run many times slower. Set before torch loads, so subprocesses the tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
torch.set_num_threads(1)

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers.cli import make_workspace  # noqa: E402
from helpers.models import ALL_COMPONENTS, MODELS  # noqa: E402


@pytest.fixture(params=sorted(MODELS))
def arch(request):
    return request.param


@pytest.fixture(params=sorted(ALL_COMPONENTS))
def component(request):
    return request.param


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny Llama + word-level tokenizer saved as a Hugging Face folder, and train / held-out text files (one per
    test module)."""
    return make_workspace(tmp_path_factory.mktemp("cli"))
