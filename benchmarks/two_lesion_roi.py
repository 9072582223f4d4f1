"""`--roi auto` on a volume with two separate real tumours (issue 19's two-lesion case).

The volume: the T1 MR of held-out sarcoma patients STS_012 and STS_014 side by side along x,
each scaled to its own 0.5th/99.5th percentiles -> 0..1000 and zero-padded to one y and z size
(the recipe's test composite, `MedSRLib.training.lesion_composites`), degraded in-plane x2 (anti-aliased bicubic). Printed per localiser weights: the ROIs (margin
included, merged as `upscale(roi="auto")` merges them) and the share of each tumour's HR voxels
inside each ROI; with `--upscale`, also the lesion-focused output's PSNR gain over bicubic inside
each tumour.

    python benchmarks/two_lesion_roi.py --data-root ../shared/data \
        [--weights W.safetensors ...] [--upscale]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedSRLib import api  # noqa: E402
from MedSRLib.roi import localiser as loc, focus as roi, boxes as roi_boxes
from MedSRLib.training import localiser_calibration as calib  # noqa: E402
from MedSRLib.training.lesion_composites import read_composite  # noqa: E402
from MedSRLib.training.localiser import composite_cases  # noqa: E402

PATIENTS = ("STS_012", "STS_014")


def two_tumour_volume(root: Path) -> tuple[sitk.Image, list[np.ndarray]]:
    """The HR volume (0.98 x 0.98 x 3.27 mm) and each tumour's HR mask (K, J, I) bool: the held-out
    test composite of the localiser recipe (`lesion_composites`)."""
    composite = next(c for c in composite_cases("test")
                     if c.modality == "MR" and all(p in c.name for p in PATIENTS))
    return read_composite(root, composite)


def psnr_in(mask: np.ndarray, estimate: np.ndarray, truth: np.ndarray) -> float:
    error = float(((estimate[mask] - truth[mask]) ** 2).mean())
    return 10 * np.log10(1000.0 ** 2 / error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--weights", nargs="*", default=[None],
                        help="localiser safetensors (default and \"\": the shipped one)")
    parser.add_argument("--upscale", action="store_true", help="also run upscale(roi='auto')")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hr, tumours = two_tumour_volume(args.data_root.resolve())
    lr = calib.low_resolution(hr, 2)
    margins = roi.margin_voxels(roi.DEFAULT_MARGIN_MM, lr.GetSpacing())
    truth = sitk.GetArrayFromImage(hr).astype(np.float64)
    for weights in (w or None for w in args.weights):  # "": the shipped weights
        found = loc.find_regions(lr, weights_path=weights)
        regions = roi_boxes.merge_overlapping(found.regions, margins, lr.GetSize())
        boxes = [r.box.grown(margins, lr.GetSize()).scaled((2, 2, 1)) for r in regions]
        print(f"{weights or 'shipped lesion_segmenter'}: {len(regions)} ROI(s), confidence "
              f"{[round(r.confidence, 2) for r in regions]}")
        for patient, tumour in zip(PATIENTS, tumours):
            shares = [roi.lesion_coverage(tumour, roi_boxes.union_mask([box], tumour.shape))
                      .voxel_fraction for box in boxes]
            print(f"  {patient} tumour: share inside each ROI {[f'{v:.0%}' for v in shares]}")
        if args.upscale:
            out = sitk.GetArrayFromImage(api.upscale(lr, scale=2, roi="auto",
                                                     detector_weights=weights,
                                                     output_float=True)).astype(np.float64)
            bicubic = sitk.GetArrayFromImage(api.upscale(lr, scale=2, model="bicubic",
                                                         output_float=True)).astype(np.float64)
            for patient, tumour in zip(PATIENTS, tumours):
                print(f"  {patient} tumour: lesion-focused output "
                      f"{psnr_in(tumour, out, truth) - psnr_in(tumour, bicubic, truth):+.2f} dB "
                      f"over bicubic")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
