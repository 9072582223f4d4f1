"""A cohort, not a volume: `batch` super-resolves many inputs into one output folder, resumably.

`batch` is a loop around `api.upscale`, the one door: it finds the cases (`cases.py`), asks
the manifest which are done (`manifest.py`), hands the others to a runner (`runners.py`: Ray
actors, or this process when Ray is absent or not wanted) and writes one manifest line per
case as it finishes. One bad case never stops the others; an interrupt stops the run cleanly
(every output is complete or absent) and the same call continues where it stopped.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import InputError
from .cases import OUTPUT_FORMATS, Case, discover, input_fingerprint, output_suffix
from .manifest import (CARRY_FAILURE, MANIFEST_NAME, RUN, SKIP, ManifestWriter, case_key,
                       decide, read_records)
from .runners import CaseResult, InProcessRunner, RayRunner, import_ray

if TYPE_CHECKING:  # the engine imports torch: only when a batch runs
    from ..engine import CancelToken

__all__ = ["batch", "BatchSummary", "MANIFEST_NAME", "OUTPUT_FORMATS", "RAY_HINT"]

RAY_HINT = "pip install 'MedSRLib[cluster]' (Ray) for parallel workers"

#: `upscale` arguments that a batch does not take: per-volume (image, ROI), or its own
#: (progress, cancel, threads: see `threads_per_worker`).
_NOT_BATCH_OPTIONS = ("image", "progress", "cancel", "threads", "roi", "roi_model",
                      "roi_weights", "roi_margin_mm", "detector_weights")
#: The options that decide an output's voxels: a case is redone when one of them changes.
_REQUEST_KEYS = ("model", "scale", "axis", "precision", "modality", "allow_untrained",
                 "output_float", "weights")
#: Memory one default local worker is allowed (a 512^2 x 300 CT at x2 with its output).
_MEMORY_PER_DEFAULT_WORKER = 4 << 30

ProgressEvent = dict  # {"event": "start" | "case" | "end", ...}: see `batch`


@dataclass
class BatchSummary:
    """What a `batch` call did. `ok`: cases super-resolved by this run; `skipped`: done by an
    earlier run; `failed`: failed in this run or earlier with the input unchanged;
    `remaining`: not reached (cancelled); `records`: this run's manifest lines."""

    manifest: Path
    runner: str
    total: int = 0
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    remaining: int = 0
    seconds: float = 0.0
    cancelled: bool = False
    notes: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def all_ok(self) -> bool:
        return self.failed == 0 and self.remaining == 0

    def line(self) -> str:
        rate = f", {self.ok / self.seconds * 3600:.0f} volumes/h" if self.ok and self.seconds else ""
        return (f"{self.total} cases: {self.ok} ok, {self.skipped} skipped (done earlier), "
                f"{self.failed} failed, {self.remaining} remaining in {self.seconds:.1f} s{rate}")


def batch(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
          output_format: str = "nrrd", workers: int | None = None,
          threads_per_worker: int | None = None, ray_address: str | None = None,
          use_ray: bool | None = None, retry_failed: bool = False,
          progress: Callable[[ProgressEvent], None] | None = None,
          cancel: "CancelToken | None" = None, **upscale_options: Any) -> BatchSummary:
    """Super-resolve every case of `inputs` into `out_dir`; returns a `BatchSummary`.

    Args:
        inputs: files, folders (searched recursively: every image file, every DICOM series)
            and CSV/TSV tables (header `input[,output][,model][,scale][,series]`).
        out_dir: output folder (created); outputs mirror the input tree; the manifest
            `medsr-batch.jsonl` is kept here.
        output_format: "nrrd" (default), "nii.gz", "nii" or "mha".
        workers: parallel workers (Ray actors). Default: one per GPU on a cluster with GPUs,
            else the CPUs divided by `threads_per_worker` (locally at most one per 4 GB free).
        threads_per_worker: torch threads per worker (default: the CPUs divided by the
            workers; 1 when neither is given and there are several CPUs).
        ray_address: join this Ray cluster ("auto", "ray://host:10001", "host:6379") instead
            of starting a local runtime; every node must see the input and output paths.
        use_ray: True needs Ray, False runs in this process, None (default) uses Ray when it
            is installed.
        retry_failed: run cases that failed before even if their input is unchanged.
        progress: called with one dict per event: {"event": "start", "cases", "to_run",
            "runner", "notes"}, {"event": "case", <manifest line>, "done", "failed",
            "skipped", "remaining", "volumes_per_hour", "eta_seconds"} and {"event": "end", ...}.
        cancel: a CancelToken; cancelling stops the run (CancelledError) leaving every output
            complete or absent; the same call later continues.
        **upscale_options: `MedSRLib.upscale` options for every case (model, scale, axis,
            device, precision, tile, batch_size, modality, allow_untrained, output_float,
            weights); a table's model/scale columns override them per case.

    A case is skipped when the manifest's latest line for it says ok with the same options and
    unchanged input and its output is there with the size written; a case that failed is not
    retried while its input and options are unchanged (unless `retry_failed`). Raises
    InputError for bad arguments and inputs before any case runs; a bad case is a "failed"
    line, never an exception.
    """
    from ..engine import CancelToken

    started = time.perf_counter()
    cancel = cancel or CancelToken()
    # cheap checks first: a typo in a path or a contradiction is reported at once
    output_suffix(output_format)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: the output folder is a file")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    for path in inputs:
        if not Path(path).exists():
            raise InputError(f"{path}: no such file or folder")
    runner, notes = _choose_runner(workers, threads_per_worker, ray_address, use_ray,
                                   upscale_options.get("device", "auto"))
    options = _check_upscale_options(upscale_options)
    cases = discover(list(inputs), out_dir, output_format)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    manifest_path = out_dir / MANIFEST_NAME
    summary = BatchSummary(manifest_path, runner.describe(), total=len(cases), notes=notes)
    emit = progress or (lambda event: None)

    with ManifestWriter(manifest_path) as writer:
        previous, unreadable = read_records(manifest_path)
        if unreadable:
            summary.notes.append(f"{manifest_path}: ignored {unreadable} unreadable line(s) "
                                 "(a run killed while writing)")
        to_run: list[Case] = []
        requests: dict[Case, tuple[dict, str]] = {}
        for case in cases:
            key = case_key(case, out_dir)
            request = _request_of(case, options, output_format)
            fingerprint = input_fingerprint(case)
            requests[case] = (request, fingerprint)
            record = previous.get(key)
            action = decide(case, out_dir, record, request, fingerprint, retry_failed)
            if action == RUN:
                to_run.append(case)
            elif action == SKIP:
                summary.skipped += 1
                writer.append(_carried(record, "skipped", request, fingerprint))
            elif action == CARRY_FAILURE:
                summary.failed += 1
                line = _carried(record, "failed", request, fingerprint)
                line["note"] = ("failed earlier with this input and these options; not retried "
                                "(retry with --retry-failed)")
                writer.append(line)
                summary.records.append(line)
        summary.remaining = len(to_run)
        if to_run and isinstance(runner, RayRunner):
            runner.start()
            summary.runner = runner.describe()
        emit({"event": "start", "cases": len(cases), "to_run": len(to_run),
              "skipped": summary.skipped, "failed_earlier": summary.failed,
              "runner": summary.runner, "notes": list(summary.notes),
              "manifest": str(manifest_path)})
        run_started = time.perf_counter()
        completed = 0

        def on_result(case: Case, result: CaseResult) -> None:
            nonlocal completed
            request, fingerprint = requests[case]
            line = _record(case, out_dir, result, request, fingerprint)
            writer.append(line)
            summary.records.append(line)
            completed += 1
            summary.remaining -= 1
            if result.status == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
            elapsed = time.perf_counter() - run_started
            per_hour = completed / elapsed * 3600 if elapsed > 0 else None
            emit({"event": "case", **line, "done": summary.ok + summary.skipped,
                  "failed": summary.failed, "remaining": summary.remaining,
                  "volumes_per_hour": round(per_hour, 1) if per_hour else None,
                  "eta_seconds": round(summary.remaining * elapsed / completed, 1)})

        try:
            if to_run:
                runner.run(to_run, options, output_format, on_result, cancel)
        except BaseException:
            summary.cancelled = True
            raise
        finally:
            if isinstance(runner, RayRunner):
                runner.shutdown()
            summary.seconds = time.perf_counter() - started
            emit({"event": "end", "cases": summary.total, "ok": summary.ok,
                  "skipped": summary.skipped, "failed": summary.failed,
                  "remaining": summary.remaining, "seconds": round(summary.seconds, 2),
                  "cancelled": summary.cancelled, "manifest": str(manifest_path)})
    return summary


def _check_upscale_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options as given, checked before any case runs; TypeError for an unknown name,
    InputError naming the option for a bad value."""
    from .. import api, zoo
    from ..engine import EngineOptions
    from ..run_plan import plan_scale

    accepted = [name for name in inspect.signature(api.upscale).parameters
                if name not in _NOT_BATCH_OPTIONS]
    for name in options:
        if name not in accepted:
            hint = (" (batch sets it per worker: threads_per_worker)" if name == "threads" else
                    " (not available in batch)" if name in _NOT_BATCH_OPTIONS else "")
            raise TypeError(f"batch() got an unexpected option {name!r}{hint}; options: "
                            + ", ".join(accepted))
    engine_extras = {"backend": options["backend"]} if "backend" in options else {}
    EngineOptions(device=options.get("device", "auto"),
                  precision=options.get("precision", "auto"), tile=options.get("tile"),
                  batch_size=options.get("batch_size", 4), **engine_extras)
    plan_scale(options.get("scale", 2), options.get("axis", "auto"), (1.0, 1.0, 1.0), (8, 8, 8))
    if options.get("model"):
        zoo.get_spec(options["model"])
    if options.get("weights"):
        zoo.check_weights_file(Path(options["weights"]))
        options = {**options, "weights": str(Path(options["weights"]).resolve())}
    return dict(options)


def _choose_runner(workers: int | None, threads: int | None, ray_address: str | None,
                   use_ray: bool | None, device: str) -> tuple[Any, list[str]]:
    """The runner for these settings and the notes to show; InputError for a contradiction."""
    for name, value in (("workers", workers), ("threads_per_worker", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name} (--{name.replace('_', '-')}) must be an integer >= 1, "
                             f"got {value!r}")
    if use_ray is False and ray_address:
        raise InputError("ray_address (--ray-address) needs Ray; it cannot be used with "
                         "use_ray=False (--no-ray)")
    if use_ray is False and workers not in (None, 1):
        raise InputError(f"workers (--workers) {workers} needs Ray; without it (--no-ray) "
                         "the cases run one at a time in this process")
    notes: list[str] = []
    ray = None if use_ray is False else import_ray()
    if ray is None and use_ray is not False:
        if use_ray or ray_address:
            raise InputError(f"Ray is not installed; {RAY_HINT}")
        notes.append(f"Ray is not installed: running the cases one at a time in this process; "
                     f"{RAY_HINT}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if ray is None:
        return InProcessRunner(threads or cpus), notes
    if threads is None:
        threads = max(1, cpus // workers) if workers else 1
    from ..memory_budget import available_bytes
    free = available_bytes()
    by_memory = cpus if free is None else max(1, free // _MEMORY_PER_DEFAULT_WORKER)
    local_cpu_workers = max(1, min(cpus // threads, by_memory))
    return RayRunner(ray, workers, threads, ray_address, device, local_cpu_workers), notes


def _request_of(case: Case, options: dict[str, Any], output_format: str) -> dict[str, Any]:
    request = {key: options.get(key) for key in _REQUEST_KEYS}
    request["scale"] = options.get("scale", 2)
    request["axis"] = options.get("axis", "auto")
    if case.model is not None:
        request["model"] = case.model
    if case.scale is not None:
        request["scale"] = case.scale
    request["format"] = output_format
    return json.loads(json.dumps(request))  # as it reads back from the manifest


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _record(case: Case, out_dir: Path, result: CaseResult, request: dict[str, Any],
            fingerprint: str) -> dict[str, Any]:
    return {"input": str(case.input), "series_uid": case.series_uid,
            "output": case_key(case, out_dir), "status": result.status, "error": result.error,
            "model": result.model,
            "factors_xyz": list(result.factors_xyz) if result.factors_xyz else None,
            "seconds": round(result.seconds, 3), "peak_memory_mb": result.peak_memory_mb,
            "output_bytes": result.output_bytes, "worker": result.worker, "finished": _now(),
            "request": request, "input_fingerprint": fingerprint}


def _carried(record: dict[str, Any], status: str, request: dict[str, Any],
             fingerprint: str) -> dict[str, Any]:
    """This run's line for a case an earlier run decided: the earlier facts, this status."""
    return {**record, "status": status, "seconds": 0.0, "finished": _now(),
            "request": request, "input_fingerprint": fingerprint,
            "note": "done earlier" if status == "skipped" else record.get("note", "")}
