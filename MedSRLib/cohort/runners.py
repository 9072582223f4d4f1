"""Who runs the cases: one process, or Ray actors that each keep their models loaded.

Both runners hand every case to the same `run_case` (read, `api.upscale`, atomic verified
write), take the cases from one queue in order, and report each finished case to the driver,
which alone writes the manifest. A worker is a long-lived process, so `model_cache` loads each
model once per worker, not once per case.

Ray is optional (`pip install MedSRLib[cluster]`) and imported only here, only when used.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import CancelledError, InputError
from .cases import Case

if TYPE_CHECKING:  # the engine imports torch: only inside a worker or a run
    from ..runtime.engine import CancelToken

ResultCallback = Callable[[Case, "CaseResult"], None]

#: Seconds to wait for a TCP connection to a named Ray cluster, and for joining it.
RAY_PROBE_SECONDS = 5.0
RAY_JOIN_SECONDS = 30.0

#: Seconds a cancelled Ray run waits for the cases in flight to stop (at the next batch of
#: slices) or finish writing, before it ends the workers.
CANCEL_GRACE_SECONDS = 20.0


@dataclass(frozen=True)
class CaseResult:
    """What a worker reports for one case; status "ok", "failed" or "cancelled"."""

    status: str
    error: str = ""
    model: str | None = None
    factors_xyz: tuple[int, int, int] | None = None
    seconds: float = 0.0
    peak_memory_mb: float | None = None
    output_bytes: int | None = None
    worker: str = ""
    disk_full: bool = False  # failed because the disk (or quota) is full


def _reset_peak_memory() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_memory_mb() -> float | None:
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    except (ImportError, OSError):
        return None


def is_disk_full(error: BaseException | None) -> bool:
    """True when `error` (or an error it was raised from) says the disk or quota is full."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left" in str(error).lower():
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def write_output(image, case: Case, output_format: str | None,
                 upscale_options: dict[str, Any]) -> None:
    """Write one case's output atomically and verified: a volume file through `io.write_all`,
    or (format "dicom") a derived DICOM series folder in the source series' study."""
    if output_format != "dicom":
        from ..io import volumes as io
        io.write_all([io.stage_volume(image, case.output, overwrite=True)])
        return
    if not case.input.is_dir():
        raise InputError(f"{case.input}: is not a DICOM series, so a DICOM output has no "
                         "patient, study or frame of reference; use another --format")
    from ..io.dicom_export import write_dicom_series
    write_dicom_series(image, case.input, case.output, overwrite=True,
                       series_uid=case.series_uid, weights=upscale_options.get("weights"),
                       modality=upscale_options.get("modality"))


def output_bytes(path: Path) -> int | None:
    """Size of an output file, or of the files in an output folder (a DICOM series); None
    when it is not there."""
    try:
        if path.is_dir():
            return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())
        return path.stat().st_size
    except OSError:
        return None


def run_case(case: Case, upscale_options: dict[str, Any], output_format: str | None,
             cancel: "CancelToken | None" = None) -> CaseResult:
    """Read, super-resolve and write one case; its output is replaced only by a complete one.

    Returns "ok" or "failed" (the message names the file and the problem; errors that are
    not the input's are "internal error: TYPE: message"). CancelledError and KeyboardInterrupt
    propagate: nothing of the case is written then.
    """
    from .. import api
    from ..io import volumes as io

    worker = f"{socket.gethostname()}:{os.getpid()}"
    started = time.perf_counter()
    _reset_peak_memory()
    options = dict(upscale_options)
    if case.model is not None:
        options["model"] = case.model
    if case.scale is not None:
        options["scale"] = case.scale
    model, factors = None, None
    try:
        case.output.parent.mkdir(parents=True, exist_ok=True)
        if output_format != "dicom":
            io.check_output_path(case.input, case.output, overwrite=True)
        image = io.read_volume(case.input, series_uid=case.series_uid)
        result = api.upscale(image, cancel=cancel, **options)
        del image
        model = result.GetMetaData(api.MODEL_KEY)
        factors = tuple(int(f) for f in result.GetMetaData(api.FACTORS_KEY).split())
        write_output(result, case, output_format, options)
        del result
    except (CancelledError, KeyboardInterrupt):
        raise
    except InputError as err:
        return CaseResult("failed", str(err), model, factors, time.perf_counter() - started,
                          _peak_memory_mb(), None, worker, is_disk_full(err))
    except Exception as err:  # noqa: BLE001 - one bad case never stops the others
        if is_disk_full(err):
            text = f"{case.output}: no space left on the device; nothing was written"
            return CaseResult("failed", text, model, factors, time.perf_counter() - started,
                              _peak_memory_mb(), None, worker, True)
        text = "out of memory" if isinstance(err, MemoryError) else f"{type(err).__name__}: {err}"
        return CaseResult("failed", f"{case.input}: internal error: {text}", model, factors,
                          time.perf_counter() - started, _peak_memory_mb(), None, worker)
    return CaseResult("ok", "", model, factors, time.perf_counter() - started, _peak_memory_mb(),
                      output_bytes(case.output), worker)


class InProcessRunner:
    """The queue in this process, one case after another."""

    def __init__(self, threads: int | None):
        self.threads = threads

    def describe(self) -> str:
        return f"1 worker in this process x {self.threads or 'default'} thread(s) (no Ray)"

    def run(self, cases: Sequence[Case], upscale_options: dict[str, Any],
            output_format: str | None,
            on_result: ResultCallback, cancel: "CancelToken") -> None:
        options = {**upscale_options, "threads": self.threads}
        for case in cases:
            cancel.raise_if_cancelled()
            on_result(case, run_case(case, options, output_format, cancel))


def import_ray():
    """The `ray` module, or None when it is not installed (or not importable)."""
    try:
        import ray
    except ImportError:
        return None
    return ray


class CaseWorker:
    """A Ray actor: one process, its torch thread count set once, its models kept loaded."""

    def __init__(self, threads: int):
        import torch

        from ..runtime.engine import CancelToken

        torch.set_num_threads(threads)
        self.threads = threads
        self._new_token = CancelToken
        self._cancel = CancelToken()
        self._stopping = False
        self._lock = threading.Lock()

    def ready(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def run(self, case: Case, upscale_options: dict[str, Any],
            output_format: str | None) -> CaseResult:
        with self._lock:
            if self._stopping:
                return CaseResult("cancelled")
            self._cancel = self._new_token()
            cancel = self._cancel
        try:
            return run_case(case, {**upscale_options, "threads": self.threads}, output_format,
                            cancel)
        except (CancelledError, KeyboardInterrupt):
            return CaseResult("cancelled")

    def cancel(self) -> None:
        with self._lock:
            self._stopping = True
            self._cancel.cancel()


def _ray_signals_kept(ray_init: Callable[[], Any]) -> Any:
    """Call `ray_init` keeping this process's SIGINT/SIGTERM/SIGHUP handlers (ray.init installs
    its own; `medsr` turns each signal into a clean cancel)."""
    if threading.current_thread() is not threading.main_thread():
        return ray_init()
    names = [n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {n: signal.getsignal(getattr(signal, n)) for n in names}
    try:
        return ray_init()
    finally:
        for name, handler in previous.items():
            if handler is not None:
                signal.signal(getattr(signal, name), handler)


def probe_ray_address(address: str, timeout: float = RAY_PROBE_SECONDS) -> None:
    """InputError at once when a `host:port` or `ray://host:port` address does not accept a TCP
    connection within `timeout` seconds ("auto" and other forms are left to Ray)."""
    text = address.split("://", 1)[-1].rstrip("/")
    host, separator, port = text.rpartition(":")
    if not separator or not port.isdigit() or not host:
        return
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        reason = "no answer" if isinstance(err, (socket.timeout, TimeoutError)) else (
            os.strerror(err.errno) if err.errno else str(err))
        raise InputError(f"cannot reach the Ray cluster at {address} ({reason} within "
                         f"{timeout:g} s); is its head node running, and is this its address "
                         "(host:6379, or ray://host:10001 for Ray Client)?") from None


#: Threads of `join_with_deadline`; one still alive after its deadline is stuck inside Ray.
_JOINS: list[threading.Thread] = []


def ray_join_pending() -> bool:
    """True while a Ray join given up on is still running in its thread: Ray's C++ core then
    may abort the interpreter at exit, so a command line should leave with os._exit."""
    return any(thread.is_alive() for thread in _JOINS)


def join_with_deadline(join: Callable[[], Any], address: str,
                       seconds: float | None = None) -> None:
    """Run `join` (ray.init with an address: it starts no process here) in a helper thread and
    wait at most `seconds`, staying interruptible: Ray retries an address that accepts but does
    not answer for minutes, inside C++ where Ctrl-C is not seen. InputError on timeout or when
    Ray refuses; KeyboardInterrupt passes at once. `seconds` defaults to RAY_JOIN_SECONDS."""
    seconds = RAY_JOIN_SECONDS if seconds is None else seconds
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            join()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            outcome["error"] = err

    helper = threading.Thread(target=target, name="medsr-ray-join", daemon=True)
    _JOINS.append(helper)
    helper.start()
    deadline = time.monotonic() + seconds
    while helper.is_alive():
        if time.monotonic() > deadline:
            raise InputError(f"the Ray cluster at {address} did not answer within {seconds:g} s; "
                             "is this the address of a running Ray head node?")
        helper.join(0.1)
    error = outcome.get("error")
    if isinstance(error, (ConnectionError, RuntimeError, ValueError, TimeoutError)):
        raise InputError(f"cannot join the Ray cluster at {address}: {_first_line(error)}") from None
    if error is not None:
        raise error


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


class RayRunner:
    """The queue on Ray actors: an embedded local runtime (started and shut down here), an
    existing cluster (`address`), or the runtime already initialised in this process."""

    def __init__(self, ray, workers: int | None, threads: int, address: str | None,
                 device: str, local_cpu_workers: int = 1):
        self.ray = ray
        self.workers = workers
        self.local_cpu_workers = local_cpu_workers  # the default on CPUs, embedded runtime
        self.threads = threads
        self.address = address
        self.device = device
        self.gpus_per_worker = 0
        self._started_here = False
        self._reaper = None
        self.notes: list[str] = []  # for the user, once the runtime is up

    def start(self) -> None:
        """Start or join the runtime and settle the number of workers; InputError when it
        cannot be reached."""
        ray = self.ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                          logging_level="ERROR")
            if self.address:
                kwargs["address"] = self.address
            else:  # embedded: exactly the CPUs the workers use; MedSRLib importable as here
                package_root = str(Path(__file__).resolve().parents[2])
                python_path = os.pathsep.join(
                    p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
                kwargs.update(num_cpus=(self.workers or self.local_cpu_workers) * self.threads,
                              runtime_env={"env_vars": {"PYTHONPATH": python_path}})
                if self.device == "cpu":  # else Ray finds the local GPUs itself
                    kwargs["num_gpus"] = 0
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            if self.address:  # fail fast: a wrong address never waits for Ray's retries
                probe_ray_address(self.address)
                join_with_deadline(lambda: ray.init(**kwargs), self.address)
            else:
                # in the main thread: Ray ties its helpers' lives to the thread that starts them
                # (PR_SET_PDEATHSIG); the reaper ends the rest if this process is killed
                from .reaper import start_reaper
                self._reaper = start_reaper()
                try:
                    _ray_signals_kept(lambda: ray.init(**kwargs))
                except (ConnectionError, RuntimeError, ValueError) as err:
                    raise InputError(f"cannot start a local Ray runtime: {_first_line(err)}") \
                        from None
            self._started_here = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus and self.device in ("auto", "cuda"):
            self.workers = self.workers or gpus  # one actor per GPU by default
            self.gpus_per_worker = min(1.0, gpus / self.workers)  # more workers share GPUs
        elif self.workers is None:
            self.workers = self.local_cpu_workers if self._started_here and not self.address \
                else max(1, int(resources.get("CPU", 1)) // self.threads)
        cluster_cpus = int(resources.get("CPU", 0))
        if self.address and not self.gpus_per_worker and \
                self.workers * self.threads > max(cluster_cpus, 1):
            self.notes.append(f"--workers {self.workers} x {self.threads} thread(s) is more than "
                              f"the {cluster_cpus} CPU(s) of the cluster: the extra workers wait "
                              "until CPUs are free (or the cluster scales up)")

    def describe(self) -> str:
        if self.workers is None:
            return "Ray workers (starting)"
        where = f"Ray cluster {self.address}" if self.address else (
            "local Ray runtime" if self._started_here else "this process's Ray runtime")
        gpu = f", {self.gpus_per_worker:g} GPU each" if self.gpus_per_worker else ""
        return f"{self.workers} Ray worker(s) x {self.threads} thread(s){gpu} on the {where}"

    def shutdown(self) -> None:
        try:
            if self._started_here and self.ray.is_initialized():
                self.ray.shutdown()
        finally:
            self._started_here = False
            if self._reaper is not None:
                self._reaper.stop()
                self._reaper = None

    def _new_actor(self):
        actor_class = self.ray.remote(CaseWorker).options(
            num_cpus=self.threads, num_gpus=self.gpus_per_worker, max_concurrency=2)
        return actor_class.remote(self.threads)

    def run(self, cases: Sequence[Case], upscale_options: dict[str, Any],
            output_format: str | None,
            on_result: ResultCallback, cancel: "CancelToken") -> None:
        ray = self.ray
        pending = deque(cases)
        actors = [self._new_actor() for _ in range(min(self.workers or 1, len(cases)))]
        starting = {actor.ready.remote(): actor for actor in actors}
        idle: list = []
        in_flight: dict[Any, tuple[Any, Case]] = {}
        started_any = False
        try:
            while pending or in_flight:
                cancel.raise_if_cancelled()
                while pending and idle:
                    actor, case = idle.pop(), pending.popleft()
                    in_flight[actor.run.remote(case, upscale_options, output_format)] = (actor, case)
                if not in_flight and not starting:
                    raise InputError("no Ray worker is left to run the cases")
                ready, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=0.5)
                for ref in ready:
                    if ref in starting:  # a worker is up (or could not start)
                        actor = starting.pop(ref)
                        try:
                            ray.get(ref)
                        except ray.exceptions.RayError as err:
                            actors.remove(actor)
                            if not started_any and not starting:
                                raise InputError("the Ray workers could not start: "
                                                 + _first_line(err)) from None
                            continue
                        started_any = True
                        idle.append(actor)
                        continue
                    actor, case = in_flight.pop(ref)
                    result, alive = self._result_of(ref, case)
                    if not alive:  # a worker that died (killed for memory?) is replaced
                        actors.remove(actor)
                        ray.kill(actor, no_restart=True)
                        actor = self._new_actor()
                        actors.append(actor)
                        starting[actor.ready.remote()] = actor
                    else:
                        idle.append(actor)
                    if result.status == "cancelled":
                        raise CancelledError("batch cancelled")
                    on_result(case, result)
        except (CancelledError, KeyboardInterrupt):
            self._stop(actors, in_flight, on_result)
            raise
        finally:
            for actor in actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass

    def _result_of(self, ref, case: Case) -> tuple[CaseResult, bool]:
        ray = self.ray
        try:
            return ray.get(ref), True
        except ray.exceptions.RayActorError as err:
            message = (f"{case.input}: the worker process ended while running this case (killed "
                       f"for memory? try fewer --workers); {_first_line(err)}")
            return CaseResult("failed", message), False
        except ray.exceptions.RayError as err:
            return CaseResult("failed", f"{case.input}: internal error: {err}"), True

    def _stop(self, actors: list, in_flight: dict, on_result: ResultCallback) -> None:
        """Ask every worker to stop at its next batch of slices and wait for the cases in
        flight: those that still finish are reported, the others wrote nothing."""
        ray = self.ray
        try:
            for actor in actors:
                actor.cancel.remote()
            deadline = time.monotonic() + CANCEL_GRACE_SECONDS
            while in_flight and time.monotonic() < deadline:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                for ref in ready:
                    _, case = in_flight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError:
                        continue
                    if result.status == "ok":
                        on_result(case, result)
        except KeyboardInterrupt:  # a second Ctrl-C: end the workers now
            pass
