"""Lesion-focused super-resolution (Zhu, Yang and Lio, "Lesion focused super-resolution"): the
region of interest and its use.

- The ROI is an index box on the INPUT grid, in SimpleITK (x, y, z) order, lower corner
  inclusive and upper corner exclusive (Python slice convention): voxels x0 <= x < x1, ...
  `RoiBox`, `parse_box`, `roi_from_mask`.
- Detector evaluation helpers (no training needed): per-slice boxes of a mask
  (`slice_boxes_from_mask`), their 3-D aggregation with a margin (`aggregate_slice_boxes`), and
  that paper's coverage metric (`lesion_coverage`: "perfect" = 100 %, "acceptable" >= 95 % of a
  slice's lesion voxels inside the ROI).
- `detect_lesion` runs the registered `lesion_detector` (that paper's box regressor) through
  its shipped weights; `detect_lesions` runs the default lesion finder (`AUTO_FINDERS`: the
  2.5-D `lesion_segmenter`, `lesion_localiser.py`, whose probability map gives one ROI per
  connected component, `roi_boxes.py`) and returns every ROI with its confidence.
- The steps `api.upscale(roi=...)` composes: `choose_roi` (the model inside the ROI: named, or
  the measured default per modality and scale, `roi_models.py`), `plan_region` (resolve the ROI
  or ROIs, before any voxel work), `refine_region` (the ROI model, with its self-ensemble when
  it has one, on each ROI plus a margin, run on a crop
  with enough context that the crop's border does not show, blended into the whole-volume
  result with a feathered weight map, `blend.py`), `annotate` (the report, also in the
  output's metadata).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from . import blend, localiser as lesion_localiser, boxes as roi_boxes, roi_models
from ..transforms import intensity
from ..io import volumes as io
from ..models import registry as zoo
from ..runtime.engine import (CancelToken, EngineOptions, ProgressCallback, context_slices_of,
                              plan_passes, super_resolve_volume)
from ..runtime.engine import effective_radius  # memoised per model object
from ..planning.run_plan import ScalePlan, plan_scale, validate_image
from ..errors import InputError, WeightsError
from .boxes import RoiBox, margin_voxels
from ..models.networks.lesion_detector import resize_slices

#: Metadata keys written on the output image of a lesion-focused run.
ROI_INDEX_KEY = "medsr_roi_index_xyz"
ROI_BOUNDS_KEY = "medsr_roi_bounds_lps_mm"
ROI_SCORE_KEY = "medsr_roi_score"
ROI_FALLBACK_KEY = "medsr_roi_fallback"
ROI_MODEL_KEY = "medsr_roi_model"
ROI_REPORT_KEY = "medsr_roi_report"  # the whole RoiReport as one-line JSON
ROI_ENSEMBLE_KEY = "medsr_roi_self_ensemble"  # self-ensemble members of the ROI model (1: none)

#: Default margin around the ROI, in mm (converted per axis to whole input voxels, >= 1).
DEFAULT_MARGIN_MM = 5.0
#: Relative tolerance of the same-grid check between a mask and the input (float32 NIfTI
#: headers round origins by ~1e-5 mm at 300 mm, which is 3e-8 relative).
GRID_TOLERANCE = 1e-6
#: Share of a slice's lesion voxels inside the ROI for an "acceptable" detection (Zhu et al.).
ACCEPTABLE_COVERAGE = 0.95
#: The perceptual model inside the ROI, by name only (`roi_models.PERCEPTUAL_ROI_MODEL`, the
#: LFSR generator); the default is per modality and scale (`roi_models.ROI_DEFAULTS`).
PERCEPTUAL_ROI_MODEL = roi_models.PERCEPTUAL_ROI_MODEL
DETECTOR_NAME = "lesion_detector"
LOCALISER_NAME = "lesion_segmenter"
#: Lesion finders `roi="auto"` may run, the default first (when its weights ship).
AUTO_FINDERS = (LOCALISER_NAME, DETECTOR_NAME)
NO_DETECTOR_MESSAGE = "no trained lesion detector ships; pass a box or a mask"
#: Metadata key: every ROI of the run as "x0 y0 z0 x1 y1 z1" groups joined by "; " (most
#: confident first); ROI_INDEX_KEY keeps the first one for readers of a single ROI.
ROI_ALL_INDEX_KEY = "medsr_roi_regions_index_xyz"
ROI_CONFIDENCE_KEY = "medsr_roi_confidences"  # one per ROI, same order, "none" when not known


# ---------------------------------------------------------------------------------------------
# The ROI: an index box on the input grid (`roi_boxes.RoiBox`)


_BOX_PATTERN = re.compile(r"^\s*-?\d+(\s*,\s*-?\d+){5}\s*$")


def looks_like_box(text: str) -> bool:
    return bool(_BOX_PATTERN.match(text))


def parse_box(text: str) -> RoiBox:
    """"x0,y0,z0,x1,y1,z1" (voxel indices, lower inclusive, upper exclusive) -> RoiBox."""
    if not looks_like_box(text):
        raise InputError(f"ROI box must be six integers x0,y0,z0,x1,y1,z1, got {text!r}")
    values = [int(v) for v in text.split(",")]
    return RoiBox(tuple(values[:3]), tuple(values[3:]))


def check_same_grid(mask: sitk.Image, image: sitk.Image) -> None:
    """InputError naming the first mismatch unless `mask` is on `image`'s voxel grid (size exact;
    spacing, origin and direction within a relative 1e-6)."""
    if tuple(mask.GetSize()) != tuple(image.GetSize()):
        raise InputError(f"ROI mask is on another grid: size {mask.GetSize()} differs from the "
                         f"input's {image.GetSize()} (x, y, z); resample the mask onto the input")
    for name, getter in (("spacing", "GetSpacing"), ("origin", "GetOrigin"),
                         ("direction", "GetDirection")):
        a = np.asarray(getattr(mask, getter)(), dtype=np.float64)
        b = np.asarray(getattr(image, getter)(), dtype=np.float64)
        tolerance = GRID_TOLERANCE * np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))
        if np.any(np.abs(a - b) > tolerance):
            raise InputError(
                f"ROI mask is on another grid: {name} {tuple(round(v, 6) for v in a)} differs "
                f"from the input's {tuple(round(v, 6) for v in b)}; resample the mask onto the input")


def bounding_box(mask_kji: np.ndarray) -> RoiBox | None:
    """Index box of the nonzero voxels of a (K, J, I) array, or None when there are none."""
    nonzero = np.asarray(mask_kji) != 0
    if not nonzero.any():
        return None
    lower, upper = [], []
    for axis in (2, 1, 0):  # x, y, z
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(nonzero.any(axis=other))
        lower.append(int(hits[0]))
        upper.append(int(hits[-1]) + 1)
    return RoiBox(tuple(lower), tuple(upper))


def roi_from_mask(mask: sitk.Image, image: sitk.Image,
                  margin_xyz: Sequence[int] = (0, 0, 0)) -> RoiBox:
    """Bounding box of the mask's nonzero voxels (any label), grown by `margin_xyz` voxels and
    clipped to the volume. InputError for a mask on another grid or an empty mask."""
    mask = io.as_scalar_volume(mask, "ROI mask")
    check_same_grid(mask, image)
    box = bounding_box(sitk.GetArrayViewFromImage(mask))
    if box is None:
        raise InputError("ROI mask is empty (no nonzero voxel): nothing marks the lesion")
    return box.grown(margin_xyz, image.GetSize())


# ---------------------------------------------------------------------------------------------
# Detector evaluation: per-slice boxes, 3-D aggregation, coverage


def in_plane_axes(slice_axis_xyz: int) -> tuple[int, int]:
    """The two other axes in (x, y, z) order: (a, b); a is the slice array's last (width) axis."""
    if slice_axis_xyz not in (0, 1, 2):
        raise InputError(f"slice axis must be 0, 1 or 2 (x, y, z), got {slice_axis_xyz!r}")
    a, b = (axis for axis in range(3) if axis != slice_axis_xyz)
    return a, b


@dataclass(frozen=True)
class SliceBox:
    """A 2-D box on slice `slice_index` along the slice axis, over the in-plane axes (a, b) in
    (x, y, z) order (`in_plane_axes`): lower inclusive, upper exclusive."""

    slice_index: int
    lower_ab: tuple[int, int]
    upper_ab: tuple[int, int]


def _slice_view(volume_kji: np.ndarray, slice_axis_xyz: int) -> np.ndarray:
    """The volume as (slices, b, a) with a the last axis (a view)."""
    return np.moveaxis(np.asarray(volume_kji), 2 - slice_axis_xyz, 0)


def slice_boxes_from_mask(mask_kji: np.ndarray, slice_axis_xyz: int = 2) -> list[SliceBox]:
    """One bounding box per slice (along `slice_axis_xyz`) that holds nonzero mask voxels."""
    in_plane_axes(slice_axis_xyz)
    boxes = []
    for index, plane in enumerate(_slice_view(mask_kji, slice_axis_xyz)):
        nonzero = plane != 0
        if not nonzero.any():
            continue
        cols = np.flatnonzero(nonzero.any(axis=0))  # along a
        rows = np.flatnonzero(nonzero.any(axis=1))  # along b
        boxes.append(SliceBox(index, (int(cols[0]), int(rows[0])),
                              (int(cols[-1]) + 1, int(rows[-1]) + 1)))
    return boxes


def aggregate_slice_boxes(boxes: Sequence[SliceBox], slice_axis_xyz: int,
                          size_xyz: Sequence[int],
                          margin_xyz: Sequence[int] = (0, 0, 0)) -> RoiBox | None:
    """The 3-D ROI: the union of the per-slice boxes over the range of their slices, grown by
    `margin_xyz` voxels and clipped to the volume; None when there is no box."""
    if not boxes:
        return None
    a, b = in_plane_axes(slice_axis_xyz)
    lower, upper = [0, 0, 0], [0, 0, 0]
    lower[slice_axis_xyz] = min(x.slice_index for x in boxes)
    upper[slice_axis_xyz] = max(x.slice_index for x in boxes) + 1
    for axis, k in ((a, 0), (b, 1)):
        lower[axis] = min(x.lower_ab[k] for x in boxes)
        upper[axis] = max(x.upper_ab[k] for x in boxes)
    box = RoiBox(tuple(max(0, v) for v in lower),
                 tuple(min(int(n), v) for v, n in zip(upper, size_xyz)))
    return box.grown(margin_xyz, size_xyz)


@dataclass(frozen=True)
class LesionCoverage:
    """Zhu et al.'s detection protocol, per lesion slice: the share of its lesion voxels inside
    the ROI; "perfect" when all are, "acceptable" when >= 95 % are (perfect ones included)."""

    slice_fractions: tuple[float, ...]
    perfect: int
    acceptable: int
    voxel_fraction: float

    @property
    def lesion_slices(self) -> int:
        return len(self.slice_fractions)

    @property
    def perfect_share(self) -> float:
        return self.perfect / self.lesion_slices if self.lesion_slices else float("nan")

    @property
    def acceptable_share(self) -> float:
        return self.acceptable / self.lesion_slices if self.lesion_slices else float("nan")


def lesion_coverage(mask_kji: np.ndarray, roi: RoiBox | np.ndarray | None,
                    slice_axis_xyz: int = 2,
                    acceptable: float = ACCEPTABLE_COVERAGE) -> LesionCoverage:
    """Coverage of the lesion (`mask_kji` nonzero) by `roi`: a 3-D box on the same grid, a
    boolean (K, J, I) ROI array (e.g. rasterised per-slice predictions), or None (nothing)."""
    lesion = np.asarray(mask_kji) != 0
    inside = np.zeros_like(lesion)
    if isinstance(roi, RoiBox):
        inside[roi.slices_kji] = True
    elif roi is not None:
        inside = np.asarray(roi, dtype=bool)
        if inside.shape != lesion.shape:
            raise InputError(f"ROI array shape {inside.shape} differs from the mask's {lesion.shape}")
    fractions = []
    for lesion_plane, inside_plane in zip(_slice_view(lesion, slice_axis_xyz),
                                          _slice_view(inside, slice_axis_xyz)):
        total = np.count_nonzero(lesion_plane)
        if total:
            fractions.append(np.count_nonzero(lesion_plane & inside_plane) / total)
    total = np.count_nonzero(lesion)
    return LesionCoverage(
        slice_fractions=tuple(fractions),
        perfect=sum(f >= 1.0 for f in fractions),
        acceptable=sum(f >= acceptable for f in fractions),
        voxel_fraction=(np.count_nonzero(lesion & inside) / total) if total else float("nan"))


# ---------------------------------------------------------------------------------------------
# The lesion detector


@dataclass(frozen=True)
class Detection:
    """What the detector found: the 3-D ROI (None: no lesion), the volume score (the highest
    per-slice lesion probability), per-slice probabilities, the threshold used and the kept
    per-slice boxes."""

    roi: RoiBox | None
    score: float
    slice_scores: tuple[float, ...]
    threshold: float
    slice_axis_xyz: int
    slice_boxes: tuple[SliceBox, ...] = ()        # the kept per-slice boxes (no margin)


def _auto_slice_axis(image: sitk.Image) -> int:
    return plan_scale(2, "auto", image.GetSpacing(), image.GetSize()).slice_axis_xyz


def load_detector(weights_path: str | os.PathLike | None = None) -> tuple[torch.nn.Module, dict]:
    """The registered lesion detector with its shipped (or given) weights, and its card.

    InputError "no trained lesion detector ships; pass a box or a mask" while none ships.
    """
    return zoo.load_finder(DETECTOR_NAME, weights_path, NO_DETECTOR_MESSAGE)


def detector_input_size(card: Mapping[str, Any]) -> int | None:
    """Side of the square whole-slice input the detector was trained on (None: native size)."""
    size = ((card.get("training_config") or {}).get("data") or {}).get("whole_slice_size")
    return int(size) if size else None


def detect_lesion_roi(image: sitk.Image, slice_axis: int | None = None,
                      margin_mm: float = DEFAULT_MARGIN_MM,
                      weights_path: str | os.PathLike | None = None,
                      threshold: float | None = None, batch_size: int = 8) -> Detection:
    """Run the lesion detector slice by slice and aggregate its boxes into a 3-D ROI.

    Slices go along `slice_axis` (x, y, z index; None = the axis of largest spacing), in the
    same network units as the SR models (`intensity.fit_mapping`). Slices whose lesion
    probability reaches the threshold (the card's "score_threshold", else 0.5) contribute
    their box; the union, grown by `margin_mm`, is the ROI. No such slice: `roi` is None.
    """
    image = validate_image(image)
    network, card = load_detector(weights_path)
    axis = _auto_slice_axis(image) if slice_axis is None else int(slice_axis)
    threshold = float(card.get("score_threshold", 0.5) if threshold is None else threshold)
    input_size = detector_input_size(card)
    voxels = sitk.GetArrayViewFromImage(image)
    slices = _slice_view(intensity.fit_mapping(voxels).to_unit(voxels), axis)
    height, width = slices.shape[1:]
    boxes_out, scores = [], []
    with torch.inference_mode():
        for start in range(0, len(slices), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size]))[:, None]
            boxes, logits = network(resize_slices(batch, input_size))
            boxes_out.append(boxes.float().numpy())
            scores.append(torch.sigmoid(logits.float()).numpy())
    boxes_norm, probabilities = np.concatenate(boxes_out), np.concatenate(scores)
    kept = []
    for index, ((cx, cy, w, h), p) in enumerate(zip(boxes_norm, probabilities)):
        if p < threshold:
            continue
        lower = (max(0, math.floor((cx - w / 2) * width)), max(0, math.floor((cy - h / 2) * height)))
        upper = (min(width, math.ceil((cx + w / 2) * width)), min(height, math.ceil((cy + h / 2) * height)))
        if upper[0] > lower[0] and upper[1] > lower[1]:
            kept.append(SliceBox(index, lower, upper))
    roi = aggregate_slice_boxes(kept, axis, image.GetSize(),
                                margin_voxels(margin_mm, image.GetSpacing()))
    return Detection(roi, float(probabilities.max()) if len(probabilities) else 0.0,
                     tuple(float(p) for p in probabilities), threshold, axis, tuple(kept))


def detect_lesion(image: sitk.Image, **options: Any) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(lower_index_xyz inclusive, upper_index_xyz exclusive) of the detected lesion ROI (margin
    included), voxel indices of `image` in SimpleITK (x, y, z) order.

    InputError when no detector weights ship or when the detector finds no lesion.
    Options: see `detect_lesion_roi`.
    """
    detection = detect_lesion_roi(image, **options)
    if detection.roi is None:
        raise InputError(f"the lesion detector found no lesion (the most lesion-like slice scored "
                         f"{detection.score:.2f}, below the detection threshold "
                         f"{detection.threshold:.2f}); draw an ROI instead")
    return detection.roi.lower_xyz, detection.roi.upper_xyz


def detect_lesions(image: sitk.Image, finder: str | None = None,
                   weights_path: str | os.PathLike | None = None
                   ) -> list[tuple[tuple[int, int, int], tuple[int, int, int], float]]:
    """Every lesion ROI the lesion finder sees in `image` (no margin), most confident first:
    (lower_index_xyz inclusive, upper_index_xyz exclusive, confidence in [0, 1]). Voxel indices
    of `image`, (x, y, z). `finder`: a name of `AUTO_FINDERS` (default: the first that ships).
    An empty list when it finds none; InputError when no finder ships."""
    image = validate_image(image)
    name = auto_finder(finder, weights_path)
    found, _, _, _ = _found_regions(image, name, _auto_slice_axis(image),
                                    margin_voxels(DEFAULT_MARGIN_MM, image.GetSpacing()),
                                    weights_path)
    return [(box.lower_xyz, box.upper_xyz, float(confidence)) for box, confidence in found]


# ---------------------------------------------------------------------------------------------
# Lesion-focused upscaling


@dataclass
class RoiReport:
    """What a lesion-focused run did. Index boxes are on the input grid, (x, y, z), lower
    inclusive, upper exclusive; bounds are LPS mm (min corner, max corner)."""

    source: str                                   # "box", "mask" or "auto"
    roi_index_xyz: tuple[tuple[int, ...], tuple[int, ...]] | None
    roi_bounds_lps_mm: tuple[tuple[float, ...], tuple[float, ...]] | None
    processed_index_xyz: tuple[tuple[int, ...], tuple[int, ...]] | None  # ROI + margin
    margin_voxels_xyz: tuple[int, int, int]
    score: float | None                           # detector score (auto only)
    fallback: bool                                # True: fast model everywhere
    roi_model: str
    model: str
    scale_factors_xyz: tuple[int, int, int]
    message: str = ""
    slice_scores: tuple[float, ...] = field(default_factory=tuple)
    # Every ROI, most confident first (the fields above describe the first): dicts with
    # index_xyz, bounds_lps_mm, processed_index_xyz and confidence (None when not known).
    regions: tuple[dict, ...] = field(default_factory=tuple)
    finder: str = ""                              # lesion finder of an "auto" run
    roi_self_ensemble: int = 1                    # self-ensemble members of the ROI model
    roi_precision: str = ""                       # the ROI model's precision ("": the run's)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_image(cls, image: sitk.Image) -> "RoiReport | None":
        """The report a lesion-focused `api.upscale` left in its output's metadata, or None."""
        if not image.HasMetaDataKey(ROI_REPORT_KEY):
            return None
        fields = json.loads(image.GetMetaData(ROI_REPORT_KEY))
        fields["regions"] = [{k: _as_tuples(v) for k, v in r.items()}
                             for r in fields.get("regions", [])]
        return cls(**{key: _as_tuples(value) if isinstance(value, list) else value
                      for key, value in fields.items()})

    def write_json(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the report as JSON atomically (temporary file beside it, then rename)."""
        return io.write_text(self.to_json(), path, overwrite)


def resolve_roi_argument(roi: Any) -> tuple[str, Any]:
    """Normalise the `roi` argument: ("auto", None or a finder name), ("box", RoiBox),
    ("boxes", tuple of RoiBox) or ("mask", sitk.Image).

    Accepted: "auto" (the default lesion finder, `AUTO_FINDERS`) or "auto:NAME" (that finder,
    e.g. "auto:lesion_detector"); a RoiBox; six integers (tuple/list or "x0,y0,z0,x1,y1,z1");
    several boxes (a list of RoiBox or of six-integer tuples, or box texts joined by ";"); a
    SimpleITK mask image; a path to a mask file.
    """
    if isinstance(roi, RoiBox):
        return "box", roi
    if isinstance(roi, sitk.Image):
        return "mask", roi
    if isinstance(roi, (tuple, list)) and roi and all(
            isinstance(v, RoiBox) or (isinstance(v, (tuple, list)) and len(v) == 6) for v in roi):
        boxes = tuple(v if isinstance(v, RoiBox) else resolve_roi_argument(tuple(v))[1] for v in roi)
        return ("box", boxes[0]) if len(boxes) == 1 else ("boxes", boxes)
    if isinstance(roi, (tuple, list)):
        if len(roi) == 2 and all(isinstance(v, (tuple, list)) for v in roi):
            roi = (*roi[0], *roi[1])
        if len(roi) != 6 or not all(isinstance(v, (int, np.integer)) for v in roi):
            raise InputError(f"ROI box must be six integers (x0, y0, z0, x1, y1, z1), got {roi!r}")
        return "box", RoiBox(tuple(roi[:3]), tuple(roi[3:]))
    if isinstance(roi, (str, os.PathLike)):
        text = str(roi).strip()
        if text.lower() == "auto":
            return "auto", None
        if text.lower().startswith("auto:"):
            finder = text[5:].strip()
            if finder not in AUTO_FINDERS:
                raise InputError(f"roi {text!r}: unknown lesion finder {finder!r}; choose one of "
                                 + ", ".join(f"auto:{name}" for name in AUTO_FINDERS))
            return "auto", finder
        if looks_like_box(text):
            return "box", parse_box(text)
        if ";" in text and all(looks_like_box(part) for part in text.split(";") if part.strip()):
            return resolve_roi_argument([parse_box(part) for part in text.split(";") if part.strip()])
        if Path(text).exists():
            return "mask", io.read_volume(text)
        raise InputError(f"roi {text!r} is neither auto, a box x0,y0,z0,x1,y1,z1 (voxel "
                         "indices) nor an existing mask file")
    raise InputError(f"roi must be 'auto', a box, a mask image or a mask file, got {type(roi).__name__}")


def choose_roi(roi_model: str | None, scale: int, allow_untrained: bool,
               modality: str | None = None, fallback: str | None = None,
               self_ensemble: int | None = None) -> roi_models.RoiModelChoice:
    """The model inside the ROI: `roi_model` when named (with `self_ensemble` members, default
    1); else the measured default for `modality` and `scale` (`roi_models.default_roi_choice`)
    when its weights ship (or untrained runs are allowed), `self_ensemble` overriding its
    members; else `fallback` (the run's own model). InputError when none applies."""
    if roi_model:
        return roi_models.RoiModelChoice(roi_model, self_ensemble or 1)
    choice = roi_models.default_roi_choice(modality, scale)
    if choice is not None and (allow_untrained or zoo.shipped_weights(
            zoo.get_spec(choice.model), scale, modality=modality) is not None):
        return choice if self_ensemble is None else replace(choice, self_ensemble=self_ensemble)
    if fallback:
        return roi_models.RoiModelChoice(fallback, self_ensemble or 1)
    raise InputError(f"no default model inside the ROI ships for x{scale}; name one with "
                     "roi_model (--roi-model), or allow untrained weights")


def choose_roi_model(roi_model: str | None, scale: int, allow_untrained: bool,
                     modality: str | None = None, fallback: str | None = None) -> str:
    """Registry name of the model inside the ROI (`choose_roi`'s model)."""
    return choose_roi(roi_model, scale, allow_untrained, modality, fallback).model


def _context_voxels_kji(model_for, factors_kji: Sequence[int], slice_axis_kji: int,
                        size_kji: Sequence[int]) -> tuple[int, int, int]:
    """Input voxels around a crop that the output voxels inside it depend on, per array axis:
    each pass's `effective_radius` (all but `CROP_CONTEXT_TOLERANCE` of the dependence; the
    whole extent for a global operation) and a 2.5-D model's neighbouring slices along its
    slice axis. The crop's output is blended into the whole-volume run across the margin."""
    context = [0, 0, 0]
    for number, slice_pass in enumerate(plan_passes(factors_kji, slice_axis_kji)):
        model, _ = model_for(slice_pass.plane_factors)
        radius = effective_radius(model, slice_pass.plane_factors)
        context[slice_pass.slice_axis] += context_slices_of(model) // 2
        plane = [a for a in range(3) if a != slice_pass.slice_axis]
        for a in plane:
            if radius is None:
                context[a] = int(size_kji[a])
            else:  # pass 2 sees axes already upscaled by pass 1: fewer input voxels
                earlier = factors_kji[a] if number > 0 and a != slice_axis_kji else 1
                context[a] += math.ceil(radius / earlier) + 1
    return tuple(min(int(c), int(n)) for c, n in zip(context, size_kji))  # type: ignore


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


@dataclass(frozen=True)
class PlannedRegion:
    """One ROI of a lesion-focused run. Boxes are input-grid indices (x, y, z), lower inclusive,
    upper exclusive: `lesion_box` the ROI itself, `processed` the ROI plus the margin (the
    feathering lies in it), `crop_box` the processed box plus the ROI model's receptive field
    (what it reads). `confidence`: the lesion finder's, None for a given box or mask."""

    lesion_box: RoiBox
    processed: RoiBox
    crop_box: RoiBox
    confidence: float | None = None


@dataclass(frozen=True)
class RegionPlan:
    """Where the ROI model runs, decided before any voxel work: `regions`, most confident first
    (empty when nothing is to be refined). `lesion_box`, `processed` and `crop_box` are the
    first region's boxes (None without one)."""

    source: str
    roi_model: str
    regions: tuple[PlannedRegion, ...]
    margins_xyz: tuple[int, int, int]
    score: float | None = None
    slice_scores: tuple[float, ...] = ()
    message: str = ""
    finder: str = ""
    roi_self_ensemble: int = 1        # self-ensemble members of the ROI model
    reuse_identity: bool = False      # the whole-volume pass is the ensemble's identity member
    roi_precision: str | None = None  # the ROI model's precision (None: the run's)

    @property
    def lesion_box(self) -> RoiBox | None:
        return self.regions[0].lesion_box if self.regions else None

    @property
    def processed(self) -> RoiBox | None:
        return self.regions[0].processed if self.regions else None

    @property
    def crop_box(self) -> RoiBox | None:
        return self.regions[0].crop_box if self.regions else None

    def crop_share(self, size_xyz: Sequence[int]) -> float:
        """The crops' voxels as a share of the volume's (a proxy for their run time)."""
        return sum(float(np.prod(r.crop_box.size_xyz)) for r in self.regions) / float(np.prod(size_xyz))


def auto_finder(finder: str | None, weights_path: str | os.PathLike | None) -> str:
    """The lesion finder an "auto" ROI runs: `finder` when named; else the model the given
    weights' card names; else the first of `AUTO_FINDERS` whose weights ship.
    InputError (NO_DETECTOR_MESSAGE) when none does."""
    if finder:
        return finder
    if weights_path is not None:
        model = zoo.read_card(zoo.check_weights_file(Path(weights_path))).get("model")
        if model not in AUTO_FINDERS:
            raise WeightsError(f"{weights_path}: card names model {model!r}, not a lesion "
                               "finder (" + ", ".join(AUTO_FINDERS) + ")")
        return model
    for name in AUTO_FINDERS:
        if zoo.shipped_weights(zoo.get_spec(name), 1) is not None:
            return name
    raise InputError(NO_DETECTOR_MESSAGE)


def _found_regions(image: sitk.Image, finder: str, slice_axis_xyz: int, margins_xyz,
                   weights_path) -> tuple[list[tuple[RoiBox, float | None]], float, tuple, str]:
    """([(ROI box, confidence)], score, slice scores, message) of the lesion finder."""
    if finder == DETECTOR_NAME:
        detection = detect_lesion_roi(image, slice_axis=slice_axis_xyz, margin_mm=0.0,
                                      weights_path=weights_path)
        message = "" if detection.roi is not None else (
            f"no lesion found (the most lesion-like slice scored {detection.score:.2f}, below the "
            f"detection threshold {detection.threshold:.2f}), so the run's model ran everywhere: "
            "the whole volume was super-resolved without an ROI model")
        found = [(detection.roi, detection.score)] if detection.roi is not None else []
        return found, detection.score, detection.slice_scores, message
    found = lesion_localiser.find_regions(image, weights_path=weights_path)
    regions = roi_boxes.merge_overlapping(found.regions, margins_xyz, image.GetSize())
    message = "" if regions else (
        f"no lesion found (the most lesion-like region scored {found.peak_probability:.2f}, below "
        f"the detection threshold {found.threshold:.2f}), so the run's model ran everywhere: the "
        "whole volume was super-resolved without an ROI model")
    return ([(r.box, r.confidence) for r in regions], found.peak_probability, (), message)


def plan_region(image: sitk.Image, roi: Any, plan: ScalePlan, roi_model: str, roi_for,
                margin_mm: float = DEFAULT_MARGIN_MM,
                detector_weights: str | os.PathLike | None = None,
                roi_self_ensemble: int = 1, reuse_identity: bool = False,
                roi_precision: str | None = None) -> RegionPlan:
    """Step 1 of lesion-focused SR: resolve `roi` ("auto" runs the lesion finder, a box must
    lie inside the volume, a mask must be on the input's grid and not empty) into the boxes
    `refine_region` needs, one set per ROI. `roi_for` loads the ROI model (its receptive field
    sizes the crops); it runs with `roi_self_ensemble` members, and with `reuse_identity` (the
    ROI model is the run's own, same weights and options) the whole-volume result counts as the
    identity member. `roi_precision`: the ROI model's precision (None: the run's)."""
    source, value = resolve_roi_argument(roi)
    size_xyz = tuple(image.GetSize())
    margins = margin_voxels(margin_mm, image.GetSpacing())
    score, slice_scores, message, finder = None, (), "", ""
    if source == "box":
        found = [(value.check_inside(size_xyz), None)]
    elif source == "boxes":
        found = [(box.check_inside(size_xyz, f"ROI box {n + 1}"), None) for n, box in enumerate(value)]
    elif source == "mask":
        found = [(roi_from_mask(value, image), None)]
    else:
        finder = auto_finder(value, detector_weights)
        found, score, slice_scores, message = _found_regions(
            validate_image(image), finder, plan.slice_axis_xyz, margins, detector_weights)
    regions = []
    if found:
        context_kji = _context_voxels_kji(roi_for, plan.factors_kji, plan.slice_axis_kji,
                                          size_xyz[::-1])
        for lesion_box, confidence in found:
            processed = lesion_box.grown(margins, size_xyz)
            regions.append(PlannedRegion(lesion_box, processed,
                                         processed.grown(context_kji[::-1], size_xyz), confidence))
    return RegionPlan(source, roi_model, tuple(regions), margins, score, tuple(slice_scores),
                      message, finder, int(roi_self_ensemble),
                      bool(reuse_identity) and roi_self_ensemble > 1 and roi_precision is None,
                      roi_precision)


def refine_region(result_units: np.ndarray, voxels: np.ndarray, region: RegionPlan,
                  plan: ScalePlan, roi_for, to_unit, options: EngineOptions,
                  progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None) -> None:
    """Step 2: for each ROI, run the ROI model on its crop of `voxels` (K, J, I, the input's
    units) and blend it into `result_units` (the whole-volume output in network units, modified
    in place) with a feathered weight that is 1 on the ROI and falls to 0 across the margin.
    With self-ensemble the ROI output is the mean of the members; with `reuse_identity` the
    identity member is `result_units` itself and only the others run."""
    options = replace(options, self_ensemble=region.roi_self_ensemble,
                      ensemble_start=1 if region.reuse_identity else 0,
                      precision=region.roi_precision or options.precision)
    for number, planned in enumerate(region.regions):
        share = (lambda f, text, n=number: progress((n + f) / len(region.regions), text)) \
            if progress is not None else None
        _refine_one(result_units, voxels, planned, region.margins_xyz, plan, roi_for, to_unit,
                    options, share, cancel)


def _refine_one(result_units: np.ndarray, voxels: np.ndarray, planned: PlannedRegion,
                margins_xyz: Sequence[int], plan: ScalePlan, roi_for, to_unit,
                options: EngineOptions, progress: ProgressCallback | None,
                cancel: CancelToken | None) -> None:
    """`refine_region` for one ROI."""
    processed, crop_box = planned.processed, planned.crop_box
    crop = super_resolve_volume(
        np.ascontiguousarray(voxels[crop_box.slices_kji]), plan.factors_kji, plan.slice_axis_kji,
        roi_for, to_unit=to_unit, from_unit=lambda units: units, out_dtype=np.dtype(np.float32),
        options=options, progress=progress, cancel=cancel)
    out_box = processed.scaled(plan.factors_xyz)
    crop_out = crop_box.scaled(plan.factors_xyz)
    inner = tuple(slice(l - c, u - c) for l, u, c in
                  zip(out_box.lower_xyz[::-1], out_box.upper_xyz[::-1], crop_out.lower_xyz[::-1]))
    size_xyz = voxels.shape[::-1]
    ramps_lower, ramps_upper = [], []
    for a_kji in range(3):
        a = 2 - a_kji
        ramp = max(blend.MIN_RAMP_VOXELS, margins_xyz[a] * plan.factors_kji[a_kji])
        ramps_lower.append(ramp if processed.lower_xyz[a] > 0 else 0)
        ramps_upper.append(ramp if processed.upper_xyz[a] < size_xyz[a] else 0)
    weights_map = blend.feather_weights(out_box.size_xyz[::-1], ramps_lower, ramps_upper)
    refined = crop[inner]
    if options.ensemble_start:  # the whole-volume pass is members 0..start-1 of the mean
        computed = options.self_ensemble - options.ensemble_start
        refined = (result_units[out_box.slices_kji] * options.ensemble_start
                   + refined * computed) / options.self_ensemble
    blend.blend_into(result_units, refined, weights_map, out_box.slices_kji)


def annotate(output: sitk.Image, region: RegionPlan, plan: ScalePlan, model: str,
             image: sitk.Image) -> RoiReport:
    """Step 3: the run's RoiReport, also written into `output`'s "medsr_roi_*" metadata."""
    lesion_box, processed = region.lesion_box, region.processed
    regions = tuple(
        {"index_xyz": (r.lesion_box.lower_xyz, r.lesion_box.upper_xyz),
         "bounds_lps_mm": r.lesion_box.bounds_lps(image),
         "processed_index_xyz": (r.processed.lower_xyz, r.processed.upper_xyz),
         "confidence": None if r.confidence is None else round(float(r.confidence), 6)}
        for r in region.regions)
    report = RoiReport(
        source=region.source,
        roi_index_xyz=(lesion_box.lower_xyz, lesion_box.upper_xyz) if lesion_box else None,
        roi_bounds_lps_mm=lesion_box.bounds_lps(image) if lesion_box else None,
        processed_index_xyz=(processed.lower_xyz, processed.upper_xyz) if processed else None,
        margin_voxels_xyz=region.margins_xyz, score=region.score, fallback=lesion_box is None,
        roi_model=region.roi_model, model=model, scale_factors_xyz=plan.factors_xyz,
        message=region.message.replace("the fast model", f"the fast model {model!r}"),
        slice_scores=tuple(round(s, 6) for s in region.slice_scores), regions=regions,
        finder=region.finder, roi_self_ensemble=region.roi_self_ensemble,
        roi_precision=region.roi_precision or "")
    output.SetMetaData(ROI_MODEL_KEY, region.roi_model)
    output.SetMetaData(ROI_ENSEMBLE_KEY, str(region.roi_self_ensemble))
    output.SetMetaData(ROI_INDEX_KEY, " ".join(str(v) for v in (*lesion_box.lower_xyz,
                                                               *lesion_box.upper_xyz))
                       if lesion_box else "none")
    output.SetMetaData(ROI_BOUNDS_KEY, " ".join(f"{v:.4f}" for corner in report.roi_bounds_lps_mm
                                                for v in corner) if lesion_box else "none")
    output.SetMetaData(ROI_SCORE_KEY, "none" if region.score is None else f"{region.score:.6f}")
    output.SetMetaData(ROI_FALLBACK_KEY, "1" if report.fallback else "0")
    output.SetMetaData(ROI_ALL_INDEX_KEY, "; ".join(
        " ".join(str(v) for v in (*r.lesion_box.lower_xyz, *r.lesion_box.upper_xyz))
        for r in region.regions) or "none")
    output.SetMetaData(ROI_CONFIDENCE_KEY, " ".join(
        "none" if r.confidence is None else f"{r.confidence:.4f}" for r in region.regions) or "none")
    output.SetMetaData(ROI_REPORT_KEY, json.dumps(asdict(report)))
    return report
