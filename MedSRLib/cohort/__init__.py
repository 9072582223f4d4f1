"""A cohort, not a volume: `batch` super-resolves many inputs into one output folder, resumably.

`batch` is a loop around `api.upscale`, the one door: it finds the cases (`cases.py`), asks
the manifest which are done (`manifest.py`), refuses before any work what would collide with
or replace what is not its own, hands the others to a runner (`runners.py`: Ray actors where
Ray pays for its start-up, else this process) and writes one manifest line per case as it
finishes. One bad case never stops the others; an interrupt stops the run cleanly
(every output is complete or absent) and the same call continues where it stopped.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import InputError
from .cases import OUTPUT_FORMATS, Case, discover, input_fingerprint, output_suffix, suffix_of
from .manifest import (CARRY_FAILURE, MANIFEST_NAME, RUN, SKIP, ManifestWriteError,
                       ManifestWriter, case_key, decide, output_signature, read_state,
                       written_by_medsr)
from .runners import CaseResult, InProcessRunner, RayRunner, import_ray, is_disk_full

if TYPE_CHECKING:  # the engine imports torch: only when a batch runs
    from ..runtime.engine import CancelToken

__all__ = ["batch", "BatchSummary", "MANIFEST_NAME", "OUTPUT_FORMATS", "RAY_HINT",
           "RAY_MIN_CASES"]

RAY_HINT = "pip install 'MedSRLib[cluster]' (Ray) for parallel workers"
#: Cases due from which `batch` starts a local Ray runtime by default (when more than one
#: worker fits): a local runtime costs 20-30 s to start on 2 CPUs, which parallel workers
#: win back only over a cohort that takes minutes (`benchmarks/bench_batch.py` measures it).
RAY_MIN_CASES = 16

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
    `remaining`: not reached (cancelled); `disk_full`: a case or a manifest line failed for
    a full disk (or quota); `records`: this run's manifest lines."""

    manifest: Path
    runner: str
    total: int = 0
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    remaining: int = 0
    seconds: float = 0.0
    cancelled: bool = False
    disk_full: bool = False
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
          output_format: str | None = None, workers: int | None = None,
          threads_per_worker: int | None = None, ray_address: str | None = None,
          use_ray: bool | None = None, retry_failed: bool = False, overwrite: bool = False,
          progress: Callable[[ProgressEvent], None] | None = None,
          cancel: "CancelToken | None" = None, **upscale_options: Any) -> BatchSummary:
    """Super-resolve every case of `inputs` into `out_dir`; returns a `BatchSummary`.

    Args:
        inputs: files, folders (searched recursively: every image file, every DICOM series)
            and CSV/TSV tables (header `input[,output][,model][,scale][,series]`).
        out_dir: output folder (created); outputs mirror the inputs' tree under their common
            root (`cases`), so equal file names in different folders never collide; the
            manifest `medsr-batch.jsonl` is kept here.
        output_format: None (default) keeps each input's format (a DICOM series: NRRD), or
            "nrrd", "nii.gz", "nii", "mha", "dicom".
        workers: parallel workers (Ray actors). Default: one per GPU on a cluster with GPUs,
            else the CPUs divided by `threads_per_worker` (locally at most one per 4 GB free,
            and never more than the CPUs: a larger number is capped with a note).
        threads_per_worker: torch threads per worker (default: the CPUs divided by the
            workers; 1 when neither is given and there are several CPUs).
        ray_address: join this Ray cluster ("auto", "ray://host:10001", "host:6379") instead
            of starting a local runtime; every node must see the input and output paths. An
            address that does not answer is an InputError within seconds.
        use_ray: True always uses Ray, False never; None (default) uses Ray when a cluster is
            named, `workers` > 1 is asked for, or at least `RAY_MIN_CASES` cases are due with
            more than one local worker possible (below that Ray's start-up costs more than
            parallel workers save), and runs in this process otherwise.
        retry_failed: run cases that failed before even if their input is unchanged.
        overwrite: replace files at output paths that this batch did not write (the manifest
            records what it wrote); without it such a file is an InputError before any work.
        progress: called with one dict per event: {"event": "start", "cases", "to_run",
            "runner", "notes"}, {"event": "case", <manifest line>, "done", "failed",
            "skipped", "remaining", "volumes_per_hour", "eta_seconds"} and {"event": "end", ...}.
        cancel: a CancelToken; cancelling stops the run (CancelledError) leaving every output
            complete or absent; the same call later continues.
        **upscale_options: `MedSRLib.upscale` options for every case (model, scale, axis,
            device, precision, tile, batch_size, modality, allow_untrained, output_float,
            weights); a table's model/scale columns override them per case.

    A case is skipped when the manifest's latest line for it says ok with the same options and
    unchanged input and its output is there as written (size and modification time); a case
    that failed is not retried while its input and options are unchanged (unless
    `retry_failed`). Raises InputError for bad arguments and inputs before any case runs (two
    cases writing one output, an output that is an input, a foreign file at an output, a
    manifest that is a symbolic link, a second batch writing into `out_dir`); a bad case is a
    "failed" line, never an exception. A case whose manifest line cannot be written (a full
    disk) is failed and its output removed; the others still run (`disk_full` says so).
    """
    from ..runtime.engine import CancelToken

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
    plan = _plan_runner(workers, threads_per_worker, ray_address, use_ray)
    options = _check_upscale_options(upscale_options)
    cases = discover(list(inputs), out_dir, output_format)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    manifest_path = out_dir / MANIFEST_NAME
    summary = BatchSummary(manifest_path, "", total=len(cases), notes=list(plan.notes))
    emit = progress or (lambda event: None)

    with ManifestWriter(manifest_path) as writer:
        state = read_state(manifest_path)
        if state.unreadable:
            summary.notes.append(f"{manifest_path}: ignored {state.unreadable} unreadable "
                                 "line(s) (a run killed while writing)")
        decisions: list[tuple[Case, str]] = []
        requests: dict[Case, tuple[dict, str]] = {}
        for case in cases:
            key = case_key(case, out_dir)
            request = _request_of(case, options, output_format)
            fingerprint = input_fingerprint(case)
            requests[case] = (request, fingerprint)
            decisions.append((case, decide(case, out_dir, state.latest.get(key), request,
                                           fingerprint, retry_failed)))
        to_run = [case for case, action in decisions if action == RUN]
        if not overwrite:
            _refuse_foreign_outputs(to_run, out_dir, state.written)
        for case, action in decisions:
            request, fingerprint = requests[case]
            record = state.latest.get(case_key(case, out_dir))
            if action == SKIP:
                summary.skipped += 1
                _append_carried(writer, _carried(record, "skipped", request, fingerprint),
                                summary)
            elif action == CARRY_FAILURE:
                summary.failed += 1
                line = _carried(record, "failed", request, fingerprint)
                line["note"] = ("failed earlier with this input and these options; not retried "
                                "(retry with --retry-failed)")
                _append_carried(writer, line, summary)
                summary.records.append(line)
        summary.remaining = len(to_run)
        runner, runner_notes = _choose_runner(plan, len(to_run),
                                              upscale_options.get("device", "auto"))
        summary.notes.extend(runner_notes)
        summary.runner = runner.describe()
        run_started = time.perf_counter()
        completed = 0

        def on_result(case: Case, result: CaseResult) -> None:
            nonlocal completed
            request, fingerprint = requests[case]
            line = _record(case, out_dir, result, request, fingerprint)
            try:
                writer.append(line)
            except ManifestWriteError as err:
                line = _unrecorded(case, line, err)
                summary.disk_full = summary.disk_full or is_disk_full(err)
                try:  # the failure itself may still fit
                    writer.append(line)
                except ManifestWriteError:
                    pass
            if line["status"] == "failed" and result.disk_full:
                summary.disk_full = True
            summary.records.append(line)
            completed += 1
            summary.remaining -= 1
            if line["status"] == "ok":
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
            if to_run and isinstance(runner, RayRunner):
                runner.start()
                summary.runner = runner.describe()
                summary.notes.extend(runner.notes)
            emit({"event": "start", "cases": len(cases), "to_run": len(to_run),
                  "skipped": summary.skipped, "failed_earlier": summary.failed,
                  "runner": summary.runner, "notes": list(summary.notes),
                  "manifest": str(manifest_path)})
            run_started = time.perf_counter()
            if to_run:
                runner.run(to_run, options, output_format, on_result, cancel)
        except BaseException:
            summary.cancelled = True
            raise
        finally:
            if isinstance(runner, RayRunner):
                runner.shutdown()
            summary.seconds = time.perf_counter() - started
            if writer.replaced:
                summary.notes.append(f"{manifest_path} was deleted or replaced during the run; "
                                     "it holds only the lines written since")
            emit({"event": "end", "cases": summary.total, "ok": summary.ok,
                  "skipped": summary.skipped, "failed": summary.failed,
                  "remaining": summary.remaining, "seconds": round(summary.seconds, 2),
                  "cancelled": summary.cancelled, "disk_full": summary.disk_full,
                  "manifest": str(manifest_path)})
    return summary


def _append_carried(writer: ManifestWriter, line: dict[str, Any], summary: BatchSummary) -> None:
    """A carried-over line; a full disk here only costs the line (the case's state is as
    before)."""
    try:
        writer.append(line)
    except ManifestWriteError as err:
        summary.disk_full = summary.disk_full or is_disk_full(err)


def _refuse_foreign_outputs(to_run: Sequence[Case], out_dir: Path,
                            written: dict[str, dict[str, Any]]) -> None:
    """InputError naming the files at output paths of due cases that no ok line of the
    manifest describes (not written by `medsr batch`, or changed since)."""
    foreign = [case.output for case in to_run if os.path.lexists(case.output)
               and not written_by_medsr(case, written.get(case_key(case, out_dir)))]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise InputError(f"{', '.join(map(str, foreign[:3]))}{more}: output exists and was not "
                         "written by medsr batch into this folder (or changed since; its "
                         f"manifest {MANIFEST_NAME} does not describe it); pass --overwrite "
                         "to replace it, or choose another --out")


def _unrecorded(case: Case, line: dict[str, Any], error: BaseException) -> dict[str, Any]:
    """The case's line when its manifest line could not be written: failed, its output
    removed (an output the manifest does not describe would block every rerun)."""
    if line["status"] == "ok":
        try:
            if case.output.is_dir() and not case.output.is_symlink():
                shutil.rmtree(case.output)
            else:
                case.output.unlink()
        except OSError:
            pass
    return {**line, "status": "failed", "output_bytes": None, "output_mtime_ns": None,
            "error": f"{getattr(error, 'strerror', None) or error}; the case's output was "
                     "removed, so that nothing unrecorded is left"}


def _check_upscale_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options as given, checked before any case runs; TypeError for an unknown name,
    InputError naming the option for a bad value."""
    from .. import api
    from ..models import registry as zoo
    from ..runtime.engine import EngineOptions
    from ..planning.run_plan import plan_scale

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


@dataclass
class _RunnerPlan:
    """The runner settings checked before any case is looked at; `ray` is the module or None."""

    workers: int | None
    threads: int | None
    address: str | None
    use_ray: bool | None
    ray: Any
    cpus: int
    notes: list[str]


def _plan_runner(workers: int | None, threads: int | None, ray_address: str | None,
                 use_ray: bool | None) -> _RunnerPlan:
    """The runner settings checked; InputError for a contradiction or a missing Ray."""
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
        if workers not in (None, 1):
            raise InputError(f"workers (--workers) {workers} needs Ray, which is not "
                             f"installed; {RAY_HINT}")
        notes.append(f"Ray is not installed: running the cases one at a time in this process; "
                     f"{RAY_HINT}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers is not None and workers > cpus and not ray_address:
        notes.append(f"--workers {workers} is more than the {cpus} CPU(s) here: using {cpus} "
                     "(more workers than CPUs only share them and cost memory)")
        workers = cpus
    return _RunnerPlan(workers, threads, ray_address, use_ray, ray, cpus, notes)


def _choose_runner(plan: _RunnerPlan, due: int, device: str) -> tuple[Any, list[str]]:
    """The runner for `due` cases: Ray when asked for (use_ray, an address, workers > 1), or by
    default when at least RAY_MIN_CASES are due and more than one local worker fits; this
    process otherwise. Returns the runner and the notes to show."""
    threads, workers = plan.threads, plan.workers
    notes: list[str] = []
    if plan.ray is None:
        return InProcessRunner(threads or plan.cpus), notes
    if threads is None:
        threads = max(1, plan.cpus // workers) if workers else 1
    from ..runtime.memory_budget import available_bytes
    free = available_bytes()
    by_memory = plan.cpus if free is None else max(1, free // _MEMORY_PER_DEFAULT_WORKER)
    local_cpu_workers = max(1, min(plan.cpus // threads, by_memory))
    wants_ray = plan.use_ray is True or bool(plan.address) or (workers or 1) > 1
    if plan.use_ray is None and not wants_ray:
        if due < RAY_MIN_CASES or local_cpu_workers < 2:
            if due:
                reason = (f"{due} case(s) due, fewer than {RAY_MIN_CASES}" if due < RAY_MIN_CASES
                          else "only one worker fits here")
                notes.append(f"running in this process without Ray ({reason}: Ray's start-up "
                             "would cost more than parallel workers save); --ray forces Ray")
            return InProcessRunner(plan.threads or plan.cpus), notes
    return RayRunner(plan.ray, workers, threads, plan.address, device, local_cpu_workers), notes


def _request_of(case: Case, options: dict[str, Any], output_format: str | None) -> dict[str, Any]:
    request = {key: options.get(key) for key in _REQUEST_KEYS}
    request["scale"] = options.get("scale", 2)
    request["axis"] = options.get("axis", "auto")
    if case.model is not None:
        request["model"] = case.model
    if case.scale is not None:
        request["scale"] = case.scale
    request["format"] = "dicom" if output_format == "dicom" else suffix_of(case.output)[1:]
    return json.loads(json.dumps(request))  # as it reads back from the manifest


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _record(case: Case, out_dir: Path, result: CaseResult, request: dict[str, Any],
            fingerprint: str) -> dict[str, Any]:
    signature = output_signature(case.output) if result.status == "ok" else None
    return {"input": str(case.input), "series_uid": case.series_uid,
            "output": case_key(case, out_dir), "status": result.status, "error": result.error,
            "model": result.model,
            "factors_xyz": list(result.factors_xyz) if result.factors_xyz else None,
            "seconds": round(result.seconds, 3), "peak_memory_mb": result.peak_memory_mb,
            "output_bytes": signature[0] if signature else result.output_bytes,
            "output_mtime_ns": signature[1] if signature else None,
            "worker": result.worker, "finished": _now(),
            "request": request, "input_fingerprint": fingerprint}


def _carried(record: dict[str, Any], status: str, request: dict[str, Any],
             fingerprint: str) -> dict[str, Any]:
    """This run's line for a case an earlier run decided: the earlier facts, this status."""
    return {**record, "status": status, "seconds": 0.0, "finished": _now(),
            "request": request, "input_fingerprint": fingerprint,
            "note": "done earlier" if status == "skipped" else record.get("note", "")}
