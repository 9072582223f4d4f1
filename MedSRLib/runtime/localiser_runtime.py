"""The lesion segmenter (`MedSRLib.models.networks.lesion_segmenter`) through OpenVINO on the CPU.

`SegmenterRunner(network, precision)` is a drop-in for the torch network in the localiser's
inference: (N, C, h, w) float32 stacks in, (N, 2, h, w) float32 logits out. The network is
converted once per process (`ov.convert_model`) and kept as OpenVINO IR in the same verified disk
cache as the SR models (`openvino_runtime.cache_folder`, keyed by a hash of the weights, SHA-256
checked before reading: `model_integrity`); each input shape gets its own static-shape compiled
model (batches are padded up to a power of two, so a volume compiles a handful of shapes).

Precision "f32" reproduces the torch network's lesion probability within ~1e-5; "bf16" (CPUs
with native bf16, e.g. AVX512_BF16 or AMX) within ~2e-2 per prediction, at about twice f32's
speed (`benchmarks/lesion_focus_time.py`).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from . import no_telemetry  # noqa: F401 - before any openvino import
from .openvino_runtime import (OpenVinoUnavailable, available, cache_folder, check_finite_weights,
                               compile_shaped, convert_cached, model_fingerprint)

PRECISIONS = ("f32", "bf16")
#: Fingerprint "factors" of a segmenter IR (keeps its cache key apart from any SR model's).
SEGMENTER_KEY = (0, 0)
MAX_COMPILED_PER_NETWORK = 8

_CONVERTED: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def cpu_has_bf16() -> bool:
    """True when OpenVINO's CPU plugin runs bf16 natively (lists BF16 among its capabilities)."""
    if not available():
        return False
    try:
        import openvino as ov
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no CPU plugin: no bf16
        return False


def _in_channels(network: nn.Module) -> int:
    return int(getattr(network, "in_channels", 3))


def converted_segmenter(network: nn.Module):
    """The OpenVINO model (dynamic (N, C, h, w) input) of `network`: from this process's memory,
    the verified disk cache, or a fresh conversion (then saved to the cache when writable).
    OpenVinoUnavailable when OpenVINO is missing or cannot convert it."""
    if not available():
        raise OpenVinoUnavailable("OpenVINO is not installed (pip install openvino)")
    with _LOCK:
        if network in _CONVERTED:
            return _CONVERTED[network]
    check_finite_weights(network)
    converted = convert_cached(network, _in_channels(network),
                               cache_folder() / f"{model_fingerprint(network, SEGMENTER_KEY)}.xml",
                               "the lesion segmenter")
    with _LOCK:
        _CONVERTED[network] = converted
    return converted


def padded_batch(count: int, batch_size: int) -> int:
    """The batch a run of `count` stacks is compiled for: the next power of two, at most
    `batch_size` (or `count` itself when it is larger than `batch_size`)."""
    if count >= batch_size:
        return count
    return min(batch_size, 1 << max(0, int(count) - 1).bit_length())


class SegmenterRunner:
    """Runs a lesion segmenter's (N, C, h, w) float32 inputs through OpenVINO in `precision`
    ("f32" or "bf16") with `threads` CPU threads (default: torch's); returns (N, 2, h, w)
    float32 logits as a CPU tensor, like the network's forward."""

    def __init__(self, network: nn.Module, precision: str = "f32", threads: int | None = None,
                 batch_size: int = 16):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.network = network
        self.precision = precision
        self.in_channels = _in_channels(network)
        self._model = converted_segmenter(network)
        self._threads = int(threads or torch.get_num_threads())
        self._batch_size = max(1, int(batch_size))
        with _LOCK:
            self._compiled = _COMPILED.setdefault(network, OrderedDict())
        self._requests: dict[tuple, object] = {}

    def eval(self) -> "SegmenterRunner":
        """Itself (the torch network's `eval`, so the runner stands in for it)."""
        return self

    def _request(self, shape: tuple[int, int, int, int]):
        if shape not in self._requests:
            config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_NUM_THREADS": self._threads}
            compiled = compile_shaped(self._compiled, (self.precision, self._threads, shape), self._model,
                                      list(shape), config, f"the lesion segmenter for {shape} inputs",
                                      MAX_COMPILED_PER_NETWORK)
            self._requests[shape] = compiled.create_infer_request()
        return self._requests[shape]

    def __call__(self, planes: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) float32 -> (N, 2, h, w) float32 logits."""
        n, c, h, w = planes.shape
        if c != self.in_channels:
            raise ValueError(f"planes must have {self.in_channels} channels, got shape "
                             f"{tuple(planes.shape)}")
        source = np.ascontiguousarray(planes.detach().cpu().numpy(), dtype=np.float32)
        batch = padded_batch(n, self._batch_size)
        if batch > n:  # the network normalises each stack on its own: padding changes nothing
            source = np.concatenate([source, np.zeros((batch - n, c, h, w), np.float32)])
        request = self._request((batch, c, h, w))
        logits = next(iter(request.infer({0: source}).values()))
        return torch.from_numpy(np.array(logits[:n], dtype=np.float32))
