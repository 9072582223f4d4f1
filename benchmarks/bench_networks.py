"""Per-network CPU speed: ms per low-resolution slice of 256x256 and 512x512, fp32 vs bf16.

Runs each registered super-resolution network as the engine does (`zoo.load_model` with random
weights: pre-upsampled models include their bicubic step, FMEN runs its deploy form), with
channels_last memory format, fp32 and bf16 autocast. One warm-up pass on a small slice, then
the best of `--repeats` timed passes per size. Prints a table.

    python benchmarks/bench_networks.py                    # all networks, x2, 256 and 512
    python benchmarks/bench_networks.py --scale 4 --networks fmen edsr_baseline --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedSRLib.models import registry as zoo  # noqa: E402

SR_NETWORKS = ("srcnn", "improved_srcnn", "vdsr", "fmen", "srresnet", "hybrid",
               "edsr_baseline", "edsr_multiscale", "mdrn")


def precision_context(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def time_slice(model: torch.nn.Module, size: int, precision: str, repeats: int) -> float:
    """Best wall time in ms of `model` on one (1, 1, size, size) slice."""
    x = torch.rand(1, 1, size, size).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.inference_mode(), precision_context(precision):
        for _ in range(repeats):
            started = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - started)
    return best * 1000.0


def bench(names: list[str], scale: int, sizes: list[int], precisions: list[str],
          repeats: int) -> list[dict]:
    rows = []
    for name in names:
        spec = zoo.get_spec(name)
        net_scale = scale if scale in spec.scales else spec.scales[-1]
        torch.manual_seed(0)
        model = zoo.load_model(name, net_scale, allow_untrained=True)
        model = model.to(memory_format=torch.channels_last)
        row = {"name": name, "kind": spec.kind, "scale": net_scale,
               "parameters": zoo.parameter_count(model.network)}
        for precision in precisions:
            time_slice(model, 64, precision, 1)  # warm-up (kernel selection, allocations)
            for size in sizes:
                row[f"{size} {precision}"] = time_slice(model, size, precision, repeats)
        rows.append(row)
        print_row(row, sizes, precisions, header=len(rows) == 1)
    return rows


def print_row(row: dict, sizes: list[int], precisions: list[str], header: bool) -> None:
    columns = [f"{s} {p}" for s in sizes for p in precisions]
    if header:
        print(f"{'network':<16}{'kind':<15}{'x':>3}{'params':>11}"
              + "".join(f"{c + ' ms':>14}" for c in columns))
    print(f"{row['name']:<16}{row['kind']:<15}{row['scale']:>3}{row['parameters']:>11,}"
          + "".join(f"{row[c]:>14.1f}" for c in columns), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(SR_NETWORKS))
    parser.add_argument("--scale", type=int, default=2, help="upscaling factor (default 2)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512],
                        help="LR slice edges in pixels (default 256 512)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per size (best kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, x{args.scale}, "
          f"ms per LR slice (best of {args.repeats}), channels_last")
    bench(args.networks, args.scale, args.sizes, args.precisions, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
