"""Inference runtime on this machine, measured in one run (issue 15's acceptance figures).

1. Speed on real 512 x 512 CT slices at x2 with the default model (edsr_lite): plain torch
   fp32 NCHW on whole slices (the way a peer runs a model) against the engine's automatic
   path and each backend/precision, ms per slice on a batch of 4 slices (a volume's work) and
   the automatic path on one slice alone; medians of interleaved rounds; ratio to plain,
   effective GFLOP/s (FLOPs counted by torch's FlopCounterMode on the fp32 forward).
2. Accuracy: PSNR of each path on held-out CT slices (the benchmark's hold-outs, degraded x2 as
   in training) and its cost against torch fp32 (contract: <= 0.05 dB). `--precision-all` does
   the same for every shipped weights file at its scales (CT/MR/XR hold-outs by the card's
   modality) for the automatic path.
3. Fixed cost: `MedSRLib.upscale` on a 64 x 64 image, first and second call in a fresh process
   (imports not counted), for every shipped model; with the OpenVINO disk cache warm (the state
   after the first use) and, for the default, cold.
4. End to end: `medsr upscale` (the CLI, automatic path) on a 512 x 512 x N int16 volume made of
   real CT slices, x2: wall time and peak RSS against input + output + 1 GB.

Run: python benchmarks/bench_runtime.py [--slices 300] [--precision-all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from MedSRLib.evaluation import benchmark as bench
from MedSRLib.transforms import intensity
from MedSRLib.io import volumes as io
from MedSRLib.runtime import model_cache
from MedSRLib.models import registry as zoo
from MedSRLib.runtime.engine import EngineOptions, SliceUpscaler
from MedSRLib.metrics import psnr
from MedSRLib.transforms.degrade import bicubic_downsample

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPEED_VOLUME = DATA / "ct" / "crlm-ct-1004-dicom"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    """The CPU_FLAGS this CPU has, space-separated ("unknown" without /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")),
                     "").split())
    return " ".join(f for f in CPU_FLAGS if f in flags)


def cpu_description() -> str:
    flags, model = set(), "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name") and model == "unknown CPU":
            model = line.split(":", 1)[1].strip()
    present = [f for f in CPU_FLAGS if f in flags]
    import openvino
    return (f"{model}; flags: {' '.join(present) or 'none of ' + ' '.join(CPU_FLAGS)}; "
            f"{os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"OpenVINO {openvino.__version__}")


def interleaved_median_ms(runs: dict, unit: np.ndarray, rounds: int) -> dict:
    """{key: median ms} of each `runs[key](unit)` over `rounds` rounds that run every key in
    turn, after one untimed warm-up call each (conversion, compilation, allocator)."""
    for run in runs.values():
        run(unit)
    times: dict = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            run(unit)
            times[key].append(time.perf_counter() - start)
    return {key: 1000 * statistics.median(values) for key, values in times.items()}


def paths() -> dict[str, EngineOptions | None]:
    """Label -> engine options (None: plain torch, the model called directly)."""
    return {
        "plain torch fp32 NCHW (peer)": None,
        "engine auto": EngineOptions(),
        "torch bf16 channels_last 192-px tiles (engine before)": EngineOptions(
            backend="torch", precision="bf16", tile=192),
        "torch fp32 channels_last whole": EngineOptions(backend="torch", precision="fp32", tile=0),
        "openvino fp32 whole": EngineOptions(backend="openvino", precision="fp32"),
        "openvino bf16 whole": EngineOptions(backend="openvino", precision="bf16"),
        "openvino int8 whole": EngineOptions(backend="openvino", precision="int8"),
    }


def runner(model, factors, options):
    if options is None:
        def plain(slices: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(slices)[:, None])[:, 0].numpy()
        return plain, "torch fp32, whole slices (model called directly)"
    upscaler = SliceUpscaler(model, factors, options)
    return upscaler.upscale, upscaler.description


def speed(model, slices_unit: np.ndarray, rounds: int) -> dict:
    """ms per slice on a batch of real slices (a volume's work: the engine's batch of 4), and
    the automatic path on one slice alone (latency)."""
    x = slices_unit.astype(np.float32)
    runners = {label: runner(model, (2, 2), options) for label, options in paths().items()}
    auto_run, auto_description = runner(model, (2, 2), EngineOptions())
    runners["engine auto, one slice alone (latency)"] = (
        lambda batch: auto_run(batch[:1]), auto_description)
    times: dict[str, list[float]] = {label: [] for label in runners}
    for run, _ in runners.values():
        run(x)  # warm-up: conversion, compilation, first oneDNN primitives
    for _ in range(rounds):  # interleaved, so a busy moment hits every path alike
        for label, (run, _) in runners.items():
            start = time.perf_counter()
            run(x)
            count = 1 if label.endswith("(latency)") else len(x)
            times[label].append((time.perf_counter() - start) / count)
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.from_numpy(x[:1])[:, None])
    flops = counter.get_total_flops()
    plain = statistics.median(times["plain torch fp32 NCHW (peer)"])
    rows = {}
    for label, (_, description) in runners.items():
        ms = 1000 * statistics.median(times[label])
        rows[label] = {"ms_per_slice": ms, "ratio_to_plain": plain * 1000 / ms,
                       "gflops_per_s": flops / (ms / 1000) / 1e9, "runs_as": description}
    return {"flops_per_slice": flops, "rounds": rounds, "rows": rows}


def held_out_slices(modality: str, per_volume: int = 3) -> list[np.ndarray]:
    slices = []
    for path in bench.held_out_inputs(DATA, modality):
        slices += [s.hr_unit for s in bench.load_slices(path, path.name, per_volume, None)]
    return slices


def accuracy(model, scale: int, hr_slices: list[np.ndarray], labels: dict) -> dict:
    """Mean PSNR (unit intensities, crop_border = scale) per path on the hold-outs."""
    scores = {}
    for label, options in labels.items():
        run, _ = runner(model, (scale, scale), options)
        values = []
        for hr in hr_slices:
            h, w = (d - d % scale for d in hr.shape)
            target = torch.from_numpy(np.ascontiguousarray(hr[:h, :w]))[None, None]
            lr = bicubic_downsample(target, scale)[:, 0].numpy()
            values.append(psnr(torch.from_numpy(run(lr))[:, None], target, crop_border=scale))
        scores[label] = float(np.mean(values))
    reference = scores[next(iter(labels))]
    return {label: {"psnr": value, "cost_db": reference - value} for label, value in scores.items()}


FIXED_COST_CHILD = r"""
import json, sys, time
import numpy as np, SimpleITK as sitk, torch
import MedSRLib, MedSRLib.api
name, scale, modality = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
image = sitk.GetImageFromArray((np.random.default_rng(0).random((1, 64, 64)) * 1000).astype(np.int16))
times = []
for _ in range(2):
    start = time.perf_counter()
    MedSRLib.upscale(image, model=name, scale=scale, modality=modality)
    times.append(time.perf_counter() - start)
print(json.dumps({"first_s": times[0], "second_s": times[1]}))
"""


def fixed_costs(cases, cache_dir: str) -> list[dict]:
    rows = []
    for name, scale, modality in cases:
        env = {**os.environ, "MEDSR_CACHE_DIR": cache_dir}
        result = subprocess.run([sys.executable, "-c", FIXED_COST_CHILD, name, str(scale), modality or ""],
                                capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        row = {"model": name, "scale": scale, "modality": modality,
               **json.loads(result.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"  {name:16s} x{scale} {modality or '':2s}  first {row['first_s']:.2f} s, "
              f"second {row['second_s']:.3f} s", flush=True)
    return rows


#: Runs `medsr` (cli.main) and writes its own VmHWM at exit. The peak is read inside the child:
#: a forked child's ru_maxrss (wait4) starts from the parent's RSS at fork, and this benchmark's
#: parent holds every shipped model by then (it reported 3.3 GB for a 1.6 GB run).
END_TO_END_CHILD = r"""
import sys
from MedSRLib import cli
code = cli.main(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    out.write(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")))
sys.exit(code)
"""


def end_to_end(slices: int, unit_source: np.ndarray, hu_source: np.ndarray) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        volume = np.stack([hu_source[i % len(hu_source)] for i in range(slices)]).astype(np.int16)
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing((0.8, 0.8, 5.0))
        source = Path(folder) / "ct.nrrd"
        sitk.WriteImage(image, str(source), False)
        input_mb, output_mb = volume.nbytes / 2**20, volume.nbytes * 4 / 2**20
        del volume, image
        arguments = ["upscale", str(source), str(Path(folder) / "sr.nrrd"), "--scale", "2",
                     "--modality", "CT", "--quiet"]
        peak_file = Path(folder) / "peak.txt"
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", END_TO_END_CHILD, str(peak_file), *arguments])
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"medsr {' '.join(arguments)} exited {result.returncode}")
        peak_mb = int(peak_file.read_text(encoding="utf-8").split()[1]) / 1024  # "VmHWM: N kB"
        command = [sys.executable, "-m", "MedSRLib.cli", *arguments]
    return {"slices": slices, "seconds": seconds, "peak_rss_mb": peak_mb, "input_mb": input_mb,
            "output_mb": output_mb, "budget_mb": input_mb + output_mb + 1024,
            "command": " ".join(command[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the end-to-end volume")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision-all", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--skip-fixed", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report = {"cpu": cpu_description()}
    print(report["cpu"], flush=True)

    hu = sitk.GetArrayFromImage(io.read_volume(SPEED_VOLUME))
    unit = intensity.fit_mapping(hu).to_unit(hu)
    middle = unit.shape[0] // 2
    model = model_cache.load_model("edsr_lite", (2, 2), modality="CT")
    report["speed"] = speed(model, unit[middle - 2:middle + 2], args.rounds)
    print(f"\nedsr_lite x2, 512x512 CT slices -> 1024x1024, {report['speed']['flops_per_slice'] / 1e9:.1f} "
          f"GFLOP per slice; ms per slice on a batch of 4 real slices (a volume's work), medians "
          f"of {args.rounds} interleaved rounds:")
    for label, row in report["speed"]["rows"].items():
        print(f"  {label:52s} {row['ms_per_slice']:8.0f} ms  {row['ratio_to_plain']:5.2f}x  "
              f"{row['gflops_per_s']:6.1f} GFLOP/s  [{row['runs_as']}]")

    ct = held_out_slices("CT")
    labels = {"torch fp32 (reference)": EngineOptions(backend="torch", precision="fp32", tile=0),
              **{k: v for k, v in paths().items() if v is not None}}
    report["accuracy"] = accuracy(model, 2, ct, labels)
    print(f"\nheld-out CT ({len(ct)} slices, x2): PSNR and cost against torch fp32")
    for label, row in report["accuracy"].items():
        print(f"  {label:52s} {row['psnr']:.3f} dB  cost {row['cost_db']:+.3f} dB")

    if args.precision_all:
        report["precision_all"] = []
        hold_outs = {m: held_out_slices(m) for m in ("CT", "MR", "XR")}
        print("\nevery shipped weights file, automatic path vs torch fp32 on its modality's hold-outs:")
        for name, scale, modality in zoo.shipped_sr_weights():
            sr = model_cache.load_model(name, (scale, scale), modality=modality)
            card_modalities = [m for m in (sr.card or {}).get("modality", ["CT"]) if m in hold_outs]
            slices = [s for m in ([modality] if modality else card_modalities) for s in hold_outs[m]]
            result = accuracy(sr, scale, slices, {"fp32": EngineOptions(backend="torch", precision="fp32", tile=0),
                                                  "auto": EngineOptions()})
            description = SliceUpscaler(sr, (scale, scale), EngineOptions()).description
            row = {"model": name, "scale": scale, "modality": modality or "+".join(card_modalities),
                   "slices": len(slices), "auto": description, "cost_db": result["auto"]["cost_db"]}
            report["precision_all"].append(row)
            print(f"  {name:16s} x{scale} {row['modality']:9s} {len(slices):3d} slices  [{description}] "
                  f"cost {row['cost_db']:+.4f} dB", flush=True)

    if not args.skip_fixed:
        with tempfile.TemporaryDirectory() as cold:
            print("\nfixed cost, 64x64 image, fresh process, OpenVINO disk cache cold (default model):")
            report["fixed_cold"] = fixed_costs([("edsr_lite", 2, None)], cold)
        warm = os.environ.get("MEDSR_CACHE_DIR") or str(Path.home() / ".cache" / "medsr")
        print(f"\nfixed cost, 64x64 image, fresh process, disk cache warm ({warm}):")
        fixed_costs(zoo.shipped_sr_weights(), warm)  # fills the cache
        report["fixed_warm"] = fixed_costs(zoo.shipped_sr_weights(), warm)

    if not args.skip_end_to_end:
        report["end_to_end"] = end_to_end(args.slices, unit, hu[max(0, middle - 10):middle + 10])
        row = report["end_to_end"]
        print(f"\nend to end: {row['command']}\n  512x512x{row['slices']} int16 CT at x2: "
              f"{row['seconds']:.0f} s ({row['seconds'] / row['slices'] * 1000:.0f} ms per slice), "
              f"peak RSS {row['peak_rss_mb']:.0f} MB vs budget input {row['input_mb']:.0f} + output "
              f"{row['output_mb']:.0f} + 1024 = {row['budget_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
