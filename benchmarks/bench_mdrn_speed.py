"""Time per 512 x 512 slice of MDRN against edsr_lite (and plain torch fp32 edsr_lite x2 as the
machine-independent reference), x2/x3/x4, on the automatic inference path, in one run.

The slice is the middle slice of the real CT series `ct/crlm-ct-1004-dicom` (512 x 512), mapped to
unit intensities as inference does; every model runs through `SliceUpscaler` with default
`EngineOptions` (backend, precision and tiles chosen automatically, as every entry point does),
after a warm-up (conversion, compilation); medians of `--rounds` interleaved rounds.

Run: python benchmarks/bench_mdrn_speed.py [--rounds 3] [--threads 1] [--out benchmarks/results/mdrn]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from MedSRLib.transforms import intensity
from MedSRLib.io import volumes as io
from MedSRLib.runtime import model_cache
from MedSRLib.runtime.engine import EngineOptions, SliceUpscaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import SPEED_VOLUME, cpu_description, interleaved_median_ms  # noqa: E402

MODELS = ("edsr_lite", "mdrn")
SCALES = (2, 3, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenVINO threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "mdrn")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_description()
    print(cpu, flush=True)
    hu = sitk.GetArrayFromImage(io.read_volume(SPEED_VOLUME))
    middle = hu.shape[0] // 2
    unit = intensity.fit_mapping(hu).to_unit(hu)[middle:middle + 1].astype(np.float32)

    reference = model_cache.load_model("edsr_lite", (2, 2), modality="CT")

    def plain(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return reference(torch.from_numpy(x)[:, None])[:, 0].numpy()

    runners = {"plain torch fp32 edsr_lite x2": (plain, "torch fp32 NCHW")}
    for name in MODELS:
        for scale in SCALES:
            model = model_cache.load_model(name, (scale, scale), modality="CT")
            upscaler = SliceUpscaler(model, (scale, scale), EngineOptions(threads=args.threads))
            runners[f"{name} x{scale}"] = (upscaler.upscale, upscaler.description)
    ms = interleaved_median_ms({key: run for key, (run, _) in runners.items()}, unit, args.rounds)
    plain_ms = ms["plain torch fp32 edsr_lite x2"]
    lines = ["# MDRN vs edsr_lite: time per 512 x 512 slice", "", f"CPU: {cpu}", "",
             f"Command: `python benchmarks/bench_mdrn_speed.py --rounds {args.rounds}"
             + (f" --threads {args.threads}" if args.threads else "") + "`. One real 512 x 512 CT "
             f"slice in, medians of {args.rounds} interleaved rounds after a warm-up, the automatic "
             "path (default EngineOptions). Machine shared with other jobs: the ratios carry, the "
             "milliseconds do not.", "",
             "| model | scale | ms per 512x512 slice | x edsr_lite same scale | x plain torch fp32 edsr_lite x2 | runs as |",
             "|---|---|---|---|---|---|"]
    for name in MODELS:
        for scale in SCALES:
            key = f"{name} x{scale}"
            lines.append(f"| {name} | x{scale} | {ms[key]:.0f} | {ms[key] / ms[f'edsr_lite x{scale}']:.2f} "
                         f"| {ms[key] / plain_ms:.2f} | {runners[key][1]} |")
    lines.append(f"| plain torch fp32 edsr_lite (reference) | x2 | {plain_ms:.0f} | | 1.00 | torch fp32 NCHW |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.md").write_text(text, encoding="utf-8")
    (args.out / "speed.json").write_text(json.dumps(
        {"cpu": cpu, "rounds": args.rounds, "threads": args.threads, "ms": ms,
         "runs_as": {key: description for key, (_, description) in runners.items()}}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
