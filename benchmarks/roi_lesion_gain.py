"""ROI-model candidates inside the VALIDATION lesions: which model should run inside the ROI of
`upscale(roi="auto")` (the choice behind `MedSRLib/roi/roi_models.py`).

Volumes: sarcoma STS_008 and STS_010 (CT, T1 MR; *_mask) and BraTS pat0005 (T1c: labels 1, 3, 4;
FLAIR: labels 1-4), degraded in-plane by x2 and x4 (`evaluation.lesion_focus`, the protocol).
The ROI is the lesion mask's bounding box on the LR grid (an oracle ROI: the finder's boxes
differ), grown by the default 5 mm margin and each member's context exactly as `refine_region`
does (`roi.focus.plan_region`); each member runs on that crop; a candidate's output inside the
ROI is the mean of its members (in network units) pasted into the plain default run. Members
marked "+k" re-use the plain run as the ensemble's identity member (`EngineOptions.
ensemble_start`). PSNR/SSIM over the lesion mask; gain over bicubic. Time: each member's crop
run over the plain whole-volume default run, same process, interleaved after a warm-up
(`--rounds`); the lesion finder's run over the plain run too.

    OMP_NUM_THREADS=1 python benchmarks/roi_lesion_gain.py --data-root ../shared/data \\
        --out benchmarks/results/lesion_focus/candidates
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedSRLib import api  # noqa: E402
from MedSRLib.evaluation import lesion_focus as protocol  # noqa: E402
from MedSRLib.planning.run_plan import model_loader, plan_scale  # noqa: E402
from MedSRLib.roi import focus  # noqa: E402
from MedSRLib.runtime.engine import EngineOptions, super_resolve_volume  # noqa: E402
from MedSRLib.transforms import intensity  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import cpu_flags  # noqa: E402

#: member label -> (model, precision, self_ensemble, ensemble_start)
MEMBERS = {
    "edsr_lite": ("edsr_lite", "auto", 1, 0),
    "edsr_lite bf16 (no int8)": ("edsr_lite", "bf16", 1, 0),
    "edsr_lite fp32": ("edsr_lite", "fp32", 1, 0),
    "edsr_lite se2 +1": ("edsr_lite", "auto", 2, 1),
    "edsr_lite se4 +1": ("edsr_lite", "auto", 4, 1),      # the flips (identity re-used)
    "edsr_lite se8 +4": ("edsr_lite", "auto", 8, 4),      # the 4 transposed
    "edsr_lite_25d": ("edsr_lite_25d", "auto", 1, 0),
    "edsr_multiscale": ("edsr_multiscale", "auto", 1, 0),
    "lfsr": ("lfsr", "auto", 1, 0),
    "mdrn bf16": ("mdrn", "auto", 1, 0),
}
#: candidate -> [(member, weight)]; "plain" is the whole-volume default run (free in ROI mode).
CANDIDATES = {
    "default edsr_lite (automatic: int8)": [("plain", 1)],
    "edsr_lite crop (check: = default)": [("edsr_lite", 1)],
    "edsr_lite bf16 (no int8)": [("edsr_lite bf16 (no int8)", 1)],
    "edsr_lite fp32": [("edsr_lite fp32", 1)],
    "edsr_lite self-ensemble x2": [("plain", 1), ("edsr_lite se2 +1", 1)],
    "edsr_lite self-ensemble x4 (flips)": [("plain", 1), ("edsr_lite se4 +1", 3)],
    "edsr_lite self-ensemble x8 (dihedral)": [("plain", 1), ("edsr_lite se4 +1", 3),
                                              ("edsr_lite se8 +4", 4)],
    "edsr_lite_25d": [("edsr_lite_25d", 1)],
    "edsr_multiscale": [("edsr_multiscale", 1)],
    "lfsr": [("lfsr", 1)],
    "mdrn bf16": [("mdrn bf16", 1)],
    "mean(edsr_lite, mdrn)": [("plain", 1), ("mdrn bf16", 1)],
    "mean(edsr_lite, edsr_lite_25d)": [("plain", 1), ("edsr_lite_25d", 1)],
    "mean(edsr_lite, edsr_multiscale)": [("plain", 1), ("edsr_multiscale", 1)],
    "mean(edsr_lite, edsr_lite_25d, edsr_multiscale)": [("plain", 1), ("edsr_lite_25d", 1),
                                                        ("edsr_multiscale", 1)],
    "mean(edsr_lite se2, edsr_lite_25d)": [("plain", 1), ("edsr_lite se2 +1", 1),
                                           ("edsr_lite_25d", 2)],
}


def timed(call):
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


def run_case(volume: protocol.LesionVolume, factor: int, hr: sitk.Image, mask: np.ndarray,
             members: dict, rounds: int) -> dict:
    case = protocol.degraded_case(hr, mask, factor)
    lr, modality = case.lr, volume.modality
    voxels = sitk.GetArrayFromImage(lr)
    mapping = intensity.fit_mapping(voxels)
    plan = plan_scale(factor, "auto", lr.GetSpacing(), lr.GetSize())
    box = focus.bounding_box(case.mask_lr)

    def plain():
        return api.upscale(lr, scale=factor, modality=modality, output_float=True)

    bicubic = sitk.GetArrayFromImage(api.upscale(lr, model="bicubic", scale=factor, output_float=True))
    plain_out = sitk.GetArrayFromImage(plain())
    units = {"plain": None}
    jobs = {}
    for label, (name, precision, ensemble, start) in members.items():
        loader = model_loader(name, modality=modality)
        region = focus.plan_region(lr, box, plan, name, loader)
        options = EngineOptions(threads=1, precision=precision, self_ensemble=ensemble,
                                ensemble_start=start)

        def job(loader=loader, crop=region.crop_box, options=options):
            return super_resolve_volume(np.ascontiguousarray(voxels[crop.slices_kji]),
                                        plan.factors_kji, plan.slice_axis_kji, loader,
                                        mapping.to_unit, lambda u: u, np.dtype(np.float32),
                                        options=options)
        jobs[label] = (job, region)
    processed = next(iter(jobs.values()))[1].processed
    out_box = processed.scaled(plan.factors_xyz)
    times = {label: [] for label in ["plain", "finder", *jobs]}
    for label, (job, region) in jobs.items():  # warm-up and the outputs
        crop = job()
        crop_out = region.crop_box.scaled(plan.factors_xyz)
        inner = tuple(slice(l - c, u - c) for l, u, c in zip(
            out_box.lower_xyz[::-1], out_box.upper_xyz[::-1], crop_out.lower_xyz[::-1]))
        units[label] = crop[inner]
    focus.detect_lesions(lr)
    for _ in range(rounds):
        times["plain"].append(timed(plain)[1])
        times["finder"].append(timed(lambda: focus.detect_lesions(lr))[1])
        for label, (job, _) in jobs.items():
            times[label].append(timed(job)[1])
    plain_seconds = float(np.median(times["plain"]))
    plain_units = mapping.to_unit(plain_out[out_box.slices_kji])
    units["plain"] = plain_units
    share = float(np.prod(processed.size_xyz)) / float(np.prod(lr.GetSize()))
    row = {"volume": volume.name, "modality": modality, "factor": factor,
           "lesion_voxels": int(case.mask.sum()), "processed_share": share,
           "plain_seconds": plain_seconds,
           "finder_over_plain": float(np.median(times["finder"])) / plain_seconds,
           "members_over_plain": {k: float(np.median(times[k])) / plain_seconds for k in jobs},
           "crop_share": {k: float(np.prod(r.crop_box.size_xyz)) / float(np.prod(lr.GetSize()))
                          for k, (_, r) in jobs.items()}}
    b_psnr, b_ssim = protocol.inside_scores(bicubic, case.truth, case.mask, case.value_range)
    row["bicubic"] = {"psnr": b_psnr, "ssim": b_ssim}
    row["candidates"] = {}
    for name, parts in CANDIDATES.items():
        if any(member not in units for member, _ in parts):
            continue
        weight = sum(w for _, w in parts)
        mean_units = sum(units[member].astype(np.float64) * w for member, w in parts) / weight
        estimate = plain_out.copy()
        estimate[out_box.slices_kji] = mapping.from_unit(mean_units.astype(np.float32))
        psnr, ssim = protocol.inside_scores(estimate, case.truth, case.mask, case.value_range)
        cost = sum(row["members_over_plain"][m] for m, _ in parts if m != "plain")
        row["candidates"][name] = {"psnr_gain_db": psnr - b_psnr, "ssim_gain": ssim - b_ssim,
                                   "psnr": psnr, "ssim": ssim, "roi_over_plain": cost}
    return row


#: Candidates whose validation figures are training figures for that modality: the shipped LFSR
#: was trained on the sarcoma MR and BraTS T1c of STS_008, STS_010 and pat0005.
TRAINED_ON_VALIDATION = {("MR", "lfsr")}
#: Budget rule: a candidate's ROI work at most this multiple of re-running the default on the
#: same crop (with a ~22 % ROI and the finder's share, more does not fit in 1.5x the plain run).
MAX_WORK_OVER_DEFAULT_CROP = 1.1

#: ROI share (ROI + margin over the volume) of the estimate: the finder's mean on the test patients.
ESTIMATE_SHARE = 0.22


def summarise(rows: list[dict]) -> list[str]:
    lines = []
    groups = sorted({(r["modality"], r["factor"]) for r in rows})
    for modality, factor in groups:
        chosen = [r for r in rows if (r["modality"], r["factor"]) == (modality, factor)]
        finder = np.mean([r["finder_over_plain"] for r in chosen])
        lines += ["", f"### {modality} x{factor} ({len(chosen)} volumes; finder {finder:.2f}x the "
                      f"plain run; processed ROI share {np.mean([r['processed_share'] for r in chosen]):.2f})",
                  "", "| candidate | PSNR gain over bicubic (dB) | vs default (dB) | SSIM gain | "
                      "SSIM vs default | ROI work / plain run | est. run / plain at a 22 % ROI |",
                  "|---|---|---|---|---|---|---|"]
        default = np.mean([r["candidates"]["default edsr_lite (automatic: int8)"]["psnr_gain_db"]
                           for r in chosen])
        default_ssim = np.mean([r["candidates"]["default edsr_lite (automatic: int8)"]["ssim_gain"]
                                for r in chosen])
        for name in CANDIDATES:
            values = [r["candidates"][name] for r in chosen if name in r["candidates"]]
            if len(values) != len(chosen):
                continue
            gain = np.mean([v["psnr_gain_db"] for v in values])
            ssim = np.mean([v["ssim_gain"] for v in values])
            # ROI work per processed voxel (context included) scaled to a 22 % ROI (+ margin)
            # share, the finder's measured share added
            per_share = np.mean([r["candidates"][name]["roi_over_plain"] / r["processed_share"]
                                 for r in chosen])
            lines.append(f"| {name} | {gain:+.3f} | {gain - default:+.3f} | {ssim:+.4f} | "
                         f"{ssim - default_ssim:+.4f} | "
                         f"{np.mean([v['roi_over_plain'] for v in values]):.2f} | "
                         f"{1 + ESTIMATE_SHARE * per_share:.2f} + finder |")
        eligible = {}
        for name in CANDIDATES:
            values = [r["candidates"][name] for r in chosen if name in r["candidates"]]
            if len(values) != len(chosen) or (modality, name) in TRAINED_ON_VALIDATION:
                continue
            work = np.mean([v["roi_over_plain"] for v in values])
            crop = np.mean([r["candidates"]["edsr_lite crop (check: = default)"]["roi_over_plain"]
                            for r in chosen])
            ssim = np.mean([v["ssim_gain"] for v in values])
            if work <= MAX_WORK_OVER_DEFAULT_CROP * crop and ssim >= default_ssim:
                eligible[name] = np.mean([v["psnr_gain_db"] for v in values])
        if eligible:
            best = max(eligible, key=eligible.get)
            lines += ["", f"Choice ({modality} x{factor}): **{best}** ({eligible[best] - default:+.3f} dB "
                          f"over the default) among {', '.join(eligible)} (ROI work <= "
                          f"{MAX_WORK_OVER_DEFAULT_CROP}x the default's on the same crop, SSIM not "
                          "below the default's; not trained on these patients)."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lesion_focus/candidates"))
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], help="member labels not to run")
    parser.add_argument("--volumes", nargs="*", default=None, help="substrings of volume names")
    parser.add_argument("--from-json", action="store_true",
                        help="only rewrite the .md from the .json of an earlier run")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.out.with_suffix(".json").read_text(encoding="utf-8"))
        write_markdown(args.out, saved["command"], saved["cpu_flags"], saved["rows"])
        return 0
    torch.set_num_threads(1)
    members = {k: v for k, v in MEMBERS.items() if k not in args.skip}
    rows = []
    for volume in protocol.VALIDATION_VOLUMES:
        if args.volumes and not any(s in volume.name for s in args.volumes):
            continue
        hr, mask = protocol.read_lesion_volume(args.data_root, volume)
        for factor in args.scales:
            row = run_case(volume, factor, hr, mask, members, args.rounds)
            rows.append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)  # each case saved as it ends
            args.out.with_suffix(".partial.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
            print(volume.name, f"x{factor}", json.dumps({k: round(v["psnr_gain_db"], 3)
                                                         for k, v in row["candidates"].items()}),
                  json.dumps({k: round(v, 2) for k, v in row["members_over_plain"].items()}),
                  flush=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/roi_lesion_gain.py " + " ".join(argv or sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "cpu_flags": cpu_flags(), "rows": rows}, indent=1) + "\n", encoding="utf-8")
    write_markdown(args.out, command, cpu_flags(), rows)
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    return 0


def write_markdown(out: Path, command: str, flags: str, rows: list[dict]) -> None:
    lines = ["# ROI-model candidates inside validation lesions", "", f"Command: `{command}`",
             f"CPU flags: {flags}; 1 torch thread", "",
             "Mean over volumes. \"ROI work / plain run\": the members' crop runs over the plain "
             "whole-volume default run (oracle ROI: the lesion mask's box + 5 mm margin + context); "
             "add the finder's share for the whole lesion-focused overhead. The estimate scales "
             "each candidate's ROI work per processed voxel to a 22 % ROI share (the finder's "
             "mean on the test patients). Members \"+k\" re-use the plain run as the identity "
             "member.", *summarise(rows)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
