"""Running a ready torch SR model through OpenVINO on the CPU (fp32, bf16 where the CPU has it,
or a shipped int8 model: see `int8_models`).

The model is converted from the torch module once per process (`ov.convert_model`, traced on a
small example) and cached on disk as OpenVINO IR in the user's cache folder, keyed by a hash of
its weights, its class and factors, and the MedSR and OpenVINO versions: a second process reads
the IR instead of tracing again. Each slice shape gets its own compiled model (static shapes are
10-17 % faster than dynamic ones in OpenVINO); compiled models are kept per shape.

Networks whose output is `bicubic(x) + body(x)` (a global bicubic residual: EDSR, SRResNet,
the hybrid, LFSR, VDSR) run only `body` in OpenVINO and add the bicubic image in fp32 torch:
in bf16 the rounding of that sum alone costs 0.08-0.12 dB PSNR at x2 (measured on the bundled
CT), the body in bf16 about 0.01 dB.

Every cached file is verified before use: the IR's .xml/.bin against the SHA-256 recorded when
MedSR wrote them, each compiled blob against the hash recorded after OpenVINO wrote it
(`model_integrity`); a damaged or unrecorded entry is deleted and made again, with a one-line
notice. Processes sharing the cache (a cohort's workers) take turns on the compiled-blob folder
(an exclusive file lock over check, compile and record), so none deletes a blob another has
just written but not yet recorded. The dependencies' usage reporting is off (`no_telemetry`, imported before OpenVINO).

Nothing is downloaded. `available()` says whether OpenVINO imports; any failure to convert or
compile raises `OpenVinoUnavailable`, which the engine turns into a one-line notice and a torch
fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import model_integrity, no_telemetry  # noqa: F401 - no_telemetry: before any openvino import

#: Example input edge for tracing (any size works: the IR is reshaped per slice shape).
TRACE_EDGE = 64


class OpenVinoUnavailable(RuntimeError):
    """OpenVINO is missing, or could not convert or compile this model."""


def available() -> bool:
    """True when the openvino package imports."""
    try:
        import openvino  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def cache_folder() -> Path:
    """Where converted models are kept: $MEDSR_CACHE_DIR, else $XDG_CACHE_HOME/medsr, else
    ~/.cache/medsr; the "openvino" folder inside it."""
    root = os.environ.get("MEDSR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "medsr")
    return Path(root) / "openvino"


def model_fingerprint(model: nn.Module, factors: tuple[int, int]) -> str:
    """A hash of the model's class, factors, parameters and buffers, MedSR and OpenVINO versions."""
    import openvino

    from .. import __version__
    digest = hashlib.sha256()
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}|{factors}|"
                  f"{__version__}|{openvino.__version__}".encode())
    inner = getattr(model, "network", None)
    if inner is not None:
        digest.update(f"{type(inner).__module__}.{type(inner).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class _WithoutBicubicResidual(nn.Module):
    """`model` with its network's bicubic residual switched off: the body's output only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        network = self.model.network
        network.bicubic_residual = False  # read while tracing: the add is not recorded
        try:
            return self.model(x)
        finally:
            network.bicubic_residual = True


class _VdsrResidual(nn.Module):
    """A pre-upsampled VDSR's residual branch on the bicubic image (VDSR adds that image)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sy, sx = self.model.factors
        upsampled = F.interpolate(x, size=(x.shape[-2] * sy, x.shape[-1] * sx), mode="bicubic",
                                  align_corners=False)
        return self.model.network.residual(upsampled)


def residual_body(model: nn.Module) -> nn.Module | None:
    """The part of `model` (a `zoo.SRModel`) that excludes a global bicubic residual, or None
    when its output is not `bicubic(x) + body(x)`."""
    network = getattr(model, "network", None)
    if getattr(network, "bicubic_residual", False) and isinstance(
            getattr(network, "output_activation", nn.Identity()), nn.Identity):
        return _WithoutBicubicResidual(model)
    if getattr(getattr(model, "spec", None), "kind", None) == "pre_upsampled" and isinstance(
            getattr(network, "residual", None), nn.Module) and type(network).__name__ == "VDSR":
        return _VdsrResidual(model)
    return None


_CONVERTED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
#: Compiled models per torch model (slice shape, precision, threads), least recently used out.
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
MAX_COMPILED_PER_MODEL = 8
#: Slices run as concurrent requests (streams) only while their outputs together stay within
#: this many pixels: each request holds its own activations (about 300 MB for edsr_lite's
#: 1024 x 1024 output), and on a quiet 2-core machine one 2-thread request per 512 x 512 slice
#: is within 2 % of two 1-thread streams (483 vs 493 ms, edsr_lite int8 x2).
PARALLEL_OUTPUT_PIXELS = 1024 * 1024
_LOCK = threading.Lock()


def _convert(model: nn.Module, factors: tuple[int, int], traced: nn.Module):
    """The OpenVINO model of `traced` (`model` or its residual body), from this process's
    memory, the disk cache, or a fresh conversion (then saved to the disk cache when writable)."""
    with _LOCK:
        per_model = _CONVERTED.setdefault(model, {})
        if factors in per_model:
            return per_model[factors]
    fingerprint = model_fingerprint(model, factors) + ("r" if traced is not model else "")
    converted = convert_cached(traced, input_channels(model),
                               cache_folder() / f"{fingerprint}.xml", "the model")
    with _LOCK:
        _CONVERTED.setdefault(model, {})[factors] = converted
    return converted


def convert_cached(network: nn.Module, channels: int, path: Path | None, what: str,
                   example: tuple[torch.Tensor, ...] | None = None, inputs: list | None = None):
    """The OpenVINO model (dynamic (N, `channels`, h, w) input) of `network`: read from the
    cache entry `path` (.xml and .bin) when its SHA-256 record matches; else converted (traced
    on a fixed random example) and saved there when the folder is writable, the record last. A
    damaged or unverified entry is deleted with a notice first. OpenVinoUnavailable naming
    `what` when OpenVINO cannot convert it. A network of several inputs gives its own
    `example` tensors and dynamic input shapes (`inputs`, -1 = dynamic). `path` None: converted
    in memory only, nothing read or saved."""
    import openvino as ov

    converted = None
    files = () if path is None else (path, path.with_suffix(".bin"))
    if files and (path.is_file() or path.with_suffix(".bin").is_file()):
        if model_integrity.matches_record(path, files):
            try:
                converted = ov.Core().read_model(str(path))
            except Exception:  # noqa: BLE001 - a damaged cache entry is re-made
                converted = None
        if converted is None:
            _notice(f"cached OpenVINO model {path} was damaged or unverified (SHA-256 "
                    "mismatch); converting it again")
            model_integrity.remove_entry(path, files)
    if converted is not None:
        return converted
    if example is None:
        example = torch.rand(1, channels, TRACE_EDGE, TRACE_EDGE, generator=torch.Generator().manual_seed(0))
        inputs = [-1, channels, -1, -1]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: checked by the tests instead
            converted = ov.convert_model(network.float().eval(), example_input=example,
                                         input=inputs)
    except Exception as err:  # noqa: BLE001 - reported, then torch runs the model
        raise OpenVinoUnavailable(f"OpenVINO could not convert {what} ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if path is None:
        return converted
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.stem}.{os.getpid()}.xml")
        ov.save_model(converted, str(temp), compress_to_fp16=False)
        os.replace(temp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(temp, path)
        model_integrity.write_record(path, files)  # last: an entry without it is re-made
    except Exception:  # noqa: BLE001 - no cache folder: convert again next process
        pass
    return converted


def converted_body(model: nn.Module, factors: tuple[int, int]) -> tuple[object, bool]:
    """(OpenVINO model of what runs in OpenVINO, whether the bicubic image is added after it):
    the residual body when `model` has one, else the whole model."""
    body = residual_body(model)
    return _convert(model, factors, body if body is not None else model), body is not None


def check_finite_weights(model: nn.Module) -> None:
    """WeightsError naming the model and its weights file when a parameter or buffer holds NaN
    or Inf. Needed before OpenVINO runs a model: its CPU kernels turn NaN into finite values
    (max(NaN, 0) = 0 in a ReLU), so the output check of the engine would not see them."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            from ..errors import WeightsError
            spec = getattr(model, "spec", None)
            weights = getattr(model, "weights_path", None)
            raise WeightsError(f"model {getattr(spec, 'name', type(model).__name__)} produced "
                               f"NaN/Inf values: its weights hold NaN/Inf (weights file "
                               f"{weights if weights is not None else 'none: untrained'}); "
                               "nothing was written")


def _notice(message: str) -> None:
    from .notices import notice  # once per process, on stderr
    notice(message)


#: Blobs this process verified or recorded (path -> (size, mtime_ns)): each is hashed once.
_TRUSTED_BLOBS: dict[Path, tuple[int, int]] = {}


def drop_unverified_blobs(folder: Path) -> set[Path]:
    """Delete every compiled blob in `folder` whose SHA-256 does not match the record written
    when it was made (or that has no record), with a notice; returns the blobs left. OSError
    when such a blob cannot be deleted (then the folder must not be used as OpenVINO's cache)."""
    kept = set()
    for blob in sorted(folder.glob("*.blob")):
        try:
            stat = blob.stat()
        except OSError:
            continue
        identity = (stat.st_size, stat.st_mtime_ns)
        if _TRUSTED_BLOBS.get(blob) == identity or model_integrity.matches_record(blob, [blob]):
            _TRUSTED_BLOBS[blob] = identity
            kept.add(blob)
            continue
        _notice(f"compiled OpenVINO model {blob} was damaged or unverified (SHA-256 mismatch); "
                "compiling it again")
        model_integrity.remove_entry(blob, [blob])
        if blob.exists():  # a read-only cache: OpenVINO must not be pointed at it
            raise PermissionError(f"cannot remove {blob}")
    return kept


#: The file `compiled_cache_lock` locks inside the compiled-blob folder.
LOCK_NAME = "cache.lock"


@contextlib.contextmanager
def compiled_cache_lock(folder: Path):
    """Hold an exclusive lock on `folder` (the compiled-blob cache) against other processes,
    blocking until it is free. Without POSIX file locks (Windows) or a writable folder (a
    read-only cache, which nobody writes to), no lock: a concurrent worker may then cost a
    recompilation, never a wrong output."""
    try:
        import fcntl
        handle = open(folder / LOCK_NAME, "a+b")
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def record_new_blobs(folder: Path, before: set[Path]) -> None:
    """Record the SHA-256 of blobs OpenVINO wrote into `folder` since `before` was listed."""
    for blob in set(folder.glob("*.blob")) - before:
        try:
            model_integrity.write_record(blob, [blob])
            stat = blob.stat()
            _TRUSTED_BLOBS[blob] = (stat.st_size, stat.st_mtime_ns)
        except OSError:  # removed meanwhile, or a read-only cache: unrecorded, so re-made later
            pass


def compile_cached(core, model, config: dict, what: str):
    """`core.compile_model(model, "CPU", config)` with the compiled blob cached on disk (a new
    process skips most of the compiling): under `compiled_cache_lock`, unverified blobs dropped
    first and new ones recorded after. Without a usable cache folder, compiled without one.
    OpenVinoUnavailable naming `what` when OpenVINO cannot compile it."""
    folder = cache_folder() / "compiled"
    with contextlib.ExitStack() as held:
        before: set[Path] | None = None
        config = dict(config)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            held.enter_context(compiled_cache_lock(folder))
            before = drop_unverified_blobs(folder)
            config["CACHE_DIR"] = str(folder)
        except OSError:
            pass
        try:
            compiled = core.compile_model(model, "CPU", config)
        except Exception as err:  # noqa: BLE001
            raise OpenVinoUnavailable(f"OpenVINO could not compile {what} "
                                      f"({type(err).__name__})") from None
        if before is not None:
            record_new_blobs(folder, before)
    return compiled


def compile_shaped(compiled_models: OrderedDict, key: tuple, model, shape, config: dict, what: str,
                   limit: int, on_disk: bool = True):
    """The compiled model for `key` in `compiled_models` (a per-network least-recently-used
    store shared by the runners of that network): kept there, or `model` cloned, reshaped to
    `shape` (a list, or {input index: list}) and compiled with `config` (`compile_cached`, or in
    memory only when not `on_disk`), then kept, the oldest dropped beyond `limit`."""
    with _LOCK:
        compiled = compiled_models.get(key)
        if compiled is not None:
            compiled_models.move_to_end(key)
            return compiled
    import openvino as ov

    shaped = model.clone()
    shaped.reshape(shape)
    if on_disk:
        compiled = compile_cached(ov.Core(), shaped, config, what)
    else:
        try:
            compiled = ov.Core().compile_model(shaped, "CPU", config)
        except Exception as err:  # noqa: BLE001
            raise OpenVinoUnavailable(f"OpenVINO could not compile {what} ({type(err).__name__})") from None
    with _LOCK:
        compiled_models[key] = compiled
        while len(compiled_models) > limit:
            compiled_models.popitem(last=False)
    return compiled


def input_channels(model: nn.Module) -> int:
    """Input channels of a `zoo.SRModel`: 1, or k + 1 for a 2.5-D model (`context_slices` k)."""
    return 1 + int(getattr(model, "context_slices", 0) or 0)


class OpenVinoRunner:
    """Runs (N, 1, h, w) float32 batches (a 2.5-D model: (N, k + 1, h, w) stacks) through the OpenVINO CPU plugin with one static-shape
    compiled model per (h, w): a single slice on a latency-tuned model (all threads on it),
    several slices on a throughput-tuned one (one stream per core, slices in parallel; 1.3x
    the latency mode's slices per second on a 2-core CPU, measured)."""

    def __init__(self, model: nn.Module, factors: tuple[int, int], bf16: bool,
                 threads: int | None = None, int8_model: Path | None = None):
        if not available():
            raise OpenVinoUnavailable("OpenVINO is not installed (pip install openvino)")
        import openvino as ov

        check_finite_weights(model)
        self.factors = factors
        self._channels = input_channels(model)
        self.bf16 = bf16
        self._ov = ov
        self._core = ov.Core()
        if int8_model is None:
            self._model, self._adds_bicubic = converted_body(model, factors)
        else:  # a shipped int8 IR of the same body (see int8_models)
            self._adds_bicubic = residual_body(model) is not None
            try:
                self._model = self._core.read_model(str(int8_model))
            except Exception as err:  # noqa: BLE001
                raise OpenVinoUnavailable(f"OpenVINO could not read the int8 model {int8_model.name} "
                                          f"({type(err).__name__})") from None
        self._threads = int(threads or torch.get_num_threads())
        # Compiled models outlive this runner (the next `upscale` of the same model reuses them);
        # infer requests are this runner's own (they are not thread-safe).
        with _LOCK:
            self._compiled = _COMPILED.setdefault(model, OrderedDict())
        self._variant = (str(int8_model or ""), bf16, self._threads)
        self._requests: dict[tuple, object] = {}

    def _compile(self, h: int, w: int, hint: str):
        config = {"INFERENCE_PRECISION_HINT": "bf16" if self.bf16 else "f32",
                  "PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": self._threads}
        if hint == "THROUGHPUT":
            config["NUM_STREAMS"] = max(1, min(self._threads, 4))
        return compile_shaped(self._compiled, (*self._variant, h, w, hint), self._model,
                              [1, self._channels, h, w], config, f"the model for {h}x{w} slices",
                              MAX_COMPILED_PER_MODEL)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 1, h, w) float32 -> (N, 1, h*sy, w*sx) float32 (CPU tensors)."""
        n, _, h, w = batch.shape
        sy, sx = self.factors
        out = np.empty((n, 1, h * sy, w * sx), dtype=np.float32)
        source = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        if n == 1 or self._threads == 1 or 2 * h * sy * w * sx > PARALLEL_OUTPUT_PIXELS:
            if (h, w) not in self._requests:
                self._requests[(h, w)] = self._compile(h, w, "LATENCY").create_infer_request()
            request = self._requests[(h, w)]
            for i in range(n):
                out[i] = next(iter(request.infer({0: source[i:i + 1]}).values()))[0]
        else:
            # Plain requests started and waited for here (no Python callbacks: a callback needs
            # the GIL in an OpenVINO thread, which deadlocks when the queue is collected).
            key = (h, w, "THROUGHPUT")
            if key not in self._requests:
                compiled = self._compile(h, w, "THROUGHPUT")
                jobs = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
                self._requests[key] = [compiled.create_infer_request() for _ in range(jobs)]
            requests = self._requests[key]
            for start in range(0, n, len(requests)):
                running = list(zip(range(start, min(n, start + len(requests))), requests))
                for i, request in running:
                    request.start_async({0: source[i:i + 1]})
                for i, request in running:
                    request.wait()
                    out[i] = request.get_output_tensor(0).data[0]
        result = torch.from_numpy(out)
        if self._adds_bicubic:  # the global residual in fp32 (see the module doc)
            middle = self._channels // 2  # a 2.5-D model adds its middle slice's
            result += F.interpolate(batch[:, middle:middle + 1].float(), size=(h * sy, w * sx), mode="bicubic",
                                    align_corners=False)
        return result
