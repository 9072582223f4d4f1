"""2.5-D against 2-D in-plane networks on the test patients: per-volume PSNR, gain over bicubic,
the automatic path's bf16/int8 cost, and time per 512 x 512 slice, all in one run.

Protocol (that of `medsr benchmark`, `MedSRLib/evaluation/benchmark.py`):

- Test volumes: the benchmark's held-out patients (`benchmark.HELD_OUT`: sarcoma STS_012 and
  STS_014 CT and MR T1, totalseg-example-ct, brain-t1-gd-skullstripped, BraTS pat0006 T1c and
  FLAIR). No model compared here trained on them or chose a checkpoint on them (the 2.5-D
  recipes validate on other patients; `--check-cards` refuses a card that lists one).
- Each volume is normalised as in training and inference (`intensity.fit_mapping`); slices are
  `--slices-per-volume` evenly spaced axial slices among those with >= 5 % foreground
  (`benchmark.choose_slices`), whole slices unless `--max-size`.
- Per scale: the HR slice is degraded by anti-aliased bicubic (`training.degrade`); a 2.5-D
  model gets the slice and its neighbours along the slice axis, each degraded alike, edges
  replicated (`benchmark.model_input`, as `medsr benchmark` gives them). Every model runs through `engine.SliceUpscaler` with
  default options (the automatic path: OpenVINO, bf16/int8 where the card allows); the 2.5-D
  model also runs in torch fp32, so the automatic path's precision cost shows per volume.
  PSNR (data range 1) on the whole slice after cropping `scale` pixels from every border.
- Time: the automatic path on one real 512 x 512 CT slice (`bench_runtime.SPEED_VOLUME`),
  medians of `--rounds` interleaved rounds after a warm-up, every model in the same rounds.

Run: python benchmarks/bench_context_slices.py --held-out ../shared/data --scales 2 4 \\
         [--out benchmarks/results/context_slices] [--weights-25d FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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
from MedSRLib.runtime.engine import EngineOptions, SliceUpscaler, slice_stacks
from MedSRLib.transforms import degrade

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import SPEED_VOLUME, cpu_description  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "context_slices"
TWO_D, TWO_HALF_D = "edsr_lite", "edsr_lite_25d"


def load(name: str, scale: int, modality: str, weights: Path | None) -> zoo.SRModel | None:
    try:
        return model_cache.load_model(name, (scale, scale), modality=modality, weights_path=weights)
    except Exception as err:  # noqa: BLE001 - reported and left out
        print(f"  {name} x{scale}: not run ({err})")
        return None


def run_scale(volumes: dict[str, list[bench.BenchmarkSlice]], scale: int,
              models: dict[str, zoo.SRModel]) -> dict[str, dict[str, list[float]]]:
    """volume -> method -> PSNR per slice; methods: bicubic, each model (automatic path) and
    each 2.5-D model again in torch fp32 ("<name> fp32"). Inputs as `medsr benchmark` makes
    them (`benchmark.model_input`)."""
    steps = degrade.with_scale(bench.DEFAULT_DEGRADATION, scale)
    factors = (scale, scale)
    runners = {"bicubic": SliceUpscaler(model_cache.load_model("bicubic", factors), factors,
                                        EngineOptions(), learned=False)}
    for name, model in models.items():
        runners[name] = SliceUpscaler(model, factors, EngineOptions())
        if model.context_slices:
            runners[f"{name} fp32"] = SliceUpscaler(model, factors, EngineOptions(
                backend="torch", precision="fp32", tile=0))
    scores: dict[str, dict[str, list[float]]] = {}
    for volume, items in volumes.items():
        scores[volume] = {method: [] for method in runners}
        for index, item in enumerate(items):
            hr = degrade.crop_to_multiple(torch.from_numpy(item.hr_unit)[None, None], factors)
            lr = degrade.apply_pipeline(hr, steps, generator=torch.Generator().manual_seed(1000 * scale + index))
            for method, upscaler in runners.items():
                sr = upscaler.upscale(bench.model_input(item, lr, upscaler.context_slices, steps, factors))
                score = bench.score_slice(torch.from_numpy(sr)[:, None], hr, scale, xray=False)
                scores[volume][method].append(score["psnr_whole"])
    return scores


def time_models(scales: list[int], rounds: int, weights_25d: dict[int, Path | None]) -> dict:
    """(name, scale) -> (median ms per 512 x 512 slice, what runs), automatic path, interleaved."""
    hu = sitk.GetArrayFromImage(io.read_volume(SPEED_VOLUME))
    unit = intensity.fit_mapping(hu).to_unit(hu)
    z = hu.shape[0] // 2
    runners = {}
    for scale in scales:
        for name in (TWO_D, TWO_HALF_D):
            model = load(name, scale, "CT", weights_25d.get(scale) if name == TWO_HALF_D else None)
            if model is None:
                continue
            upscaler = SliceUpscaler(model, (scale, scale), EngineOptions())
            runners[(name, scale)] = (upscaler, slice_stacks(unit, 0, z, z + 1, model.context_slices))
    for upscaler, block in runners.values():
        upscaler.upscale(block)  # warm-up: conversion, compilation
    times: dict = {key: [] for key in runners}
    for _ in range(rounds):
        for key, (upscaler, block) in runners.items():
            start = time.perf_counter()
            upscaler.upscale(block)
            times[key].append(time.perf_counter() - start)
    return {key: (1000 * statistics.median(times[key]), runners[key][0].description) for key in runners}


def check_cards(models: dict[str, zoo.SRModel], test_paths: list[str]) -> tuple[list[str], list[str]]:
    """(leaks, notes): test files a card lists among its training data, or, for a 2.5-D model,
    its validation data (both must be empty); notes name test files a 2-D card used for its
    checkpoint choice (the shipped edsr_lite validated on these patients)."""
    leaks, notes = [], []
    for name, model in models.items():
        card = model.card or {}
        leaks += [f"{name} trained on {p}" for p in test_paths if p in card.get("training_data", [])]
        chosen_on = [p for p in test_paths if p in card.get("validation_data", [])]
        if model.context_slices:
            leaks += [f"{name} chose its checkpoint on {p}" for p in chosen_on]
        elif chosen_on:
            notes.append(f"note: {name}'s card chose its checkpoint on {len(chosen_on)} of these "
                         f"{len(test_paths)} test volumes (the 2.5-D model starts from its weights)")
    return leaks, notes


def write_costs(costs: dict[int, dict[str, float]], cards: dict[int, tuple[Path, str]],
                slices_per_volume: int, modalities: list[str], argv: list[str]) -> None:
    """The 2.5-D cards' `bf16` entries: per test volume, PSNR of torch fp32 minus the automatic
    path's (OpenVINO bf16 on CPUs with it), as `training.bf16_cost` records them."""
    import openvino

    from MedSRLib.runtime import int8_models
    for scale, per_volume in costs.items():
        if scale not in cards or not per_volume:
            continue
        path, description = cards[scale]
        worst = max(per_volume.values())
        entry = {"held_out_cost_db": round(float(np.mean(list(per_volume.values()))), 4),
                 "worst_volume_cost_db": worst, "per_volume_cost_db": per_volume,
                 "automatic": worst <= int8_models.MAX_COST_DB, "runs_as": description,
                 "slices": slices_per_volume * len(per_volume), "modalities": modalities,
                 "backend": "openvino", "openvino": openvino.__version__,
                 "command": "python benchmarks/bench_context_slices.py " + " ".join(argv)}
        card_path = Path(path).with_suffix(".json")
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card.setdefault("bf16", {})[f"x{scale}"] = entry
        card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote the bf16 entry x{scale} of {card_path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=Path, required=True, help="data root (shared/data)")
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--modalities", nargs="+", default=["CT", "MR"])
    parser.add_argument("--slices-per-volume", type=int, default=3)
    parser.add_argument("--max-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights-25d", nargs="*", default=[], metavar="FILE",
                        help="2.5-D weights files to use instead of the shipped ones (one per scale)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md / results.json")
    parser.add_argument("--write-bf16-cost", action="store_true",
                        help="record the 2.5-D model's automatic-path cost against fp32 per test volume "
                             "in its card's bf16 entry (the form training.bf16_cost writes)")
    args = parser.parse_args(argv)
    weights_25d: dict[int, Path | None] = {}
    for path in map(Path, args.weights_25d):
        weights_25d[int(max(zoo.read_card(path)["scales"]))] = path
    lines = [f"CPU: {cpu_description()}",
             "Command: python benchmarks/bench_context_slices.py " + " ".join(argv or sys.argv[1:]), ""]
    print("\n".join(lines), flush=True)
    results: dict = {"cpu": lines[0], "scales": {}, "time_ms": {}}
    costs: dict[int, dict[str, float]] = {}
    cards: dict[int, tuple[Path, str]] = {}
    test_paths = {m: bench.held_out_inputs(args.held_out, m) for m in args.modalities}
    stacks = {m: {str(p.relative_to(args.held_out)): bench.load_slices(p, p.name, args.slices_per_volume,
                                                                       args.max_size)
                  for p in paths} for m, paths in test_paths.items()}
    table = ["| modality | scale | test volume | slices | bicubic PSNR | edsr_lite gain | 2.5-D gain | "
             "2.5-D - edsr_lite | 2.5-D auto-path cost vs fp32 |", "|---" * 9 + "|"]
    summary = ["| modality | scale | volumes | edsr_lite gain | 2.5-D gain | 2.5-D - edsr_lite | "
               "worst volume 2.5-D - edsr_lite | worst auto-path cost |", "|---" * 8 + "|"]
    for scale in args.scales:
        for modality in args.modalities:
            models = {name: model for name in (TWO_D, TWO_HALF_D) if (model := load(
                name, scale, modality, weights_25d.get(scale) if name == TWO_HALF_D else None)) is not None}
            leaks, notes = check_cards(models, list(stacks[modality]))
            if leaks:
                raise SystemExit(f"test volumes listed in a model card: {leaks}")
            for note in notes:
                if note not in lines:
                    lines.append(note)
                    print(note, flush=True)
            scores = run_scale(stacks[modality], scale, models)
            if TWO_HALF_D in models and models[TWO_HALF_D].weights_path is not None:
                upscaler = SliceUpscaler(models[TWO_HALF_D], (scale, scale), EngineOptions())
                cards[scale] = (models[TWO_HALF_D].weights_path, upscaler.description)
            results["scales"].setdefault(f"x{scale}", {})[modality] = scores
            gains: dict[str, list[float]] = {"2d": [], "25d": [], "delta": [], "cost": []}
            for volume, per_method in scores.items():
                mean = {method: float(np.mean(values)) for method, values in per_method.items()}
                g2 = mean.get(TWO_D, np.nan) - mean["bicubic"]
                g25 = mean.get(TWO_HALF_D, np.nan) - mean["bicubic"]
                cost = mean.get(f"{TWO_HALF_D} fp32", np.nan) - mean.get(TWO_HALF_D, np.nan)
                for key, value in (("2d", g2), ("25d", g25), ("delta", g25 - g2), ("cost", cost)):
                    gains[key].append(value)
                costs.setdefault(scale, {})[volume] = round(float(cost), 4)
                table.append(f"| {modality} | x{scale} | {volume} | {len(per_method['bicubic'])} | "
                             f"{mean['bicubic']:.2f} | {g2:+.2f} | {g25:+.2f} | {g25 - g2:+.2f} | {cost:+.3f} |")
            summary.append(f"| {modality} | x{scale} | {len(scores)} | {np.mean(gains['2d']):+.2f} | "
                           f"{np.mean(gains['25d']):+.2f} | {np.mean(gains['delta']):+.2f} | "
                           f"{np.min(gains['delta']):+.2f} | {np.max(gains['cost']):+.3f} |")
            print("\n".join(table[-len(scores):] + [summary[-1]]), flush=True)
    timing = ["| model | scale | ms per 512x512 slice (automatic path) | runs as | x edsr_lite |",
              "|---|---|---|---|---|"]
    times = time_models(args.scales, args.rounds, weights_25d)
    for (name, scale), (ms, description) in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        reference = times.get((TWO_D, scale), (np.nan,))[0]
        timing.append(f"| {name} | x{scale} | {ms:.0f} | {description} | {ms / reference:.2f} |")
        results["time_ms"][f"{name} x{scale}"] = {"ms": ms, "runs_as": description}
    report = lines + ["Per test volume (mean whole-slice PSNR over its slices, dB; gains over bicubic):", "",
                      *table, "", "Means over the test volumes:", "", *summary, "",
                      "Time, same run:", "", *timing, ""]
    print("\n".join(["", *timing]), flush=True)
    if args.write_bf16_cost:
        write_costs(costs, cards, args.slices_per_volume, args.modalities, argv or sys.argv[1:])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text("\n".join(report), encoding="utf-8")
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
