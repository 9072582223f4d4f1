"""Least-squares linear filters as a calibration point for the held-out benchmark.

The weights issue calibrates its quality bar with "a linear 7x7 filter fitted by least squares
gains about +1.7 dB at x2". This script fits that filter on the default recipe's training
slices and scores it on the benchmark's held-out slices with the benchmark's own code
(normalisation, degradation, slice choice, PSNR with crop_border = scale), so a reader can
compare our held-out set with the calibration's. Two readings of "7x7 linear filter":

- hr_grid: a 7x7 filter (+ bias) applied to the bicubic-upsampled image;
- lr_grid: one 7x7 filter (+ bias) per output sub-pixel phase on the LR image (sub-pixel).

Closed-form least squares, written by hand because it is 20 lines of torch (no library fits
a convolution kernel by normal equations).

    python benchmarks/linear_filter_calibration.py --data-root ../shared/data --modality CT --scales 2 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedSRLib.evaluation import benchmark  # noqa: E402
from MedSRLib.transforms import intensity
from MedSRLib import metrics
from MedSRLib.training import config as tconfig, data as tdata  # noqa: E402
from MedSRLib.transforms import degrade

KERNEL = 7
TRAIN_SLICES_PER_VOLUME = 6


def _windows(image: torch.Tensor) -> torch.Tensor:
    """(H*W, 50) float64: every pixel's 7x7 neighbourhood (replicate padding) and a 1 for the bias."""
    r = KERNEL // 2
    cols = F.unfold(F.pad(image, (r, r, r, r), mode="replicate"), KERNEL)[0].T.double()
    return torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=cols.dtype)], 1)


def _pair(hr_plane: np.ndarray, scale: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hr = degrade.crop_to_multiple(torch.from_numpy(np.ascontiguousarray(hr_plane))[None, None].float(),
                                  (scale, scale))
    low = degrade.bicubic_downsample(hr, scale)
    return hr, low, degrade.bicubic_upsample(low, hr.shape[-2:])


def _design(hr: torch.Tensor, low: torch.Tensor, up: torch.Tensor, scale: int, grid: str):
    """Design matrix and targets: HR pixels (hr_grid) or the scale**2 sub-pixels of each LR pixel."""
    if grid == "hr_grid":
        return _windows(up), hr[0, 0].reshape(-1, 1).double()
    return _windows(low), F.pixel_unshuffle(hr, scale)[0].reshape(scale * scale, -1).T.double()


def _predict(weights: torch.Tensor, hr, low, up, scale: int, grid: str) -> torch.Tensor:
    design, _ = _design(hr, low, up, scale, grid)
    out = (design @ weights).float()
    if grid == "hr_grid":
        return out.reshape(hr.shape)
    return F.pixel_shuffle(out.T.reshape(1, scale * scale, *low.shape[-2:]), scale)


def training_planes(recipe: str, data_root: Path, modality: str) -> list[np.ndarray]:
    cfg = tconfig.load_config(recipe)
    split = tdata.split_sources(cfg["data"]["sources"], data_root)
    planes = []
    for item in split.train:
        if item.modality != modality:
            continue
        volume = tdata.read_volume_array(data_root / item.path)
        unit = intensity.fit_mapping(volume).to_unit(volume)
        planes += [unit[z] for z in benchmark.choose_slices(unit, TRAIN_SLICES_PER_VOLUME)]
    return planes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--modality", default="CT", choices=["CT", "MR"])
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--recipe", default="edsr_lite_x2", help="recipe whose training split is used")
    args = parser.parse_args(argv)
    root = args.data_root.resolve()
    train = training_planes(args.recipe, root, args.modality)
    paths = benchmark.held_out_inputs(root, args.modality)
    held_out = [s for p, label in zip(paths, benchmark.volume_labels(paths))
                for s in benchmark.load_slices(p, label, 3, None)]
    print(f"{args.modality}: fitted on {len(train)} training slices ({args.recipe} split), "
          f"scored on {len(held_out)} held-out slices of {len(paths)} volumes")
    for scale in args.scales:
        for grid in ("hr_grid", "lr_grid"):
            gram, cross = 0, 0
            for plane in train:
                design, target = _design(*_pair(plane, scale), scale, grid)
                mask = (target.mean(1) > benchmark.FOREGROUND_THRESHOLD) | (torch.rand(len(target)) < 0.2)
                gram = gram + design[mask].T @ design[mask]
                cross = cross + design[mask].T @ target[mask]
            weights = torch.linalg.solve(gram + 1e-6 * torch.eye(gram.shape[0], dtype=gram.dtype), cross)
            gains = []
            for item in held_out:
                hr, low, up = _pair(item.hr_unit, scale)
                out = _predict(weights, hr, low, up, scale, grid)
                gains.append(float(metrics.psnr(out, hr, 1.0, crop_border=scale)
                                   - metrics.psnr(up, hr, 1.0, crop_border=scale)))
            print(f"x{scale} {grid}: mean PSNR gain over bicubic {np.mean(gains):+.2f} dB "
                  f"(per slice {', '.join(f'{g:+.2f}' for g in gains)})")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
