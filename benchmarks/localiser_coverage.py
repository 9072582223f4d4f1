"""Lesion localiser (`lesion_segmenter`, `--roi auto`) coverage on held-out patients, paper 003's
protocol.

For every volume of the localiser's TEST patients (and their two-patient composites, two
separate lesions each) (`MedSRLib.training.localiser.RECIPE`: never
trained on, never used for the checkpoint or the threshold) and every input factor f: the HR
volume is degraded in-plane by f (anti-aliased bicubic per axial slice), the localiser runs on
that low-resolution input with the card's calibrated threshold, its ROIs (one per connected
component, grown by the margin, overlapping ones merged: what `upscale(roi="auto")` refines) are
mapped back to the HR grid (index * f) and compared with the HR lesion mask. Per axial lesion
slice: the share of its lesion voxels inside the ROIs, "perfect" = 100 %, "acceptable" >= 95 %
(paper 003, Table 2). Also reported: the per-slice protocol (on each slice, the box of that
slice's thresholded prediction, no margin), the ROIs' share of the volume, the lesion components
no ROI touches, and the Dice of the thresholded probability map.

    python benchmarks/localiser_coverage.py --data-root ../shared/data --factors 2 4 \
        --out benchmarks/results/localiser
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedSRLib.roi import localiser as loc, focus as roi  # noqa: E402
from MedSRLib.training import localiser_calibration as calib  # noqa: E402


def markdown(results, command: str, setting: tuple[float, float, float], margin_mm: float,
             seconds: float, threads: int = 1) -> str:
    lines = ["# Lesion localiser coverage (held-out test patients)", "", f"Command: `{command}`", "",
             f"Threshold {setting[0]}, smallest component {setting[1]} mm^3 and box padding "
             f"{setting[2]} mm (the card's, chosen on the validation patients), margin {margin_mm} mm.",
             "Composites (`A + B`): two patients' volumes side by side, two separate lesions.",
             "Per axial lesion slice: share of its",
             "lesion voxels inside the ROIs; perfect = 100 %, acceptable >= 95 %. Per-slice = the box of",
             "that slice's thresholded prediction (paper 003's protocol); 3-D ROIs = one box per connected",
             "component + margin, what `upscale(roi=\"auto\")` super-resolves. Missed = lesion components of at least",
             f"{calib.MIN_LESION_MM3:.0f} mm^3 (26-connected) that no ROI touches. {seconds:.0f} s wall time, {threads} torch thread(s).", "",
             "| Volume | input | lesion slices | per-slice perfect | per-slice acceptable | 3-D ROI perfect | "
             "3-D ROI acceptable | ROIs (confidence) | ROI share of volume | Dice | missed lesions |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        n = max(r.lesion_slices, 1)
        confidences = ", ".join(f"{c:.2f}" for c in r.confidences)
        lines.append(f"| {r.volume} | x{r.factor} | {r.lesion_slices} | {r.per_slice_perfect / n:.0%} | "
                     f"{r.per_slice_acceptable / n:.0%} | {r.perfect / n:.0%} | {r.acceptable / n:.0%} | "
                     f"{r.rois} ({confidences}) | {r.roi_share:.1%} | {r.dice:.3f} | "
                     f"{r.missed_components} of {r.lesion_components} |")
    groups = [("all single volumes", lambda r: " + " not in r.volume),
              ("CT, MR, T1c, FLAIR (the old detector's volumes)",
               lambda r: "PET_" not in r.volume and " + " not in r.volume),
              ("two-patient composites", lambda r: " + " in r.volume)]
    for (label, keep), factor in ((g, f) for g in groups for f in sorted({r.factor for r in results})):
        p = calib.pooled([r for r in results if r.factor == factor and keep(r)])
        lines.append(f"| **{label} (x{factor})** | x{factor} | {p['lesion_slices']} | "
                     f"**{p['per_slice_perfect']:.0%}** | **{p['per_slice_acceptable']:.0%}** | "
                     f"**{p['perfect']:.0%}** | **{p['acceptable']:.0%}** | - | "
                     f"mean {p['mean_roi_share']:.1%}, max {p['max_roi_share']:.1%} | "
                     f"mean {p['mean_dice']:.3f} | {p['missed_components']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--weights", default=None, help="localiser safetensors (default: the shipped one)")
    parser.add_argument("--margin-mm", type=float, default=roi.DEFAULT_MARGIN_MM)
    parser.add_argument("--threshold", type=float, default=None, help="default: the card's")
    parser.add_argument("--out", type=Path, default=None, help="folder for coverage.md / coverage.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    localiser = loc.load_ensemble(args.weights)
    card = localiser.card
    threshold = args.threshold if args.threshold is not None else \
        loc.calibrated_setting(card, "threshold", loc.DEFAULT_THRESHOLD)
    setting = (threshold, loc.calibrated_setting(card, "min_component_mm3", 0.0),
               loc.calibrated_setting(card, "padding_mm", 0.0))
    started = time.perf_counter()
    results = calib.evaluate_cases(args.data_root.resolve(), calib.evaluation_cases("test"),
                                   args.factors, [setting], args.margin_mm, localiser)
    seconds = time.perf_counter() - started
    command = "python benchmarks/localiser_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, command, setting, args.margin_mm, seconds, args.threads)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "coverage.md").write_text(text)
        single = [r for r in results if " + " not in r.volume]
        summary = {f"x{f}": calib.pooled([r for r in single if r.factor == f]) for f in args.factors}
        summary.update({f"x{f}_without_pet": calib.pooled(
            [r for r in single if r.factor == f and "PET_" not in r.volume]) for f in args.factors})
        summary.update({f"x{f}_composites": calib.pooled(
            [r for r in results if r.factor == f and " + " in r.volume]) for f in args.factors})
        (args.out / "coverage.json").write_text(json.dumps(
            {"setting": setting, "margin_mm": args.margin_mm, "summary": summary,
             "volumes": [asdict(r) for r in results]}, indent=2,
            default=lambda v: v.item() if hasattr(v, "item") else str(v)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
