"""Paper 003's Table 1 on held-out MR patients: PSNR / SSIM inside the lesion ROI.

Rows: methods (bicubic, bicubic + non-local-means denoising for the noisy cases, the pixel-loss
generator edsr_lite in SRResNet's role, the same GAN recipe as LFSR on whole slices in SRGAN's
role, LFSR); columns: x2, x4, x2 with k-space noise sigma 20 and 40 (paper 003's 8-bit
convention, `training.degrade.add_kspace_noise`). Per held-out volume, the lesion slices
(evenly spaced, up to --slices per volume) are degraded with the training code, super-resolved
whole, and scored inside the ROI: the bounding box of that slice's lesion mask grown by
--margin HR pixels (the ground-truth ROI, so detection errors do not enter the SR scores;
the detector is scored by detector_coverage.py). Then the time of the heavy model on the whole
volume vs lesion-focused runs (`api.upscale(roi=...)`: LFSR in the ROI, bicubic or the default elsewhere).

    python benchmarks/bench_lfsr.py --data-root ../shared/data --out benchmarks/results/lfsr

Non-local means: scikit-image's `denoise_nl_means` (`pip install -e ".[bench]"`) on each noisy
LR slice before bicubic upsampling, as paper 003's "B+NLD" (ITK's PatchBasedDenoising either
left the image unchanged or ran for minutes per slice here).
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

from MedSRLib import api, metrics  # noqa: E402
from MedSRLib.transforms import intensity
from MedSRLib.io import volumes as io
from MedSRLib.roi import focus as roi
from MedSRLib.models import registry as zoo
from MedSRLib.errors import InputError  # noqa: E402
from MedSRLib.transforms import degrade  # noqa: E402

#: Held-out MR volumes with lesion masks (patients held out by every MR recipe).
HELD_OUT = [("sarcoma/STS_012/MR_T1_image.nii.gz", "sarcoma/STS_012/MR_T1_mask.nii.gz"),
            ("sarcoma/STS_014/MR_T1_image.nii.gz", "sarcoma/STS_014/MR_T1_mask.nii.gz"),
            ("brats/brats_2013_pat0006_1/T1c_subtrMeanDivStd.nii.gz", "brats/brats_2013_pat0006_1/OTMultiClass.nii.gz")]
CONDITIONS = [("x2", 2, 0.0), ("x4", 4, 0.0), ("x2 sigma=20", 2, 20.0), ("x2 sigma=40", 2, 40.0)]
#: Table rows: paper 003's bicubic, B+NLD, SRResNet (our pixel-loss generator: edsr_lite), SRGAN
#: (the same generator and GAN recipe on whole-slice patches: gan_wholeslice_x*.yaml) and LFSR.
#: Noisy columns add NLM-first runs and LFSR re-trained with that noise (lfsr_noise{sigma}_x2).
METHODS = ["bicubic", "bicubic+NLM", "edsr_lite", "gan_wholeslice", "lfsr", "NLM+edsr_lite", "NLM+lfsr",
           "lfsr noise-trained"]


def lesion_slices(mask_kji: np.ndarray, count: int) -> list[int]:
    """Up to `count` evenly spaced axial slices holding lesion voxels (ends excluded)."""
    candidates = np.flatnonzero(mask_kji.reshape(mask_kji.shape[0], -1).any(1))
    if candidates.size <= count:
        return [int(c) for c in candidates]
    return [int(candidates[i]) for i in np.linspace(0, candidates.size - 1, count + 2).round().astype(int)[1:-1]]


def roi_box(mask_plane: np.ndarray, margin: int, multiple: int) -> tuple[slice, slice]:
    rows, cols = np.nonzero(mask_plane)
    h, w = mask_plane.shape
    y0, y1 = max(0, rows.min() - margin), min(h, rows.max() + 1 + margin)
    x0, x1 = max(0, cols.min() - margin), min(w, cols.max() + 1 + margin)
    return slice(y0, y1), slice(x0, x1)


def nlm_denoise(low: torch.Tensor, sigma: float) -> torch.Tensor:
    """Non-local means (scikit-image, Buades et al.) on one (1, 1, h, w) LR slice, with the
    known noise std; 5x5 patches, 13x13 search window, h = 0.8 sigma (skimage's guidance)."""
    from skimage.restoration import denoise_nl_means  # the [bench] extra
    std = sigma / degrade.GREY_LEVELS                 # noise std in unit intensities
    out = denoise_nl_means(low[0, 0].double().numpy(), patch_size=5, patch_distance=6,
                           h=0.8 * std, sigma=std, fast_mode=True)
    return torch.from_numpy(out).float()[None, None]


def load_methods(scale: int, weights_dir: Path | None, baselines: Path) -> tuple[dict[str, zoo.SRModel], list[str]]:
    models, notes = {}, []
    for name in ("bicubic", "edsr_lite", "lfsr"):
        try:
            models[name] = zoo.load_model(name, scale, weights_dir=weights_dir)
        except InputError as err:
            notes.append(f"x{scale} {name}: skipped ({err})")
    gan = baselines / f"gan_wholeslice_x{scale}" / f"lfsr_x{scale}.safetensors"
    if gan.is_file():
        models["gan_wholeslice"] = zoo.load_model("lfsr", scale, weights_path=gan)
    else:
        notes.append(f"x{scale} gan_wholeslice: skipped ({gan} not found: make lfsr-baselines)")
    return models, notes


def noise_trained(baselines: Path, scale: int, sigma: float, cache: dict, notes: list[str]):
    """The LFSR model re-trained with k-space noise `sigma` (runs/lfsr_noise{sigma}_x{scale}), or None."""
    if not sigma:
        return None
    key = (scale, sigma)
    if key not in cache:
        path = baselines / f"lfsr_noise{sigma:g}_x{scale}" / f"lfsr_x{scale}.safetensors"
        cache[key] = zoo.load_model("lfsr", scale, weights_path=path) if path.is_file() else None
        if cache[key] is None:
            notes.append(f"x{scale} sigma={sigma:g} lfsr noise-trained: skipped ({path} not found)")
    return cache[key]


def run_quality(root: Path, slices_per_volume: int, margin: int, weights_dir: Path | None,
                baselines: Path):
    per_condition: dict[str, dict[str, list[tuple[float, float]]]] = {}
    notes: list[str] = []
    models_by_scale = {}
    for scale in sorted({c[1] for c in CONDITIONS}):
        models_by_scale[scale], scale_notes = load_methods(scale, weights_dir, baselines)
        notes += scale_notes
    rows, cache = 0, {}
    for image_path, mask_path in HELD_OUT:
        voxels = sitk.GetArrayFromImage(io.read_volume(root / image_path))
        mask = sitk.GetArrayFromImage(io.read_volume(root / mask_path)) > 0
        unit = intensity.fit_mapping(voxels).to_unit(voxels)
        for z in lesion_slices(mask, slices_per_volume):
            rows += 1
            for label, scale, sigma in CONDITIONS:
                hr = degrade.crop_to_multiple(torch.from_numpy(np.ascontiguousarray(unit[z]))[None, None].float(),
                                              (scale, scale))
                generator = torch.Generator().manual_seed(1000 * rows + scale + int(sigma))
                steps = [{"type": "bicubic", "scale": scale}] + ([{"type": "kspace_noise", "sigma": sigma}] if sigma else [])
                low = degrade.apply_pipeline(hr, steps, generator)
                box = roi_box(mask[z][:hr.shape[-2], :hr.shape[-1]], margin, scale)
                target = hr[..., box[0], box[1]]
                outputs = {}
                with torch.inference_mode():
                    for name, model in models_by_scale[scale].items():
                        outputs[name] = model(low).float()
                    noisy_model = noise_trained(baselines, scale, sigma, cache, notes)
                    if noisy_model is not None:
                        outputs["lfsr noise-trained"] = noisy_model(low).float()
                    if sigma:  # denoise the LR slice first, then each model (rows "+NLM")
                        denoised = nlm_denoise(low, sigma)
                        for name, model in models_by_scale[scale].items():
                            if name in ("bicubic", "edsr_lite", "lfsr"):
                                label_nlm = "bicubic+NLM" if name == "bicubic" else f"NLM+{name}"
                                outputs[label_nlm] = model(denoised).float()
                for name, output in outputs.items():
                    crop = output[..., box[0], box[1]]
                    score = (metrics.psnr(crop, target, 1.0), metrics.ssim(crop, target, 1.0))
                    per_condition.setdefault(label, {}).setdefault(name, []).append(score)
        print(f"{image_path}: done", flush=True)
    return per_condition, notes, rows


def run_timing(root: Path, weights_dir: Path | None, threads: int) -> dict:
    """Seconds (x2 along z) for the LFSR model on the whole volume vs lesion-focused runs with
    bicubic or the default model outside the ROI (the ground-truth mask's box)."""
    image_path, mask_path = HELD_OUT[0]
    image = io.read_volume(root / image_path)
    box = roi.roi_from_mask(io.read_volume(root / mask_path), image)
    weights = zoo.shipped_weights(zoo.get_spec("lfsr"), 2, weights_dir)
    common = dict(scale=2, axis="z", threads=threads, modality="MR")
    timings = {"volume": image_path, "size_xyz": list(image.GetSize()),
               "roi_index_xyz": [list(box.lower_xyz), list(box.upper_xyz)], "runs": []}

    def timed(label, call):
        start = time.perf_counter()
        call()
        timings["runs"].append((label, time.perf_counter() - start))

    timed("lfsr on the whole volume", lambda: api.upscale(image, model="lfsr", weights=weights and str(weights), **common))
    for fast in ("bicubic", None):
        name = fast or api.choose_model(None, image, "MR", 2)
        timed(f"lesion-focused: lfsr in the ROI, {name} elsewhere",
              lambda: api.upscale(image, roi=box, roi_model="lfsr", model=fast,
                                  roi_weights=weights and str(weights), **common))
    timed(f"{api.choose_model(None, image, 'MR', 2)} (default) on the whole volume",
          lambda: api.upscale(image, **common))
    return timings


def markdown(per_condition, notes, rows, timings, command) -> str:
    lines = ["# Lesion-focused SR: paper 003's Table 1 on held-out MR", "", f"Command: `{command}`", "",
             f"{rows} lesion slices of {len(HELD_OUT)} held-out volumes "
             f"({', '.join(p for p, _ in HELD_OUT)}); PSNR (dB) / SSIM inside the ground-truth ROI "
             "(lesion box + margin), unit intensities (0.5/99.5 percentiles -> 0/1).", ""]
    labels = [c[0] for c in CONDITIONS]
    lines += ["| Method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for method in METHODS:
        cells = []
        for label in labels:
            scores = per_condition.get(label, {}).get(method)
            cells.append("-" if not scores else
                         f"{np.mean([s[0] for s in scores]):.2f} / {np.mean([s[1] for s in scores]):.4f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    if timings:
        whole = timings["runs"][0][1]
        lines += ["", "## Time (x2 along z, CPU)", "",
                  f"Volume {timings['volume']} {timings['size_xyz']}, ROI {timings['roi_index_xyz']} (its mask's box):",
                  "", "| Run | seconds | vs lfsr everywhere |", "|---|---|---|"]
        lines += [f"| {label} | {sec:.1f} | {sec / whole:.0%} |" for label, sec in timings["runs"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--slices", type=int, default=5, help="lesion slices per volume")
    parser.add_argument("--margin", type=int, default=8, help="HR pixels around the lesion box")
    parser.add_argument("--weights-dir", type=Path, default=None, help="default: the shipped weights")
    parser.add_argument("--baselines", type=Path, default=Path("runs"),
                        help="folder holding gan_wholeslice_x{2,4}/ (make lfsr-baselines)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.data_root.resolve()
    per_condition, notes, rows = run_quality(root, args.slices, args.margin, args.weights_dir, args.baselines)
    timings = None if args.skip_timing else run_timing(root, args.weights_dir, args.threads)
    command = "python benchmarks/bench_lfsr.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(per_condition, notes, rows, timings, command)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table1.md").write_text(text, encoding="utf-8")
        (args.out / "table1.json").write_text(json.dumps(
            {"scores": {k: {m: [list(s) for s in v] for m, v in d.items()} for k, d in per_condition.items()},
             "notes": notes, "timings": timings}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
