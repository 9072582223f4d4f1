"""PSNR gain over bicubic inside held-out tumours: the default model on the whole volume against
lesion-focused runs (`upscale(roi="auto")`, the ROI model inside the localiser's ROIs).

Volumes: the held-out CT and T1 MR of STS_012 and STS_014 and BraTS pat0006 T1c, each degraded
in-plane by x2 and x4 (anti-aliased bicubic); PSNR over the tumour mask's voxels, in the HR
volume's 0.5-99.5 percentile range. `--roi-weights W` adds a lesion-focused run with LFSR weights
W (e.g. a retrained candidate); `--modality` is not passed, so LFSR runs on every volume.

    python benchmarks/roi_lesion_gain.py --data-root ../shared/data [--roi-weights X2 X4]
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
from MedSRLib.training.localiser_calibration import low_resolution  # noqa: E402

VOLUMES = (("sarcoma/STS_012/CT_image", "sarcoma/STS_012/CT_mask", "CT"),
           ("sarcoma/STS_014/CT_image", "sarcoma/STS_014/CT_mask", "CT"),
           ("sarcoma/STS_012/MR_T1_image", "sarcoma/STS_012/MR_T1_mask", "MR"),
           ("sarcoma/STS_014/MR_T1_image", "sarcoma/STS_014/MR_T1_mask", "MR"),
           ("brats/brats_2013_pat0006_1/T1c_subtrMeanDivStd", "brats/brats_2013_pat0006_1/OTMultiClass", "MR"))


def psnr_inside(mask: np.ndarray, estimate: np.ndarray, truth: np.ndarray, value_range: float) -> float:
    mse = float(np.mean((estimate[mask] - truth[mask]) ** 2))
    return 10 * np.log10(value_range ** 2 / mse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--roi-weights", nargs=2, default=None, metavar=("X2", "X4"),
                        help="also run LFSR with these x2 and x4 weights files")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {"default model": {}, "roi auto, shipped lfsr": {"roi": "auto", "roi_model": "lfsr"}}
    gains: dict[tuple[str, int, str], list[float]] = {}
    for image_name, mask_name, modality in VOLUMES:
        hr = sitk.ReadImage(str(args.data_root / f"{image_name}.nii.gz"))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(args.data_root / f"{mask_name}.nii.gz"))) > 0
        for factor in (2, 4):
            size = [n // factor * factor if a < 2 else n for a, n in enumerate(hr.GetSize())]
            cropped, inside = hr[:size[0], :size[1], :], mask[:, :size[1], :size[0]]
            lr = low_resolution(cropped, factor)
            truth = sitk.GetArrayFromImage(cropped).astype(np.float32)
            value_range = float(np.percentile(truth, 99.5) - np.percentile(truth, 0.5))

            def score(**kwargs) -> float:
                out = api.upscale(lr, scale=factor, output_float=True, **kwargs)
                return psnr_inside(inside, sitk.GetArrayFromImage(out), truth, value_range)

            bicubic = score(model="bicubic")
            row = {name: score(**kwargs) - bicubic for name, kwargs in runs.items()}
            if args.roi_weights:
                weights = args.roi_weights[0 if factor == 2 else 1]
                row["roi auto, --roi-weights"] = score(roi="auto", roi_model="lfsr", roi_weights=weights)  \
                    - bicubic
            for name, gain in row.items():
                gains.setdefault((modality, factor, name), []).append(gain)
            print(f"{image_name} x{factor}: " + ", ".join(f"{k} {v:+.2f} dB" for k, v in row.items()),
                  flush=True)
    print("\nmean gain over bicubic inside the tumours:")
    for (modality, factor, name), values in sorted(gains.items()):
        print(f"  {modality} x{factor} {name}: {np.mean(values):+.2f} dB ({len(values)} volumes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
