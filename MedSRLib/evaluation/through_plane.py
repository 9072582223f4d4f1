"""Through-plane benchmark (`medsr benchmark --through-plane`, `benchmarks/bench_through_plane.py`).

Protocol: each held-out thin-slice volume (never used in training or checkpoint choice:
`data.TEST_SOURCES`) is mapped to network units by `intensity.fit_mapping`, centre-cropped
in-plane to `--crop` pixels, and made thick along z with `profile.degradation_matrix` (box
profile, contiguous; the gap case: thickness 0.6 x spacing). The thin truth keeps the slices the
thick ones cover (n * factor). Every method then goes through `MedSRLib.upscale` on the thick
volume as a user would run it (`scale=(1, 1, factor)`, float output), except cubic-z (the same
Keys cubic resampling the network starts from). Scores against the truth in unit intensities
(data range 1): PSNR over the whole volume and SSIM averaged over the sagittal planes, without
the first and last `factor` slices (extrapolated by every method alike).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .. import metrics
from ..errors import InputError
from ..through_plane import apply, data
from ..transforms import slice_profile as profile

#: (factor, thickness ratio) settings; the gap case runs on the first volume only.
SETTINGS = ((3.0, 1.0), (5.0, 1.0))
GAP_SETTING = (5.0, 0.6)


def make_thick(thin: np.ndarray, factor: float, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(thick volume, the thin truth over the same extent) along array axis 0."""
    matrix = profile.degradation_matrix(thin.shape[0], factor, ratio, "box").astype(np.float32)
    n = matrix.shape[0]
    covered = int(round(n * factor))
    thick = np.tensordot(matrix, thin, axes=(1, 0)).astype(np.float32)
    return thick, thin[:covered]


def score(output: np.ndarray, truth: np.ndarray, margin: int) -> dict[str, float]:
    """PSNR (whole volume) and SSIM (mean over sagittal planes), `margin` slices off each end."""
    a = torch.from_numpy(np.ascontiguousarray(output[margin:truth.shape[0] - margin], dtype=np.float32))
    b = torch.from_numpy(np.ascontiguousarray(truth[margin:truth.shape[0] - margin], dtype=np.float32))
    mse = float(torch.mean((a.double() - b.double()) ** 2))
    planes_a = a.permute(2, 0, 1)[:, None]  # sagittal: (I, 1, K, J)
    planes_b = b.permute(2, 0, 1)[:, None]
    return {"psnr": 10.0 * np.log10(1.0 / mse), "ssim": metrics.ssim(planes_a, planes_b)}


def as_image(volume: np.ndarray, spacing_xyz: Sequence[float]) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    return image


#: Role of the extra CT test volumes: lung-nodule crops of LIDC-IDRI test patients (the lesion
#: finder's, `training.localiser.EXTRA_LESIONS`), thin enough to be made thick; no model, not
#: even the in-plane trunk the through-plane network starts from, has seen them.
UNSEEN = "unseen CT"
#: An extra volume qualifies with slices at most this thick (mm) and at least this many.
UNSEEN_MAX_SPACING_MM, UNSEEN_MIN_SLICES = 1.25, 45


def unseen_ct_cases(folder: Path | None = None) -> list[tuple[str, str, str]]:
    """(modality, absolute path, UNSEEN) of the extra lesion volumes' CT test crops that are
    thin (<= UNSEEN_MAX_SPACING_MM) and long (>= UNSEEN_MIN_SLICES slices) enough; empty when
    their folder is absent."""
    from ..training.localiser import extra_cases
    out = []
    for case in extra_cases("test", root=folder):
        if case.modality != "CT":
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(case.image)
        reader.ReadImageInformation()
        if reader.GetSpacing()[2] <= UNSEEN_MAX_SPACING_MM and reader.GetSize()[2] >= UNSEEN_MIN_SLICES:
            out.append(("CT", case.image, UNSEEN))
    return out


def case_name(path: str) -> str:
    """A case as the report and its figures name it: the file name, or the case folder's for
    the extra crops, whose files are all image.nii.gz."""
    return Path(path).parent.name if Path(path).name == "image.nii.gz" else Path(path).name


#: Method label of `--baseline-weights` (another through-plane network, e.g. a previous release).
BASELINE = "baseline through-plane"
FP32_REFERENCE = "MedSR through-plane, fp32 torch"


def run_methods(thick: np.ndarray, spacing_xyz: Sequence[float], factor: float, ratio: float,
                adapt_seconds: float, weights: str | None, baseline_weights: str | None = None,
                fp32_reference: bool = False) -> dict[str, tuple[np.ndarray | None, float]]:
    """{method: (output volume or None when not applicable, seconds)}. Every network runs on
    the automatic path (backend and precision as a user gets them); `fp32_reference` adds the
    same network in fp32 torch, the reference of the automatic path's precision cost."""
    from .. import api
    thick_spacing = (spacing_xyz[0], spacing_xyz[1], spacing_xyz[2] * factor)
    image = as_image(thick, thick_spacing)
    thickness = thick_spacing[2] * ratio
    results: dict[str, tuple[np.ndarray | None, float]] = {}
    started = time.perf_counter()
    cubic = apply.restore(thick, 0, int(round(thick.shape[0] * factor)), ratio, None, cubic_only=True)  # type: ignore[arg-type]
    results["cubic-z"] = (cubic, time.perf_counter() - started)
    if float(factor).is_integer() and factor <= 4:
        started = time.perf_counter()
        out = api.upscale(image, model="edsr_lite", scale=(1, 1, int(factor)), output_float=True)
        results["today (edsr_lite + averaging)"] = (sitk.GetArrayFromImage(out), time.perf_counter() - started)
    else:
        results["today (edsr_lite + averaging)"] = (None, 0.0)
    runs = [("MedSR through-plane", weights, {}),
            ("MedSR adapted", weights, {"adapt": True, "adapt_seconds": adapt_seconds})]
    if baseline_weights:
        runs.insert(0, (BASELINE, baseline_weights, {}))
    if fp32_reference:
        runs.insert(-1, (FP32_REFERENCE, weights, {"precision": "fp32", "backend": "torch"}))
    for label, weights_path, extra in runs:
        if label == "MedSR adapted" and adapt_seconds <= 0:
            continue
        started = time.perf_counter()
        out = api.upscale(image, scale=(1, 1, factor), output_float=True, slice_thickness=thickness,
                          weights=weights_path, **extra)
        results[label] = (sitk.GetArrayFromImage(out), time.perf_counter() - started)
    return results


def figure(path: Path, thick: np.ndarray, factor: float, outputs: dict[str, np.ndarray], truth: np.ndarray) -> None:
    """Sagittal reformat PNG: thick (nearest) | cubic | MedSR | truth, 8-bit, unit range 0-1."""
    column = truth.shape[2] // 2
    n = truth.shape[0]
    nearest = thick[np.minimum((np.arange(n) / factor).astype(int), thick.shape[0] - 1)]
    panels = [nearest[:, :, column], outputs["cubic-z"][:n, :, column],
              outputs["MedSR through-plane"][:n, :, column], truth[:, :, column]]
    strip = np.concatenate([np.pad(p, ((0, 0), (0, 4)), constant_values=1.0) for p in panels], axis=1)
    image = sitk.GetImageFromArray(np.clip(strip[::-1] * 255.0, 0, 255).astype(np.uint8))
    sitk.WriteImage(image, str(path))


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="medsr benchmark --through-plane", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--through-plane", action="store_true",
                        help="this benchmark: thick slices made from thin held-out volumes")
    parser.add_argument("--held-out", metavar="DATA_ROOT", required=True,
                        help="the data folder holding the held-out volumes (../shared/data)")
    parser.add_argument("--out", required=True, help="output folder (results.md, .json, PNGs)")
    parser.add_argument("--crop", type=int, default=160, help="in-plane centre crop (pixels)")
    parser.add_argument("--adapt-seconds", type=float, default=90.0,
                        help="CPU budget of the adapted run (0 = skip it)")
    parser.add_argument("--weights", default=None, help="through-plane weights instead of the shipped")
    parser.add_argument("--baseline-weights", default=None,
                        help=f"another through-plane weights file, scored as '{BASELINE}' in the "
                             "same run (e.g. a previous release's, from git history)")
    parser.add_argument("--fp32-reference", action="store_true",
                        help=f"also score the network in fp32 torch ('{FP32_REFERENCE}'): the "
                             "precision cost of the automatic path")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of the cases to run")
    parser.add_argument("--unseen-ct", action="store_true",
                        help="add the thin LIDC-IDRI test crops of the extra lesion volumes "
                             "($MEDSR_EXTRA_LESIONS or ../extra_data/lesions) as unseen CT rows")
    args = parser.parse_args(list(argv))
    torch.set_num_threads(args.threads)
    root, out = Path(args.held_out), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cases = [(modality, rel, "test") for modality, rel in data.TEST_SOURCES]
    cases += [(modality, rel, "validation") for modality, rel in data.VALIDATION_SOURCES if modality == "CT"]
    cases += unseen_ct_cases() if args.unseen_ct else []
    for case_index, (modality, rel, role) in enumerate(cases):
        if args.only and not any(s in rel for s in args.only):
            continue
        if not (root / rel).exists():
            raise InputError(f"{root / rel}: held-out volume not found")
        units, spacing = data.load_units(root / rel)
        k, j, i = units.shape
        c = args.crop
        units = units[:, max(0, (j - c) // 2):max(0, (j - c) // 2) + c, max(0, (i - c) // 2):max(0, (i - c) // 2) + c]
        settings = list(SETTINGS) + ([GAP_SETTING] if case_index == 0 else [])
        for factor, ratio in settings:
            thick, truth = make_thick(units, factor, ratio)
            outputs = run_methods(thick, spacing, factor, ratio, args.adapt_seconds, args.weights,
                                  args.baseline_weights, args.fp32_reference)
            margin = int(np.ceil(factor))
            for method, (volume, seconds) in outputs.items():
                if volume is None:
                    rows.append({"case": rel, "role": role, "modality": modality, "factor": factor, "thickness_ratio": ratio,
                                 "method": method, "psnr": None, "ssim": None, "seconds": None})
                    continue
                s = score(volume, truth, margin)
                rows.append({"case": rel, "role": role, "modality": modality, "factor": factor, "thickness_ratio": ratio,
                             "method": method, **s, "seconds": round(seconds, 1)})
                print(f"{rel} x{factor:g} t{ratio:g} {method}: {s['psnr']:.2f} dB SSIM {s['ssim']:.4f} "
                      f"({seconds:.1f} s)", file=sys.stderr, flush=True)
            name = case_name(rel).split(".")[0]
            if ratio == 1.0:
                figure(out / f"sagittal_{modality}_{name}_x{factor:g}.png", thick, factor,
                       {m: v for m, (v, _) in outputs.items() if v is not None}, truth)
            (out / "results.json").write_text(json.dumps({"command": "medsr benchmark " + shlex.join(list(argv)),
                                                          "rows": rows}, indent=1), encoding="utf-8")
    (out / "results.md").write_text(report(rows, "medsr benchmark " + shlex.join(list(argv))), encoding="utf-8")
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0


def report(rows: list[dict], command: str) -> str:
    """Markdown: per case and setting, PSNR / SSIM per method and the gain over cubic-z; then
    the mean gain at x3 and x5 (box, contiguous) over CT and MR."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"Command: `{command}`", "", "| case | factor | thickness/spacing | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    keys = list(dict.fromkeys((r["case"], r["factor"], r["thickness_ratio"]) for r in rows))
    for key in keys:
        cells = []
        by_method = {r["method"]: r for r in rows if (r["case"], r["factor"], r["thickness_ratio"]) == key}
        cubic = by_method.get("cubic-z", {}).get("psnr")
        for m in methods:
            r = by_method.get(m)
            if r is None or r["psnr"] is None:
                cells.append("n/a")
            else:
                gain = "" if m == "cubic-z" or cubic is None else f" ({r['psnr'] - cubic:+.2f})"
                cells.append(f"{r['psnr']:.2f}{gain} / {r['ssim']:.3f}")
        role = next(r["role"] for r in rows if r["case"] == key[0])
        label = case_name(key[0]) + ("" if role == "test" else f" ({role})")
        lines.append(f"| {label} | x{key[1]:g} | {key[2]:g} | " + " | ".join(cells) + " |")
    gains = mean_gains(rows)
    lines += ["", "Mean PSNR gain over cubic-z on the test volumes (box, contiguous), CT and MR averaged "
              "(each modality's mean, then their mean):", ""]
    for m in methods:
        if m == "cubic-z":
            continue
        parts = []
        for factor in (3.0, 5.0):
            per_modality = [gains[(m, factor, modality)] for modality in ("CT", "MR")
                            if (m, factor, modality) in gains]
            parts.append(f"x{factor:g}: " + (f"{np.mean(per_modality):+.2f} dB" if per_modality else "n/a"))
        lines.append(f"- {m}: " + ", ".join(parts))
    lines += ["", "Per modality (mean gain over cubic-z on the test volumes, dB):", "",
              "| method | CT x3 | MR x3 | CT x5 | MR x5 |", "|---|---|---|---|---|"]
    cells_of = {m: [gains.get((m, f, mod)) for f in (3.0, 5.0) for mod in ("CT", "MR")]
                for m in methods if m != "cubic-z"}
    for m, cells in cells_of.items():
        lines.append(f"| {m} | " + " | ".join("n/a" if c is None else f"{c:+.2f}" for c in cells) + " |")
    if BASELINE in cells_of:
        for m, cells in cells_of.items():
            if not m.startswith("MedSR") or m == FP32_REFERENCE:
                continue
            steps = [None if c is None or b is None else c - b for c, b in zip(cells, cells_of[BASELINE])]
            lines.append(f"| step of {m} over the baseline | "
                         + " | ".join("n/a" if c is None else f"{c:+.2f}" for c in steps) + " |")
    lines += precision_cost(rows)
    unseen = mean_gains(rows, UNSEEN)
    if unseen:
        lines += ["", f"Unseen CT (the {UNSEEN} rows: LIDC-IDRI test crops that no model, not even "
                  "the in-plane trunk, has seen), mean gain over cubic-z, dB:", "",
                  "| method | CT x3 | CT x5 |", "|---|---|---|"]
        for m in cells_of:
            lines.append(f"| {m} | " + " | ".join(
                f"{unseen[(m, f, 'CT')]:+.2f}" if (m, f, "CT") in unseen else "n/a" for f in (3.0, 5.0)) + " |")
        for m in (m for m in cells_of if m.startswith("MedSR") and m != FP32_REFERENCE and BASELINE in cells_of):
            steps = [unseen[(m, f, "CT")] - unseen[(BASELINE, f, "CT")]
                     if (m, f, "CT") in unseen and (BASELINE, f, "CT") in unseen else None for f in (3.0, 5.0)]
            lines.append(f"| step of {m} over the baseline | "
                         + " | ".join("n/a" if c is None else f"{c:+.2f}" for c in steps) + " |")
    return "\n".join(lines) + "\n"


def precision_cost(rows: list[dict]) -> list[str]:
    """Report lines: PSNR of the automatic path minus fp32 torch per case and setting, over
    every row that has both (none without `--fp32-reference`)."""
    psnr = {(r["case"], r["factor"], r["thickness_ratio"], r["method"]): r["psnr"] for r in rows}
    steps = [psnr[key[:3] + ("MedSR through-plane",)] - value for key, value in psnr.items()
             if key[3] == FP32_REFERENCE and value is not None
             and psnr.get(key[:3] + ("MedSR through-plane",)) is not None]
    if not steps:
        return []
    return ["", f"Precision cost of the automatic path (MedSR through-plane minus {FP32_REFERENCE}) "
            f"over {len(steps)} rows: mean {np.mean(steps):+.3f} dB, worst {min(steps):+.3f} dB, "
            f"best {max(steps):+.3f} dB."]


def mean_gains(rows: list[dict], role: str = "test") -> dict[tuple[str, float, str], float]:
    """{(method, factor, modality): mean PSNR gain over cubic-z} over the box, contiguous
    settings (x3 and x5) of the volumes of `role`."""
    cubic = {(r["case"], r["factor"]): r["psnr"] for r in rows
             if r["method"] == "cubic-z" and r["thickness_ratio"] == 1.0}
    collected: dict[tuple[str, float, str], list[float]] = {}
    for r in rows:
        if r["role"] != role or r["thickness_ratio"] != 1.0 or r["method"] == "cubic-z" \
                or r["psnr"] is None or (r["case"], r["factor"]) not in cubic:
            continue
        key = (r["method"], float(r["factor"]), r["modality"])
        collected.setdefault(key, []).append(r["psnr"] - cubic[(r["case"], r["factor"])])
    return {k: float(np.mean(v)) for k, v in collected.items()}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
