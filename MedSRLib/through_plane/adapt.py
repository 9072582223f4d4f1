"""Self-supervised adaptation to one volume (SMORE/ECLARE idea): fine-tune a copy of the
through-plane network on pairs made from the volume's own stored (in-plane) slices, degraded
along one in-plane axis with the assumed slice profile and the run's factor, within a CPU-time
budget. The shipped network is never changed (its copy is trained).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..runtime.engine import CancelToken, ProgressCallback
from . import apply, data
from ..models.through_plane_io import trainable_copy
from ..models.networks.through_plane import run_planes
from ..transforms.slice_profile import SliceProfile

#: Fine-tuning settings: patch edge (HR pixels), pairs per step, Adam learning rate.
PATCH, BATCH, LEARNING_RATE = 48, 8, 1e-4


def inplane_planes(units: np.ndarray, axis: int, max_planes: int = 64) -> list[np.ndarray]:
    """Up to `max_planes` evenly spread stored slices (perpendicular to array `axis`) that hold
    some structure (std > 0.02 network units)."""
    n = units.shape[axis]
    planes = []
    for index in np.unique(np.linspace(0, n - 1, min(n, max_planes)).astype(int)):
        plane = np.ascontiguousarray(np.take(units, index, axis=axis), dtype=np.float32)
        if np.std(plane) > 0.02:
            planes.append(plane)
    return planes


def adapt_network(units: np.ndarray, axis: int, profile: SliceProfile, net: torch.nn.Module,
                  seconds: float, factor: float | None = None, seed: int = 0,
                  progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None) -> torch.nn.Module:
    """A fine-tuned copy of `net` for the volume `units` (K, J, I, network units) whose thick
    slices are along array `axis`, trained for at most `seconds` of process CPU time on pairs
    from its stored slices (degraded like the thick slices: `factor`, default spacing / mean
    in-plane pixel, clamped to 1.5-8, and `profile`'s thickness ratio and shape). Returns the
    copy in eval mode; `net` is untouched."""
    cancel = cancel or CancelToken()
    report = progress or (lambda fraction, message: None)
    planes = inplane_planes(units, axis)
    if factor is None:
        factor = 4.0
    factor = float(min(max(factor, data.FACTOR_RANGE[0]), data.FACTOR_RANGE[1]))
    degradation = data.Degradation(factor, apply.clamp_ratio(profile.thickness_ratio), profile.kind)
    tuned = trainable_copy(net).train()
    if not planes or max(max(p.shape) for p in planes) < PATCH + 4 * factor + 8 \
            or max(min(p.shape) for p in planes) < PATCH:
        report(1.0, "adaptation skipped: stored slices too small")
        tuned.adapted_steps = 0  # type: ignore[attr-defined]
        return tuned.eval()
    optimizer = torch.optim.Adam(tuned.parameters(), lr=LEARNING_RATE)
    rng = np.random.default_rng(seed)
    started = time.process_time()
    steps = 0
    while True:
        used = time.process_time() - started
        if used >= seconds:
            break
        cancel.raise_if_cancelled()
        batch = data.sample_thick_batch(planes, None, BATCH, PATCH, rng, degradation)
        rows = slice(batch.margin, batch.target.shape[2] - batch.margin)
        prediction = run_planes(tuned, torch.from_numpy(batch.thick), torch.from_numpy(batch.positions),
                                degradation.factor, degradation.thickness_ratio)
        loss = torch.nn.functional.l1_loss(prediction[:, :, rows], torch.from_numpy(batch.target[:, :, rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        report(min(1.0, used / seconds), f"adapting to this volume: step {steps}, "
                                         f"{used:.0f}/{seconds:.0f} CPU s")
    cancel.raise_if_cancelled()
    tuned.adapted_steps = steps  # type: ignore[attr-defined]
    return tuned.eval()
