"""Time of the lesion localiser: the shipped ensemble against the first segmenter alone.

Both run `find_regions` (its default path: `localiser.FIND_RUNTIME`, `FIND_SLICE_GAP_MM`) on the
same volumes in one process, interleaved, twice each (the tiled 300-slice CT once); the last
run's wall time is printed with the ratio and the CPU flags. The finder against the SR run it
serves, and its fast paths against the reference map: `lesion_focus_time.py`.

    python benchmarks/localiser_time.py --data-root ../shared/data [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedSRLib.io import volumes as io  # noqa: E402
from MedSRLib.roi import localiser as loc
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import cpu_flags  # noqa: E402

FIRST_SEGMENTER = Path(__file__).resolve().parent / "results/localiser/candidates/S200/lesion_segmenter.safetensors"
#: Validation patients only (sarcoma STS_010, BraTS pat0005): nothing here touches a test patient.
VOLUMES = ("sarcoma/STS_010/MR_T1_image.nii.gz", "ct/totalseg-example-ct.nii.gz",
           "brats/brats_2013_pat0005_1/T1c_subtrMeanDivStd.nii.gz", "ct/crlm-ct-1004-dicom")
TALL_SLICES = 300


def tall_ct(image: sitk.Image, slices: int) -> sitk.Image:
    """`image`'s slices repeated (forwards, then backwards, ...) to `slices` slices of 1 mm: the
    size of a thin-slice abdominal CT, for timing only."""
    voxels = sitk.GetArrayFromImage(image)
    repeats = -(-slices // (2 * voxels.shape[0]))
    tall = sitk.GetImageFromArray(np.concatenate([voxels, voxels[::-1]] * repeats)[:slices])
    tall.SetSpacing(tuple(image.GetSpacing()[:2]) + (1.0,))
    return tall


def compared_localisers(description: str, argv: list[str] | None
                        ) -> tuple[argparse.Namespace, dict[str, loc.Localiser]]:
    """The command line (--data-root, --threads, --also; torch threads set) and the localisers
    compared: the first segmenter alone, the shipped ensemble and any `--also` weights files
    (e.g. a candidate before it ships)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--also", type=Path, nargs="*", default=[],
                        help="further localiser weights files (with their cards) to compare")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args, {"first segmenter alone": loc.load_ensemble(FIRST_SEGMENTER),
                  "shipped ensemble": loc.load_ensemble(),
                  **{str(path): loc.load_ensemble(path) for path in args.also}}


def main(argv: list[str] | None = None) -> int:
    args, localisers = compared_localisers(__doc__.splitlines()[0], argv)
    print(f"CPU flags: {cpu_flags()}; torch threads {args.threads}")
    volumes = [(relative, io.read_volume(args.data_root / relative), 2) for relative in VOLUMES]
    volumes.append((f"{VOLUMES[-1]} tiled to {TALL_SLICES} slices",
                    tall_ct(volumes[-1][1], TALL_SLICES), 1))   # warm by then: one round
    for relative, image, rounds in volumes:
        seconds = {}
        for _ in range(rounds):  # the last round is reported (first-call costs excluded)
            for name, localiser in localisers.items():
                start = time.perf_counter()
                loc.find_regions(image, localiser=localiser)
                seconds[name] = time.perf_counter() - start
        ratio = seconds["shipped ensemble"] / seconds["first segmenter alone"]
        print(f"{relative} {image.GetSize()}: " + ", ".join(
            f"{name} {value:.1f} s" for name, value in seconds.items()) + f"; ratio {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
