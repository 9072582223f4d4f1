"""Engine speed, precision and memory on this machine, measured in one run.

1. Slice-wise x2 SR of the bundled sample CT (256 x 256 x 16 -> 512 x 512, or --volume) with bicubic and
   SRCNN: the plain way (fp32, NCHW, whole slice, batch 1) against bf16 autocast +
   channels_last at several tile sizes; ms per slice and the plain/best ratio.
2. The PSNR cost of bf16: the sample is degraded x2 (antialiased bicubic, as in training), SR'd
   back with fp32 and with the best bf16 setting, and both are scored against the original.
3. Peak RSS of `MedSRLib.upscale` on a 512 x 512 x N int16 volume at x2 (N = 100 and 300), each
   in a fresh process, against input + output + 1 GB.

Run: python benchmarks/bench_engine.py [--model srcnn] [--skip-memory | --memory-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import SimpleITK as sitk
import torch

from MedSRLib.transforms import intensity
from MedSRLib.io import volumes as io
from MedSRLib.models import registry as zoo
from MedSRLib.evaluation.demo import SAMPLE_PATH
from MedSRLib.runtime.engine import EngineOptions, SliceUpscaler
from MedSRLib.metrics import psnr
from MedSRLib.transforms.degrade import bicubic_downsample

TILES = (64, 128, 192, 0)


def load_sr(name: str):
    try:
        return zoo.load_model(name, 2), "trained"
    except Exception:  # noqa: BLE001 - untrained is fine for timing, and said so
        torch.manual_seed(0)
        return zoo.load_model(name, 2, allow_untrained=True), "untrained (random weights)"


def time_per_slice(model, slices: np.ndarray, options: EngineOptions, repeats: int = 2) -> tuple[float, np.ndarray]:
    upscaler = SliceUpscaler(model, (2, 2), options, learned=True)
    batch = options.batch_size
    run = lambda: np.concatenate([upscaler.upscale(slices[i:i + batch])
                                  for i in range(0, len(slices), batch)])
    output = run()  # warm-up (and the receptive-field probe)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best / len(slices), output


def speed_table(names: list[str], slices: np.ndarray) -> dict:
    results = {}
    for name in names:
        model, status = load_sr(name)
        plain_ms, _ = time_per_slice(model, slices, EngineOptions(precision="fp32", tile=0,
                                                                  channels_last=False, batch_size=1))
        rows = {"plain fp32 NCHW whole batch1": plain_ms}
        for tile in TILES:
            ms, _ = time_per_slice(model, slices, EngineOptions(precision="bf16", tile=tile,
                                                                channels_last=True, batch_size=4))
            rows[f"bf16 channels_last tile={tile or 'whole'}"] = ms
            ms32, _ = time_per_slice(model, slices, EngineOptions(precision="fp32", tile=tile,
                                                                  channels_last=True, batch_size=4))
            rows[f"fp32 channels_last tile={tile or 'whole'}"] = ms32
        best_key = min((k for k in rows if k.startswith("bf16")), key=rows.get)
        results[name] = {"status": status, "ms_per_slice": rows, "best": best_key,
                         "plain_over_best": plain_ms / rows[best_key]}
        print(f"\n{name} ({status}), x2, {slices.shape[1]}x{slices.shape[2]} -> "
              f"{2 * slices.shape[1]}x{2 * slices.shape[2]}, ms per slice:")
        for key, value in rows.items():
            print(f"  {key:36s} {value:9.1f}")
        print(f"  plain / best ({best_key}) = {plain_ms / rows[best_key]:.2f}x")
    return results


def precision_cost(name: str, volume: np.ndarray, best_tile: int) -> dict:
    mapping = intensity.fit_mapping(volume)
    hr = torch.from_numpy(mapping.to_unit(volume))
    lr = bicubic_downsample(hr, 2).numpy()
    model, status = load_sr(name)
    outputs = {}
    for label, options in (("fp32", EngineOptions(precision="fp32", tile=0, channels_last=False,
                                                  batch_size=1)),
                           ("bf16", EngineOptions(precision="bf16", tile=best_tile, batch_size=4))):
        outputs[label] = SliceUpscaler(model, (2, 2), options).upscale(lr)
    target = hr[:, None]
    scores = {k: psnr(torch.from_numpy(v)[:, None].clamp(-1, 2), target) for k, v in outputs.items()}
    bicubic = psnr(torch.nn.functional.interpolate(torch.from_numpy(lr)[:, None], scale_factor=2,
                                                   mode="bicubic"), target)
    print(f"\n{name} ({status}) on the sample degraded x2: PSNR fp32 {scores['fp32']:.3f} dB, "
          f"bf16 {scores['bf16']:.3f} dB, difference {abs(scores['fp32'] - scores['bf16']):.4f} dB "
          f"(bicubic {bicubic:.3f} dB)")
    return {"psnr_fp32": scores["fp32"], "psnr_bf16": scores["bf16"], "psnr_bicubic": bicubic,
            "difference_db": abs(scores["fp32"] - scores["bf16"])}


MEMORY_CHILD = r"""
import resource, sys, json, numpy as np, SimpleITK as sitk
import MedSRLib
def rss_mb():
    # Peak RSS of this process image (VmHWM); ru_maxrss would carry the forking parent's peak.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
n, model = int(sys.argv[1]), sys.argv[2]
import torch; torch.zeros(1)
MedSRLib.upscale(sitk.GetImageFromArray(np.zeros((2, 64, 64), np.int16)), model=model, scale=2)
baseline = rss_mb()
rng = np.random.default_rng(0)
volume = (rng.integers(-1000, 1500, size=(n, 512, 512))).astype(np.int16)
image = sitk.GetImageFromArray(volume); del volume
out = MedSRLib.upscale(image, model=model, scale=2, axis="z", batch_size=4)
peak = rss_mb()
print(json.dumps({"slices": n, "baseline_mb": baseline, "peak_mb": peak,
                  "input_mb": n * 512 * 512 * 2 / 2**20, "output_mb": n * 1024 * 1024 * 2 / 2**20}))
"""


def memory_check(model: str) -> list[dict]:
    rows = []
    for n in (100, 300):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(n), model],
                                capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row["seconds"] = time.perf_counter() - started
        row["overhead_mb"] = row["peak_mb"] - row["baseline_mb"] - row["input_mb"] - row["output_mb"]
        row["within_budget"] = row["overhead_mb"] <= 1024
        rows.append(row)
        print(f"\nmemory, {model}, 512x512x{n} int16 at x2: peak RSS {row['peak_mb']:.0f} MB = "
              f"process baseline {row['baseline_mb']:.0f} + input {row['input_mb']:.0f} + output "
              f"{row['output_mb']:.0f} + overhead {row['overhead_mb']:.0f} MB "
              f"({'within' if row['within_budget'] else 'OVER'} the 1 GB budget), "
              f"{row['seconds']:.0f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="srcnn")
    parser.add_argument("--volume", default=str(SAMPLE_PATH),
                        help="volume to time (default: the bundled 256x256x16 sample); e.g. "
                             "../shared/data/ct/crlm-ct-1004-dicom for 512x512 slices")
    parser.add_argument("--max-slices", type=int, default=16, help="slices of it to use")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-model", default="bicubic",
                        help="model for the 512x512xN memory runs (the engine's buffers are the "
                             "same for every model; a network adds one batch of tile activations)")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"AMX: {torch.cpu._is_amx_tile_supported()}, AVX512-BF16: "
          f"{torch.cpu._is_avx512_bf16_supported()}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    report = {}
    if not args.memory_only:
        volume = sitk.GetArrayFromImage(io.read_volume(args.volume))
        middle = volume.shape[0] // 2
        volume = volume[max(0, middle - args.max_slices // 2):][:args.max_slices]
        slices = intensity.fit_mapping(volume).to_unit(volume)
        report["speed"] = speed_table(["bicubic", args.model], slices)
        best = report["speed"][args.model]["best"]
        best_tile = 0 if best.endswith("whole") else int(best.rsplit("=", 1)[1])
        report["precision"] = precision_cost(args.model, volume, best_tile)
    if not args.skip_memory:
        report["memory"] = memory_check(args.memory_model)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
