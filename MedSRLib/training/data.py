"""Training data: volumes and 2-D images -> normalised, foreground-aware random 2-D patches.

Pipeline (MONAI dictionary transforms on `{"image": path, ...}` items):

1. deterministic, cached once per volume (`CacheDataset` in memory or `PersistentDataset` on
   disk): `LoadNormalisedVolumed` reads the file or DICOM folder with `MedSRLib.io.volumes.read_volume`
   and maps intensities with `MedSRLib.transforms.intensity.fit_mapping(volume).to_unit` (exactly the
   inference normalisation), giving a (1, Z, Y, X) float32 array (a PNG is one slice, Z = 1);
   `ForegroundIndicesd` stores a subsample of the voxels above a unit-intensity threshold.
2. random, per visit: `RandSlicePatchd` picks `num_samples` 2-D patches, each from a random
   slice along one of the configured axes, centred on a foreground voxel with probability
   `foreground_probability` (so the black border around the body does not dominate), else on
   any voxel; then `RandFlipd` (both axes) and `RandRotate90d`. For a 2.5-D network
   (`context_slices` k > 0) a patch holds the slice and its k neighbours along the slice axis
   as channels (k + 1, P, P), edge slices replicated as the engine does at inference.

Randomness is a function of (seed, epoch, dataset index) only: `SeededVisitDataset` reseeds
the random transforms for every item, so a batch does not depend on the worker that made it or
on where a run was resumed, and `ResumableDistributedSampler` (a `DistributedSampler`) can skip
the batches already consumed in the current epoch.

Splits are by patient and declared in the config (`validation: [patient ids]` or
`validation_last: N` per source); `split_sources` refuses a patient in both sets.
"""

from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import (Compose, MapTransform, RandFlipd, Randomizable, RandRotate90d,
                              Transform)
from torch.utils.data import DistributedSampler

from ..runtime.engine import neighbour_indices
from ..transforms.intensity import fit_mapping

#: Foreground voxels kept per volume for centre sampling (an evenly strided subset).
MAX_FOREGROUND_INDICES = 200_000


# ---------------------------------------------------------------------------------------------
# Sources and the patient-level split


@dataclass(frozen=True)
class VolumeItem:
    """One training/validation volume: its path (relative to the data root) and metadata."""

    path: str
    patient: str
    modality: str
    licence: str
    mask: str | None = None

    def as_dict(self, root: Path) -> dict[str, Any]:
        item = {"image": str(root / self.path), "path": self.path, "patient": self.patient}
        if self.mask is not None:
            item["mask"] = str(root / self.mask)
        return item


@dataclass
class Split:
    train: list[VolumeItem] = field(default_factory=list)
    validation: list[VolumeItem] = field(default_factory=list)


def _stem(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".dcm", ".jpg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def patient_of(relative_path: str, rule: str = "stem") -> str:
    """Patient id of a path: "stem" (file name without extension), "parent" (folder name), or
    a regular expression whose first group, searched in the file name, is the id."""
    path = Path(relative_path)
    if rule == "stem":
        return _stem(path.name)
    if rule == "parent":
        return path.parent.name
    match = re.search(rule, path.name)
    if not match:
        raise ValueError(f"patient rule {rule!r} does not match file name {path.name!r}")
    return match.group(1) if match.groups() else match.group(0)


def split_sources(sources: Sequence[Mapping[str, Any]], root: Path,
                  modalities: Sequence[str] | None = None) -> Split:
    """Expand each source's glob under `root` and split its patients into train/validation.

    A source: {glob (or files: [explicit paths]), modality, licence, patient:
    stem|parent|REGEX, validation: [ids], validation_last: N (the last N patients by id),
    mask_replace: [old, new] (mask path = image path with old -> new), exclude: [globs],
    prepared_by: the script that makes files from outside the shared data (named in the error
    when they are missing)}.
    `modalities` (config `data.modalities`), when given, keeps only the sources of those
    modalities, so a recipe can specialise its parent's data without repeating it.
    """
    split = Split()
    if modalities:
        known = {str(s.get("modality", "")) for s in sources}
        missing = sorted(set(modalities) - known)
        if missing:
            raise ValueError(f"data.modalities {missing} match no data source (sources have {sorted(known)})")
        sources = [s for s in sources if str(s.get("modality", "")) in set(modalities)]
    for source in sources:
        pattern = source.get("glob")
        if pattern:
            matches = sorted(glob.glob(str(root / pattern)))
        elif source.get("files"):
            pattern = f"files {list(source['files'])[:3]}"
            matches = [str(root / f) for f in source["files"]]
            missing = [m for m in matches if not Path(m).exists()]
            if missing:
                raise ValueError(f"data source files do not exist: {missing[:3]}")
        else:
            raise ValueError(f"data source {dict(source)} has neither 'glob' nor 'files'")
        excluded = set()
        for exclusion in source.get("exclude", []):
            excluded.update(glob.glob(str(root / exclusion)))
        matches = [m for m in matches if m not in excluded]
        if not matches:
            made_by = (f" (these files are made by {source['prepared_by']})"
                       if source.get("prepared_by") else "")
            raise ValueError(f"data source glob {pattern!r} matches nothing under {root}{made_by}")
        rule = source.get("patient", "stem")
        items = []
        for match in matches:
            relative = str(Path(match).relative_to(root))
            mask = None
            if "mask_replace" in source:
                old, new = source["mask_replace"]
                mask = str(Path(relative).parent / Path(relative).name.replace(old, new))
                if not (root / mask).exists():
                    raise ValueError(f"mask {mask} for {relative} does not exist")
            items.append(VolumeItem(relative, patient_of(relative, rule),
                                    str(source.get("modality", "")), str(source.get("licence", "")),
                                    mask))
        patients = sorted({item.patient for item in items})
        held_out = set(source.get("validation", []))
        unknown = held_out - set(patients)
        if unknown:
            raise ValueError(f"validation patients {sorted(unknown)} not found in source {pattern!r} "
                             f"(patients: {patients[:8]}...)")
        if source.get("validation_last"):
            held_out.update(patients[-int(source["validation_last"]):])
        for item in items:
            (split.validation if item.patient in held_out else split.train).append(item)
    overlap = {i.patient for i in split.train} & {i.patient for i in split.validation}
    if overlap:
        raise ValueError(f"patients {sorted(overlap)} are in both the training and validation sets")
    return split


# ---------------------------------------------------------------------------------------------
# Deterministic (cached) transforms


def _read_2d_image(path: Path) -> np.ndarray:
    """(1, H, W) grey values of a PNG/JPEG; RGB(A) images become the mean of R, G and B."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = array[..., :3].mean(-1)
    return array[None] if array.ndim == 2 else array


def read_volume_array(path: str | Path) -> np.ndarray:
    """(Z, Y, X) array of a volume file, DICOM folder or 2-D image (Z = 1), via MedSRLib.io.volumes."""
    path = Path(path)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        return _read_2d_image(path)
    try:
        from ..io.volumes import read_volume
    except ImportError:  # pragma: no cover - before MedSRLib.io.volumes existed
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    else:
        image = read_volume(path)
    array = sitk.GetArrayFromImage(image)
    return array[None] if array.ndim == 2 else array


class LoadNormalisedVolumed(MapTransform):
    """Read `image` (and `mask`) and normalise the image exactly as inference does.

    image -> (1, Z, Y, X) float32 in unit intensities; mask -> (1, Z, Y, X) uint8 (> 0).
    """

    def __init__(self, keys: Sequence[str] = ("image",), mask_key: str = "mask"):
        super().__init__(keys, allow_missing_keys=True)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = read_volume_array(d[key])
            if volume.ndim == 2:
                volume = volume[None]
            mapping = fit_mapping(volume)
            d[key] = mapping.to_unit(volume)[None]
            d[f"{key}_mapping"] = (mapping.offset, mapping.scale)
        if self.mask_key in d:
            mask = read_volume_array(d[self.mask_key])
            mask = mask[None] if mask.ndim == 2 else mask
            if mask.shape != d["image"].shape[1:]:
                raise ValueError(f"mask {d[self.mask_key]} has shape {mask.shape}, image {d['image'].shape[1:]}")
            d[self.mask_key] = (mask > 0).astype(np.uint8)[None]
        return d


class ForegroundIndicesd(Transform):
    """Store up to MAX_FOREGROUND_INDICES flat indices of voxels with unit intensity > threshold.

    With a mask present (lesion data), the mask's voxels are used instead.
    """

    def __init__(self, threshold: float = 0.1, use_mask: bool = False):
        self.threshold = threshold
        self.use_mask = use_mask

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = d["mask"][0] > 0 if (self.use_mask and "mask" in d) else d["image"][0] > self.threshold
        indices = np.flatnonzero(source.reshape(-1))
        step = max(1, indices.size // MAX_FOREGROUND_INDICES)
        d["foreground_indices"] = indices[::step].astype(np.int64)
        return d


# ---------------------------------------------------------------------------------------------
# Random patch sampling


def _window(centre: int, size: int, length: int) -> tuple[int, int]:
    """Start/stop of a `size` window around `centre`, shifted inside [0, length) when possible."""
    start = centre - size // 2
    start = min(max(start, 0), max(length - size, 0))
    return start, min(start + size, length)


def _extract_patch(plane: np.ndarray, centre: tuple[int, int], size: int) -> np.ndarray:
    """`size` x `size` patch of a 2-D plane around centre, zero-padded where the plane is smaller."""
    (y0, y1), (x0, x1) = _window(centre[0], size, plane.shape[0]), _window(centre[1], size, plane.shape[1])
    patch = np.zeros((size, size), dtype=plane.dtype)
    patch[: y1 - y0, : x1 - x0] = plane[y0:y1, x0:x1]
    return patch


class RandSlicePatchd(Randomizable, Transform):
    """`num_samples` random 2-D patches from random slices of a (1, Z, Y, X) volume.

    axes: slice axes allowed (0 = Z, 1 = Y, 2 = X in array order); an axis is skipped for a
    volume whose other two sizes are not both > 1 (so a PNG only gives Z slices).
    Each patch is centred on a stored foreground voxel with `foreground_probability`, else on
    a uniformly random voxel. Output items: {"image": (1 + context_slices, P, P) float32 tensor
    (the slice's neighbours along the slice axis as channels, in order, the slice in the
    middle, edges replicated), optionally "mask": (1, P, P) of the middle slice, "patient": id}.
    """

    def __init__(self, patch_size: int, axes: Sequence[int] = (0,), num_samples: int = 1,
                 foreground_probability: float = 0.9, context_slices: int = 0):
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if not set(axes) <= {0, 1, 2} or not axes:
            raise ValueError(f"axes must be a non-empty subset of (0, 1, 2), got {axes}")
        self.patch_size = int(patch_size)
        self.axes = tuple(int(a) for a in axes)
        self.num_samples = int(num_samples)
        self.foreground_probability = float(foreground_probability)
        self.context_slices = int(context_slices)

    def randomize(self, data: Any = None) -> None:  # randomness is drawn in __call__
        pass

    def _centre(self, shape: tuple[int, ...], foreground: np.ndarray) -> tuple[int, int, int]:
        if foreground.size and self.R.rand() < self.foreground_probability:
            flat = int(foreground[self.R.randint(foreground.size)])
            return tuple(int(c) for c in np.unravel_index(flat, shape))  # type: ignore[return-value]
        return tuple(int(self.R.randint(n)) for n in shape)  # type: ignore[return-value]

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        volume = data["image"][0]
        shape = volume.shape
        axes = [a for a in self.axes if all(shape[o] > 1 for o in range(3) if o != a)] or [0]
        foreground = data.get("foreground_indices", np.zeros(0, dtype=np.int64))
        samples = []
        for _ in range(self.num_samples):
            axis = axes[self.R.randint(len(axes))]
            centre = self._centre(shape, foreground)
            in_plane = tuple(c for i, c in enumerate(centre) if i != axis)
            item: dict[Hashable, Any] = {"patient": data.get("patient", "")}
            for key in ("image", "mask"):
                if key in data:
                    indices = (neighbour_indices(centre[axis], shape[axis], self.context_slices)
                               if key == "image" else [centre[axis]])
                    patches = [_extract_patch(np.take(data[key][0], i, axis=axis), in_plane, self.patch_size)
                               for i in indices]
                    item[key] = torch.from_numpy(np.stack(patches))
            samples.append(item)
        return samples


class RandWholeSliced(Randomizable, Transform):
    """`num_samples` whole 2-D slices of a (1, Z, Y, X) volume resampled to `size` x `size`
    (the lesion detector's input, `lesion_detector.resize_slices`).

    With `lesion_probability` the slice is one holding stored foreground (mask) voxels, else a
    uniformly random slice along a random allowed axis. Output items as RandSlicePatchd's.
    """

    def __init__(self, size: int, axes: Sequence[int] = (0,), num_samples: int = 1,
                 lesion_probability: float = 0.8):
        if size < 8:
            raise ValueError(f"whole_slice_size must be >= 8, got {size}")
        self.size = int(size)
        self.axes = tuple(int(a) for a in axes)
        self.num_samples = int(num_samples)
        self.lesion_probability = float(lesion_probability)

    def randomize(self, data: Any = None) -> None:  # randomness is drawn in __call__
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        from ..models.networks.lesion_detector import resize_slices
        shape = data["image"][0].shape
        axes = [a for a in self.axes if all(shape[o] > 1 for o in range(3) if o != a)] or [0]
        foreground = data.get("foreground_indices", np.zeros(0, dtype=np.int64))
        samples = []
        for _ in range(self.num_samples):
            axis = axes[self.R.randint(len(axes))]
            if foreground.size and self.R.rand() < self.lesion_probability:
                voxel = np.unravel_index(int(foreground[self.R.randint(foreground.size)]), shape)
                index = int(voxel[axis])
            else:
                index = int(self.R.randint(shape[axis]))
            item: dict[Hashable, Any] = {"patient": data.get("patient", "")}
            for key in ("image", "mask"):
                if key in data:
                    plane = torch.from_numpy(np.ascontiguousarray(np.take(data[key][0], index, axis=axis)))
                    item[key] = resize_slices(plane[None, None], self.size, mask=key == "mask")[0]
            samples.append(item)
        return samples


class BoxFromMaskd(Transform):
    """Target box of the mask's foreground in the lesion detector's convention
    (`networks/lesion_detector.py`): (cx, cy, w, h), centre and size normalised by the patch
    width (x, last axis) and height (y). The box spans whole pixels (edges at pixel borders);
    a patch with an empty mask gets the all-zero box (w = h = 0: no lesion).
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = torch.as_tensor(d["mask"])[0] > 0
        height, width = mask.shape
        rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
        if rows.numel() == 0:
            d["box"] = torch.zeros(4)
        else:
            y0, y1 = float(rows[0]), float(rows[-1] + 1)
            x0, x1 = float(cols[0]), float(cols[-1] + 1)
            d["box"] = torch.tensor([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                                     (x1 - x0) / width, (y1 - y0) / height], dtype=torch.float32)
        return d


def random_transforms(data_config: Mapping[str, Any], with_mask: bool = False,
                      context_slices: int = 0) -> Compose:
    """The per-visit random chain: patches (with `context_slices` neighbours as channels),
    flips along both axes, rot90 (+ boxes for masks)."""
    keys = ["image", "mask"] if with_mask else ["image"]
    if data_config.get("whole_slice_size"):
        sampler: Any = RandWholeSliced(
            size=int(data_config["whole_slice_size"]), axes=data_config.get("slice_axes", [0]),
            num_samples=int(data_config.get("patches_per_volume", 4)),
            lesion_probability=float(data_config.get("foreground_probability", 0.8)))
    else:
        sampler = RandSlicePatchd(
            patch_size=int(data_config.get("patch_size", 96)),
            axes=data_config.get("slice_axes", [0]),
            num_samples=int(data_config.get("patches_per_volume", 4)),
            foreground_probability=float(data_config.get("foreground_probability", 0.9)),
            context_slices=context_slices)
    chain: list[Any] = [sampler]
    if data_config.get("flips", True):
        chain += [RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1)]
    if data_config.get("rot90", True):
        chain.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)))
    if with_mask:
        chain.append(BoxFromMaskd())
    return Compose(chain)


def _item_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class SeededVisitDataset(torch.utils.data.Dataset):
    """Visits of cached volumes: item (epoch, index) = random patches of volume index % n.

    The random transforms are reseeded from (seed, epoch, index) for every item.
    """

    def __init__(self, volumes: torch.utils.data.Dataset, transform: Compose, visits_per_epoch: int,
                 seed: int):
        self.volumes = volumes
        self.transform = transform
        self.visits_per_epoch = int(visits_per_epoch)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.visits_per_epoch

    def __getitem__(self, key: tuple[int, int] | int) -> list[dict[Hashable, Any]]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        volume = self.volumes[index % len(self.volumes)]
        self.transform.set_random_state(seed=_item_seed(self.seed, epoch, index))
        return self.transform(volume)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler yielding (epoch, index) keys that can skip the first `skip` of an epoch.

    Works for world size 1 as well (num_replicas=1, rank=0).
    """

    def __init__(self, dataset: SeededVisitDataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, int(i)) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def volume_dataset(items: Sequence[dict[str, Any]], data_config: Mapping[str, Any],
                   use_mask_foreground: bool = False) -> Dataset:
    """Decoded, normalised volumes, cached: "memory" (CacheDataset), "disk:DIR" (PersistentDataset)
    or "none"."""
    transform = Compose([LoadNormalisedVolumed(), ForegroundIndicesd(
        float(data_config.get("foreground_threshold", 0.1)), use_mask=use_mask_foreground)])
    cache = str(data_config.get("cache", "memory"))
    if cache == "memory":
        return CacheDataset(list(items), transform=transform, copy_cache=False,
                            num_workers=int(data_config.get("cache_workers", 1)), progress=False)
    if cache.startswith("disk:"):
        return PersistentDataset(list(items), transform=transform, cache_dir=cache[len("disk:"):])
    if cache == "none":
        return Dataset(list(items), transform=transform)
    raise ValueError(f"data.cache must be 'memory', 'disk:DIR' or 'none', got {cache!r}")


# ---------------------------------------------------------------------------------------------
# Validation slices


@dataclass
class ValidationSlice:
    patient: str
    image: torch.Tensor        # (1, 1 + k, H, W) unit intensities (k context slices, the
                               # validated slice in the middle), H and W multiples of every scale
    foreground: torch.Tensor   # (1, 1, H, W) bool
    box: torch.Tensor | None = None


def validation_slices(volumes: Dataset, data_config: Mapping[str, Any], multiple: int,
                      with_boxes: bool = False, context_slices: int = 0) -> list[ValidationSlice]:
    """Fixed held-out slices: `slices_per_volume` evenly spaced slices along the first of
    `slice_axes` (Z for 2-D images) among those with >= 5 %
    foreground (lesion slices for detector data), centre-cropped to `max_size` (or padded to
    `patch_size` for boxes), trimmed to a multiple of `multiple`; with `context_slices` k, the
    k neighbours along that axis (edges replicated) come as channels around the slice."""
    config = data_config.get("validation_slices", {})
    per_volume = int(config.get("slices_per_volume", 3))
    max_size = int(config.get("max_size", 192))
    threshold = float(data_config.get("foreground_threshold", 0.1))
    patch = int(data_config.get("patch_size", 96))
    result = []
    axis = int(data_config.get("slice_axes", [0])[0])
    for index in range(len(volumes)):
        d = volumes[index]
        volume_axis = axis if all(d["image"].shape[1 + o] > 1 for o in range(3) if o != axis) else 0
        volume = np.moveaxis(d["image"][0], volume_axis, 0)
        if with_boxes:
            weight = np.moveaxis(d["mask"][0], volume_axis, 0).reshape(volume.shape[0], -1).mean(1)
        else:
            weight = (volume > threshold).reshape(volume.shape[0], -1).mean(1)
        candidates = np.flatnonzero(weight >= (1e-9 if with_boxes else 0.05))
        if candidates.size == 0:
            candidates = np.arange(volume.shape[0])
        chosen = np.unique(candidates[np.linspace(0, candidates.size - 1, per_volume + 2).round().astype(int)[1:-1]]
                           if candidates.size > 2 else candidates)
        for z in chosen:
            plane = volume[z]
            if with_boxes and data_config.get("whole_slice_size"):
                from ..models.networks.lesion_detector import resize_slices
                size = int(data_config["whole_slice_size"])
                image = resize_slices(torch.from_numpy(np.ascontiguousarray(plane))[None, None], size)
                mask_slice = torch.from_numpy(np.ascontiguousarray(np.moveaxis(d["mask"][0], volume_axis, 0)[z]))
                mask_small = resize_slices(mask_slice[None, None], size, mask=True)
                box = BoxFromMaskd()({"mask": mask_small[0]})["box"]
                result.append(ValidationSlice(d["patient"], image, mask_small > 0, box[None]))
                continue
            if with_boxes:
                mask = np.moveaxis(d["mask"][0], volume_axis, 0)[z]
                rows, cols = np.nonzero(mask)
                centre = (int(rows.mean()), int(cols.mean()))
                image = _extract_patch(plane, centre, patch)
                mask_patch = _extract_patch(mask, centre, patch)
                box = BoxFromMaskd()({"mask": mask_patch[None]})["box"]
                result.append(ValidationSlice(d["patient"], torch.from_numpy(image.copy())[None, None],
                                              torch.from_numpy(mask_patch > 0)[None, None], box[None]))
                continue
            if data_config.get("whole_slice_size"):  # SR on whole resized slices (paper 002)
                from ..models.networks.lesion_detector import resize_slices
                resized = resize_slices(torch.from_numpy(np.ascontiguousarray(plane))[None, None],
                                        int(data_config["whole_slice_size"]))
                plane = resized[0, 0].numpy()
            h = min(plane.shape[0], max_size) // multiple * multiple
            w = min(plane.shape[1], max_size) // multiple * multiple
            if h < 16 or w < 16:
                continue
            y0, x0 = (plane.shape[0] - h) // 2, (plane.shape[1] - w) // 2
            crop = np.ascontiguousarray(plane[y0:y0 + h, x0:x0 + w])
            image = torch.from_numpy(crop)[None, None]
            foreground = image > threshold
            if context_slices:
                stack = volume[neighbour_indices(int(z), volume.shape[0], context_slices)]
                image = torch.from_numpy(np.ascontiguousarray(stack[:, y0:y0 + h, x0:x0 + w]))[None]
            result.append(ValidationSlice(d["patient"], image, foreground))
    if not result:
        raise ValueError("no validation slices could be taken from the validation volumes")
    return result
