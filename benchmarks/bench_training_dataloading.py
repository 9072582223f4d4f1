"""Does data loading starve training? it/s with the real MONAI loader vs one fixed in-memory batch.

    python benchmarks/bench_training_dataloading.py [RECIPE] [--steps 20] [--workers 0 1]
        [--precision fp32 bf16] [--set key=value ...]

For each (workers, precision) it reports: loader-only batches/s, training it/s on real batches
(data loading included), training it/s on a fixed batch (compute only), and the share of the
step spent waiting for data. Volumes are decoded once (cache) before timing starts.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from MedSRLib.training.config import load_config
from MedSRLib.training.trainer import Trainer


def measure(config: dict, steps: int) -> dict[str, float]:
    trainer = Trainer(config, output_dir="/tmp/medsr_bench_unused", progress=False)
    trainer.sampler.set_position(0, 0)
    iterator = iter(trainer.loader)
    batch, iterator = trainer._next_batch(iterator)
    trainer.train_step(batch)  # warm-up (allocations, autocast caches)

    start = time.perf_counter()
    for _ in range(steps):
        _, iterator = trainer._next_batch(iterator)
    loader_rate = steps / (time.perf_counter() - start)

    waited = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        tick = time.perf_counter()
        real, iterator = trainer._next_batch(iterator)
        waited += time.perf_counter() - tick
        trainer.train_step(real)
    real_elapsed = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    fixed_elapsed = time.perf_counter() - start
    return {"loader_batches_per_s": round(loader_rate, 2), "it_per_s_real_data": round(steps / real_elapsed, 2),
            "it_per_s_fixed_batch": round(steps / fixed_elapsed, 2),
            "data_wait_share": round(waited / real_elapsed, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="edsr_baseline_x2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for workers in args.workers:
        for precision in args.precision:
            config = load_config(args.recipe, [*args.overrides, f"data.num_workers={workers}",
                                               f"train.precision={precision}"])
            result = measure(config, args.steps)
            print(json.dumps({"recipe": args.recipe, "workers": workers, "precision": precision, **result}),
                  flush=True)


if __name__ == "__main__":
    main()
