"""ROI index boxes, and the ROIs of a lesion probability map (one box per lesion component).

Boxes are `RoiBox` (input-grid voxel indices, (x, y, z), lower inclusive, upper exclusive).
Components are 26-connected (SimpleITK `ConnectedComponent`, fully connected); a component's
confidence is its highest lesion probability. `merge_overlapping` joins boxes whose grown
versions (ROI + margin) touch, so the lesion model never runs twice on the same voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..transforms import geometry
from ..errors import InputError


@dataclass(frozen=True)
class RoiBox:
    """Voxel index box, (x, y, z) order: `lower_xyz` inclusive, `upper_xyz` exclusive."""

    lower_xyz: tuple[int, int, int]
    upper_xyz: tuple[int, int, int]

    def __post_init__(self) -> None:
        for name in ("lower_xyz", "upper_xyz"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, (int, np.integer)) for v in value):
                raise InputError(f"ROI {name} must be 3 integers (x, y, z), got {value!r}")
            object.__setattr__(self, name, tuple(int(v) for v in value))
        bad = [a for a in range(3) if self.upper_xyz[a] <= self.lower_xyz[a]]
        if bad:
            axis = "xyz"[bad[0]]
            raise InputError(
                f"ROI box {self.as_text()} is empty or inverted along {axis}: upper "
                f"{self.upper_xyz[bad[0]]} must exceed lower {self.lower_xyz[bad[0]]} "
                "(lower inclusive, upper exclusive)")

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        return tuple(u - l for l, u in zip(self.lower_xyz, self.upper_xyz))  # type: ignore

    @property
    def slices_kji(self) -> tuple[slice, slice, slice]:
        """numpy index of the box in a (K, J, I) array."""
        return tuple(slice(l, u) for l, u in zip(self.lower_xyz[::-1], self.upper_xyz[::-1]))  # type: ignore

    def as_text(self) -> str:
        return ",".join(str(v) for v in (*self.lower_xyz, *self.upper_xyz))

    def grown(self, margin_xyz: Sequence[int], size_xyz: Sequence[int]) -> "RoiBox":
        """The box grown by `margin_xyz` voxels each side, clipped to a volume of `size_xyz`."""
        return RoiBox(tuple(max(0, l - m) for l, m in zip(self.lower_xyz, margin_xyz)),
                      tuple(min(n, u + m) for u, m, n in zip(self.upper_xyz, margin_xyz, size_xyz)))

    def scaled(self, factors_xyz: Sequence[int]) -> "RoiBox":
        """The same physical box as output-grid indices (voxel boundaries line up)."""
        return RoiBox(tuple(l * f for l, f in zip(self.lower_xyz, factors_xyz)),
                      tuple(u * f for u, f in zip(self.upper_xyz, factors_xyz)))

    def check_inside(self, size_xyz: Sequence[int], what: str = "ROI box") -> "RoiBox":
        """InputError unless 0 <= lower and upper <= size on every axis."""
        for a in range(3):
            if self.lower_xyz[a] < 0 or self.upper_xyz[a] > size_xyz[a]:
                raise InputError(
                    f"{what} {self.as_text()} lies outside the volume along {'xyz'[a]}: "
                    f"voxels {self.lower_xyz[a]}..{self.upper_xyz[a] - 1} asked, the volume has "
                    f"0..{size_xyz[a] - 1} (size {tuple(size_xyz)}, x,y,z order)")
        return self

    def bounds_lps(self, image: sitk.Image) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Physical (LPS mm) min and max corners of the box's voxel boundaries in `image`."""
        origin = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in self.lower_xyz])
        grid = geometry.Grid(self.size_xyz, tuple(image.GetSpacing()), tuple(origin),
                             tuple(image.GetDirection()))
        corners = geometry.corner_points(grid)
        return (tuple(float(v) for v in corners.min(axis=0)),
                tuple(float(v) for v in corners.max(axis=0)))


def margin_voxels(margin_mm: float, spacing_xyz: Sequence[float]) -> tuple[int, int, int]:
    """Whole input voxels per axis that cover `margin_mm` (at least 1 when margin_mm > 0)."""
    if not np.isfinite(margin_mm) or margin_mm < 0:
        raise InputError(f"ROI margin must be a finite number of mm >= 0, got {margin_mm!r}")
    if margin_mm == 0:
        return (0, 0, 0)
    return tuple(max(1, math.ceil(margin_mm / s - 1e-9)) for s in spacing_xyz)  # type: ignore


@dataclass(frozen=True)
class LesionRegion:
    """One ROI: its box (no margin), its confidence (peak lesion probability in [0, 1]) and the
    number of voxels of its component(s) above the threshold."""

    box: RoiBox
    confidence: float
    voxels: int


def regions_from_probability(probability_kji: np.ndarray, threshold: float,
                             spacing_xyz: Sequence[float], min_volume_mm3: float = 0.0
                             ) -> list[LesionRegion]:
    """The connected components of `probability_kji >= threshold` with at least
    `min_volume_mm3` of volume, as boxes with their confidence, most confident first."""
    probability_kji = np.asarray(probability_kji, dtype=np.float32)
    if probability_kji.ndim != 3:
        raise InputError(f"probability map must be 3-D (K, J, I), got shape {probability_kji.shape}")
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"probability threshold must lie in (0, 1], got {threshold!r}")
    mask = sitk.GetImageFromArray((probability_kji >= threshold).astype(np.uint8))
    labels = sitk.ConnectedComponent(mask, True)
    label_array = sitk.GetArrayViewFromImage(labels)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels)
    voxel_mm3 = float(np.prod(spacing_xyz))
    regions = []
    for label in stats.GetLabels():
        count = int(stats.GetNumberOfPixels(label))
        if count * voxel_mm3 < min_volume_mm3:
            continue
        x, y, z, sx, sy, sz = stats.GetBoundingBox(label)
        box = RoiBox((x, y, z), (x + sx, y + sy, z + sz))
        inside = label_array[box.slices_kji] == label
        confidence = float(probability_kji[box.slices_kji][inside].max())
        regions.append(LesionRegion(box, confidence, count))
    regions.sort(key=lambda r: (-r.confidence, r.box.lower_xyz))
    return regions


def _touch(a: RoiBox, b: RoiBox) -> bool:
    return all(a.lower_xyz[i] < b.upper_xyz[i] and b.lower_xyz[i] < a.upper_xyz[i] for i in range(3))


def _union(a: RoiBox, b: RoiBox) -> RoiBox:
    return RoiBox(tuple(min(p, q) for p, q in zip(a.lower_xyz, b.lower_xyz)),
                  tuple(max(p, q) for p, q in zip(a.upper_xyz, b.upper_xyz)))


def merge_overlapping(regions: Sequence[LesionRegion], margin_xyz: Sequence[int],
                      size_xyz: Sequence[int]) -> list[LesionRegion]:
    """Regions whose boxes grown by `margin_xyz` overlap become one (union box, highest
    confidence, summed voxels), repeated until no two overlap; most confident first."""
    merged = list(regions)
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                a, b = merged[i], merged[j]
                if _touch(a.box.grown(margin_xyz, size_xyz), b.box.grown(margin_xyz, size_xyz)):
                    merged[i] = LesionRegion(_union(a.box, b.box), max(a.confidence, b.confidence),
                                             a.voxels + b.voxels)
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    merged.sort(key=lambda r: (-r.confidence, r.box.lower_xyz))
    return merged


def union_mask(boxes: Sequence[RoiBox], shape_kji: Sequence[int]) -> np.ndarray:
    """Boolean (K, J, I) array, True inside any of `boxes`."""
    inside = np.zeros(tuple(int(n) for n in shape_kji), dtype=bool)
    for box in boxes:
        inside[box.slices_kji] = True
    return inside
