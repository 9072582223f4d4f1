"""Writers for `medsr benchmark`: results.md, results.csv, results.json and figure_x{s}.png.

Tables follow paper 000's Tables II-IV: one table per scale, rows = images, columns = methods,
a mean row last; each cell is "PSNR / SSIM" (dB / unitless).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .scores import FOREGROUND_THRESHOLD, ScaleResult, mean_scores, steps_over_baseline

#: Figure crop edge in HR pixels (smaller images use their whole size) and displayed panel size.
FIGURE_CROP = 96
FIGURE_PANEL = 192
CAPTION_HEIGHT = 30

REGIONS = {"whole": "whole slice", "foreground": f"foreground (HR unit intensity > {FOREGROUND_THRESHOLD})"}


def _cell(scores: dict[str, float], first: str, second: str, bold: bool = False) -> str:
    if first not in scores:
        return "-"
    a = f"{scores[first]:.2f}" if first.startswith("psnr") else f"{scores[first]:.4f}"
    a = f"**{a}**" if bold else a
    if second == first:
        return a
    return f"{a} / {scores[second]:.4f}" if second in scores else f"{a} / -"


def score_table(result: ScaleResult, first: str, second: str) -> list[str]:
    """Markdown table: a row per image, a mean row, a column per method; cells first / second."""
    means = mean_scores(result)
    lines = ["| Image | " + " | ".join(result.methods) + " |",
             "|---|" + "---|" * len(result.methods)]
    for image, by_method in result.scores.items():
        lines.append(f"| {image} | " + " | ".join(_cell(by_method[m], first, second)
                                                 for m in result.methods) + " |")
    valid = [m for m in result.methods if first in means[m] and math.isfinite(means[m][first])]
    best = max(valid, key=lambda m: means[m][first]) if valid else None
    lines.append("| **Mean** | " + " | ".join(_cell(means[m], first, second, bold=(m == best))
                                             for m in result.methods) + " |")
    return lines


def gains_over_bicubic(result: ScaleResult, region: str = "whole") -> dict[str, dict[str, float]]:
    """method -> {"psnr_gain_db": mean PSNR minus bicubic's, "images_better": count, "images": n}."""
    gains = {}
    key = f"psnr_{region}"
    for method in result.methods[1:]:
        pairs = [(by[method][key], by["bicubic"][key]) for by in result.scores.values()
                 if key in by[method] and key in by["bicubic"]]
        if pairs:
            gains[method] = {"psnr_gain_db": float(np.mean([a for a, _ in pairs]) - np.mean([b for _, b in pairs])),
                             "images_better": sum(a > b for a, b in pairs), "images": len(pairs)}
    return gains


def gains_table(results: Sequence[ScaleResult]) -> list[str]:
    """Markdown: mean PSNR gain over bicubic per method and scale, with images where it wins."""
    methods = list(dict.fromkeys(m for r in results for m in r.methods[1:]))
    lines = ["| Method | " + " | ".join(f"x{r.scale} whole | x{r.scale} foreground" for r in results) + " |",
             "|---|" + "---|---|" * len(results)]
    for method in methods:
        cells = []
        for result in results:
            for region in REGIONS:
                gain = gains_over_bicubic(result, region).get(method)
                cells.append("-" if gain is None else f"{gain['psnr_gain_db']:+.2f} dB "
                             f"({gain['images_better']}/{gain['images']})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def baseline_step_table(results: Sequence[ScaleResult]) -> list[str]:
    """Markdown: per volume and scale, the whole-slice PSNR step of each model over the same
    model with the baseline weights (empty without baseline columns)."""
    steps = {r.scale: steps_over_baseline(r) for r in results}
    methods = list(dict.fromkeys(m for by_method in steps.values() for m in by_method))
    if not methods:
        return []
    lines = ["", "## Step over the baseline weights", "",
             "Whole-slice PSNR of each model minus the same model with the baseline weights, "
             "mean over the volume's images (dB).", "",
             "| Model | Volume | " + " | ".join(f"x{r.scale}" for r in results) + " |",
             "|---|---|" + "---|" * len(results)]
    for method in methods:
        volumes = list(dict.fromkeys(v for by_method in steps.values()
                                     for v in by_method.get(method, {}).get("per_volume", {})))
        for volume in volumes + ["**mean**"]:
            cells = []
            for result in results:
                step = steps[result.scale].get(method)
                value = None if step is None else (
                    step["mean"] if volume == "**mean**" else step["per_volume"].get(volume))
                cells.append("-" if value is None else f"{value:+.2f}")
            lines.append(f"| {method} | {volume} | " + " | ".join(cells) + " |")
    return lines


def protocol_text(results: Sequence[ScaleResult], run_info: dict[str, Any]) -> list[str]:
    return [
        f"Command: `{run_info['command']}`", "",
        f"Modality {run_info['modality']}; {len(run_info['inputs'])} input(s), "
        f"{len(run_info['images'])} image(s) ({run_info['slices_per_volume']} evenly spaced axial "
        "slice(s) per volume among those with >= 5 % foreground"
        + (f", resampled to {run_info['resize']} x {run_info['resize']} px" if run_info.get("resize") else "")
        + (f", centre-cropped to {run_info['max_size']} px" if run_info["max_size"] else "") + ").",
        "Intensities: each volume's 0.5th/99.5th percentiles -> 0/1 (the training normalisation); "
        "PSNR with data_range = 1.0 in those units; SSIM: Gaussian 11x11, sigma 1.5.",
        f"Degradation (training code, `degrade.apply_pipeline`): `{json.dumps(run_info['degradation'])}` "
        "with the scale filled in; HR cropped to a multiple of the scale first.",
        "Scores on raw model outputs (not clamped), `scale` pixels cropped from every border "
        "(crop_border = scale); mean row = mean over images.",
        f"Foreground: HR unit intensity > {FOREGROUND_THRESHOLD} (the training foreground "
        "threshold, no closing); SSIM/UQI average windows centred on foreground pixels.",
        f"Engine: device {run_info['device']}, precision {run_info['precision']} (autocast of "
        f"learned models: {run_info['autocast_learned_models']}), "
        f"{run_info['torch_threads']} torch thread(s).", "",
        "Inputs: " + ", ".join(f"`{p}`" for p in run_info["inputs"]),
    ]


def markdown_text(results: Sequence[ScaleResult], run_info: dict[str, Any]) -> str:
    lines = ["# MedSR benchmark", ""] + protocol_text(results, run_info)
    xray = run_info["modality"] == "XR"
    if any(len(r.methods) > 1 for r in results):
        lines += ["", "## Mean PSNR gain over bicubic", "",
                  "Mean PSNR of the method minus bicubic's over the same images (images where the "
                  "method beats bicubic / images).", ""] + gains_table(results)
    lines += baseline_step_table(results)
    for result in results:
        lines += ["", f"## x{result.scale}", ""]
        lines += [f"- {note}" for note in result.notes] + ([""] if result.notes else [])
        for region, title in REGIONS.items():
            lines += [f"PSNR (dB) / SSIM, x{result.scale}, {title}:", ""]
            lines += score_table(result, f"psnr_{region}", f"ssim_{region}") + [""]
        if xray:
            lines += [f"MS-SSIM / UQI, x{result.scale}, whole slice:", ""]
            lines += score_table(result, "ms_ssim_whole", "uqi_whole") + [""]
            lines += [f"UQI, x{result.scale}, foreground:", ""]
            lines += score_table(result, "uqi_foreground", "uqi_foreground") + [""]
        if result.figure_path:
            lines += [f"![x{result.scale}]({result.figure_path.name})", ""]
    lines += ["## Seconds per slice", "",
              "Wall time of the engine's upscale call per slice (model loading excluded).", ""]
    methods = list(dict.fromkeys(m for r in results for m in r.methods))
    lines += ["| Method | " + " | ".join(f"x{r.scale}" for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for method in methods:
        cells = [f"{r.seconds_per_slice[method]:.4f}" if method in r.seconds_per_slice else "-"
                 for r in results]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(results: Sequence[ScaleResult]) -> list[tuple[str, int, str, str, str, float]]:
    """Long format (image, scale, method, metric, region, value); timing rows have image "all"."""
    rows = []
    for result in results:
        for image, by_method in result.scores.items():
            for method in result.methods:
                for key, value in by_method[method].items():
                    metric, region = key.rsplit("_", 1)
                    rows.append((image, result.scale, method, metric, region, value))
        for method, seconds in result.seconds_per_slice.items():
            rows.append(("all", result.scale, method, "seconds_per_slice", "-", seconds))
    return rows


def _jsonable(value: float) -> float | None:
    return value if math.isfinite(value) else None


def json_payload(results: Sequence[ScaleResult], run_info: dict[str, Any]) -> dict[str, Any]:
    payload: dict[str, Any] = {**run_info, "scales": {}}
    for result in results:
        means = mean_scores(result)
        payload["scales"][f"x{result.scale}"] = {
            "factors": list(result.factors), "methods": result.methods, "notes": result.notes,
            "per_image": {image: {m: {k: _jsonable(v) for k, v in s.items()} for m, s in by.items()}
                          for image, by in result.scores.items()},
            "mean": {m: {k: _jsonable(v) for k, v in s.items()} for m, s in means.items()},
            "psnr_gain_over_bicubic": {region: gains_over_bicubic(result, region) for region in REGIONS},
            "psnr_step_over_baseline": {region: steps_over_baseline(result, region) for region in REGIONS},
            "seconds_per_slice": result.seconds_per_slice,
            "figure": result.figure_info,
        }
    return payload


def detail_region(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the size x size window with the most gradient energy in `hr`."""
    gy, gx = np.gradient(hr.astype(np.float64))
    energy = np.pad(np.hypot(gy, gx), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = energy[size:, size:] - energy[:-size, size:] - energy[size:, :-size] + energy[:-size, :-size]
    y0, x0 = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y0), int(x0)


def write_figure(result: ScaleResult, path: Path) -> dict[str, Any]:
    """Crops of HR, bicubic and each model on one region, captions with the slice's PSNR/SSIM."""
    figure = result.figure
    hr = figure["hr"]
    size = min(FIGURE_CROP, *hr.shape)
    zoom = max(1, FIGURE_PANEL // size)
    panel = size * zoom
    y0, x0 = detail_region(hr, size)
    scores = result.scores[figure["image"]]
    panels = [("HR", f"{figure['image']}"[:30], hr)]
    for method in result.methods:
        s = scores[method]
        panels.append((method, f"{s['psnr_whole']:.2f} dB / {s['ssim_whole']:.4f}",
                       figure["outputs"][method]))
    low, high = np.percentile(hr[y0:y0 + size, x0:x0 + size], [1, 99])  # one window for all panels
    high = high if high > low else low + 1.0
    canvas = Image.new("L", (panel * len(panels), panel + CAPTION_HEIGHT), color=0)
    draw = ImageDraw.Draw(canvas)
    for i, (title, caption, values) in enumerate(panels):
        crop = np.clip((values[y0:y0 + size, x0:x0 + size] - low) / (high - low), 0.0, 1.0)
        pixels = Image.fromarray((crop * 255.0 + 0.5).astype(np.uint8)).resize((panel, panel), Image.NEAREST)
        canvas.paste(pixels, (i * panel, CAPTION_HEIGHT))
        draw.text((i * panel + 3, 2), title, fill=255)
        draw.text((i * panel + 3, 15), caption, fill=255)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return {"file": path.name, "image": figure["image"], "region_yx_size": [y0, x0, size],
            "panel_px": panel, "panels": [p[0] for p in panels],
            "display_window_unit": [float(low), float(high)],
            "captions": "PSNR (dB) / SSIM of the whole slice; display window = HR crop's 1st-99th percentile"}


def write_all(out_dir: Path, results: Sequence[ScaleResult], run_info: dict[str, Any]) -> list[Path]:
    """Write the figures, results.md, results.csv and results.json into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        result.figure_path = out_dir / f"figure_x{result.scale}.png"
        result.figure_info = write_figure(result, result.figure_path)
        written.append(result.figure_path)
    md = out_dir / "results.md"
    md.write_text(markdown_text(results, run_info), encoding="utf-8")
    table = out_dir / "results.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("image", "scale", "method", "metric", "region", "value"))
        writer.writerows(csv_rows(results))
    payload = out_dir / "results.json"
    payload.write_text(json.dumps(json_payload(results, run_info), indent=2) + "\n", encoding="utf-8")
    return written + [md, table, payload]
