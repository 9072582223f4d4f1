"""Draw the README's picture: a thick-slice volume made thin, in a coronal view.

A thin-slice MR (contrast-enhanced T1 of the brain, 1 mm slices; a validation volume that no
shipped network was trained on) is made thick along z by averaging every `FACTOR` consecutive
1 mm slices (a box slice profile, what a thick reconstruction does), then brought back to 1 mm
slices by cubic interpolation and by MedSR (`MedSRLib.upscale(thick, scale=(1, 1, FACTOR))`,
the shipped through-plane network). The picture shows one coronal plane: thick input | cubic |
MedSR | the original 1 mm slices, and below, the same zoomed detail of each, with the PSNR of
that plane against the original.

    python docs/scripts/make_readme_figure.py --data-root /path/to/shared/data

writes docs/assets/thick-to-thin.png (about 3 minutes on 2 busy cores; needs matplotlib, from
the `docs` extra). Only public MedSRLib calls are used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

import MedSRLib  # noqa: E402

#: the volume: skull-stripped contrast T1 brain MR, 0.98 x 0.98 x 1.0 mm (niivue-demo-images)
VOLUME = "mr/brain-t1-gd-skullstripped.nii.gz"
FACTOR = 5
#: coronal planes kept around the shown one (the network also runs sagittal planes)
BAND = 96
OUT = Path(__file__).resolve().parents[1] / "assets" / "thick-to-thin.png"


def make_thick(thin_zyx: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each run of `factor` consecutive slices along array axis 0 (box profile)."""
    n = thin_zyx.shape[0] // factor
    return thin_zyx[: n * factor].reshape(n, factor, *thin_zyx.shape[1:]).mean(axis=1)


def cubic_z(thick_zyx: np.ndarray, factor: int) -> np.ndarray:
    """Cubic (Keys) interpolation along z onto the thin grid, slice centres aligned: thin slice
    j sits at thick coordinate (j + 0.5) / factor - 0.5 (torch's align_corners=False)."""
    planes = torch.from_numpy(np.ascontiguousarray(thick_zyx.transpose(1, 0, 2)))[:, None]  # (y, 1, z, x)
    thin = torch.nn.functional.interpolate(planes, scale_factor=(factor, 1), mode="bicubic",
                                           align_corners=False)
    return thin[:, 0].numpy().transpose(1, 0, 2)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    return float(10 * np.log10(data_range ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--save-arrays", help="also save the coronal views (.npz), to redraw quickly")
    parser.add_argument("--zoom", default="0.42,0.80,0.06,0.44",
                        help="zoomed box as fractions of the coronal view: top,bottom,left,right")
    args = parser.parse_args()

    image = MedSRLib.read_volume(str(Path(args.data_root) / VOLUME))
    thin = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    spacing_x, spacing_y, spacing_z = image.GetSpacing()
    y0 = thin.shape[1] // 2 - BAND // 2
    thin = thin[:, y0:y0 + BAND, :]
    thick = make_thick(thin, FACTOR)
    truth = thin[: thick.shape[0] * FACTOR]

    thick_image = sitk.GetImageFromArray(thick)
    thick_image.SetSpacing((spacing_x, spacing_y, spacing_z * FACTOR))
    sr = sitk.GetArrayFromImage(MedSRLib.upscale(thick_image, scale=(1, 1, FACTOR),
                                                 output_float=True))
    cubic = cubic_z(thick, FACTOR)
    nearest = np.repeat(thick, FACTOR, axis=0)

    plane = BAND // 2
    window = (0.0, float(np.percentile(truth, 99.5)))
    # physical aspect: z pixels are spacing_z / spacing_x times taller than x pixels
    aspect = spacing_z / spacing_x
    panels = {"thick input (5 mm slices)": nearest, "cubic": cubic, "MedSR": sr,
              "original 1 mm slices": truth}
    coronal = {k: v[:, plane, :][::-1] for k, v in panels.items()}  # superior at the top

    # zoomed detail: a box in the coronal plane (rows: z from the top, columns: x)
    height, width = coronal["MedSR"].shape
    top, bottom, left, right = (float(v) for v in args.zoom.split(","))
    box = (int(height * top), int(height * bottom), int(width * left), int(width * right))
    margin = FACTOR  # the first and last slices are extrapolated by every method
    scores = {k: psnr(v[margin:-margin, plane, :], truth[margin:-margin, plane, :], window[1])
              for k, v in panels.items() if k in ("cubic", "MedSR")}

    fig, axes = plt.subplots(2, 4, figsize=(13.0, 6.9), dpi=100,
                             gridspec_kw={"height_ratios": [1.0, 1.0]})
    for column, (title, view) in enumerate(coronal.items()):
        upper, lower = axes[0, column], axes[1, column]
        upper.imshow(view, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest",
                     aspect=aspect)
        r0, r1, c0, c1 = box
        upper.add_patch(plt.Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, color="#ffcc00", lw=1.2))
        label = title
        if title in scores:
            label += f"\nPSNR {scores[title]:.1f} dB (this plane)"
        upper.set_title(label, fontsize=11)
        lower.imshow(view[r0:r1, c0:c1], cmap="gray", vmin=window[0], vmax=window[1],
                     interpolation="nearest", aspect=aspect)
        lower.set_title("zoom", fontsize=9)
        for axis in (upper, lower):
            axis.set_xticks([])
            axis.set_yticks([])
    fig.suptitle(f"Brain MR (not used in training), coronal view: 1 mm slices averaged to "
                 f"{FACTOR} mm, then made thin again (x{FACTOR} along z)", fontsize=12)
    fig.tight_layout()
    if args.save_arrays:
        np.savez_compressed(args.save_arrays, **{k.split(" ")[0]: v for k, v in coronal.items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KB; PSNR {scores}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
