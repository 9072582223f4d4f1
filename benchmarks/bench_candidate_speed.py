"""Time per 512 x 512 slice of a candidate weights file against the shipped one, on the
automatic inference path (int8 or bf16 OpenVINO where it is within its accuracy contract), in
one run: both interleaved, medians of `--rounds` rounds after a warm-up, with plain torch fp32
of the shipped file in the same rounds as a machine-independent reference.

The candidate is a folder holding `<model>_x<scale>.safetensors`, its card and, for the int8
path, its int8 model (`python -m MedSRLib.evaluation.quantize_int8 --weights-dir DIR ...`).

Run: python benchmarks/bench_candidate_speed.py --model edsr_lite --scale 4 --candidate DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from MedSRLib.io import volumes as io
from MedSRLib.models import registry as zoo
from MedSRLib.runtime.engine import EngineOptions, SliceUpscaler
from MedSRLib.transforms import intensity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import SPEED_VOLUME, cpu_description, interleaved_median_ms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="edsr_lite")
    parser.add_argument("--scale", type=int, required=True)
    parser.add_argument("--candidate", type=Path, required=True, help="folder of the candidate weights")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(cpu_description(), flush=True)
    factors = (args.scale, args.scale)
    hu = sitk.GetArrayFromImage(io.read_volume(SPEED_VOLUME))
    middle = hu.shape[0] // 2
    unit = intensity.fit_mapping(hu).to_unit(hu)[middle:middle + 1]  # (1, 512, 512)

    shipped = zoo.load_model(args.model, factors)
    candidate = zoo.load_model(args.model, factors, weights_dir=args.candidate)
    runners = {}
    for label, model in (("shipped", shipped), ("candidate", candidate)):
        upscaler = SliceUpscaler(model, factors, EngineOptions())
        runners[label] = (upscaler.upscale, upscaler.description)

    def plain(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return shipped(torch.from_numpy(x)[:, None])[:, 0].numpy()

    runners["plain torch fp32, shipped (reference)"] = (plain, "torch fp32")
    ms = interleaved_median_ms({label: run for label, (run, _) in runners.items()}, unit, args.rounds)
    reference = ms["plain torch fp32, shipped (reference)"]
    print(f"{args.model} x{args.scale}, one 512 x 512 CT slice, median of {args.rounds} rounds, "
          f"{torch.get_num_threads()} torch thread(s):")
    for label, (_, description) in runners.items():
        print(f"  {label:40s} {ms[label]:8.0f} ms  ({ms[label] / reference:.2f}x the reference)  "
              f"runs as {description}")
    print(f"candidate / shipped: {ms['candidate'] / ms['shipped']:.2f}x")


if __name__ == "__main__":
    main()
