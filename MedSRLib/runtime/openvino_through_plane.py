"""Running the through-plane network (`ThroughPlaneEDSR`) through OpenVINO on the CPU.

What runs in OpenVINO is the network without its cubic-resampled image: the trunk on the thick
planes, the resampling of its features (the resampling matrix is an input), the tail and its
refinement blocks, giving the residual. The cubic image is added in fp32 torch, as the torch
path does (bf16 rounding of that sum would cost more than the body in bf16).

Each plane-batch shape (planes, thick rows, width, output rows) gets its own compiled model;
the last batch of a volume is padded to the batch size so that one volume needs at most one
shape per orientation. In bf16 this is about twice as fast as torch's bf16 autocast on one
thread of an AVX512-BF16 CPU (measured by `benchmarks/bench_through_plane.py --speed`).

The shipped network's conversion and compiled blobs are cached on disk like the in-plane
models' (`openvino_runtime`); a network adapted to one volume is converted and compiled in
memory only, so that adapted copies never fill the cache.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..models.networks.through_plane import ThroughPlaneEDSR, run_planes
from ..transforms.slice_profile import cubic_matrix, phase_map
from . import openvino_runtime
from ..errors import InputError
from .engine import EngineOptions, notice, resolve_backend, resolve_device, resolve_precision
from .openvino_runtime import OpenVinoUnavailable

#: A function restoring thick planes (N, 1, n, W) at output-row positions (m,) to (N, 1, m, W),
#: given the through-plane factor and thickness ratio (`run_planes`' signature without the net).
PlaneRunner = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]

#: Compiled models kept per network (shape, precision, threads), least recently used out.
MAX_COMPILED = 6
_CONVERTED: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class ThroughPlaneResidual(nn.Module):
    """`net`'s learned residual: (thick (N, 1, n, W), matrix (m, n) of the cubic resampling,
    conditioning (1, 3, m, 1): phase, factor and thickness-ratio channels) -> (N, 1, m, W)."""

    def __init__(self, net: ThroughPlaneEDSR):
        super().__init__()
        self.net = net

    def forward(self, thick: torch.Tensor, matrix: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        return self.net.residual(thick, matrix, conditioning)


def plane_inputs(rows: int, positions: torch.Tensor, factor: float,
                 thickness_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(cubic matrix (m, rows), conditioning (1, 3, m, 1)) float32 for output rows at input-row
    `positions` (m,), as `ThroughPlaneEDSR.forward` builds them."""
    pos = positions.detach().cpu().numpy()
    matrix = cubic_matrix(rows, pos).astype(np.float32)
    m = matrix.shape[0]
    conditioning = np.stack([phase_map(pos).astype(np.float32),
                             np.full(m, (float(factor) - 1.0) / 7.0, dtype=np.float32),
                             np.full(m, float(thickness_ratio), dtype=np.float32)])[None, :, :, None]
    return matrix, np.ascontiguousarray(conditioning)


def _converted(net: ThroughPlaneEDSR, cache: bool):
    """The OpenVINO model of `net`'s residual (dynamic shapes): this process's copy, the disk
    cache's (`cache`), or a fresh conversion."""
    with _LOCK:
        if net in _CONVERTED:
            return _CONVERTED[net]
    body = ThroughPlaneResidual(net).float().eval()
    example = (torch.rand(1, 1, 12, 16, generator=torch.Generator().manual_seed(0)),
               torch.rand(30, 12, generator=torch.Generator().manual_seed(1)),
               torch.rand(1, 3, 30, 1, generator=torch.Generator().manual_seed(2)))
    inputs = [[-1, 1, -1, -1], [-1, -1], [1, 3, -1, 1]]
    path = (openvino_runtime.cache_folder()
            / f"{openvino_runtime.model_fingerprint(net, (0, 0))}tp.xml") if cache else None
    converted = openvino_runtime.convert_cached(body, 1, path, "the through-plane network",
                                                example=example, inputs=inputs)
    with _LOCK:
        _CONVERTED[net] = converted
    return converted


class OpenVinoPlaneRunner:
    """A `PlaneRunner` for `net` on the OpenVINO CPU plugin (bf16 or fp32 body), `batch`
    planes per call (smaller batches are padded)."""

    def __init__(self, net: ThroughPlaneEDSR, bf16: bool, threads: int | None = None, batch: int = 8):
        if not openvino_runtime.available():
            raise OpenVinoUnavailable("OpenVINO is not installed (pip install openvino)")
        openvino_runtime.check_finite_weights(net)
        self.bf16 = bf16
        self.batch = int(batch)
        self._cache = not getattr(net, "adapted_steps", 0)
        self._model = _converted(net, self._cache)
        self._threads = int(threads or torch.get_num_threads())
        with _LOCK:
            self._compiled = _COMPILED.setdefault(net, OrderedDict())
        self._requests: dict[tuple, object] = {}

    def _request(self, rows: int, width: int, out_rows: int):
        key = (self.bf16, self._threads, self.batch, rows, width, out_rows)
        if key not in self._requests:
            config = {"INFERENCE_PRECISION_HINT": "bf16" if self.bf16 else "f32",
                      "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self._threads}
            shape = {0: [self.batch, 1, rows, width], 1: [out_rows, rows], 2: [1, 3, out_rows, 1]}
            compiled = openvino_runtime.compile_shaped(
                self._compiled, key, self._model, shape, config,
                f"the through-plane network for {rows}x{width} planes", MAX_COMPILED, on_disk=self._cache)
            self._requests[key] = compiled.create_infer_request()
        return self._requests[key]

    def __call__(self, thick: torch.Tensor, positions: torch.Tensor, factor: float,
                 thickness_ratio: float) -> torch.Tensor:
        n, _, rows, width = thick.shape
        matrix, conditioning = plane_inputs(rows, positions, factor, thickness_ratio)
        out_rows = matrix.shape[0]
        source = np.ascontiguousarray(thick.detach().cpu().numpy(), dtype=np.float32)
        residual = np.empty((n, 1, out_rows, width), dtype=np.float32)
        request = self._request(rows, width, out_rows)
        for start in range(0, n, self.batch):
            chunk = source[start:start + self.batch]
            count = chunk.shape[0]
            if count < self.batch:  # padded: one compiled shape per volume orientation
                chunk = np.concatenate([chunk, np.zeros((self.batch - count,) + chunk.shape[1:],
                                                        dtype=np.float32)])
            result = request.infer({0: chunk, 1: matrix, 2: conditioning})
            residual[start:start + count] = next(iter(result.values()))[:count]
        upsampled = torch.einsum("mr,nrw->nmw", torch.from_numpy(matrix), thick[:, 0].float())[:, None]
        return upsampled + torch.from_numpy(residual)


def device_and_precision(options: EngineOptions) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None for fp32) of the through-plane network under `options`:
    CUDA when `resolve_device` picks it; InputError for fp16 on the CPU."""
    device = resolve_device(options.device)
    if device.type == "cpu" and options.precision == "fp16":
        raise InputError("precision fp16 is for CUDA; on the CPU the through-plane network runs "
                         "in bf16 or fp32")
    return device, resolve_precision(options.precision, device, learned=True)


def planned_backend(options: EngineOptions) -> str:
    """"openvino" or "torch": what `plane_runner` runs the shipped network's architecture in
    under `options` (OpenVINO only on the CPU; InputError as `device_and_precision`)."""
    device, _ = device_and_precision(options)
    if device.type != "cpu":
        return "torch"
    return resolve_backend(options.backend, device, True, (1, 1),
                           "auto" if options.precision == "int8" else options.precision)


def plane_runner(net: nn.Module, options: EngineOptions, batch: int = 8) -> tuple[PlaneRunner, str]:
    """(the function that restores batches of planes with `net` under `options`, what runs,
    e.g. "openvino bf16 on the CPU"). The device as `resolve_device` picks it (CUDA when there is
    one); on the CPU, backend "auto" runs OpenVINO when it imports (torch on failure, with a
    notice) and "torch" runs torch's autocast in the precision `resolve_precision` picks (fp16
    is refused there: InputError). On CUDA, torch (fp16 autocast under "auto")."""
    device, autocast = device_and_precision(options)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast, "fp32")
    if isinstance(net, ThroughPlaneEDSR):
        if planned_backend(options) == "openvino":
            try:
                return OpenVinoPlaneRunner(net, precision == "bf16", options.threads, batch), \
                    f"openvino {precision} on the CPU"
            except OpenVinoUnavailable as err:
                notice(f"{err}; running the through-plane network in torch")
    net = net.to(device)

    def torch_runner(thick: torch.Tensor, positions: torch.Tensor, factor: float,
                     thickness_ratio: float) -> torch.Tensor:
        previous = getattr(net, "autocast_dtype", None)
        if hasattr(net, "autocast_dtype"):
            net.autocast_dtype = autocast
        try:
            return run_planes(net, thick.to(device), positions, factor, thickness_ratio).float().cpu()
        finally:
            if hasattr(net, "autocast_dtype"):
                net.autocast_dtype = previous

    used = precision if hasattr(net, "autocast_dtype") else "fp32"
    return torch_runner, f"torch {used} on the {'GPU' if device.type == 'cuda' else 'CPU'}"
