"""Volumes with several separate lesions, made of real patients' volumes side by side.

No volume of the data pool holds two well-separated lesions; issue 19 asks that `--roi auto`
returns one ROI per lesion. Placing two patients' crops of the same modality side by side along
x gives such a volume with expert masks. It serves the localiser's validation (checkpoint,
threshold) with validation patients and its benchmark with held-out test patients
(`localiser.RECIPE["composites"]`); the two sets never mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

#: Composite sizes in x and y are cut to a multiple of this, so x2 and x4 inputs tile exactly.
SIZE_MULTIPLE = 4
#: Each part's 0.5th/99.5th percentiles map to 0 and this value (one intensity scale for all).
UNIT_RANGE = 1000.0


@dataclass(frozen=True)
class Composite:
    """Patients' volumes of one source, side by side (paths relative to the data root)."""

    images: tuple[str, ...]
    masks: tuple[str, ...]
    modality: str
    subset: str                      # "validation" or "test"

    @property
    def name(self) -> str:
        return " + ".join(self.images)


def side_by_side(volumes_kji: Sequence[np.ndarray], masks_kji: Sequence[np.ndarray],
                 spacing_xyz: Sequence[float]) -> tuple[sitk.Image, list[np.ndarray]]:
    """One float32 image of spacing `spacing_xyz` (mm) holding `volumes_kji` side by side along x
    (each scaled from its own 0.5th/99.5th percentiles to 0..UNIT_RANGE, zero-padded to the
    largest z and y size, x and y cut to multiples of SIZE_MULTIPLE), and each part's mask
    (K, J, I) bool on that grid (False outside its own part)."""
    if len(volumes_kji) != len(masks_kji) or len(volumes_kji) < 2:
        raise ValueError("a composite needs at least two volumes, each with its mask")
    k = max(v.shape[0] for v in volumes_kji)
    j = max(v.shape[1] for v in volumes_kji)

    def padded(array: np.ndarray) -> np.ndarray:
        return np.pad(array, [(0, k - array.shape[0]), (0, j - array.shape[1]), (0, 0)])

    parts = []
    for voxels in volumes_kji:
        low, high = np.percentile(voxels, (0.5, 99.5))
        parts.append(padded(np.clip((voxels - low) / max(high - low, 1e-6), 0, 1) * UNIT_RANGE))
    widths = [v.shape[2] for v in volumes_kji]
    voxels = np.concatenate(parts, axis=2)
    j_cut = j // SIZE_MULTIPLE * SIZE_MULTIPLE
    i_cut = voxels.shape[2] // SIZE_MULTIPLE * SIZE_MULTIPLE
    masks = []
    for n, mask in enumerate(masks_kji):
        full = np.zeros(voxels.shape, dtype=bool)
        start = sum(widths[:n])
        full[:, :, start:start + widths[n]] = padded(mask.astype(bool))
        masks.append(full[:, :j_cut, :i_cut])
    image = sitk.GetImageFromArray(voxels[:, :j_cut, :i_cut].astype(np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    return image, masks


def read_composite(root: Path, composite: Composite) -> tuple[sitk.Image, list[np.ndarray]]:
    """The composite's image and each part's lesion mask; ValueError when the parts' voxel
    spacings differ by more than 1 % (they are placed voxel by voxel, not resampled)."""
    volumes, masks, spacings = [], [], []
    for image_path, mask_path in zip(composite.images, composite.masks):
        image = sitk.ReadImage(str(root / image_path))
        volumes.append(sitk.GetArrayFromImage(image).astype(np.float32))
        masks.append(sitk.GetArrayFromImage(sitk.ReadImage(str(root / mask_path))) > 0)
        spacings.append(np.asarray(image.GetSpacing()))
    if any(np.abs(s / spacings[0] - 1).max() > 0.01 for s in spacings):
        raise ValueError(f"{composite.name}: voxel spacings differ "
                         f"({[tuple(np.round(s, 3)) for s in spacings]})")
    return side_by_side(volumes, masks, tuple(spacings[0]))
