"""Cost of the lesion finder of `--roi auto` against the plain super-resolution run, and the
agreement of its fast paths with the reference map.

`time`: on the bundled CT sample, a 512 x 512 CT of the pool (CRLM-CT-1004, 41 slices), a BraTS
validation MR (pat0005 T1c) and the CT tiled to 123 slices, in one process and
interleaved, the plain default run (`api.upscale(image, scale=s)`, automatic path, s = 2 and 4)
and `find_regions` with each localiser path; prints the finder's time as a share of each run.

`maps`: on the VALIDATION volumes only (sarcoma STS_008/STS_010 CT and MR T1, BraTS pat0005 T1c
and FLAIR, degraded in-plane x2 and x4 with `localiser_calibration.low_resolution`), each fast
path's probability map against the reference (torch fp32, every slice): max/mean absolute
difference, the ROI boxes at the card's calibration, and the lesion-slice coverage (perfect /
acceptable, `roi.focus.lesion_coverage` through `localiser_calibration.score_settings`).

    python benchmarks/lesion_focus_time.py time --data-root ../shared/data [--threads 1]
    python benchmarks/lesion_focus_time.py maps --data-root ../shared/data [--out FILE.json]
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
from MedSRLib.io import volumes as io  # noqa: E402
from MedSRLib.roi import localiser as loc  # noqa: E402
from MedSRLib.training import localiser_calibration as calib  # noqa: E402
from MedSRLib.training.localiser import cases  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import cpu_flags  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "MedSRLib/data/ct_abdomen_sample.nrrd"
CT_512 = "ct/crlm-ct-1004-dicom"
TILED_SLICES = 123
BRATS_VALIDATION = "brats/brats_2013_pat0005_1/T1c_subtrMeanDivStd.nii.gz"
#: Localiser paths compared: (name, runtime, slice gap mm).
PATHS = {"reference (torch fp32)": ("torch", None),
         "openvino f32": ("openvino-f32", None),
         "openvino bf16": ("openvino-bf16", None),
         "openvino bf16, slices >= 4 mm apart": ("openvino-bf16", 4.0),
         "openvino bf16, slices >= 6 mm apart": ("openvino-bf16", 6.0),
         "openvino bf16, x and y slices >= 4 mm apart": ("openvino-bf16", (4.0, 4.0, 0.0)),
         "openvino bf16, x and y slices >= 3 mm apart": ("openvino-bf16", (3.0, 3.0, 0.0))}
REFERENCE = "reference (torch fp32)"
VALIDATION_IMAGES = ("CT_image", "MR_T1_image", "T1c_", "Flair_")


def tiled(image: sitk.Image, slices: int) -> sitk.Image:
    """`image`'s slices repeated (forwards, then backwards, ...) to `slices` slices, same spacing:
    a longer scan of the same kind, for timing only."""
    voxels = sitk.GetArrayFromImage(image)
    repeats = -(-slices // (2 * voxels.shape[0]))
    out = sitk.GetImageFromArray(np.concatenate([voxels, voxels[::-1]] * repeats)[:slices])
    out.SetSpacing(image.GetSpacing())
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    for key in image.GetMetaDataKeys():
        out.SetMetaData(key, image.GetMetaData(key))
    return out


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run_time(args: argparse.Namespace) -> int:
    localiser = loc.load_ensemble()
    paths = {name: PATHS[name] for name in args.paths}
    ct = io.read_volume(args.data_root / CT_512)
    volumes = [("bundled CT sample", io.read_volume(SAMPLE)), (CT_512, ct),
               (BRATS_VALIDATION, io.read_volume(args.data_root / BRATS_VALIDATION)),
               (f"{CT_512} tiled to {TILED_SLICES} slices", tiled(ct, TILED_SLICES))]
    print(f"CPU flags: {cpu_flags()}; torch/OpenVINO threads {args.threads}; "
          f"{args.rounds} interleaved round(s) after a warm-up on the sample, the last reported",
          flush=True)
    for scale in (2, 4):  # first-call costs (loading, conversion) out of the figures
        api.upscale(volumes[0][1], scale=scale)
    for runtime, gap in paths.values():
        loc.find_regions(volumes[0][1], localiser=localiser, runtime=runtime, slice_gap_mm=gap)
    rows = []
    for label, image in volumes[:args.volumes]:
        seconds: dict[str, float] = {}
        for _ in range(args.rounds):
            for scale in (2, 4):
                seconds[f"SR x{scale}"] = timed(lambda: api.upscale(image, scale=scale))
            for name, (runtime, gap) in paths.items():
                seconds[name] = timed(lambda: loc.find_regions(
                    image, localiser=localiser, runtime=runtime, slice_gap_mm=gap))
        line = f"{label} {image.GetSize()}: SR x2 {seconds['SR x2']:.1f} s, x4 {seconds['SR x4']:.1f} s"
        for name in paths:
            line += (f"; {name} {seconds[name]:.1f} s = {seconds[name] / seconds['SR x2']:.2f} of x2,"
                     f" {seconds[name] / seconds['SR x4']:.2f} of x4")
        print(line, flush=True)
        rows.append({"volume": label, "size_xyz": list(image.GetSize()), "seconds": seconds})
    if args.out:
        args.out.write_text(json.dumps({"cpu_flags": cpu_flags(), "threads": args.threads,
                                        "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


def validation_volumes(root: Path):
    """(name, HR image, HR lesion mask) of the localiser's validation volumes (no PET, no test
    patient)."""
    for case in sorted(cases("validation"), key=lambda c: "brats" not in c.image):  # MR first
        if case.mask and any(tag in case.image for tag in VALIDATION_IMAGES):
            yield calib.read_hr(root, case)


def run_maps(args: argparse.Namespace) -> int:
    localiser = loc.load_ensemble()
    card = localiser.card
    setting = (loc.calibrated_setting(card, "threshold", loc.DEFAULT_THRESHOLD),
               loc.calibrated_setting(card, "min_component_mm3", 0.0),
               loc.calibrated_setting(card, "padding_mm", 0.0))
    margin_mm = loc.calibrated_setting(card, "margin_mm", 5.0)
    paths = {name: PATHS[name] for name in args.paths}
    print(f"CPU flags: {cpu_flags()}; calibration (threshold, min mm3, padding mm) {setting}, "
          f"margin {margin_mm} mm", flush=True)
    rows = []
    for name, image, mask in validation_volumes(args.data_root):
        if args.only and not any(part in name for part in args.only):
            continue
        for factor in (2, 4):
            size = [n // factor * factor if a < 2 else n for a, n in enumerate(image.GetSize())]
            lr = calib.low_resolution(image[:size[0], :size[1], :], factor)
            hr_mask = mask[:, :size[1], :size[0]]
            units = loc.units_of(sitk.GetArrayViewFromImage(lr))
            maps = {}
            for path, (runtime, gap) in paths.items():
                start = time.perf_counter()
                cached = args.cache and args.cache / f"{name.replace('/', '_')}-x{factor}.npy"
                if path == REFERENCE and cached and cached.is_file():
                    maps[path] = np.load(cached)  # the reference map of an earlier run
                else:
                    maps[path] = localiser.probability(units, lr.GetSpacing(), runtime=runtime,
                                                       slice_gap_mm=gap)
                    if path == REFERENCE and cached:
                        args.cache.mkdir(parents=True, exist_ok=True)
                        np.save(cached, maps[path])
                seconds = time.perf_counter() - start
                reference = maps[REFERENCE]
                difference = np.abs(maps[path] - reference)
                result = calib.score_settings(maps[path], lr, hr_mask, factor, [setting],
                                              margin_mm, name)[0]
                regions = loc.regions_of_map(maps[path], lr.GetSpacing(), *setting)
                row = {"volume": name, "factor": factor, "path": path, "seconds": round(seconds, 2),
                       "max_abs_diff": float(difference.max()),
                       "mean_abs_diff": float(difference.mean()),
                       "boxes_xyz": [[list(r.box.lower_xyz), list(r.box.upper_xyz)] for r in regions],
                       "lesion_slices": result.lesion_slices, "perfect": result.perfect,
                       "acceptable": result.acceptable, "roi_share": result.roi_share,
                       "missed_components": result.missed_components}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for path in paths:
        mine = [r for r in rows if r["path"] == path]
        summary[path] = {"max_abs_diff": max(r["max_abs_diff"] for r in mine),
                         "mean_abs_diff": float(np.mean([r["mean_abs_diff"] for r in mine])),
                         "lesion_slices": sum(r["lesion_slices"] for r in mine),
                         "perfect": sum(r["perfect"] for r in mine),
                         "acceptable": sum(r["acceptable"] for r in mine),
                         "same_boxes": sum(r["boxes_xyz"] == ref["boxes_xyz"] for r, ref in
                                           zip(mine, [r for r in rows if r["path"] == REFERENCE])),
                         "maps": len(mine), "seconds": round(sum(r["seconds"] for r in mine), 1)}
        print(path, json.dumps(summary[path]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"cpu_flags": cpu_flags(), "setting": setting,
                                        "margin_mm": margin_mm, "summary": summary,
                                        "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("time", "maps"))
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--volumes", type=int, default=4, help="time: only the first n volumes")
    parser.add_argument("--paths", nargs="*", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cache", type=Path, help="maps: folder keeping the reference maps")
    parser.add_argument("--only", nargs="*", default=[], help="maps: only volumes naming these")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return run_time(args) if args.what == "time" else run_maps(args)


if __name__ == "__main__":
    raise SystemExit(main())
