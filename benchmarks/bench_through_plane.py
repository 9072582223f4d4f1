"""Through-plane benchmark: held-out thin-slice CT and MR made thick (box profile, x3 and x5,
one case with a gap), scored against the thin truth for cubic-z, today's isotropic path, the
through-plane network and the adapted network; sagittal-reformat figures.

    python benchmarks/bench_through_plane.py --held-out ../shared/data --out benchmarks/results/through_plane

is the same as `medsr benchmark --through-plane --held-out ../shared/data --out ...` (protocol:
MedSRLib/evaluation/through_plane.py). Adaptation timing on a 512x512x60 CT:
`python benchmarks/bench_through_plane.py --adapt-timing ../shared/data/ct/crlm-ct-1004-dicom`.
Speed of the automatic path and of torch against another through-plane network (e.g. the
previous release's, in torch) in one process:
`python benchmarks/bench_through_plane.py --speed ../shared/data/ct/crlm-ct-1004-dicom OLD.safetensors`.
"""

from __future__ import annotations

import sys
import time

from MedSRLib.evaluation import through_plane as benchmark


def adapt_timing(path: str) -> int:
    """CPU and wall seconds of adapt (default budget) + apply on a thick CT, x5 to 1 mm."""
    import MedSRLib

    image = MedSRLib.read_volume(path)
    for adapt in (False, True):
        wall, cpu = time.perf_counter(), time.process_time()
        out = MedSRLib.upscale(image, target_spacing=(image.GetSpacing()[0], image.GetSpacing()[1], 1.0),
                               adapt=adapt, threads=1)
        print(f"{path} {image.GetSize()} -> {out.GetSize()} adapt={adapt}: "
              f"{time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} CPU s "
              f"({out.GetMetaData('medsr_model')})", flush=True)
    return 0


def speed(path: str, baseline_weights: str, rounds: int = 1) -> int:
    """CPU and wall seconds on a thick volume to 1 mm (one thread, no adaptation), interleaved in
    one process after a warm-up of each on a 64 x 64 crop (medians of `rounds`):
    the shipped network on the automatic path (OpenVINO where installed), the shipped network in
    torch (the automatic path before the OpenVINO backend) and `baseline_weights` in torch (the
    previous release's automatic path). Prints the CPU flags and the ratios to the baseline."""
    import statistics

    import MedSRLib
    from bench_runtime import cpu_flags

    image = MedSRLib.read_volume(path)
    target = (image.GetSpacing()[0], image.GetSpacing()[1], 1.0)
    runs = {"shipped, automatic": (None, "auto"), "shipped, torch": (None, "torch"),
            "baseline, torch": (baseline_weights, "torch")}
    cpu_seconds: dict[str, list[float]] = {label: [] for label in runs}
    wall_seconds: dict[str, list[float]] = {label: [] for label in runs}
    for weights, backend in runs.values():   # warm-up: loading, conversion, first calls
        MedSRLib.upscale(image[:64, :64, :], target_spacing=target, weights=weights, threads=1,
                         backend=backend)
    for _ in range(rounds):
        for label, (weights, backend) in runs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            out = MedSRLib.upscale(image, target_spacing=target, weights=weights, threads=1, backend=backend)
            cpu_seconds[label].append(time.process_time() - cpu)
            wall_seconds[label].append(time.perf_counter() - wall)
    print(f"CPU flags: {cpu_flags()}")
    print(f"{path} {image.GetSize()} -> {out.GetSize()}, 1 thread, medians of {rounds}:")
    base = statistics.median(cpu_seconds["baseline, torch"])
    for label in runs:
        cpu, wall = statistics.median(cpu_seconds[label]), statistics.median(wall_seconds[label])
        print(f"  {label}: {cpu:.0f} CPU s ({wall:.0f} s wall), {cpu / base:.2f}x the baseline", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--adapt-timing":
        sys.exit(adapt_timing(sys.argv[2]))
    if len(sys.argv) == 4 and sys.argv[1] == "--speed":
        sys.exit(speed(sys.argv[2], sys.argv[3]))
    sys.exit(benchmark.main(["--through-plane", *sys.argv[1:]]))
