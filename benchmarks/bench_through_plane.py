"""Through-plane benchmark: held-out thin-slice CT and MR made thick (box profile, x3 and x5,
one case with a gap), scored against the thin truth for cubic-z, today's isotropic path, the
through-plane network and the adapted network; sagittal-reformat figures.

    python benchmarks/bench_through_plane.py --held-out ../shared/data --out benchmarks/results/through_plane

is the same as `medsr benchmark --through-plane --held-out ../shared/data --out ...` (protocol:
MedSRLib/evaluation/through_plane.py). Adaptation timing on a 512x512x60 CT:
`python benchmarks/bench_through_plane.py --adapt-timing ../shared/data/ct/crlm-ct-1004-dicom`.
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--adapt-timing":
        sys.exit(adapt_timing(sys.argv[2]))
    sys.exit(benchmark.main(["--through-plane", *sys.argv[1:]]))
