"""Running the through-plane network on a volume in network units.

The volume is cubic-resampled along the slice axis to the output slices (any real factor, the
extent-exact grid of `planning.output_grid`), then every plane containing the slice axis is
restored by the network in both orthogonal orientations (for a z slice axis: coronal and
sagittal planes), and the two results are averaged.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..runtime.engine import CancelToken, ProgressCallback
from ..transforms import slice_profile as profile
from ..models.networks.through_plane import run_planes
from ..runtime.openvino_through_plane import PlaneRunner

#: Conditioning range the network was trained on (thickness / spacing).
RATIO_RANGE = (0.4, 1.0)


def resample_positions(n_in: int, n_out: int) -> np.ndarray:
    """Input-slice coordinates of the n_out output slices over the same extent."""
    return profile.sample_positions(n_out, n_in / n_out)


def cubic_resample(volume: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """`volume` float32 cubic-resampled (Keys a = -0.5) along `axis` to `n_out` samples over the
    same extent, in the input's axis order."""
    n_in = volume.shape[axis]
    matrix = profile.cubic_matrix(n_in, resample_positions(n_in, n_out)).astype(np.float32)
    moved = np.moveaxis(volume, axis, 0)
    out = np.tensordot(matrix, moved.reshape(n_in, -1), axes=(1, 0)).reshape((n_out,) + moved.shape[1:])
    return np.ascontiguousarray(np.moveaxis(out, 0, axis), dtype=np.float32)


def clamp_ratio(thickness_ratio: float) -> float:
    """The thickness ratio fed to the network: clamped to its training range."""
    return float(min(max(thickness_ratio, RATIO_RANGE[0]), RATIO_RANGE[1]))


def restore(units: np.ndarray, axis: int, n_out: int, thickness_ratio: float,
            net: torch.nn.Module | None, batch_planes: int = 8,
            progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
            cubic_only: bool = False, runner: PlaneRunner | None = None) -> np.ndarray:
    """`units` (K, J, I) float32 with thick slices along array `axis` -> float32 volume with
    `n_out` slices along it over the same extent: the network's restoration of every plane
    containing `axis`, in both orientations, averaged. `cubic_only` (or `net` None) returns the
    cubic resampling the network starts from (the baseline). `runner` restores the batches of
    planes (e.g. `openvino_through_plane.plane_runner`'s); default: `net` in torch fp32."""
    cancel = cancel or CancelToken()
    report = progress or (lambda fraction, message: None)
    n_in = units.shape[axis]
    if cubic_only or net is None:
        return cubic_resample(units, axis, n_out)
    factor = n_out / n_in
    positions = torch.from_numpy(resample_positions(n_in, n_out))
    ratio = clamp_ratio(thickness_ratio)
    moved = np.moveaxis(units, axis, 0)  # (n, A, B) view: slice axis first
    net = net.eval()
    if runner is None:
        runner = functools.partial(run_planes, net)
    total = _restore_planes(moved, runner, positions, factor, ratio, n_out, batch_planes, report, cancel)
    cancel.raise_if_cancelled()
    return np.ascontiguousarray(np.moveaxis(total, 0, axis))


def _restore_planes(moved: np.ndarray, runner: PlaneRunner, positions: torch.Tensor, factor: float,
                    ratio: float, n_out: int, batch_planes: int, report: ProgressCallback,
                    cancel: CancelToken) -> np.ndarray:
    """Both orientations of planes of `moved` (n, A, B) restored and averaged: (n_out, A, B)."""
    total = np.zeros((n_out,) + moved.shape[1:], dtype=np.float32)
    steps = moved.shape[1] + moved.shape[2]
    done = 0
    with torch.inference_mode():
        for plane_axis in (1, 2):  # planes (n, B) along A, then (n, A) along B
            n_planes = moved.shape[plane_axis]
            for start in range(0, n_planes, batch_planes):
                cancel.raise_if_cancelled()
                stop = min(start + batch_planes, n_planes)
                block = np.take(moved, np.arange(start, stop), axis=plane_axis)  # (n, b, X) or (n, X, b)
                planes = torch.from_numpy(np.ascontiguousarray(np.moveaxis(block, plane_axis, 0),
                                                               dtype=np.float32))[:, None]
                restored = runner(planes, positions, factor, ratio)[:, 0].numpy()
                index = [slice(None)] * 3
                index[plane_axis] = slice(start, stop)
                total[tuple(index)] += np.moveaxis(restored, 0, plane_axis)
                done += stop - start
                report(done / steps, f"through-plane: plane {done}/{steps}")
    total *= 0.5
    return total
