"""PSNR inside the VALIDATION lesion masks of candidate in-plane weights against the shipped
ones: a quick check of a model meant for the ROI of lesion-focused runs, before the full ROI
pipeline (`roi_lesion_gain.py`).

Per lesion slice of `evaluation.lesion_focus.VALIDATION_VOLUMES` (sarcoma STS_008, STS_010 CT
and T1 MR; BraTS pat0005 T1c tumour core, FLAIR whole tumour): the benchmark's protocol
(each volume's 0.5th / 99.5th percentiles -> 0 / 1, anti-aliased bicubic degradation, the
slice super-resolved whole, bf16), PSNR and SSIM over the lesion voxels of the volume
(`lesion_focus.inside_scores`).

Run: python benchmarks/candidate_lesion_step.py --candidate DIR --scale 4 [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from MedSRLib.evaluation import lesion_focus as lf
from MedSRLib.models import registry as zoo
from MedSRLib.runtime.engine import EngineOptions, SliceUpscaler
from MedSRLib.transforms import degrade, intensity

def volume_scores(volume: lf.LesionVolume, root: Path, upscalers: dict[str, SliceUpscaler],
                  scale: int) -> dict[str, tuple[float, float]]:
    """{method: (PSNR dB, SSIM) inside the lesion} of one volume, bicubic included, pooled over
    its lesion slices by the protocol's `lesion_focus.inside_scores` (data range 1)."""
    image, mask = lf.read_lesion_volume(root, volume)
    hr = sitk.GetArrayFromImage(image)
    unit = intensity.fit_mapping(hr).to_unit(hr).astype(np.float32)
    steps = degrade.with_scale([{"type": "bicubic"}], scale)
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in [*upscalers, "bicubic"]}
    truths, masks = [], []
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        truth = degrade.crop_to_multiple(torch.from_numpy(unit[k])[None, None], (scale, scale))
        lr = degrade.apply_pipeline(truth, steps)
        for name, upscaler in upscalers.items():
            outputs[name].append(upscaler.upscale(lr[:, 0].numpy())[0])
        outputs["bicubic"].append(degrade.bicubic_upsample(lr, truth.shape[-2:])[0, 0].numpy())
        truths.append(truth[0, 0].numpy())
        masks.append(mask[k][:truth.shape[-2], :truth.shape[-1]])
    truth_kji, mask_kji = np.stack(truths), np.stack(masks)
    return {name: lf.inside_scores(np.stack(o), truth_kji, mask_kji, 1.0) for name, o in outputs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", type=Path, required=True, help="folder of the candidate weights")
    parser.add_argument("--model", default="edsr_lite")
    parser.add_argument("--scale", type=int, required=True)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    factors = (args.scale, args.scale)
    models = {"shipped": zoo.load_model(args.model, factors),
              "candidate": zoo.load_model(args.model, factors, weights_dir=args.candidate)}
    upscalers = {name: SliceUpscaler(m, factors, EngineOptions(precision="bf16")) for name, m in models.items()}
    steps = []
    for volume in lf.VALIDATION_VOLUMES:
        row = volume_scores(volume, args.data_root, upscalers, args.scale)
        steps.append(row["candidate"][0] - row["shipped"][0])
        print(f"{volume.name:48s} " + "  ".join(f"{name} {psnr:.2f} / {ssim:.4f}" for name, (psnr, ssim)
                                                in row.items())
              + f"  step {steps[-1]:+.3f} dB", flush=True)
    print(f"mean step {np.mean(steps):+.3f} dB (PSNR dB / SSIM inside the lesion masks)")


if __name__ == "__main__":
    main()
