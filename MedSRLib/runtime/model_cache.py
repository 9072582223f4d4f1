"""Loaded models kept across calls in one process, so a second `upscale` costs its pixels only.

A Slicer user pressing Apply again, a cohort worker or a Python loop over X-rays reuses the
network already built and loaded. The key holds the model name, factors, modality and the
identity (path, size, modification time) of the weights file used, so a retrained file is
reloaded. Untrained (random-weight) models are never cached: each call draws them anew from
torch's generator, as the tests expect. At most `MAX_MODELS` stay (least recently used out).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Hashable, Sequence, TypeVar

from ..models import registry as zoo

#: Models kept at most (a shipped model is a few MB).
MAX_MODELS = 8

_MODELS: "OrderedDict[Hashable, object]" = OrderedDict()
Loaded = TypeVar("Loaded")
_LOCK = threading.Lock()


def _file_identity(path: Path | None) -> tuple | None:
    if path is None:
        return None
    stat = Path(path).stat()
    return (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def load_model(name: str, factors: tuple[int, int], *, allow_untrained: bool = False,
               weights_path: str | Path | None = None, modality: str | None = None) -> zoo.SRModel:
    """`zoo.load_model`, reusing a model this process already loaded from the same weights."""
    spec = zoo.get_spec(name)
    path = weights_path
    if path is None and spec.needs_weights and max(factors) in spec.scales:
        path = zoo.shipped_weights(spec, max(factors), None, modality)

    def load() -> zoo.SRModel:
        return zoo.load_model(name, factors, allow_untrained=allow_untrained,
                              weights_path=weights_path, modality=modality)

    try:
        identity = _file_identity(Path(path)) if path is not None else None
    except OSError:  # a missing file: let zoo report it
        identity = None
    if spec.needs_weights and identity is None:  # untrained or an error: nothing to reuse
        return load()
    return _reused((name, tuple(factors), modality, identity), load)


def _reused(key: Hashable, load: Callable[[], Loaded]) -> Loaded:
    """What `load()` gives, kept under `key` (least recently used out beyond MAX_MODELS)."""
    with _LOCK:
        loaded = _MODELS.get(key)
        if loaded is not None:
            _MODELS.move_to_end(key)
            return loaded  # type: ignore[return-value]
    loaded = load()
    with _LOCK:
        _MODELS[key] = loaded
        while len(_MODELS) > MAX_MODELS:
            _MODELS.popitem(last=False)
    return loaded


def load_files(kind: str, paths: Sequence[Path], load: Callable[[], Loaded]) -> Loaded:
    """`load()`, reusing what this process already loaded for the same `kind` from the same
    files (path, size, modification time of every one of `paths`): e.g. the lesion finder's
    ensemble, whose networks then also keep their compiled OpenVINO models. A missing file is
    left to `load` to report."""
    try:
        key = (kind, tuple(_file_identity(Path(path)) for path in paths))
    except OSError:
        return load()
    return _reused(key, load)


def clear() -> None:
    """Forget every cached model."""
    with _LOCK:
        _MODELS.clear()
