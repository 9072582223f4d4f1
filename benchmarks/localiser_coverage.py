"""Lesion localiser (`lesion_segmenter`, `--roi auto`) coverage on held-out patients, the protocol of
Ren et al. (lesion-focused SR).

For every volume of the localiser's TEST patients (and their two-patient composites, two
separate lesions each) (`MedSRLib.training.localiser.RECIPE`: never
trained on, never used for the checkpoint or the threshold) and every input factor f: the HR
volume is degraded in-plane by f (anti-aliased bicubic per axial slice), the localiser runs on
that low-resolution input with the card's calibrated threshold, its ROIs (one per connected
component, grown by the margin, overlapping ones merged: what `upscale(roi="auto")` refines) are
mapped back to the HR grid (index * f) and compared with the HR lesion mask. Per axial lesion
slice: the share of its lesion voxels inside the ROIs, "perfect" = 100 %, "acceptable" >= 95 %
(Ren et al., Table 2). Also reported: the per-slice protocol (on each slice, the box of that
slice's thresholded prediction, no margin), the ROIs' share of the volume, the lesion components
no ROI touches, and the Dice of the thresholded probability map. The lesion is read by the
recipe's mask convention (`MedSRLib.training.localiser.lesion_mask`: on a BraTS contrast T1 the
tumour core, labels 1, 3 and 4; on FLAIR the whole tumour; a sarcoma mask's nonzero voxels).

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
from MedSRLib.training.localiser import extra_cases  # noqa: E402


def extra_markdown(results) -> list[str]:
    """Table of the extra test volumes (lung nodules, `localiser.EXTRA_LESIONS`): pooled rows of
    the nodule crops and of the whole-slice slabs, then each slab."""
    lines = ["", "## Extra test volumes: a new lesion type (LIDC-IDRI lung nodules on CT)", "",
             "Patients `EXTRA_LESIONS[\"test\"]` of `MedSRLib/training/localiser.py` (never "
             "calibrated on; ../extra_data/lesions or $MEDSR_EXTRA_LESIONS, made by "
             "benchmarks/lesion_data/prepare_lesion_data.py; skipped when absent). The nodule "
             "crops (`lidc-voi`) are 43-91 px around their nodule, so their ROI share says little; "
             "the slabs (`lidc-slab`) are whole 512 x 512 chest slices the finder must search.", "",
             "| volumes | input | volumes | lesion slices | 3-D ROI perfect | 3-D ROI acceptable | "
             "ROI share of volume | missed lesions | volumes entirely missed |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = [("lidc-voi (nodule crops)", lambda r: r.volume.startswith("lidc-voi/")),
              ("lidc-slab (whole slices)", lambda r: r.volume.startswith("lidc-slab/"))]
    for (label, keep), factor in ((g, f) for g in groups for f in sorted({r.factor for r in results})):
        rows = [r for r in results if r.factor == factor and keep(r)]
        if not rows:
            continue
        p = calib.pooled(rows)
        lines.append(f"| **{label}** | x{factor} | {len(rows)} | {p['lesion_slices']} | "
                     f"**{p['perfect']:.0%}** | **{p['acceptable']:.0%}** | "
                     f"mean {p['mean_roi_share']:.1%}, max {p['max_roi_share']:.1%} | "
                     f"{p['missed_components']} of {p['lesion_components']} | "
                     f"{p['volumes_entirely_missed']} |")
    for r in (r for r in results if r.volume.startswith("lidc-slab/")):
        n = max(r.lesion_slices, 1)
        lines.append(f"| {r.volume} | x{r.factor} | 1 | {r.lesion_slices} | {r.perfect / n:.0%} | "
                     f"{r.acceptable / n:.0%} | {r.roi_share:.1%} ({r.rois} ROIs) | "
                     f"{r.missed_components} of {r.lesion_components} | "
                     f"{int(r.voxel_coverage == 0)} |")
    return lines


def all_lesion_types(results, extra_results, factor: int) -> dict:
    """Every single test volume at `factor`, the extra ones included (three lesion types:
    sarcoma, brain tumour, lung nodule): pooled perfect / acceptable lesion slices and lesions
    missed over all of them; the mean ROI share over those that are not crops around their
    lesion (a nodule crop is mostly lesion and margin: its share says nothing)."""
    rows = [r for r in (*results, *extra_results) if r.factor == factor and " + " not in r.volume]
    whole = calib.pooled(rows)
    field = calib.pooled([r for r in rows if not r.volume.startswith("lidc-voi/")])
    return {"volumes": len(rows), "lesion_slices": whole["lesion_slices"],
            "perfect": whole["perfect"], "acceptable": whole["acceptable"],
            "missed_components": whole["missed_components"],
            "volumes_entirely_missed": whole["volumes_entirely_missed"],
            "mean_roi_share_not_crops": field["mean_roi_share"]}


def all_types_markdown(results, extra_results) -> list[str]:
    """The goal checked over all three lesion types (`all_lesion_types`)."""
    lines = ["", "## All test lesion types together", "",
             "Sarcoma (CT, T1 MR, PET), brain tumour (T1c core, FLAIR whole tumour) and lung nodule "
             "(CT crops and whole-slice slabs): every single test volume above, pooled. Goal: >= 90 % "
             "acceptable, >= 80 % perfect, mean ROI share <= 25 % (over the volumes that are not crops "
             "around their lesion), no lesion entirely missed.", ""]
    for factor in sorted({r.factor for r in results}):
        a = all_lesion_types(results, extra_results, factor)
        met = (a["acceptable"] >= 0.9 and a["perfect"] >= 0.8 and a["mean_roi_share_not_crops"] <= 0.25
               and a["missed_components"] == 0)
        lines.append(f"- x{factor}: {a['volumes']} volumes, {a['lesion_slices']} lesion slices: acceptable "
                     f"{a['acceptable']:.1%}, perfect {a['perfect']:.1%}, mean ROI share "
                     f"{a['mean_roi_share_not_crops']:.1%}, lesions missed {a['missed_components']} "
                     f"(volumes entirely missed {a['volumes_entirely_missed']}): "
                     f"{'met' if met else 'NOT met'}")
    return lines


def markdown(results, command: str, setting: tuple[float, float, float], margin_mm: float,
             seconds: float, threads: int = 1, extra_results=(), runtime: str = "torch") -> str:
    lines = ["# Lesion localiser coverage (held-out test patients)", "", f"Command: `{command}`", "",
             f"Threshold {setting[0]}, smallest component {setting[1]} mm^3 and box padding "
             f"{setting[2]} mm (the card's, chosen by cross-validation on the validation patients), "
             f"margin {margin_mm} mm; segmenters run in {runtime}.",
             "Lesion masks (`MedSRLib.training.localiser.lesion_mask`): BraTS T1c = tumour core "
             "(labels 1, 3, 4; oedema excluded), BraTS FLAIR = whole tumour (labels 1-4), sarcoma = "
             "mask > 0.",
             "Composites (`A + B`): two patients' volumes side by side, two separate lesions.",
             "Per axial lesion slice: share of its",
             "lesion voxels inside the ROIs; perfect = 100 %, acceptable >= 95 %. Per-slice = the box of",
             "that slice's thresholded prediction (Ren et al.'s protocol); 3-D ROIs = one box per connected",
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
    lines += ["", "Goal (all single volumes, each input factor): >= 90 % of lesion slices acceptable, "
              ">= 80 % perfect, mean ROI share <= 25 %, no lesion entirely missed; composites: "
              "two ROIs, one per tumour.", ""]
    for factor in sorted({r.factor for r in results}):
        p = calib.pooled([r for r in results if r.factor == factor and " + " not in r.volume])
        met = (p["acceptable"] >= 0.9 and p["perfect"] >= 0.8 and p["mean_roi_share"] <= 0.25
               and p["volumes_entirely_missed"] == 0 and p["missed_components"] == 0)
        lines.append(f"- x{factor}: acceptable {p['acceptable']:.1%}, perfect {p['perfect']:.1%}, "
                     f"mean ROI share {p['mean_roi_share']:.1%}, lesions missed "
                     f"{p['missed_components']}: {'met' if met else 'NOT met'}")
    if extra_results:
        lines += extra_markdown(extra_results)
        lines += all_types_markdown(results, extra_results)
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
    parser.add_argument("--runtime", default=calib.FIND_MAP,
                        help="how the maps are made: find (what --roi auto computes, the "
                             "default), torch (the reference: torch fp32, every slice) or an "
                             "OpenVINO runtime of MedSRLib.roi.localiser.RUNTIMES on every slice")
    parser.add_argument("--no-extra", dest="extra", action="store_false",
                        help="without the extra lung-nodule test volumes (skipped when absent)")
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
                                   args.factors, [setting], args.margin_mm, localiser,
                                   args.runtime)
    extra = extra_cases("test") if args.extra else []
    extra_results = calib.evaluate_cases(args.data_root.resolve(), extra, args.factors, [setting],
                                         args.margin_mm, localiser, args.runtime) if extra else []
    seconds = time.perf_counter() - started
    command = "python benchmarks/localiser_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, command, setting, args.margin_mm, seconds, args.threads, extra_results,
                    args.runtime)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "coverage.md").write_text(text, encoding="utf-8")
        single = [r for r in results if " + " not in r.volume]
        summary = {f"x{f}": calib.pooled([r for r in single if r.factor == f]) for f in args.factors}
        summary.update({f"x{f}_without_pet": calib.pooled(
            [r for r in single if r.factor == f and "PET_" not in r.volume]) for f in args.factors})
        summary.update({f"x{f}_composites": calib.pooled(
            [r for r in results if r.factor == f and " + " in r.volume]) for f in args.factors})
        for factor in args.factors:
            if extra_results:
                summary[f"x{factor}_all_lesion_types"] = all_lesion_types(results, extra_results, factor)
            for label in ("lidc-voi", "lidc-slab"):
                rows = [r for r in extra_results
                        if r.factor == factor and r.volume.startswith(label + "/")]
                if rows:
                    summary[f"x{factor}_extra_{label}"] = calib.pooled(rows)
        (args.out / "coverage.json").write_text(json.dumps(
            {"setting": setting, "margin_mm": args.margin_mm, "runtime": args.runtime,
             "summary": summary,
             "lesion_masks": "MedSRLib.training.localiser.lesion_mask (BraTS T1c: tumour core, "
                             "labels 1, 3, 4; FLAIR: whole tumour; sarcoma and extra: mask > 0)",
             "volumes": [asdict(r) for r in results],
             "extra_volumes": [asdict(r) for r in extra_results]}, indent=2,
            default=lambda v: v.item() if hasattr(v, "item") else str(v)) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
