"""Wall-clock of fitting an allocation with and without replaying the blocks before each candidate's layer.

    .venv/bin/python bench/allocation_replay_speed.py     # writes bench/results/allocation_replay_speed.json

SmolLM2-135M with MLP-token routers (untrained: the fit's cost does not depend on what they learned), one
calibration batch of 2 x 256 tokens of the training books, levels 0.5 / 0, the path down to 0.85 of the routed
FLOPs. The same fit runs twice, with `replay=False` (every block of every candidate runs) and `replay=True`
(`elastiformer/block_replay.py`), and the two paths must agree move for move. Take it on a quiet machine.
"""

import json
import time
from pathlib import Path

import torch

import elastiformer as ef
from elastiformer import calibration
from elastiformer.data.text import load_texts, pack_sequences
from elastiformer.evaluation.timing import machine
from elastiformer.loading.models import load_model, load_tokenizer


def main() -> dict:
    torch.manual_seed(0)
    em = ef.get_elastic_model(load_model("smollm2-135m"), ef.ElasticConfig(mlp_tokens=0.8))
    ids = pack_sequences(load_texts(None, split="train"), load_tokenizer("smollm2-135m"), 256, max_sequences=2)
    batch = [{"input_ids": ids}]  # (2, 256)
    runs = {}
    for replay in (False, True):
        t0 = time.perf_counter()
        calibration.fit_allocation(em, batch, max_batches=1, min_budget=0.85, levels=(0.5, 0.0), progress=False,
                                   replay=replay)
        alloc = em.allocation
        runs[replay] = {"seconds": time.perf_counter() - t0, "moves": [list(vars(m).values()) for m in alloc.moves],
                        "cost": alloc.cost}
    full, fast = runs[False], runs[True]
    same = full["moves"] == fast["moves"] and max(abs(a - b) for a, b in zip(full["cost"], fast["cost"])) < 1e-6
    result = {"model": "smollm2-135m", "component": "mlp_tokens", "calibration_tokens": int(ids.numel()),
              "levels": [0.5, 0.0], "min_budget": 0.85, "machine": machine(), "threads": torch.get_num_threads(),
              "moves": len(fast["moves"]), "same_path": same, "seconds_every_block": full["seconds"],
              "seconds_replayed": fast["seconds"], "time_ratio": fast["seconds"] / full["seconds"]}
    out = Path(__file__).parent / "results" / "allocation_replay_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}), f"-> {out}")
    return result


if __name__ == "__main__":
    main()
