"""Output grid of a super-resolved volume: size, spacing, origin and direction (LPS, mm).

Scale factors are per image axis in SimpleITK order (x, y, z) = (i, j, k). The output grid
covers exactly the input's physical extent: voxel-boundary corners coincide, the direction
matrix is kept (oblique included), and the first voxel centre moves half a new voxel inwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

MIN_FACTOR, MAX_FACTOR = 1, 4


@dataclass(frozen=True)
class Grid:
    """A voxel grid: size (voxels), spacing (mm), origin (LPS mm), direction (3x3 row-major)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set spacing/origin/direction on `image` (whose size must equal this grid's)."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} differs from grid size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def check_scale_factors(factors: Sequence[int]) -> tuple[int, int, int]:
    """Validate per-axis integer factors (x, y, z) in 1..4 with at least one > 1."""
    if len(factors) != 3:
        raise InputError(f"scale factors need 3 values (x, y, z), got {tuple(factors)}")
    out = []
    for f in factors:
        if isinstance(f, float) and f.is_integer():
            f = int(f)
        if not isinstance(f, (int, np.integer)) or not MIN_FACTOR <= f <= MAX_FACTOR:
            raise InputError(f"scale factors must be integers {MIN_FACTOR}-{MAX_FACTOR}, got {tuple(factors)}")
        out.append(int(f))
    if max(out) < 2:
        raise InputError(f"at least one scale factor must be 2-4, got {tuple(factors)}")
    return tuple(out)  # type: ignore[return-value]


#: Plausible voxel spacings (mm): below, the SR grid's spacing underflows or rounds away;
#: above, corner coordinates lose all precision. A micro-CT is ~1e-3 mm, a whole body 1e3 mm.
MIN_SPACING_MM, MAX_SPACING_MM = 1e-6, 1e6
#: Origins beyond this (mm) are not a patient position (a broken header).
MAX_ORIGIN_MM = 1e9


def check_spacing(spacing: Sequence[float]) -> None:
    """InputError unless every spacing is a finite number in [1e-6, 1e6] mm."""
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise InputError(f"voxel spacing must be positive, got {tuple(spacing)} mm")
    if any(not MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise InputError(f"voxel spacing {tuple(spacing)} mm is outside the plausible range "
                         f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm")


def check_grid(image: sitk.Image, name: str = "image") -> None:
    """InputError naming `name` unless spacing (see `check_spacing`), origin (finite, within
    1e9 mm) and direction (finite, invertible) describe a usable grid."""
    try:
        check_spacing(image.GetSpacing())
    except InputError as err:
        raise InputError(f"{name}: {err}") from None
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    if not np.all(np.isfinite(origin)) or np.any(np.abs(origin) > MAX_ORIGIN_MM):
        raise InputError(f"{name}: origin {tuple(origin)} mm is not a finite position")
    dimension = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dimension, dimension)
    shown = tuple(float(v) for v in direction.reshape(-1))
    if not np.all(np.isfinite(direction)):
        raise InputError(f"{name}: direction matrix {shown} holds NaN or infinite values")
    determinant = float(np.linalg.det(direction))
    if abs(determinant) < 1e-6:
        raise InputError(f"{name}: direction matrix {shown} is singular or nearly so "
                         f"(determinant {determinant:.3g}); its columns must be independent "
                         "unit direction cosines")


def is_orthogonal(image: sitk.Image, tolerance: float = 1e-3) -> bool:
    """True when the image's direction columns are orthogonal (|cosine| <= `tolerance`)."""
    dimension = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dimension, dimension)
    unit = direction / np.linalg.norm(direction, axis=0, keepdims=True)
    return float(np.max(np.abs(unit.T @ unit - np.eye(dimension)))) <= tolerance


def upscaled_grid(grid: Grid, factors_xyz: Sequence[int]) -> Grid:
    """The grid with `factors_xyz` times more voxels per axis over the same physical extent."""
    factors = check_scale_factors(factors_xyz)
    check_spacing(grid.spacing)
    direction = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)
    old_spacing = np.asarray(grid.spacing, dtype=np.float64)
    new_spacing = old_spacing / np.asarray(factors, dtype=np.float64)
    # Centre of new voxel 0 sits half a new voxel inside the old voxel-0 boundary, per axis.
    shift_index_space = (new_spacing - old_spacing) / 2.0
    new_origin = np.asarray(grid.origin, dtype=np.float64) + direction @ shift_index_space
    return Grid(
        size=tuple(int(n * f) for n, f in zip(grid.size, factors)),
        spacing=tuple(float(s) for s in new_spacing),
        origin=tuple(float(o) for o in new_origin),
        direction=tuple(float(d) for d in direction.reshape(-1)),
    )


def corner_points(grid: Grid) -> np.ndarray:
    """The 8 physical corners (LPS mm) of the voxel-boundary box of `grid`, shape (8, 3)."""
    direction = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(grid.spacing, dtype=np.float64)
    corners = []
    for cz in (0, 1):
        for cy in (0, 1):
            for cx in (0, 1):
                index = np.array([cx, cy, cz]) * np.asarray(grid.size) - 0.5
                corners.append(np.asarray(grid.origin) + direction @ (index * spacing))
    return np.array(corners)
