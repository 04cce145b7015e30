"""Prefill wall-clock of ElastiFormer head routing against the dense model (SmolLM2-135M, 4 x 512 random tokens).

    .venv/bin/python bench/head_routing_speed.py     # writes bench/results/head_routing_speed.json

Untrained head routers (speed does not depend on what they learned, only on how many heads run). Budgets and the
dense forward are timed interleaved (median of 3 after a warm-up), so drift of the machine hits them alike.
"""

import json
import statistics
import time
from pathlib import Path

import torch

import elastiformer as ef
from elastiformer.evaluation.timing import machine
from elastiformer.loading.models import load_model

BUDGETS = (0.8, 0.6)


def main(reps: int = 3) -> dict:
    torch.manual_seed(0)
    em = ef.get_elastic_model(load_model("smollm2-135m"), ef.ElasticConfig(attn_heads=0.8))
    em.eval()
    ids = torch.randint(0, em.base_model.config.vocab_size, (4, 512))  # (B, T)
    times: dict[str, list[float]] = {"dense": [], **{str(b): [] for b in BUDGETS}}
    flops = {}
    with torch.no_grad():
        for rep in range(reps + 1):
            for name in times:
                if name == "dense":
                    with em.disable_routers():
                        t0 = time.perf_counter()
                        em(input_ids=ids)
                else:
                    em.set_budget(float(name))
                    t0 = time.perf_counter()
                    em(input_ids=ids)
                    flops[name] = em.last_stats()["flops_ratio"]
                if rep:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
    dense = statistics.median(times["dense"])
    result = {"model": "smollm2-135m", "shape": [4, 512], "machine": machine(), "dense_seconds": dense,
              "records": [{"budget": float(b), "block_flops_ratio": flops[b],
                           "time_ratio": statistics.median(times[b]) / dense} for b in flops]}
    out = Path(__file__).parent / "results" / "head_routing_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["records"]), f"dense {dense:.2f}s -> {out}")
    return result


if __name__ == "__main__":
    main()
