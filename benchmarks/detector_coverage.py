"""Lesion detector coverage on held-out patients, paper 003's protocol.

For every held-out volume of the detector recipe (its `validation:` patients) and every input
factor f: the HR volume is degraded in-plane by f (the training code's anti-aliased bicubic,
axial slices), the detector runs on that low-resolution volume, its boxes are mapped back to
the HR grid (index * f) and compared with the HR lesion mask. Per lesion slice, the share of
lesion voxels inside the ROI; "perfect" = 100 %, "acceptable" >= 95 % (paper 003, Table 2).
Two ROIs are scored:

- per-slice: the detector's own box on each slice (no margin), the paper's protocol;
- 3-D ROI: the union of the per-slice boxes grown by the margin, what `upscale(roi="auto")`
  super-resolves; its share of the volume is the work the heavy model does.

    python benchmarks/detector_coverage.py --data-root ../shared/data --factors 2 4 \
        --out benchmarks/results/detector
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedSRLib.io import volumes as io  # noqa: E402
from MedSRLib.roi import focus as roi
from MedSRLib.training import config as tconfig, data as tdata  # noqa: E402
from MedSRLib.transforms import degrade

AXIAL = 2  # slice axis, (x, y, z) index


def low_resolution(image: sitk.Image, factor: int) -> sitk.Image:
    """`image` degraded in-plane (x, y) by `factor` (anti-aliased bicubic per axial slice),
    cropped to a multiple of the factor; spacing x factor, same origin corner convention."""
    voxels = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))
    low = degrade.bicubic_downsample(voxels, factor).numpy()
    out = sitk.GetImageFromArray(low)
    out.SetSpacing((image.GetSpacing()[0] * factor, image.GetSpacing()[1] * factor, image.GetSpacing()[2]))
    out.SetDirection(image.GetDirection())
    out.SetOrigin(image.GetOrigin())
    return out


def to_hr_mask(boxes, factor: int, shape_kji: tuple[int, int, int]) -> np.ndarray:
    """Rasterise LR per-slice boxes (axial) onto the HR (K, J, I) grid."""
    inside = np.zeros(shape_kji, dtype=bool)
    for box in boxes:
        (x0, y0), (x1, y1) = box.lower_ab, box.upper_ab
        inside[box.slice_index, y0 * factor:y1 * factor, x0 * factor:x1 * factor] = True
    return inside


def to_hr_box(box: roi.RoiBox, factor: int, size_xyz) -> roi.RoiBox:
    scale = (factor, factor, 1)
    return roi.RoiBox(tuple(v * s for v, s in zip(box.lower_xyz, scale)),
                      tuple(min(n, v * s) for v, s, n in zip(box.upper_xyz, scale, size_xyz)))


def evaluate(data_root: Path, factors, weights: str | None, margin_mm: float,
             threshold: float | None = None) -> list[dict]:
    cfg = tconfig.load_config("lesion_detector")
    split = tdata.split_sources(cfg["data"]["sources"], data_root)
    rows = []
    for item in split.validation:
        image = io.read_volume(data_root / item.path)
        mask = sitk.GetArrayFromImage(io.read_volume(data_root / item.mask)) > 0
        for factor in factors:
            hr_size = [n // factor * factor if a < 2 else n for a, n in enumerate(image.GetSize())]
            hr_image = image[:hr_size[0], :hr_size[1], :]
            hr_mask = mask[:, :hr_size[1], :hr_size[0]]
            detection = roi.detect_lesion_roi(low_resolution(hr_image, factor), slice_axis=AXIAL,
                                              margin_mm=margin_mm, weights_path=weights,
                                              threshold=threshold)
            per_slice = roi.lesion_coverage(hr_mask, to_hr_mask(detection.slice_boxes, factor, hr_mask.shape))
            box = None if detection.roi is None else to_hr_box(detection.roi, factor, hr_size)
            whole = roi.lesion_coverage(hr_mask, box)
            roi_share = (float(np.prod([u - l for l, u in zip(box.lower_xyz, box.upper_xyz)])
                               / np.prod(hr_size)) if box else 0.0)
            rows.append({"volume": item.path, "licence": item.licence, "factor": factor,
                         "lesion_slices": per_slice.lesion_slices,
                         "per_slice_perfect": per_slice.perfect, "per_slice_acceptable": per_slice.acceptable,
                         "roi_perfect": whole.perfect, "roi_acceptable": whole.acceptable,
                         "roi_voxel_coverage": whole.voxel_fraction, "roi_volume_share": roi_share,
                         "score": detection.score})
            print(f"{item.path} x{factor}: {per_slice.lesion_slices} lesion slices, per-slice "
                  f"perfect {per_slice.perfect} acceptable {per_slice.acceptable}; 3-D ROI perfect "
                  f"{whole.perfect} acceptable {whole.acceptable}, {roi_share:.1%} of the volume", flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Lesion detector coverage (held-out patients)", "", f"Command: `{command}`", "",
             "Per lesion slice: share of lesion voxels inside the ROI; perfect = 100 %, acceptable >= 95 %.",
             "Per-slice = the detector's box on that slice (paper 003's protocol); 3-D ROI = union of the",
             "boxes + margin, what `upscale(roi=\"auto\")` super-resolves (its share of the volume in the last column).",
             "", "| Volume | input | lesion slices | per-slice perfect | per-slice acceptable | 3-D ROI perfect | "
             "3-D ROI acceptable | ROI share of volume |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = max(r["lesion_slices"], 1)
        lines.append(f"| {r['volume']} | x{r['factor']} | {r['lesion_slices']} | "
                     f"{r['per_slice_perfect'] / n:.0%} | {r['per_slice_acceptable'] / n:.0%} | "
                     f"{r['roi_perfect'] / n:.0%} | {r['roi_acceptable'] / n:.0%} | {r['roi_volume_share']:.1%} |")
    for factor in sorted({r["factor"] for r in rows}):
        sel = [r for r in rows if r["factor"] == factor]
        n = sum(r["lesion_slices"] for r in sel)
        share = lambda key: sum(r[key] for r in sel) / max(n, 1)  # noqa: E731
        lines.append(f"| **all (x{factor})** | x{factor} | {n} | **{share('per_slice_perfect'):.0%}** | "
                     f"**{share('per_slice_acceptable'):.0%}** | **{share('roi_perfect'):.0%}** | "
                     f"**{share('roi_acceptable'):.0%}** | {np.mean([r['roi_volume_share'] for r in sel]):.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--weights", default=None, help="detector safetensors (default: the shipped one)")
    parser.add_argument("--margin-mm", type=float, default=roi.DEFAULT_MARGIN_MM)
    parser.add_argument("--threshold", type=float, default=None,
                        help="slice lesion probability to keep a box (default: the card's)")
    parser.add_argument("--out", type=Path, default=None, help="folder for coverage.md / coverage.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = evaluate(args.data_root.resolve(), args.factors, args.weights, args.margin_mm, args.threshold)
    command = "python benchmarks/detector_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, command)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "coverage.md").write_text(text, encoding="utf-8")
        (args.out / "coverage.json").write_text(json.dumps(rows, indent=2, default=lambda v: v.item()) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
