"""Lesion localiser: the lesion probability map of a volume from the 2.5-D `lesion_segmenter`.

The same slicing serves training (`MedSRLib.training.localiser`) and inference, so both see
identical inputs:

- intensities go to the SR models' network units (`intensity.fit_mapping`, per volume);
- along each slice axis, every slice is stacked with its neighbours (`context` slices, edge
  slices repeated) and resized to `input_size` x `input_size` (bilinear, anti-aliased);
- the network's lesion probability is resized back to the slice's own size and the three axes'
  maps are averaged into one (K, J, I) map on the input grid.

`find_regions` turns the map into ROIs (`roi_boxes`): connected components above the card's
calibrated threshold, one box per component, with a confidence each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import intensity, roi_boxes, zoo
from .errors import InputError

LOCALISER_NAME = "lesion_segmenter"
#: Side of the square slice the network sees (training and inference).
DEFAULT_INPUT_SIZE = 128
#: Probability threshold when a card does not record a calibrated one.
DEFAULT_THRESHOLD = 0.5
NO_LOCALISER_MESSAGE = "no trained lesion localiser ships; pass a box or a mask"


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


def network_stacks(slices: np.ndarray, indices: Sequence[int], context: int,
                   input_size: int) -> torch.Tensor:
    """(len(indices), context, input_size, input_size) float32 network input for the slices
    `indices` of `slices` (slices, rows, columns), with their neighbours as channels."""
    count = slices.shape[0]
    stack = np.stack([slices[context_indices(i, count, context)] for i in indices])
    return resize_planes(torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)),
                         (input_size, input_size))


def _batches(count: int, batch_size: int) -> Iterator[list[int]]:
    for start in range(0, count, batch_size):
        yield list(range(start, min(count, start + batch_size)))


def probability_map(units_kji: np.ndarray, network: torch.nn.Module, context: int = 3,
                    input_size: int = DEFAULT_INPUT_SIZE, axes_xyz: Sequence[int] = (0, 1, 2),
                    batch_size: int = 16) -> np.ndarray:
    """Lesion probability (float32, (K, J, I), in [0, 1]) of a volume in network units: the
    mean over `axes_xyz` of the per-slice predictions resized back onto the input grid."""
    units_kji = np.asarray(units_kji, dtype=np.float32)
    if units_kji.ndim != 3 or min(units_kji.shape) < 1:
        raise InputError(f"the lesion localiser needs a 3-D volume, got shape {units_kji.shape}")
    total = np.zeros(units_kji.shape, dtype=np.float32)
    network = network.eval()
    with torch.inference_mode():
        for axis in axes_xyz:
            slices = slice_axis_view(units_kji, axis)
            out = slice_axis_view(total, axis)  # a view: writes land in `total`
            for batch in _batches(slices.shape[0], batch_size):
                logits = network(network_stacks(slices, batch, context, input_size))
                probability = torch.softmax(logits.float(), dim=1)[:, 1:2]
                probability = resize_planes(probability, slices.shape[1:])[:, 0]
                out[batch[0]:batch[-1] + 1] += probability.numpy()
    total /= float(len(axes_xyz))
    return np.clip(total, 0.0, 1.0, out=total)


def load_localiser(weights_path: str | os.PathLike | None = None) -> tuple[torch.nn.Module, dict]:
    """The registered lesion segmenter with its shipped (or given) safetensors weights, and
    its card. InputError when none ships, WeightsError for a missing or mismatched file."""
    return zoo.load_finder(LOCALISER_NAME, weights_path, NO_LOCALISER_MESSAGE)


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


def find_regions(image: sitk.Image, weights_path: str | os.PathLike | None = None,
                 threshold: float | None = None, batch_size: int = 16,
                 localiser: tuple[torch.nn.Module, dict] | None = None) -> Localisation:
    """ROIs of `image` (no margin): the lesion probability map thresholded at the card's
    calibrated threshold (or `threshold`), one box per connected component large enough
    (the card's minimum component volume, mm^3), each with its confidence (peak probability)."""
    network, card = localiser or load_localiser(weights_path)
    voxels = sitk.GetArrayViewFromImage(image)
    context = int((card.get("config") or {}).get("in_channels", 3))
    input_size = int(card.get("input_size", DEFAULT_INPUT_SIZE))
    probability = probability_map(units_of(voxels), network, context, input_size,
                                  batch_size=batch_size)
    threshold = calibrated_setting(card, "threshold", DEFAULT_THRESHOLD) if threshold is None \
        else float(threshold)
    min_volume = calibrated_setting(card, "min_component_mm3", 0.0)
    regions = roi_boxes.regions_from_probability(probability, threshold, image.GetSpacing(),
                                                 min_volume_mm3=min_volume)
    return Localisation(tuple(regions), threshold, float(probability.max(initial=0.0)))
