"""Speed/quality frontier (issue 15): every shipped SR weights file's held-out gain over bicubic
against its time per 512 x 512 input slice on the automatic inference path, measured in one run.

- Gain: mean whole-slice PSNR gain over bicubic on the held-out benchmark images, read from the
  committed benchmark tables (`benchmarks/results/{ct,mr,xr}/results.csv`, made by
  `medsr benchmark --held-out ../shared/data --modality CT|MR|XR ...`; the README gives each
  command). Nothing here is tuned on them.
- Speed: `SliceUpscaler` with default options (the path every entry point takes) on one real
  512 x 512 CT slice, median of `--rounds` rounds after a warm-up, models interleaved, with
  plain torch fp32 on edsr_lite x2 (the way a peer runs a model) in the same rounds as the
  reference: its ratio is what carries to another machine, not the milliseconds.
- A model is on the frontier of its (modality, scale) when no other model there is at least as
  good (gain) and faster; `default` marks the registry's default for that modality and scale.

Run: python benchmarks/bench_frontier.py [--rounds 3] [--out benchmarks/results/frontier]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from MedSRLib.transforms import intensity
from MedSRLib.io import volumes as io
from MedSRLib.runtime import model_cache
from MedSRLib.models import registry as zoo
from MedSRLib.runtime.engine import EngineOptions, SliceUpscaler, slice_stacks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import SPEED_VOLUME, cpu_description, interleaved_median_ms  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "frontier"
#: The packaged copy `medsr models` prints its ms/slice from; written with the default --out.
PACKAGED_COPY = Path(__file__).resolve().parents[1] / "MedSRLib" / "data" / "speed_frontier.json"


def held_out_gains(modality: str) -> dict[tuple[str, int], tuple[float, int]]:
    """(method, scale) -> (mean PSNR gain over bicubic in dB, images), whole slices."""
    table = RESULTS / modality.lower() / "results.csv"
    psnr: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    with table.open() as handle:
        for row in csv.DictReader(handle):
            if row["metric"] == "psnr" and row["region"] == "whole":
                psnr[(row["method"], int(row["scale"]))][row["image"]] = float(row["value"])
    gains = {}
    for (method, scale), values in psnr.items():
        reference = psnr.get(("bicubic", scale), {})
        common = [image for image in values if image in reference]
        if method != "bicubic" and common:
            gains[(method, scale)] = (float(np.mean([values[i] - reference[i] for i in common])),
                                      len(common))
    return gains


def modalities_of(name: str, modality: str | None) -> list[str]:
    if modality:
        return [modality]
    card = zoo.load_model(name, (2, 2) if 2 in zoo.get_spec(name).scales else
                          (zoo.get_spec(name).scales[0],) * 2).card or {}
    return [m for m in card.get("modality", ["CT", "MR"]) if m in ("CT", "MR", "XR")]


def frontier_flags(rows: list[dict]) -> None:
    """Sets row["frontier"]: no other row of the same (modality, scale) is at least as good and
    strictly faster, or better and as fast."""
    for row in rows:
        row["frontier"] = not any(
            other is not row and other["modality"] == row["modality"] and other["scale"] == row["scale"]
            and other["gain_db"] >= row["gain_db"] and other["ms"] <= row["ms"]
            and (other["gain_db"] > row["gain_db"] or other["ms"] < row["ms"])
            for other in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--relabel", action="store_true",
                        help="time nothing: re-read the gains from benchmarks/results/<modality>/ and "
                             "re-mark the registry's defaults in the existing frontier.json "
                             "(after a benchmark re-run or a new default), then rewrite both files")
    args = parser.parse_args()
    if args.relabel:
        saved = json.loads((args.out / "frontier.json").read_text(encoding="utf-8"))
        gains = {m: held_out_gains(m) for m in ("CT", "MR", "XR") if (RESULTS / m.lower()).is_dir()}
        for row in saved["rows"]:
            row["default"] = zoo.default_model(row["modality"], row["scale"]) == row["model"]
            measured = gains.get(row["modality"], {}).get((row["model"], row["scale"]))
            if measured is not None:
                row["gain_db"], row["images"] = measured
        frontier_flags(saved["rows"])
        write_frontier(args.out, saved["cpu"], saved["plain_ms"], saved["rounds"], saved["rows"])
        return
    cpu = cpu_description()
    print(cpu, flush=True)
    hu = sitk.GetArrayFromImage(io.read_volume(SPEED_VOLUME))
    middle = hu.shape[0] // 2
    unit_volume = intensity.fit_mapping(hu).to_unit(hu)
    unit = unit_volume[middle:middle + 1]  # (1, 512, 512)

    runners = {}
    reference = model_cache.load_model("edsr_lite", (2, 2), modality="CT")

    def plain(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return reference(torch.from_numpy(x)[:, None])[:, 0].numpy()

    runners["plain torch fp32 edsr_lite x2 (reference)"] = (plain, "torch fp32 NCHW")
    for name, scale, modality in zoo.shipped_sr_weights():
        model = model_cache.load_model(name, (scale, scale), modality=modality)
        upscaler = SliceUpscaler(model, (scale, scale), EngineOptions())
        # a 2.5-D model gets the same slice with its neighbours (engine.slice_stacks)
        block = slice_stacks(unit_volume, 0, middle, middle + 1, model.context_slices)
        runners[(name, scale, modality)] = (lambda _, run=upscaler.upscale, block=block: run(block),
                                            upscaler.description)
    ms_of = interleaved_median_ms({key: run for key, (run, _) in runners.items()}, unit, args.rounds)
    plain_ms = ms_of["plain torch fp32 edsr_lite x2 (reference)"]

    gains = {m: held_out_gains(m) for m in ("CT", "MR", "XR") if (RESULTS / m.lower()).is_dir()}
    rows = []
    for key, (_, description) in runners.items():
        if isinstance(key, str):
            continue
        name, scale, modality = key
        ms = ms_of[key]
        for m in modalities_of(name, modality):
            if (name, scale) not in gains.get(m, {}):
                continue
            gain, images = gains[m][(name, scale)]
            rows.append({"model": name, "scale": scale, "modality": m, "weights_for": modality,
                         "gain_db": gain, "images": images, "ms": ms, "vs_plain": ms / plain_ms,
                         "runs_as": description,
                         "default": zoo.default_model(m, scale) == name})
    frontier_flags(rows)
    rows.sort(key=lambda r: (r["modality"], r["scale"], r["ms"]))
    write_frontier(args.out, cpu, plain_ms, args.rounds, rows)


def write_frontier(out: Path, cpu: str, plain_ms: float, rounds: int, rows: list[dict]) -> None:
    """frontier.md (the table, printed too) and frontier.json in `out`."""
    lines = ["# Speed/quality frontier", "", f"CPU: {cpu}", "",
             f"Command: `python benchmarks/bench_frontier.py --rounds {rounds}`. Time: one 512 x 512 "
             f"real CT slice in, medians of {rounds} interleaved rounds after a warm-up, the "
             f"automatic path of every entry point. Reference in the same rounds: plain torch fp32 "
             f"edsr_lite x2 = {plain_ms:.0f} ms (time ratios below are against it). Gain: mean "
             "whole-slice PSNR gain over bicubic on the held-out benchmark images "
             "(`benchmarks/results/<modality>/results.csv`).", "",
             "| modality | scale | model | gain over bicubic | ms per 512x512 slice | x plain-torch edsr_lite x2 time | runs as | frontier | default |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['modality']} | x{r['scale']} | {r['model']} | {r['gain_db']:+.2f} dB ({r['images']} images) "
                     f"| {r['ms']:.0f} | {r['vs_plain']:.2f} | {r['runs_as']} | {'yes' if r['frontier'] else ''} "
                     f"| {'default' if r['default'] else ''} |")
    off = [r for r in rows if r["default"] and not r["frontier"]]
    lines += ["", "Defaults off the frontier: " + (", ".join(
        f"{r['model']} {r['modality']} x{r['scale']}" for r in off) or "none") + "."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.md").write_text(text, encoding="utf-8")
    measured = json.dumps({"cpu": cpu, "plain_ms": plain_ms, "rounds": rounds, "rows": rows},
                          indent=2) + "\n"
    (out / "frontier.json").write_text(measured, encoding="utf-8")
    if out.resolve() == DEFAULT_OUT.resolve():  # `medsr models` reads the packaged copy
        PACKAGED_COPY.write_text(measured, encoding="utf-8")
        print(f"also written: {PACKAGED_COPY}")


if __name__ == "__main__":
    main()
