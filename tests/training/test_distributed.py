"""The same training loop under `accelerate launch` with 2 CPU processes (DDP over gloo) on a tiny model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HELPERS_DIR, TESTS_DIR


def accelerate_launcher() -> str:
    """accelerate is a declared dependency: without its launcher beside this Python the tests fail, never skip."""
    found = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("accelerate's launcher is not installed beside this Python, and accelerate is a declared "
                    "dependency: pip install -e .", pytrace=False)
    return found


def test_train_under_accelerate_launch_with_two_processes(workspace, tmp_path):
    launcher = accelerate_launcher()
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_LOG_LEVEL="error")
    out = tmp_path / "ddp"
    # `--cpu` would take accelerate's MPI path; `--multi_gpu` launches through torchrun, and on a machine without a
    # GPU the processes join a gloo (MULTI_CPU) group
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "elastiformer", "train", "--model", str(workspace / "model"),
           "--data", str(workspace / "train.txt"), "--output", str(out), "--mlp-tokens", "0.5", "--steps", "3",
           "--seq-len", "16", "--batch-size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-8000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3
    assert log["tokens"] == 3 * 2 * 2 * 16  # steps x batch x 2 processes x seq_len: each process saw its own data
    assert (out / "routers" / "routers.safetensors").is_file()


def test_nan_on_one_process_stops_every_process(workspace, tmp_path):
    """A NaN loss on process 1 alone: both processes stop with the one-line error instead of process 0 waiting
    forever in backward's all-reduce."""
    launcher = accelerate_launcher()
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_LOG_LEVEL="error",
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "ddp"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(HELPERS_DIR / "ddp_nan_worker.py"), "train", "--model",
           str(workspace / "model"), "--data", str(workspace / "train.txt"), "--output", str(out), "--mlp-tokens",
           "0.5", "--steps", "4", "--seq-len", "16", "--batch-size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)  # a hang would time out here
    assert proc.returncode != 0
    assert proc.stderr.count("error: the loss became") == 2, proc.stderr[-4000:]  # one line from each process
    assert "on another process" in proc.stderr
    assert "ElastiformerError" not in proc.stderr  # our error was a message, not a traceback (the launcher adds its own)
    assert not (out / "routers").exists()
