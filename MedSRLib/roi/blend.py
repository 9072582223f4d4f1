"""Feathered blending of a region's output into a whole-volume output (no seam).

The lesion model's output replaces the fast model's inside a box of the output grid, through a
weight map that is 1 in the box's core, 0 outside the box, and rises as a raised cosine over a
few output voxels inside each face of the box. A face that lies on the volume's border has no
ramp (there is nothing beyond it to blend with). The weight map is separable: the product of one
1-D profile per axis, so corners are smooth too.

Blending adds at most |a - b| * max|dw/dx| to the gradient, with max|dw/dx| = pi / (2 (ramp + 1))
per output voxel: where both models agree (a == b) the blend is the identity.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: Smallest ramp, in output voxels along an axis, of a face that is blended.
MIN_RAMP_VOXELS = 2


def ramp_profile(length: int, ramp_lower: int, ramp_upper: int) -> np.ndarray:
    """1-D weights over `length` voxels: a raised-cosine rise over `ramp_lower` voxels after the
    lower face and a fall over `ramp_upper` voxels before the upper face, 1 between.

    A ramp of 0 means no ramp on that face (weight 1 up to the face). Values lie in (0, 1];
    the i-th ramp voxel (i = 0 at the face) has weight 0.5 - 0.5 cos(pi (i + 1) / (ramp + 1)).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if ramp_lower < 0 or ramp_upper < 0:
        raise ValueError(f"ramps must be >= 0, got {ramp_lower}, {ramp_upper}")
    weights = np.ones(length, dtype=np.float64)
    position = np.arange(length, dtype=np.float64)
    for ramp, distance in ((ramp_lower, position), (ramp_upper, length - 1 - position)):
        if ramp:
            rise = 0.5 - 0.5 * np.cos(np.pi * np.minimum(distance + 1, ramp + 1) / (ramp + 1))
            weights = np.minimum(weights, rise)
    return weights


def feather_weights(box_size_kji: Sequence[int], ramps_lower_kji: Sequence[int],
                    ramps_upper_kji: Sequence[int]) -> np.ndarray:
    """Separable weight map (float32, shape `box_size_kji`) for a box of the output grid.

    `ramps_lower_kji[a]` / `ramps_upper_kji[a]`: ramp width in output voxels at the box's lower /
    upper face along array axis a (0 for a face on the volume's border). Each ramp is capped at
    half the box's extent so the two faces of an axis never overlap.
    """
    weights = np.ones(tuple(int(n) for n in box_size_kji), dtype=np.float32)
    for axis, (n, low, high) in enumerate(zip(box_size_kji, ramps_lower_kji, ramps_upper_kji)):
        cap = max(1, int(n) // 2) if low and high else int(n)
        profile = ramp_profile(int(n), min(int(low), cap), min(int(high), cap))
        shape = [1, 1, 1]
        shape[axis] = int(n)
        weights *= profile.reshape(shape).astype(np.float32)
    return weights


def blend_into(base: np.ndarray, region: np.ndarray, weights: np.ndarray,
               index: tuple[slice, slice, slice]) -> np.ndarray:
    """`base[index] += weights * (region - base[index])` in place; returns `base`.

    `region` and `weights` have the shape of `base[index]`.
    """
    target = base[index]
    if region.shape != target.shape or weights.shape != target.shape:
        raise ValueError(f"region {region.shape} and weights {weights.shape} must match the "
                         f"target box {target.shape}")
    target += weights * (region - target)
    return base
