"""Slice-wise super-resolution of a voxel array: arrays in, arrays out; no files, no geometry.

A volume (K, J, I) is cut into 2-D slices along one array axis, the slices are batched, each
batch is cut into tiles with a halo at least as wide as the network's receptive field, the
network runs on each tile, and the halo is cropped away. Because every output pixel is computed
from exactly the input the whole-slice pass would see, tiled and untiled outputs agree (up to
float rounding): no blending weights are needed. A network with a global operation (receptive
field wider than the probe) is run on whole slices. A 2.5-D network gets each slice with its
neighbours along the slice axis as channels (`slice_stacks`); batches, tiles and backends carry
the stacks as they carry single slices.

Peak memory is the input, the output, and one batch of tiles, whatever the number of slices.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import CancelledError, InputError, WeightsError
from .notices import notice  # noqa: F401 (the backends' notices, re-exported)

ProgressCallback = Callable[[float, str], None]


class CancelToken:
    """Thread-safe cancel flag; `cancel()` makes the running job raise CancelledError."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise CancelledError("super-resolution cancelled; nothing was written")


@dataclass(frozen=True)
class EngineOptions:
    """How to run: device ("auto", "cpu", "cuda"), precision ("auto", "fp32", "bf16", "fp16",
    "int8"; see `resolve_precision` and `SliceUpscaler`),
    tile edge in input pixels (None = automatic, 0 = whole slices), slices per batch, CPU
    threads (None = torch's default), channels_last memory format (torch), backend ("auto",
    "torch", "openvino"; see `resolve_backend`), geometric self-ensemble members per slice
    (1 = off; 2, 4 or 8: `ensemble_transforms`) and the first of them this run computes
    (`ensemble_start` > 0: the earlier members' outputs exist elsewhere, e.g. the whole-volume
    pass of the same model; the result is then the mean of members ensemble_start..n-1 only)."""

    device: str = "auto"
    precision: str = "auto"
    tile: int | None = None
    batch_size: int = 4
    threads: int | None = None
    channels_last: bool = True
    backend: str = "auto"
    self_ensemble: int = 1
    ensemble_start: int = 0

    def __post_init__(self) -> None:
        """InputError naming the option (API argument and CLI flag) for a value out of range."""
        if self.backend not in BACKENDS:
            raise InputError(f"backend (--backend) must be one of {', '.join(BACKENDS)}, "
                             f"got {self.backend!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"device (--device) must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision (--precision) must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise InputError(f"batch_size (--batch) must be an integer >= 1, got {self.batch_size!r}")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise InputError(f"threads (--threads) must be an integer >= 1, got {self.threads!r}")
        if self.tile is not None and (not _is_int(self.tile) or
                                      (self.tile != 0 and self.tile < MIN_TILE)):
            raise InputError(f"tile (--tile) must be 0 (whole slices) or at least {MIN_TILE} "
                             f"pixels, got {self.tile!r}")
        if not _is_int(self.self_ensemble) or self.self_ensemble not in SELF_ENSEMBLE_SIZES:
            raise InputError("self_ensemble must be one of "
                             f"{', '.join(map(str, SELF_ENSEMBLE_SIZES))}, got {self.self_ensemble!r}")
        if not _is_int(self.ensemble_start) or not 0 <= self.ensemble_start < self.self_ensemble:
            raise InputError(f"ensemble_start must be an integer in [0, self_ensemble), got "
                             f"{self.ensemble_start!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
BACKENDS = ("auto", "torch", "openvino")
#: OpenVINO runs whole slices up to this many output pixels, tiles of OV_TILE beyond (memory).
OV_WHOLE_SLICE_MAX_PIXELS = 1024 * 1024
OV_TILE = 256
#: Smallest tile edge (input pixels): smaller tiles are mostly halo and make no real progress.
MIN_TILE = 16


#: Geometric self-ensemble (Lim et al., "Enhanced deep residual networks for single image
#: super-resolution", EDSR+): the in-plane dihedral transforms (transpose, flip rows, flip
#: columns), applied in this order; n members take the first n. 2 adds the 180-degree rotation,
#: 4 the two flips, 8 the transposed four.
DIHEDRAL_TRANSFORMS = ((False, False, False), (False, True, True), (False, True, False),
                       (False, False, True), (True, False, False), (True, True, True),
                       (True, True, False), (True, False, True))
SELF_ENSEMBLE_SIZES = (1, 2, 4, 8)


def ensemble_transforms(members: int, factors: tuple[int, int]) -> tuple[tuple[bool, bool, bool], ...]:
    """The (transpose, flip rows, flip columns) transforms of a `members`-strong self-ensemble.
    Unequal in-plane factors allow no transpose (the network is loaded for (fy, fx), not
    (fx, fy)): at most the 4 flips then."""
    if members not in SELF_ENSEMBLE_SIZES:
        raise InputError(f"self_ensemble must be one of {', '.join(map(str, SELF_ENSEMBLE_SIZES))}, "
                         f"got {members!r}")
    usable = DIHEDRAL_TRANSFORMS if factors[0] == factors[1] else DIHEDRAL_TRANSFORMS[:4]
    return usable[:members]


def _flip(x: torch.Tensor, rows: bool, cols: bool) -> torch.Tensor:
    dims = [d for d, flag in ((-2, rows), (-1, cols)) if flag]
    return torch.flip(x, dims) if dims else x


#: Automatic tile edge (input pixels) on CPU: 128-256 px tiles beat whole 512^2 slices here.
AUTO_TILE_CPU = 192


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when available, else CPU; "cuda" without a GPU is an InputError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _cpu_has_fast_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def resolve_precision(precision: str, device: torch.device, learned: bool) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    "auto": bf16 on CPUs with AMX/AVX512-BF16 and fp16 on CUDA for learned networks, fp32 for
    interpolation baselines (nothing to gain).
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be auto, fp32, bf16, fp16 or int8, got {precision!r}")
    if precision in ("auto", "int8"):  # int8: the layers left float run as "auto" would
        if not learned:
            return None
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if _cpu_has_fast_bf16() else None
    if precision == "fp16" and device.type == "cpu":
        raise InputError("precision fp16 is for CUDA; use bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def context_slices_of(model: nn.Module) -> int:
    """Neighbouring slices `model` takes besides the one it super-resolves (`zoo.SRModel.
    context_slices`; 0 for a 2-D network)."""
    return int(getattr(model, "context_slices", 0) or 0)


def _centre_dependence(model: nn.Module, factors: tuple[int, int], probe: torch.Tensor) -> torch.Tensor:
    """|d output / d input| (h, w), summed over input channels, of the output pixel over the
    centre of the square `probe` (1, C, h, h) input, by back-propagation on the model's device."""
    sy, sx = factors
    centre = probe.shape[-1] // 2
    device = next(iter(model.parameters()), torch.empty(0)).device
    x = probe.to(device).requires_grad_(True)
    with torch.enable_grad():
        model(x)[0, 0, centre * sy, centre * sx].backward()
    return x.grad[0].abs().sum(0).cpu()


def receptive_radius(model: nn.Module, factors: tuple[int, int], probe: int = 48,
                     max_probe: int = 96) -> int | None:
    """Input pixels each side that one output pixel depends on, measured by back-propagation.

    Returns None when the dependence reaches the probe's border even at `max_probe` pixels
    (a global operation, or a field so wide that tiles would be mostly halo): such a model runs
    on whole slices.
    """
    generator = torch.Generator().manual_seed(0)
    channels = 1 + context_slices_of(model)
    while probe <= max_probe:
        grad = _centre_dependence(model, factors, torch.rand(1, channels, probe, probe, generator=generator))
        rows = torch.nonzero(grad.sum(1)).flatten()
        cols = torch.nonzero(grad.sum(0)).flatten()
        if len(rows) == 0:
            return 1
        radius = int(max(probe // 2 - rows.min(), rows.max() - probe // 2,
                         probe // 2 - cols.min(), cols.max() - probe // 2))
        if radius < probe // 2 - 1:
            return radius + 2
        probe *= 2
    return None


#: Measured radii per loaded model and factors. Keyed by the model object itself: the radius
#: depends on its config (a card may record a smaller depth) and on its weights (a zeroed last
#: conv hides the rest of the network), so models of one registry name may differ.
_RADIUS_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, int | None]]" = weakref.WeakKeyDictionary()


def _cached_radius(model: nn.Module, factors: tuple[int, int]) -> int | None:
    """receptive_radius, memoised per model object and factors."""
    per_model = _RADIUS_CACHE.setdefault(model, {})
    if tuple(factors) not in per_model:
        per_model[tuple(factors)] = receptive_radius(model, factors)
    return per_model[tuple(factors)]


#: Share of an output pixel's dependence on its input (back-propagated magnitude) that a crop's
#: context may leave out: an ROI crop then needs about half the exact receptive radius, and its
#: pixels differ from the whole-slice run by about this fraction of the intensity range.
CROP_CONTEXT_TOLERANCE = 1e-4


def effective_radius(model: nn.Module, factors: tuple[int, int],
                     tolerance: float = CROP_CONTEXT_TOLERANCE) -> int | None:
    """Input pixels each side that hold all but `tolerance` of one output pixel's dependence on
    the input (|gradient| summed over rings of Chebyshev distance, on a smooth random probe),
    plus one; at most the exact `receptive_radius`; None where that is None. What a crop that
    is blended into a whole-slice run needs around it."""
    exact = _cached_radius(model, factors)
    if exact is None:
        return None
    key = ("effective", tuple(factors), float(tolerance))
    per_model = _RADIUS_CACHE.setdefault(model, {})
    if key not in per_model:
        probe = max(48, 2 * exact + 8)
        channels = 1 + context_slices_of(model)
        noise = torch.rand(1, channels, probe + 8, probe + 8, generator=torch.Generator().manual_seed(0))
        smooth = torch.nn.functional.avg_pool2d(noise, 9, 1)  # image-like
        grad = _centre_dependence(model, factors, smooth).numpy()
        rows, cols = np.indices(grad.shape)
        distance = np.maximum(abs(rows - probe // 2), abs(cols - probe // 2))
        outside = [grad[distance > r].sum() for r in range(exact + 1)]
        total = max(float(grad.sum()), 1e-30)
        radius = next((r for r, mass in enumerate(outside) if mass <= tolerance * total), exact)
        per_model[key] = min(exact, radius + 1)
    return per_model[key]


def resolve_backend(backend: str, device: torch.device, learned: bool,
                    factors: tuple[int, int], precision: str = "auto") -> str:
    """"torch" or "openvino". "auto": OpenVINO for a learned, trained network with equal in-plane
    factors on the CPU when the package imports (2-2.5x faster than torch in fp32 on the CPUs
    measured, more in bf16), torch otherwise (CUDA, interpolation, anisotropic factors).
    "openvino" asked for but not installed, or on CUDA: torch, with a one-line notice."""
    if backend == "torch":
        if precision == "int8":
            notice("int8 runs on the OpenVINO backend; torch runs the model in float")
        return "torch"
    from . import openvino_runtime
    if precision == "int8" and backend == "auto":
        backend = "openvino"
    usable = device.type == "cpu" and factors[0] == factors[1]
    if backend == "openvino":
        if device.type != "cpu":
            notice("the OpenVINO backend runs on the CPU; using torch on CUDA")
            return "torch"
        if not openvino_runtime.available():
            notice("OpenVINO is not installed (pip install openvino); using torch")
            return "torch"
        return "openvino" if factors[0] == factors[1] else "torch"
    return "openvino" if learned and usable and openvino_runtime.available() else "torch"


def choose_int8(model: nn.Module, factors: tuple[int, int], precision: str,
                float_dtype: torch.dtype | None):
    """The shipped int8 IR (path) to run `model` with on OpenVINO, or None (float).

    "int8": the model's int8 IR when one was made from its weights file (notice otherwise).
    "auto": that IR only when the card's held-out PSNR cost against fp32, with the float layers
    in `float_dtype` (None = fp32), is within `int8_models.MAX_COST_DB` and the CPU plugin
    lists INT8. Anything else: None.
    """
    if precision not in ("auto", "int8") or factors[0] != factors[1]:
        return None
    from . import int8_models
    found = int8_models.find(getattr(model, "weights_path", None), getattr(model, "card", None),
                             factors[0])
    if found is None:
        if precision == "int8":
            name = getattr(getattr(model, "spec", None), "name", "this model")
            notice(f"no int8 model made from these weights for {name} x{factors[0]} "
                   "(`python -m MedSRLib.evaluation.quantize_int8` makes one); running it in float")
        return None
    path, entry = found
    if precision == "int8":
        return path
    cost = int8_models.held_out_cost(entry, "bf16" if float_dtype == torch.bfloat16 else "fp32")
    if cost is None or cost > int8_models.MAX_COST_DB or not int8_models.cpu_runs_int8():
        return None
    return path


def bf16_keeps_the_image(card: dict | None, scale: int) -> bool:
    """False when the card records that bf16 costs a held-out volume more than the accuracy
    contract at `scale` (`training.bf16_cost`); True otherwise (most networks lose <= 0.02 dB)."""
    entry = ((card or {}).get("bf16") or {}).get(f"x{scale}")
    return entry is None or bool(entry.get("automatic", True))


class SliceUpscaler:
    """Runs one ready model on batches of 2-D slices, tiled, on one device, backend and
    precision."""

    def __init__(self, model: nn.Module, factors: tuple[int, int], options: EngineOptions,
                 learned: bool = True):
        self.factors = factors
        self.device = resolve_device(options.device)
        self.autocast_dtype = resolve_precision(options.precision, self.device, learned)
        if (options.precision == "auto" and self.autocast_dtype == torch.bfloat16
                and not bf16_keeps_the_image(getattr(model, "card", None), factors[0])):
            self.autocast_dtype = None
        self.channels_last = options.channels_last
        self.model = model.eval()
        # Random-weight (untrained) networks stay in torch under "auto": converting them would
        # cost seconds per call and fill the disk cache with throw-away models.
        trained = learned and getattr(model, "card", None) is not None
        self.backend = resolve_backend(options.backend, self.device, trained, factors,
                                       options.precision)
        self._runner = None
        self.int8 = False
        if self.backend == "openvino":
            from .openvino_runtime import OpenVinoRunner, OpenVinoUnavailable
            int8_model = choose_int8(model, factors, options.precision, self.autocast_dtype)
            try:
                self._runner = OpenVinoRunner(self.model, factors,
                                              bf16=self.autocast_dtype == torch.bfloat16,
                                              threads=options.threads, int8_model=int8_model)
                self.int8 = int8_model is not None
            except OpenVinoUnavailable as err:
                notice(f"{err}; using torch")
                self.backend = "torch"
        tile = options.tile
        self._auto_tile = tile is None
        if tile is None:
            tile = 0 if (self.device.type != "cpu" or self.backend == "openvino") else AUTO_TILE_CPU
        self.tile = tile
        self._halo: int | None = None  # measured when a slice first needs tiling
        self.ensemble = ensemble_transforms(options.self_ensemble, factors)[options.ensemble_start:]
        self.model = self.model.to(self.device)
        if self.channels_last and self.backend == "torch":
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def description(self) -> str:
        """What runs: backend, precision and tiling, e.g. "openvino bf16, whole slices"."""
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        if self.int8:
            precision = f"int8 (float layers {precision})"
        tiling = f"{self.tile}-px tiles" if self.tile else "whole slices"
        ensemble = f", self-ensemble x{len(self.ensemble)}" if len(self.ensemble) > 1 else ""
        return f"{self.backend} {precision}, {tiling}{ensemble}"

    def _run_ensemble(self, x: torch.Tensor) -> torch.Tensor:
        """The network on `x` (N, C, h, w), or with self-ensemble the mean of its outputs on the
        transformed inputs, each transformed back; one batch per input shape (the flips of one
        orientation run together)."""
        if self.ensemble == DIHEDRAL_TRANSFORMS[:1]:
            return self._run(x)
        n, total = x.shape[0], None
        for transpose in (False, True):
            members = [(rows, cols) for t, rows, cols in self.ensemble if t == transpose]
            if not members:
                continue
            oriented = x.transpose(-1, -2) if transpose else x
            y = self._run(torch.cat([_flip(oriented, rows, cols) for rows, cols in members]))
            for m, (rows, cols) in enumerate(members):
                part = _flip(y[m * n:(m + 1) * n], rows, cols)
                part = part.transpose(-1, -2) if transpose else part
                total = part.clone() if total is None else total.add_(part)
        return total / len(self.ensemble)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self._runner is not None:
            try:
                return self._runner(x)
            except Exception as err:  # noqa: BLE001 - any OpenVINO failure: torch takes over
                from .openvino_runtime import OpenVinoUnavailable
                if not isinstance(err, OpenVinoUnavailable):
                    raise
                notice(f"{err}; using torch")
                self._runner, self.backend = None, "torch"
                if self.channels_last:
                    self.model = self.model.to(memory_format=torch.channels_last)
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                y = self.model(x)
        else:
            y = self.model(x)
        return y.float().cpu()

    @property
    def context_slices(self) -> int:
        """Neighbours per slice the model takes (0: 2-D; see `slice_stacks`)."""
        return context_slices_of(self.model)

    def upscale(self, slices: np.ndarray) -> np.ndarray:
        """(N, h, w) float32 in network units -> (N, h*sy, w*sx) float32. A 2.5-D model
        (`context_slices` k > 0) takes (N, k + 1, h, w) stacks (`slice_stacks`) and returns
        their middle slices super-resolved; tiles cut every slice of a stack alike."""
        sy, sx = self.factors
        channels = 1 + self.context_slices
        batch = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
        if batch.ndim == 3 and channels == 1:
            batch = batch[:, None]
        if batch.ndim != 4 or batch.shape[1] != channels:
            raise ValueError(f"slices must be (N, h, w) for a 2-D model or (N, {channels}, h, w) "
                             f"stacks for this 2.5-D one, got shape {tuple(slices.shape)}")
        n, _, h, w = batch.shape
        if (self._auto_tile and self.backend == "openvino"
                and h * w * sy * sx > OV_WHOLE_SLICE_MAX_PIXELS):
            self.tile = OV_TILE  # whole slices would need GB-sized activations
        if self.tile and (h > self.tile or w > self.tile) and self._halo is None:
            self._halo = _cached_radius(self.model, self.factors)
            if self._halo is None:  # a global operation: whole slices only
                self.tile = 0
        with torch.inference_mode():
            if not self.tile or (h <= self.tile and w <= self.tile):
                return check_finite_output(self._run_ensemble(batch)[:, 0].numpy(), self.model)
            out = torch.empty(n, 1, h * sy, w * sx)
            r, t = self._halo, self.tile
            for y0 in range(0, h, t):
                y1 = min(y0 + t, h)
                py0, py1 = max(0, y0 - r), min(h, y1 + r)
                for x0 in range(0, w, t):
                    x1 = min(x0 + t, w)
                    px0, px1 = max(0, x0 - r), min(w, x1 + r)
                    tile_out = self._run_ensemble(batch[:, :, py0:py1, px0:px1])
                    oy, ox = (y0 - py0) * sy, (x0 - px0) * sx
                    out[:, :, y0 * sy:y1 * sy, x0 * sx:x1 * sx] = \
                        tile_out[:, :, oy:oy + (y1 - y0) * sy, ox:ox + (x1 - x0) * sx]
            return check_finite_output(out[:, 0].numpy(), self.model)


def check_finite_output(output: np.ndarray, model: nn.Module) -> np.ndarray:
    """`output` (a network's result) unchanged, or WeightsError naming the model and its
    weights file when it holds a NaN or infinite value (NaN/inf weights, an overflow): cast to
    an integer type such voxels would silently become 0 or the type's limits."""
    if not np.isfinite(output).all():
        spec = getattr(model, "spec", None)
        name = getattr(spec, "name", type(model).__name__)
        weights = getattr(model, "weights_path", None)
        raise WeightsError(f"model {name} produced NaN/Inf values (weights file "
                           f"{weights if weights is not None else 'none: untrained'}); nothing "
                           "was written")
    return output


def slice_stacks(volume: np.ndarray, axis: int, start: int, stop: int,
                 context_slices: int) -> np.ndarray:
    """Slices start..stop-1 of `volume` along `axis` as (N, h, w), or, with `context_slices`
    k > 0, as (N, k + 1, h, w) stacks of each slice and its neighbours (`neighbour_indices`:
    edges replicated); h, w are the remaining axes in increasing order."""
    if not context_slices:
        index = [slice(None)] * volume.ndim
        index[axis] = slice(start, stop)
        return np.moveaxis(volume[tuple(index)], axis, 0)
    n_slices = volume.shape[axis]
    indices = np.stack([neighbour_indices(i, n_slices, context_slices) for i in range(start, stop)])
    taken = np.moveaxis(np.take(volume, indices.reshape(-1), axis=axis), axis, 0)
    return taken.reshape(stop - start, context_slices + 1, *taken.shape[1:])


def neighbour_indices(index: int, n_slices: int, context_slices: int) -> np.ndarray:
    """Slice indices a 2.5-D network sees for slice `index` of `n_slices`: index - k/2 ...
    index + k/2 (k = `context_slices`, even) in order, clipped to [0, n_slices - 1], so edge
    slices are replicated (a one-slice volume gives k + 1 copies of its slice)."""
    if context_slices < 0 or context_slices % 2:
        raise ValueError(f"context_slices must be an even number >= 0, got {context_slices}")
    half = context_slices // 2
    return np.clip(np.arange(index - half, index + half + 1), 0, n_slices - 1)


@dataclass(frozen=True)
class SlicePass:
    """One sweep over the volume: slices along `slice_axis`, 2-D factors on the other two axes
    (in increasing array-axis order)."""

    slice_axis: int
    plane_factors: tuple[int, int]


def plan_passes(factors_kji: Sequence[int], slice_axis: int) -> list[SlicePass]:
    """In-plane pass for the two axes other than `slice_axis`, then, if `slice_axis` itself is
    scaled, a through-plane pass on slices along the first other axis."""
    fk = tuple(int(f) for f in factors_kji)
    plane = [a for a in range(3) if a != slice_axis]
    passes = []
    if fk[plane[0]] > 1 or fk[plane[1]] > 1:
        passes.append(SlicePass(slice_axis, (fk[plane[0]], fk[plane[1]])))
    if fk[slice_axis] > 1:
        second_axis = plane[0]
        # Plane of the second pass: (slice_axis, plane[1]) in increasing array order.
        plane2 = sorted((slice_axis, plane[1]))
        factors2 = tuple(fk[slice_axis] if a == slice_axis else 1 for a in plane2)
        passes.append(SlicePass(second_axis, factors2))  # type: ignore[arg-type]
    return passes


def _check_memory_error(err: BaseException) -> None:
    from .memory_budget import is_out_of_memory, out_of_memory_message
    if is_out_of_memory(err):
        raise InputError(out_of_memory_message()) from None


def super_resolve_volume(
    volume: np.ndarray,
    factors_kji: Sequence[int],
    slice_axis: int,
    model_for: Callable[[tuple[int, int]], tuple[nn.Module, bool]],
    to_unit: Callable[[np.ndarray], np.ndarray],
    from_unit: Callable[[np.ndarray], np.ndarray],
    out_dtype: np.dtype,
    options: EngineOptions = EngineOptions(),
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Super-resolve `volume` (K, J, I) by integer `factors_kji`, slice-wise along `slice_axis`.

    `model_for((fy, fx))` returns (model, learned) mapping (N, 1, h, w) network units to
    (N, 1, h*fy, w*fx); a 2.5-D model (`context_slices` k > 0) gets each slice with its k
    neighbours along the pass's slice axis as (N, k + 1, h, w) (edges replicated, so a volume
    of 1, 2 or 3 slices runs too) and the output grid is the same. `to_unit` maps voxel values
    to network units, `from_unit` maps them back and casts to `out_dtype`. Work is done batch by
    batch; `cancel` is checked between batches.
    The result is written into `out` when given (its shape and dtype must be the result's), else
    into a new array.
    """
    if volume.ndim != 3:
        raise InputError(f"volume must be 3-D (K, J, I), got shape {volume.shape}")
    passes = plan_passes(factors_kji, slice_axis)
    if not passes:
        raise InputError(f"scale factors {tuple(factors_kji)} leave the volume unchanged")
    if options.threads:
        torch.set_num_threads(int(options.threads))
    cancel = cancel or CancelToken()
    report = progress or (lambda fraction, message: None)
    upscalers = []
    for slice_pass in passes:
        model, learned = model_for(slice_pass.plane_factors)
        upscalers.append(SliceUpscaler(model, slice_pass.plane_factors, options, learned))
    total = sum(_pass_cost(volume.shape, factors_kji, passes, i) for i in range(len(passes)))
    done = 0.0
    current: np.ndarray = volume
    for pass_index, (slice_pass, upscaler) in enumerate(zip(passes, upscalers)):
        last = pass_index == len(passes) - 1
        axis = slice_pass.slice_axis
        out_shape = list(current.shape)
        plane = [a for a in range(3) if a != axis]
        for a, f in zip(plane, slice_pass.plane_factors):
            out_shape[a] *= f
        if last and out is not None:
            if out.shape != tuple(out_shape) or out.dtype != out_dtype:
                raise ValueError(f"out is {out.shape} {out.dtype}, the result {tuple(out_shape)} "
                                 f"{np.dtype(out_dtype)}")
            result = out
        else:
            result = np.empty(out_shape, dtype=out_dtype if last else np.float32)
        n_slices = current.shape[axis]
        cost_per_slice = _pass_cost(volume.shape, factors_kji, passes, pass_index) / n_slices
        for start in range(0, n_slices, options.batch_size):
            cancel.raise_if_cancelled()
            stop = min(start + options.batch_size, n_slices)
            index = [slice(None)] * 3
            index[axis] = slice(start, stop)
            block = slice_stacks(current, axis, start, stop, upscaler.context_slices)
            if pass_index == 0:
                block = to_unit(block)
            try:
                upscaled = upscaler.upscale(block)
            except (RuntimeError, MemoryError) as err:
                _check_memory_error(err)
                raise
            upscaled = np.moveaxis(upscaled, 0, axis)
            result[tuple(index)] = from_unit(upscaled) if last else upscaled
            done += cost_per_slice * (stop - start)
            report(done / total, f"pass {pass_index + 1}/{len(passes)}: slice {stop}/{n_slices}")
        current = result
    cancel.raise_if_cancelled()
    return current


def _pass_cost(shape: Sequence[int], factors_kji: Sequence[int], passes: list[SlicePass],
               index: int) -> float:
    """Output voxels a pass produces (a proxy for its run time)."""
    size = [float(s) for s in shape]
    for p in passes[: index + 1]:
        plane = [a for a in range(3) if a != p.slice_axis]
        for a, f in zip(plane, p.plane_factors):
            size[a] *= f
    return size[0] * size[1] * size[2]
