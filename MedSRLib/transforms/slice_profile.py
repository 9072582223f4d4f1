"""Slice profiles along one axis as matrices: what a thick reconstruction does to thin samples,
and cubic resampling from one slice grid to another.

Positions are in pixel-index units of the finer (HR) grid: HR pixel i covers [i - 0.5, i + 0.5].
A thick slice k of a volume whose slices are `factor` HR pixels apart is centred at
`first_centre + k * factor` and integrates the HR signal with its profile: a box of width
`thickness_ratio * factor` HR pixels (the slice thickness; a ratio below 1 leaves a gap between
slices) or a Gaussian of that full width at half maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

PROFILES = ("box", "gaussian")
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_ERF = np.vectorize(math.erf, otypes=[np.float64])


def ndtr(x: np.ndarray) -> np.ndarray:
    """The standard normal cumulative distribution at `x`."""
    return 0.5 * (1.0 + _ERF(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


@dataclass(frozen=True)
class SliceProfile:
    """The assumed acquisition of the thick slices: profile shape, thickness and spacing (mm)."""

    kind: str
    thickness_mm: float
    spacing_mm: float
    source: str = "assumed equal to the slice spacing"

    def __post_init__(self) -> None:
        if self.kind not in PROFILES:
            raise InputError(f"slice profile must be one of {', '.join(PROFILES)}, got {self.kind!r}")
        for name, value in (("slice thickness", self.thickness_mm), ("slice spacing", self.spacing_mm)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number of mm, got {value!r}")

    @property
    def thickness_ratio(self) -> float:
        """Thickness over spacing: 1 = contiguous slices, < 1 = a gap, > 1 = overlapping."""
        return self.thickness_mm / self.spacing_mm

    @property
    def gap_mm(self) -> float:
        """Uncovered distance between consecutive slices (0 when contiguous or overlapping)."""
        return max(0.0, self.spacing_mm - self.thickness_mm)

    def describe(self) -> str:
        """One line for the output metadata, e.g. "box, thickness 5.000 mm, spacing 5.000 mm,
        gap 0.000 mm (DICOM SliceThickness)"."""
        return (f"{self.kind}, thickness {self.thickness_mm:.3f} mm, spacing {self.spacing_mm:.3f} mm, "
                f"gap {self.gap_mm:.3f} mm ({self.source})")


def degradation_matrix(n_hr: int, factor: float, thickness_ratio: float = 1.0, kind: str = "box",
                       first_centre: float | None = None) -> np.ndarray:
    """(n_lr, n_hr) float64 matrix M with thick = M @ thin along the axis.

    Slice k is centred at `first_centre + k * factor` (default: the first slice's box starts at
    the HR grid's edge, -0.5); only slices whose centre lies inside the HR grid are made. Each
    row sums to 1: the box weight of HR pixel i is the length of its cell inside the box; the
    Gaussian's is the probability mass of its cell.
    """
    if factor <= 0 or thickness_ratio <= 0:
        raise ValueError("factor and thickness_ratio must be positive")
    width = thickness_ratio * factor
    centre0 = factor / 2.0 - 0.5 if first_centre is None else float(first_centre)
    n_lr = int(math.floor((n_hr - 0.5 - centre0) / factor)) + 1 if centre0 <= n_hr - 0.5 else 0
    if n_lr < 1:
        raise ValueError(f"{n_hr} HR pixels hold no slice of factor {factor}")
    centres = centre0 + factor * np.arange(n_lr)
    lower = np.arange(n_hr) - 0.5
    upper = lower + 1.0
    if kind == "box":
        weights = np.clip(np.minimum(upper[None], centres[:, None] + width / 2)
                          - np.maximum(lower[None], centres[:, None] - width / 2), 0.0, None)
    elif kind == "gaussian":
        sigma = max(width / _FWHM_PER_SIGMA, 1e-3)
        weights = ndtr((upper[None] - centres[:, None]) / sigma) - ndtr((lower[None] - centres[:, None]) / sigma)
    else:
        raise ValueError(f"profile kind must be one of {PROFILES}, got {kind!r}")
    sums = weights.sum(axis=1, keepdims=True)
    empty = sums[:, 0] <= 0
    if np.any(empty):  # a box thinner than a pixel between pixel edges: nearest pixel
        weights[empty, np.clip(np.rint(centres[empty]).astype(int), 0, n_hr - 1)] = 1.0
        sums = weights.sum(axis=1, keepdims=True)
    return weights / sums


def _keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def sample_positions(n_out: int, ratio: float, first: float | None = None) -> np.ndarray:
    """Input-index coordinates of output samples j = 0..n_out-1 when output spacing / input
    spacing = `ratio` and both grids cover the same extent from the same edge:
    u_j = (j + 0.5) * ratio - 0.5 (or `first` + j * ratio)."""
    j = np.arange(n_out, dtype=np.float64)
    return (j + 0.5) * ratio - 0.5 if first is None else first + j * ratio


def cubic_matrix(n_in: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), n_in) float64 matrix of Keys cubic interpolation (a = -0.5, the
    Catmull-Rom spline) at input-index `positions`, edges replicated."""
    positions = np.asarray(positions, dtype=np.float64)
    matrix = np.zeros((len(positions), n_in))
    base = np.floor(positions).astype(int)
    rows = np.arange(len(positions))
    for offset in (-1, 0, 1, 2):
        index = base + offset
        weight = _keys_cubic(positions - index)
        np.add.at(matrix, (rows, np.clip(index, 0, n_in - 1)), weight)
    return matrix


def phase_map(positions: np.ndarray) -> np.ndarray:
    """Per output sample, its distance to the nearest input slice centre in slice spacings,
    scaled to [0, 1] (0 on a slice centre, 1 midway between two): a network input channel."""
    positions = np.asarray(positions, dtype=np.float64)
    return (2.0 * np.abs(positions - np.rint(positions))).astype(np.float32)
