"""Lesion localiser: the lesion probability map of a volume from the 2.5-D `lesion_segmenter`.

The same slicing serves training (`MedSRLib.training.localiser`) and inference, so both see
identical inputs:

- intensities go to the SR models' network units (`intensity.fit_mapping`, per volume);
- along each slice axis, every slice is stacked with its neighbours (`context` slices, edge
  slices repeated) and resampled (bilinear, anti-aliased when shrinking) onto the card's pixel
  spacing in mm (`input_spacing_mm`: a lesion has the same size in pixels whatever the scanner,
  field of view, slice thickness or SR input factor), padded with zeros to a multiple of 16;
  cards of the first segmenter instead record a fixed square `input_size`;
- the network's lesion probability is resized back to the slice's own size and the three axes'
  maps are averaged into one (K, J, I) map on the input grid;
- a card may list `ensemble` members (segmenters with their own slicing, e.g. another pixel
  size): their maps are averaged with its own (`Localiser`, `load_ensemble`);
- the networks run in torch (the reference, `runtime="torch"`) or through OpenVINO
  (`MedSRLib.runtime.localiser_runtime`): f32 reproduces the reference map within ~1e-4, bf16
  (where the CPU has it) within ~0.02 at about 4x the torch speed; a constant stack (e.g. an
  MR's zero background) runs once for all its copies;
- `find_regions` (the finder of `--roi auto`) runs the fastest runtime with sagittal and
  coronal slices at least `FIND_SLICE_GAP_MM` apart (the others interpolated), a coarser map at
  a fraction of the reference's cost; `Localiser.probability` defaults to the reference map.

`find_regions` turns the map into ROIs (`roi_boxes`): connected components above the card's
calibrated threshold, one box per component grown by the card's calibrated padding (mm), with a
confidence each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from ..transforms import intensity
from ..runtime import localiser_runtime, model_cache
from ..runtime.notices import notice
from . import boxes as roi_boxes
from ..models import registry as zoo
from ..errors import InputError, WeightsError

LOCALISER_NAME = "lesion_segmenter"
#: Side of the square slice the first segmenter saw (cards with "input_size", no spacing).
DEFAULT_INPUT_SIZE = 128
#: The network's input sizes must be multiples of this (four 2x poolings of the BasicUNet).
SIZE_MULTIPLE = 16
#: Probability threshold when a card does not record a calibrated one.
DEFAULT_THRESHOLD = 0.5
NO_LOCALISER_MESSAGE = "no trained lesion localiser ships; pass a box or a mask"
#: How the segmenters run: torch fp32 (the reference), OpenVINO f32 or bf16, or "auto" (OpenVINO
#: bf16 where the CPU runs bf16 natively, else OpenVINO f32, else torch).
RUNTIMES = ("torch", "openvino-f32", "openvino-bf16", "auto")
#: What `find_regions` (the `--roi auto` finder) runs by default: the fastest runtime, and
#: sagittal and coronal slices (along x and y) at least 4 mm apart (the ones between
#: interpolated; axial slices as `Slicing.slice_step`). Its map differs from the reference
#: (torch, `Slicing.slice_step` only) by up to a few tenths at lesion edges, with the same
#: lesion-slice coverage on the validation volumes: benchmarks/results/localiser/time.md.
FIND_RUNTIME = "auto"
FIND_SLICE_GAP_MM = (4.0, 4.0, 0.0)


def units_of(voxels_kji: np.ndarray) -> np.ndarray:
    """The volume in network units (float32): its 0.5th/99.5th percentiles map to 0/1."""
    return intensity.fit_mapping(voxels_kji).to_unit(voxels_kji)


def slice_axis_view(volume_kji: np.ndarray, axis_xyz: int) -> np.ndarray:
    """The volume as (slices, rows, columns) along `axis_xyz` (x, y, z index), a view."""
    if axis_xyz not in (0, 1, 2):
        raise InputError(f"slice axis must be 0, 1 or 2 (x, y, z), got {axis_xyz!r}")
    return np.moveaxis(np.asarray(volume_kji), 2 - axis_xyz, 0)


def context_indices(index: int, count: int, context: int) -> list[int]:
    """Slice indices of the `context` slices centred on `index`, clamped to 0..count-1."""
    half = context // 2
    return [min(max(index + d, 0), count - 1) for d in range(-half, context - half)]


def resize_planes(planes: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """(N, C, h, w) -> (N, C, *size); anti-aliased when shrinking with a bilinear kernel."""
    size = tuple(int(s) for s in size)
    if tuple(planes.shape[-2:]) == size:
        return planes
    if mode == "nearest":
        return F.interpolate(planes, size=size, mode="nearest")
    shrinking = planes.shape[-2] > size[0] or planes.shape[-1] > size[1]
    return F.interpolate(planes, size=size, mode="bilinear", align_corners=False,
                         antialias=shrinking)


@dataclass(frozen=True)
class Slicing:
    """How slices become network inputs: `context` adjacent slices per stack, resampled to
    `spacing_mm` pixels (mm) or, when it is None, resized to `size` x `size` pixels; with a
    `window` (the training crop, network pixels), a slice is run in overlapping windows of that
    size, so the network sees what it was trained on whatever the field of view."""

    context: int = 3
    spacing_mm: float | None = None
    size: int = DEFAULT_INPUT_SIZE
    window: int | None = None

    @classmethod
    def of_card(cls, card: Mapping[str, Any]) -> "Slicing":
        spacing = card.get("input_spacing_mm")
        window = card.get("training_crop") if spacing is not None else None
        return cls(int((card.get("config") or {}).get("in_channels", 3)),
                   None if spacing is None else float(spacing),
                   int(card.get("input_size", DEFAULT_INPUT_SIZE)),
                   None if window is None else int(window))

    def slice_step(self, slice_spacing_mm: float,
                   plane_extent_mm: Sequence[float] | None = None) -> int:
        """Run every n-th slice along an axis of `slice_spacing_mm` (the others interpolated):
        slices closer than the network's pixels (the fixed `spacing_mm`, or a slice's
        `plane_extent_mm` (rows, columns) over `size` when resized whole, the finer of the two)
        add no detail the network sees in-plane."""
        pixel_mm = self.spacing_mm
        if pixel_mm is None and plane_extent_mm:
            pixel_mm = min(float(e) for e in plane_extent_mm) / self.size
        if pixel_mm is None or slice_spacing_mm <= 0:
            return 1
        return max(1, int(pixel_mm / float(slice_spacing_mm) + 1e-6))

    def plane_shape(self, shape_hw: Sequence[int], spacing_hw: Sequence[float]) -> tuple[int, int]:
        """(rows, columns) in network pixels of a slice of `shape_hw` pixels of `spacing_hw` mm."""
        if self.spacing_mm is None:
            return self.size, self.size
        return tuple(max(1, round(n * s / self.spacing_mm))  # type: ignore[return-value]
                     for n, s in zip(shape_hw, spacing_hw))


def plane_spacing(spacing_xyz: Sequence[float], axis_xyz: int) -> tuple[float, float]:
    """(row, column) spacing in mm of the slices of `slice_axis_view(volume, axis_xyz)`."""
    rows_columns = [a for a in (2, 1, 0) if a != axis_xyz]  # x, y, z index of rows, columns
    return float(spacing_xyz[rows_columns[0]]), float(spacing_xyz[rows_columns[1]])


def network_stacks(slices: np.ndarray, indices: Sequence[int], context: int,
                   plane_hw: int | Sequence[int]) -> torch.Tensor:
    """(len(indices), context, *plane_hw) float32 network input for the slices `indices` of
    `slices` (slices, rows, columns), with their neighbours as channels (an int: a square)."""
    if isinstance(plane_hw, (int, np.integer)):
        plane_hw = (int(plane_hw), int(plane_hw))
    count = slices.shape[0]
    stack = np.stack([slices[context_indices(i, count, context)] for i in indices])
    return resize_planes(torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)), plane_hw)


def pad_to_multiple(planes: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """(N, C, h, w) zero-padded at the bottom and right to multiples of `multiple`, and to at
    least 2 x `multiple` (the network's deepest level then keeps 2 x 2 pixels, which instance
    normalisation needs)."""
    h, w = planes.shape[-2:]
    rows, columns = max(h + -h % multiple, 2 * multiple), max(w + -w % multiple, 2 * multiple)
    return F.pad(planes, (0, columns - w, 0, rows - h))


def _batches(count: int, batch_size: int) -> Iterator[list[int]]:
    for start in range(0, count, batch_size):
        yield list(range(start, min(count, start + batch_size)))


def distinct_stacks(planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the stacks to run, index of each stack's result among them) of (N, C, h, w)
    network inputs: a constant stack (e.g. background outside an MR's head, or a window wholly
    in the zero padding) gives the same output as any other stack of that constant, so one of
    them runs for all."""
    flat = planes.reshape(planes.shape[0], -1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    keep, inverse, first_of_value = [], [], {}
    for i, (lo, hi) in enumerate(zip(low.tolist(), high.tolist())):
        if lo == hi and lo in first_of_value:
            inverse.append(first_of_value[lo])
            continue
        if lo == hi:
            first_of_value[lo] = len(keep)
        inverse.append(len(keep))
        keep.append(i)
    return torch.tensor(keep, dtype=torch.long), torch.tensor(inverse, dtype=torch.long)


def lesion_probability(network: torch.nn.Module, stacks: torch.Tensor, window: int | None,
                       batch_size: int = 16) -> torch.Tensor:
    """(N, 1, h, w) lesion probability of network inputs (N, C, h, w): the whole plane at once
    (zero-padded for the network), or in `window`-pixel windows overlapping by a quarter and
    blended with Gaussian weights (MONAI `sliding_window_inference`)."""
    def predict(planes: torch.Tensor) -> torch.Tensor:
        h, w = planes.shape[-2:]
        distinct, inverse = distinct_stacks(planes)
        logits = network(pad_to_multiple(planes[distinct]))[..., :h, :w]
        return torch.softmax(logits.float(), dim=1)[:, 1:2][inverse]

    if window is None:
        return predict(stacks)
    return sliding_window_inference(stacks, (window, window), batch_size, predict,
                                    overlap=0.25, mode="gaussian")


def sampled_slices(count: int, step: int) -> list[int]:
    """Every `step`-th slice index of `count`, always with the last one."""
    indices = list(range(0, count, max(1, int(step))))
    return indices if indices[-1] == count - 1 else indices + [count - 1]


def add_interpolated(out: np.ndarray, indices: Sequence[int], planes: np.ndarray) -> None:
    """Add to `out` (slices, h, w) the `planes` computed at slice `indices` (increasing, first
    0, last the final slice), linearly interpolated onto the slices between them."""
    for (a, b), (pa, pb) in zip(zip(indices, indices[1:]), zip(planes, planes[1:])):
        for i in range(a, b):
            w = np.float32((i - a) / (b - a))
            out[i] += pa if w == 0 else (1 - w) * pa + w * pb
    out[indices[-1]] += planes[-1]


def probability_map(units_kji: np.ndarray, network: torch.nn.Module,
                    spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0),
                    slicing: Slicing = Slicing(), axes_xyz: Sequence[int] = (0, 1, 2),
                    batch_size: int = 16,
                    slice_gap_mm: float | Sequence[float] | None = None) -> np.ndarray:
    """Lesion probability (float32, (K, J, I), in [0, 1]) of a volume in network units with
    voxel spacing `spacing_xyz` (mm): the mean over `axes_xyz` of the per-slice predictions
    resized back onto the input grid (along an axis whose slices are closer than the network's
    pixels, every n-th slice's, linearly interpolated between: `Slicing.slice_step`; with
    `slice_gap_mm` (one for every axis, or per axis (x, y, z); 0: none), slices are also at
    least that far apart: a coarser, faster map)."""
    units_kji = np.asarray(units_kji, dtype=np.float32)
    if units_kji.ndim != 3 or min(units_kji.shape) < 1:
        raise InputError(f"the lesion localiser needs a 3-D volume, got shape {units_kji.shape}")
    gaps_xyz = (0.0,) * 3 if not slice_gap_mm else tuple(
        float(g or 0.0) for g in (np.broadcast_to(np.asarray(slice_gap_mm, dtype=float), (3,))))
    total = np.zeros(units_kji.shape, dtype=np.float32)
    if isinstance(network, torch.nn.Module):
        network = network.eval()
    with torch.inference_mode():
        for axis in axes_xyz:
            slices = slice_axis_view(units_kji, axis)
            out = slice_axis_view(total, axis)  # a view: writes land in `total`
            spacing_hw = plane_spacing(spacing_xyz, axis)
            plane = slicing.plane_shape(slices.shape[1:], spacing_hw)
            extent_mm = [n * d for n, d in zip(slices.shape[1:], spacing_hw)]
            step = slicing.slice_step(spacing_xyz[axis], extent_mm)
            if gaps_xyz[axis] > 0:
                step = max(step, int(np.ceil(gaps_xyz[axis] / float(spacing_xyz[axis]) - 1e-6)))
            run = sampled_slices(slices.shape[0], step)
            computed = np.empty((len(run), *slices.shape[1:]), dtype=np.float32)
            for batch in _batches(len(run), batch_size):
                stacks = network_stacks(slices, [run[i] for i in batch], slicing.context, plane)
                probability = lesion_probability(network, stacks, slicing.window, batch_size)
                computed[batch[0]:batch[-1] + 1] = resize_planes(probability, slices.shape[1:])[:, 0]
            add_interpolated(out, run, computed)
    total /= float(len(axes_xyz))
    return np.clip(total, 0.0, 1.0, out=total)


def load_localiser(weights_path: str | os.PathLike | None = None) -> tuple[torch.nn.Module, dict]:
    """The registered lesion segmenter with its shipped (or given) safetensors weights, and
    its card. InputError when none ships, WeightsError for a missing or mismatched file."""
    return zoo.load_finder(LOCALISER_NAME, weights_path, NO_LOCALISER_MESSAGE)


@dataclass(frozen=True)
class Localiser:
    """The segmenters whose probability maps are averaged, each with its own slicing (the
    first: the weights file asked for; the others: its card's `ensemble` members), and the
    first one's card, which holds the calibration of the whole."""

    members: tuple[tuple[torch.nn.Module, Slicing], ...]
    card: dict

    @classmethod
    def of_network(cls, network: torch.nn.Module, card: dict) -> "Localiser":
        """One segmenter alone (its card's ensemble members, if any, are not loaded)."""
        return cls(((network.eval(), Slicing.of_card(card)),), card)

    def probability(self, units_kji: np.ndarray, spacing_xyz: Sequence[float],
                    batch_size: int = 16, runtime: str = "torch",
                    slice_gap_mm: float | Sequence[float] | None = None) -> np.ndarray:
        """Mean lesion probability of the members (float32, (K, J, I), in [0, 1]), their
        networks run in `runtime` (one of `RUNTIMES`; "torch" is the reference), with slices at
        least `slice_gap_mm` apart when given (`probability_map`)."""
        total = None
        for network, slicing in self.members:
            network = runtime_network(network, runtime, batch_size)
            one = probability_map(units_kji, network, spacing_xyz, slicing, batch_size=batch_size,
                                  slice_gap_mm=slice_gap_mm)
            total = one if total is None else np.add(total, one, out=total)
        return total / np.float32(len(self.members))


def resolved_runtime(runtime: str) -> str:
    """`runtime` with "auto" resolved: "openvino-bf16" where OpenVINO runs bf16 natively on
    this CPU, else "openvino-f32" where OpenVINO imports, else "torch"."""
    if runtime not in RUNTIMES:
        raise InputError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime != "auto":
        return runtime
    if localiser_runtime.cpu_has_bf16():
        return "openvino-bf16"
    return "openvino-f32" if localiser_runtime.available() else "torch"


def runtime_network(network: torch.nn.Module, runtime: str, batch_size: int = 16):
    """`network` itself ("torch") or its OpenVINO runner (same call: stacks in, logits out);
    when OpenVINO cannot run it, the torch network, with a one-line notice."""
    runtime = resolved_runtime(runtime)
    if runtime == "torch" or isinstance(network, localiser_runtime.SegmenterRunner):
        return network
    try:
        return localiser_runtime.SegmenterRunner(network, runtime.split("-")[1],
                                                 batch_size=batch_size)
    except localiser_runtime.OpenVinoUnavailable as err:
        notice(f"lesion localiser: {err}; running it in torch")
        return network


def ensemble_member_paths(weights_path: Path, card: Mapping[str, Any]) -> list[Path]:
    """Files of the card's `ensemble` members (names relative to `weights_path`'s folder)."""
    names = [str(name) for name in (card.get("ensemble") or {}).get("members", [])]
    bad = [name for name in names if Path(name).name != name or not name.endswith(".safetensors")]
    if bad:
        raise WeightsError(f"{weights_path}: ensemble members must be .safetensors files beside "
                           f"it, got {bad}")
    return [weights_path.parent / name for name in names]


def load_ensemble(weights_path: str | os.PathLike | None = None) -> Localiser:
    """The shipped (or given) localiser with every ensemble member its card lists; errors as
    `load_localiser` (a member file that is missing or mismatched: WeightsError). Reused within
    a process while the files are unchanged (`model_cache.load_files`)."""
    path = Path(weights_path) if weights_path is not None else \
        zoo.shipped_weights(zoo.get_spec(LOCALISER_NAME), 1)
    if path is None or not path.is_file():
        return _load_ensemble(weights_path, path)
    members = ensemble_member_paths(path, zoo.read_card(path))
    return model_cache.load_files(LOCALISER_NAME, [path, path.with_suffix(".json"), *members],
                                  lambda: _load_ensemble(weights_path, path))


def _load_ensemble(weights_path: str | os.PathLike | None, path: Path | None) -> Localiser:
    network, card = load_localiser(weights_path)
    members = [(network, Slicing.of_card(card))]
    for member_path in ensemble_member_paths(path, card):
        member, member_card = zoo.load_finder(LOCALISER_NAME, member_path, NO_LOCALISER_MESSAGE)
        members.append((member, Slicing.of_card(member_card)))
    return Localiser(tuple(members), card)


@dataclass(frozen=True)
class Localisation:
    """What the localiser found on one volume: ROIs (most confident first; empty: no lesion),
    the probability threshold used and the highest lesion probability anywhere."""

    regions: tuple[roi_boxes.LesionRegion, ...]
    threshold: float
    peak_probability: float


def calibrated_setting(card: Mapping[str, Any], key: str, default: float) -> float:
    """A number the card's "calibration" block records (chosen on validation patients)."""
    value = (card.get("calibration") or {}).get(key, default)
    return float(value)


def regions_of_map(probability_kji: np.ndarray, spacing_xyz: Sequence[float], threshold: float,
                   min_volume_mm3: float = 0.0, padding_mm: float = 0.0
                   ) -> list[roi_boxes.LesionRegion]:
    """One region per connected component of `probability_kji >= threshold` of at least
    `min_volume_mm3`, its box grown by `padding_mm` (whole voxels, clipped to the volume): the
    localiser's estimate of the lesion's extent, before any ROI margin."""
    regions = roi_boxes.regions_from_probability(probability_kji, threshold, spacing_xyz,
                                                 min_volume_mm3=min_volume_mm3)
    padding = roi_boxes.margin_voxels(padding_mm, spacing_xyz)
    size_xyz = probability_kji.shape[::-1]
    return [roi_boxes.LesionRegion(r.box.grown(padding, size_xyz), r.confidence, r.voxels)
            for r in regions]


def find_regions(image: sitk.Image, weights_path: str | os.PathLike | None = None,
                 threshold: float | None = None, batch_size: int = 16,
                 localiser: Localiser | None = None, runtime: str = FIND_RUNTIME,
                 slice_gap_mm: float | Sequence[float] | None = FIND_SLICE_GAP_MM
                 ) -> Localisation:
    """ROIs of `image` (no margin): the lesion probability map (the ensemble's mean, its
    networks run in `runtime`, one of `RUNTIMES`; slices at least `slice_gap_mm` apart, None:
    `Slicing.slice_step` only; `runtime="torch", slice_gap_mm=None` is the reference map the
    calibration was chosen on) thresholded at the card's calibrated
    threshold (or `threshold`), one box per connected component large enough (the card's
    minimum component volume, mm^3) grown by the card's padding (mm), each with its confidence
    (peak probability)."""
    localiser = localiser or load_ensemble(weights_path)
    card = localiser.card
    voxels = sitk.GetArrayViewFromImage(image)
    probability = localiser.probability(units_of(voxels), image.GetSpacing(), batch_size,
                                        runtime, slice_gap_mm)
    threshold = calibrated_setting(card, "threshold", DEFAULT_THRESHOLD) if threshold is None \
        else float(threshold)
    regions = regions_of_map(probability, image.GetSpacing(), threshold,
                             calibrated_setting(card, "min_component_mm3", 0.0),
                             calibrated_setting(card, "padding_mm", 0.0))
    return Localisation(tuple(regions), threshold, float(probability.max(initial=0.0)))
