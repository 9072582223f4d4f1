"""Through-plane benchmark: held-out thin-slice CT and MR made thick (box profile, x3 and x5,
one case with a gap), scored against the thin truth for cubic-z, today's isotropic path, the
through-plane network and the adapted network; sagittal-reformat figures.

    python benchmarks/bench_through_plane.py --held-out ../shared/data --out benchmarks/results/through_plane

is the same as `medsr benchmark --through-plane --held-out ../shared/data --out ...` (protocol:
MedSRLib/evaluation/through_plane.py). Adaptation timing on a 512x512x60 CT:
`python benchmarks/bench_through_plane.py --adapt-timing ../shared/data/ct/crlm-ct-1004-dicom`.
Speed against another through-plane network (e.g. the previous release's) in one process:
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
    """CPU seconds of the shipped through-plane network and of `baseline_weights` on a thick
    volume to 1 mm (one thread, no adaptation), interleaved in one process after a warm-up of
    each on a 64 x 64 crop; prints the CPU flags and the ratio shipped / baseline (medians of
    `rounds`)."""
    import statistics

    import MedSRLib
    from bench_runtime import cpu_flags

    image = MedSRLib.read_volume(path)
    target = (image.GetSpacing()[0], image.GetSpacing()[1], 1.0)
    seconds: dict[str, list[float]] = {"shipped": [], "baseline": []}
    for weights in (None, baseline_weights):   # warm-up: loading, first calls
        MedSRLib.upscale(image[:64, :64, :], target_spacing=target, weights=weights, threads=1)
    for _ in range(rounds):
        for label, weights in (("shipped", None), ("baseline", baseline_weights)):
            cpu = time.process_time()
            out = MedSRLib.upscale(image, target_spacing=target, weights=weights, threads=1)
            seconds[label].append(time.process_time() - cpu)
    shipped, baseline = (statistics.median(seconds[k]) for k in ("shipped", "baseline"))
    print(f"CPU flags: {cpu_flags()}")
    print(f"{path} {image.GetSize()} -> {out.GetSize()}, 1 thread: shipped {shipped:.0f} CPU s, "
          f"baseline {baseline:.0f} CPU s, ratio {shipped / baseline:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--adapt-timing":
        sys.exit(adapt_timing(sys.argv[2]))
    if len(sys.argv) == 4 and sys.argv[1] == "--speed":
        sys.exit(speed(sys.argv[2], sys.argv[3]))
    sys.exit(benchmark.main(["--through-plane", *sys.argv[1:]]))
