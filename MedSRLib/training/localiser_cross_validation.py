"""Calibration of the lesion localiser's ROI setting by cross-validation over patients and
over whole sources, on ROI coverage (the protocol of Ren et al., lesion-focused SR: an axial
lesion slice is perfect when all its lesion voxels lie in the ROIs, acceptable at >= 95 %).

Only non-test patients take part. The probability map of each (volume, input factor) is
computed once with the shipped ensemble and cached (`--cache`, keyed by the weights' bytes);
the lesion is read by the recipe's mask convention (`localiser.lesion_mask`). A setting is
(threshold, smallest component mm^3, box padding in-plane mm, box padding along z mm); the
ROI margin is the user's (`focus.DEFAULT_MARGIN_MM`), not a card setting.

Scoring works on the low-resolution grid: the ROIs are boxes of that grid scaled by the input
factor, so each axial slice's covered lesion is the sum, over the cells inside the ROIs, of the
high-resolution lesion voxels per cell (exactly `localiser_calibration.score_settings`).

Selection (`select`): among the settings whose mean ROI share of the recipe's single volumes
stays within `MAX_MEAN_ROI_SHARE` at every input factor, the fewest volumes whose lesion no ROI
touches (or whose composite tumours share an ROI), then the best worst leave-one-source-out
fold, then the best mean over folds, then the smaller smallest component (recall first). A
fold's score is its worse input factor's acceptable + perfect lesion-slice shares plus the
share of its lesions an ROI touches. The validation patients select: the recipe's, and those of
an extra source (`localiser.EXTRA_LESIONS`) whose other patients trained the network; an extra
source it never trained on is a held-out fold only; the training patients (whose maps are
over-confident) are scored for information.
The nested estimate (`nested`) holds each fold (a source, or a patient) out in turn, selects on
the volumes sharing no patient with it and scores the held-out fold: how the rule does on an
unseen source or patient.

    python -m MedSRLib.training.localiser_cross_validation --data-root ../shared/data \\
        --cache /tmp/loc_maps --out benchmarks/results/localiser \\
        --card MedSRLib/models/weights/lesion_segmenter.json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..models import registry as zoo
from ..roi import boxes as roi_boxes, focus as roi, localiser as loc
from .lesion_composites import Composite
from .localiser import EXTRA_LESIONS, Case, cases, composite_cases, extra_cases
from . import localiser_calibration as calib

#: The recipe's decision: ROI share may grow to this (mean of the single volumes, each factor)
#: where that buys coverage.
MAX_MEAN_ROI_SHARE = 0.25
ACCEPTABLE = roi.ACCEPTABLE_COVERAGE
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)
MIN_COMPONENTS_MM3 = (0.0, 100.0, 250.0, 500.0, 1000.0, 2000.0)
PADDINGS_MM = (0.0, 2.5, 5.0, 7.5, 10.0)
Z_PADDINGS_MM = (0.0, 2.5, 5.0, 10.0)

Setting = tuple[float, float, float, float]   # threshold, min component mm3, pad xy mm, pad z mm


def source_label(case: Case) -> str:
    """Fold name of a recipe source: family and image kind, e.g. "sarcoma CT_image",
    "brats T1c", or an extra source's name ("lidc-voi")."""
    family = case.source.split("/")[0] if case.source else case.image.split("/")[0]
    kind = Path(case.source or case.image).name.split(".")[0].replace("_subtrMeanDivStd", "")
    return family if kind == "image" else f"{family} {kind}"


@dataclass
class Entry:
    """One (volume, input factor) of the calibration: its LR probability map and, per LR cell,
    the count of HR lesion voxels (in-plane factor x factor block); the LR cells of each HR lesion
    component (26-connected, >= `calib.MIN_LESION_MM3`)."""

    name: str
    factor: int
    source: str
    patients: tuple[str, ...]
    composite: bool
    crop: bool                       # a tight crop around its lesion: ROI share not constrained
    probability_kji: np.ndarray
    lesion_counts_kji: np.ndarray
    spacing_xyz: tuple[float, float, float]
    component_cells: list[np.ndarray]
    part_cells: list[np.ndarray] = field(default_factory=list)   # a composite's parts' lesions
    extra: bool = False              # held out: an extra source (localiser.EXTRA_LESIONS) the
    #                                  network never trained on; scored, never selecting
    _regions: dict[float, list[roi_boxes.LesionRegion]] = field(default_factory=dict, repr=False)

    def regions(self, threshold: float) -> list[roi_boxes.LesionRegion]:
        """Every component of the map at `threshold` (no size limit), cached."""
        if threshold not in self._regions:
            self._regions[threshold] = roi_boxes.regions_from_probability(
                self.probability_kji, threshold, self.spacing_xyz)
        return self._regions[threshold]


@dataclass(frozen=True)
class Score:
    """Coverage of one entry with one setting (counts of axial lesion slices)."""

    name: str
    factor: int
    lesion_slices: int
    perfect: int
    acceptable: int
    roi_share: float
    rois: int
    lesion_components: int
    missed_components: int
    voxel_coverage: float
    dice: float
    separated: bool = True           # a composite's parts' lesions each in ROIs of their own


def lesion_counts(hr_mask_kji: np.ndarray, factor: int) -> np.ndarray:
    """(K, J/f, I/f) int32: HR lesion voxels in each LR cell (in-plane f x f blocks; the mask's
    J and I must be multiples of f)."""
    k, j, i = hr_mask_kji.shape
    if j % factor or i % factor:
        raise ValueError(f"mask shape {hr_mask_kji.shape} is not a multiple of factor {factor}")
    blocks = hr_mask_kji.reshape(k, j // factor, factor, i // factor, factor)
    return blocks.sum(axis=(2, 4), dtype=np.int32)


def component_cells(hr_mask_kji: np.ndarray, factor: int, hr_voxel_mm3: float) -> list[np.ndarray]:
    """Flat LR-cell indices of each HR lesion component (`calib._lesion_components`)."""
    labels = calib._lesion_components(hr_mask_kji, hr_voxel_mm3)
    k, j, i = np.nonzero(labels)
    if not len(k):
        return []
    lr_shape = (labels.shape[0], labels.shape[1] // factor, labels.shape[2] // factor)
    flat = np.ravel_multi_index((k, j // factor, i // factor), lr_shape)
    label = labels[k, j, i]
    return [np.unique(flat[label == n]) for n in range(1, int(labels.max()) + 1)]


def padding_voxels(pad_xy_mm: float, pad_z_mm: float, spacing_xyz: Sequence[float]
                   ) -> tuple[int, int, int]:
    """Whole voxels of box padding per axis: `pad_xy_mm` in x and y, `pad_z_mm` along z (each as
    `boxes.margin_voxels`: at least one voxel when > 0)."""
    in_plane = roi_boxes.margin_voxels(pad_xy_mm, spacing_xyz)
    along_z = roi_boxes.margin_voxels(pad_z_mm, spacing_xyz)
    return in_plane[0], in_plane[1], along_z[2]


def score(entry: Entry, setting: Setting, margin_mm: float = roi.DEFAULT_MARGIN_MM) -> Score:
    """Coverage of `entry`'s lesion by the ROIs of `setting` (as `find_regions` then
    `focus` build them: components >= the smallest volume, boxes padded, merged when their
    margins touch, grown by the margin), computed on the LR grid."""
    threshold, min_mm3, pad_xy, pad_z = setting
    size_xyz = entry.probability_kji.shape[::-1]
    voxel_mm3 = float(np.prod(entry.spacing_xyz))
    padding = padding_voxels(pad_xy, pad_z, entry.spacing_xyz)
    regions = [roi_boxes.LesionRegion(r.box.grown(padding, size_xyz), r.confidence, r.voxels)
               for r in entry.regions(threshold) if r.voxels * voxel_mm3 >= min_mm3]
    margins = roi_boxes.margin_voxels(margin_mm, entry.spacing_xyz)
    regions = roi_boxes.merge_overlapping(regions, margins, size_xyz)
    inside = roi_boxes.union_mask([r.box.grown(margins, size_xyz) for r in regions],
                                  entry.probability_kji.shape)
    counts = entry.lesion_counts_kji
    totals = counts.sum(axis=(1, 2))
    covered = np.where(inside, counts, 0).sum(axis=(1, 2))
    lesion = totals > 0
    fractions = covered[lesion] / totals[lesion]
    missed = sum(not inside.flat[cells].any() for cells in entry.component_cells)
    separated = True
    if len(entry.part_cells) > 1:
        owners = [cells_touched(entry.part_cells, r.box.grown(margins, size_xyz),
                                entry.probability_kji.shape) for r in regions]
        separated = all(len(o) <= 1 for o in owners) and \
            len(set().union(*owners)) == len(entry.part_cells)
    binary = entry.probability_kji >= threshold
    overlap = int(counts[binary].sum())
    total = int(np.count_nonzero(binary)) * entry.factor ** 2 + int(totals.sum())
    return Score(entry.name, entry.factor, int(lesion.sum()), int((fractions >= 1.0).sum()),
                 int((fractions >= ACCEPTABLE).sum()), round(float(inside.mean()), 4), len(regions),
                 len(entry.component_cells), int(missed),
                 float(covered.sum() / max(totals.sum(), 1)),
                 round(2 * overlap / total, 4) if total else 1.0, separated)


def cells_touched(groups: Sequence[np.ndarray], box: roi_boxes.RoiBox,
                  shape_kji: Sequence[int]) -> set[int]:
    """Indices of the groups of flat cell indices (grid `shape_kji`) that `box` touches."""
    shape = tuple(shape_kji)
    touched = set()
    for n, cells in enumerate(groups):
        k, j, i = np.unravel_index(cells, shape)
        (x0, y0, z0), (x1, y1, z1) = box.lower_xyz, box.upper_xyz
        if np.any((i >= x0) & (i < x1) & (j >= y0) & (j < y1) & (k >= z0) & (k < z1)):
            touched.add(n)
    return touched


def pooled(scores: Sequence[Score]) -> dict[str, float]:
    """Pooled lesion-slice shares, mean ROI share, lesions and volumes missed."""
    slices = sum(s.lesion_slices for s in scores) or 1
    components = sum(s.lesion_components for s in scores)
    return {"lesion_slices": int(sum(s.lesion_slices for s in scores)),
            "perfect": sum(s.perfect for s in scores) / slices,
            "acceptable": sum(s.acceptable for s in scores) / slices,
            "mean_roi_share": float(np.mean([s.roi_share for s in scores])),
            "max_roi_share": float(np.max([s.roi_share for s in scores])),
            "lesion_components": int(components),
            "missed_components": int(sum(s.missed_components for s in scores)),
            "volumes_entirely_missed": int(sum(s.voxel_coverage == 0 for s in scores)),
            "lesions_sharing_an_roi": int(sum(not s.separated for s in scores))}


def fold_score(scores: Sequence[Score]) -> float:
    """The worse input factor's acceptable + perfect lesion-slice shares, plus the share of
    lesions (components) an ROI touches: the higher, the better (at most 3)."""
    factors = sorted({s.factor for s in scores})
    per_factor = [pooled([s for s in scores if s.factor == f]) for f in factors]
    whole = pooled(scores)
    found = 1.0 - whole["missed_components"] / max(whole["lesion_components"], 1)
    return min(p["acceptable"] + p["perfect"] for p in per_factor) + found


def admissible(scores: Sequence[Score], single: Callable[[str], bool],
               max_mean_share: float = MAX_MEAN_ROI_SHARE) -> bool:
    """Mean ROI share of the single volumes (`single(name)`) within `max_mean_share` at every
    factor."""
    for factor in sorted({s.factor for s in scores}):
        shares = [s.roi_share for s in scores if s.factor == factor and single(s.name)]
        if shares and float(np.mean(shares)) > max_mean_share:
            return False
    return True


def failures(scores: Sequence[Score]) -> int:
    """Volumes whose lesion the ROIs miss entirely, and multi-lesion volumes whose lesions do
    not each get an ROI of their own."""
    return sum(s.voxel_coverage == 0 or not s.separated for s in scores)


def select(table: dict[Setting, list[Score]], folds: dict[str, set[str]],
           single: Callable[[str], bool], max_mean_share: float = MAX_MEAN_ROI_SHARE
           ) -> tuple[Setting, dict[str, Any]]:
    """Among the admissible settings (mean ROI share), the one with the fewest `failures`
    (lesions missed entirely, composites' lesions sharing an ROI), then whose worst fold
    (`folds`: name -> volume names) scores best (`fold_score`), then the best mean over folds,
    then (recall first) the smaller smallest component kept, then the smaller mean ROI share,
    the higher threshold and the less padding. No admissible setting: the smallest mean ROI share. Returns the setting and
    its per-fold figures."""
    def fold_scores(setting: Setting) -> dict[str, float]:
        return {name: fold_score([s for s in table[setting] if s.name in volumes])
                for name, volumes in folds.items()
                if any(s.name in volumes for s in table[setting])}

    allowed = [k for k in table if admissible(table[k], single, max_mean_share)]
    if not allowed:
        best = min(table, key=lambda k: pooled(table[k])["mean_roi_share"])
    else:
        def key(k: Setting) -> tuple:
            per_fold = fold_scores(k)
            return (-failures(table[k]), round(min(per_fold.values()), 6),
                    round(float(np.mean(list(per_fold.values()))), 6),
                    -k[1], -pooled(table[k])["mean_roi_share"], k[0], -k[2], -k[3])
        best = max(allowed, key=key)
    return best, {"admissible_settings": len(allowed), "fold_scores": fold_scores(best)}


def nested(table: dict[Setting, list[Score]], folds: dict[str, set[str]],
           patients_of: dict[str, set[str]], single: Callable[[str], bool],
           max_mean_share: float = MAX_MEAN_ROI_SHARE,
           selection_folds: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """Hold each fold out in turn: select (`select`, over `selection_folds`, default `folds`)
    on the volumes sharing no patient with it, then score the held-out fold at each factor
    with that setting."""
    out = {}
    selection_folds = folds if selection_folds is None else selection_folds
    for held, volumes in folds.items():
        held_patients = set().union(*(patients_of[v] for v in volumes))
        rest = {name: {v for v in vs if v not in volumes and not patients_of[v] & held_patients}
                for name, vs in selection_folds.items()}
        rest = {name: vs for name, vs in rest.items() if vs}
        if not rest:
            out[held] = {"setting": None, "note": "no fold shares no patient with it"}
            continue
        kept = set().union(*rest.values()) if rest else set()
        sub_table = {k: [s for s in rows if s.name in kept] for k, rows in table.items()}
        setting, _ = select(sub_table, rest, single, max_mean_share)
        rows = [s for s in table[setting] if s.name in volumes]
        out[held] = {"setting": list(setting), "score": round(fold_score(rows), 4),
                     **{f"x{f}": rounded(pooled([s for s in rows if s.factor == f]))
                        for f in sorted({s.factor for s in rows})}}
    return out


def rounded(row: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


# ---------------------------------------------------------------------------------------------
# Probability maps, cached per (volume, factor, weights)


def weights_digest(weights_path: Path) -> str:
    """sha256 (first 16 hex) over the localiser's weights file and its ensemble members."""
    _, card = loc.load_localiser(weights_path)
    digest = hashlib.sha256()
    for path in [weights_path, *loc.ensemble_member_paths(weights_path, card)]:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def cached_probability(cache: Path | None, key: str, compute: Callable[[], np.ndarray]
                       ) -> np.ndarray:
    """The map stored under `key` in `cache` (npz), else `compute()` stored there."""
    if cache is None:
        return compute()
    path = cache / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")
    if path.is_file():
        return np.load(path)["probability"]
    probability = compute()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, probability=probability.astype(np.float32), key=key)
    return probability


def entries_of(root: Path, selected: Iterable[Case | Composite], factors: Sequence[int],
               localiser: loc.Localiser, digest: str, cache: Path | None) -> list[Entry]:
    """Entry of every case x factor (input degraded as `localiser_calibration.evaluate_cases`).
    An extra source is held out (`Entry.extra`) unless the network trained on patients of it."""
    trained_extra = {source_label(c) for c in extra_cases("train")}
    out = []
    for case in selected:
        name, image, mask = calib.read_hr(root, case)
        part_masks: list[np.ndarray] = []
        if isinstance(case, Composite):
            parts = calib.composite_parts(case)
            source, patients = source_label(parts[0]), tuple(c.patient for c in parts)
            part_masks = calib.read_composite_lesions(root, case)[1]
        else:
            source, patients = source_label(case), (case.patient,)
        extra = source.split(" ")[0] in EXTRA_LESIONS["sources"] and source not in trained_extra
        for factor in factors:
            size = [n // factor * factor if a < 2 else n for a, n in enumerate(image.GetSize())]
            lr_image = calib.low_resolution(image[:size[0], :size[1], :], factor)
            hr_mask = mask[:, :size[1], :size[0]]
            spacing = tuple(float(s) for s in lr_image.GetSpacing())

            def compute(lr_image: sitk.Image = lr_image) -> np.ndarray:
                voxels = sitk.GetArrayFromImage(lr_image)
                return localiser.probability(loc.units_of(voxels), lr_image.GetSpacing(),
                                             **calib.map_options(calib.FIND_MAP))

            started = time.process_time()
            probability = cached_probability(
                cache, f"{name}|x{factor}|{digest}|{calib.FIND_MAP}", compute)
            print(f"{name} x{factor}: map {time.process_time() - started:.1f} CPU s", flush=True)
            out.append(Entry(name, factor, source, patients, isinstance(case, Composite),
                             bool(getattr(case, "crop", False)), probability, lesion_counts(hr_mask, factor), spacing,
                             component_cells(hr_mask, factor, float(np.prod(spacing)) / factor ** 2),
                             [np.flatnonzero(lesion_counts(m[:, :size[1], :size[0]], factor))
                              for m in part_masks], extra))
    return out


def grid(thresholds: Sequence[float] = THRESHOLDS, mins: Sequence[float] = MIN_COMPONENTS_MM3,
         paddings: Sequence[float] = PADDINGS_MM, z_paddings: Sequence[float] | None = Z_PADDINGS_MM
         ) -> list[Setting]:
    """Every setting; `z_paddings` None: the padding along z equals the in-plane one (what the
    finder's single `padding_mm` does)."""
    if z_paddings is None:
        return [(t, m, p, p) for t, m, p in itertools.product(thresholds, mins, paddings)]
    return list(itertools.product(thresholds, mins, paddings, z_paddings))


def isotropic(setting: Setting) -> bool:
    """The finder's card holds one padding (`padding_mm`): in-plane and z paddings equal."""
    return setting[2] == setting[3]


def folds_of(entries: Sequence[Entry]) -> dict[str, dict[str, set[str]]]:
    """Leave-one-source-out folds (source -> volume names, composites with their source) and
    leave-one-patient-out folds (patient -> single volumes; composites form their own fold)."""
    by_source: dict[str, set[str]] = {}
    by_patient: dict[str, set[str]] = {}
    for e in entries:
        by_source.setdefault(e.source, set()).add(e.name)
        key = "composites" if e.composite else e.patients[0]
        by_patient.setdefault(key, set()).add(e.name)
    return {"source": by_source, "patient": by_patient}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--weights", type=Path, default=None, help="default: the shipped localiser")
    parser.add_argument("--cache", type=Path, default=None, help="folder of cached maps")
    parser.add_argument("--subsets", nargs="+", default=["validation"],
                        help="patient subsets whose folds select (never 'test')")
    parser.add_argument("--report-subsets", nargs="*", default=[],
                        help="subsets scored with the chosen setting for information only")
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", type=Path, default=None, help="folder for cross_validation.json")
    parser.add_argument("--card", type=Path, default=None,
                        help="write the chosen setting into this card's calibration block")
    parser.add_argument("--maps-only", action="store_true", help="only fill the map cache")
    parser.add_argument("--no-extra", dest="extra", action="store_false",
                        help="without the extra lesion volumes (localiser.EXTRA_LESIONS)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if "test" in args.subsets + args.report_subsets:
        parser.error("test patients never take part in the calibration")
    torch.set_num_threads(args.threads)
    cpu_start = time.process_time()
    weights = args.weights or zoo.shipped_weights(zoo.get_spec(loc.LOCALISER_NAME), 1)
    localiser = loc.load_ensemble(weights)
    digest = weights_digest(Path(weights))
    root = args.data_root.resolve()

    def subset_entries(subset: str) -> list[Entry]:
        chosen = [*(c for c in cases(subset) if c.mask), *composite_cases(subset),
                  *(extra_cases(subset) if args.extra and subset == "validation" else [])]
        return entries_of(root, chosen, args.factors, localiser, digest, args.cache)

    entries = [e for subset in args.subsets for e in subset_entries(subset)]
    report = {subset: subset_entries(subset) for subset in args.report_subsets}
    maps_cpu = time.process_time() - cpu_start
    if args.maps_only:
        print(f"maps: {maps_cpu:.0f} CPU s")
        return 0
    result = cross_validate(entries, report)
    result.update({"subsets": args.subsets, "factors": args.factors, "weights_digest": digest,
                   "cpu_seconds": round(time.process_time() - cpu_start, 1),
                   "cpu_seconds_maps": round(maps_cpu, 1),
                   "command": "python -m MedSRLib.training.localiser_cross_validation "
                              + " ".join(argv if argv is not None else __import__("sys").argv[1:])})
    print(json.dumps({k: result[k] for k in ("chosen", "chosen_any_padding", "cpu_seconds")}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cross_validation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (args.out / "cross_validation.md").write_text(markdown(result), encoding="utf-8")
    if args.card:
        write_calibration(args.card, result)
        print(f"wrote {args.card}")
    return 0


def cross_validate(entries: Sequence[Entry], report: dict[str, Sequence[Entry]] | None = None,
                   settings: Sequence[Setting] | None = None) -> dict[str, Any]:
    """Score every setting on every entry; select among the isotropic-padding settings (the
    finder's) by the worst leave-one-source-out fold of the selecting sources (an extra source
    the network never trained on is a held-out fold: scored, never selecting), and record the
    per-fold figures, the nested
    estimates (source and patient folds), each source's in-sample best (what per-source
    settings could at most gain) and the best setting with a separate z padding."""
    settings = list(settings or grid())
    table = {k: [score(e, k) for e in entries] for k in settings}
    single = {e.name for e in entries if not e.composite}
    selecting = {e.name for e in entries if not e.extra}
    constrained = {e.name for e in entries if not e.composite and not e.crop and not e.extra}
    patients_of = {e.name: set(e.patients) for e in entries}
    folds = folds_of(entries)
    selection_folds = folds_of([e for e in entries if not e.extra])["source"]
    iso = {k: v for k, v in table.items() if isotropic(k)}

    def only(tab: dict[Setting, list[Score]], names: set[str]) -> dict[Setting, list[Score]]:
        return {k: [s for s in rows if s.name in names] for k, rows in tab.items()}

    chosen, detail = select(only(iso, selecting), selection_folds, constrained.__contains__)
    any_padding, any_detail = select(only(table, selecting), selection_folds,
                                     constrained.__contains__)
    rows = table[chosen]

    def figures(rows: Sequence[Score], volumes: set[str]) -> dict[str, Any]:
        part = [s for s in rows if s.name in volumes]
        return {f"x{f}": rounded(pooled([s for s in part if s.factor == f]))
                for f in sorted({s.factor for s in part})}

    def best_alone(volumes: set[str]) -> dict[str, Any]:
        """The fold's best isotropic setting on its own volumes (in-sample, optimistic), with its
        own mean ROI share within the limit where it has whole volumes."""
        def own(k: Setting) -> list[Score]:
            return [s for s in iso[k] if s.name in volumes]
        allowed = [k for k in iso if admissible(own(k), constrained.__contains__)] or list(iso)
        k = max(allowed, key=lambda k: (-failures(own(k)), round(fold_score(own(k)), 6),
                                        -pooled(own(k))["mean_roi_share"]))
        return {"setting": list(k), "score": round(fold_score(own(k)), 4), **figures(own(k), volumes)}

    result: dict[str, Any] = {
        "chosen": list(chosen), "objective": OBJECTIVE,
        "selection_sources": sorted(selection_folds),
        "admissible_settings": detail["admissible_settings"], "settings_scored": len(settings),
        "folds": {kind: {name: {"volumes": sorted(v), "score": round(
            fold_score([s for s in rows if s.name in v]), 4), **figures(rows, v)}
            for name, v in folds[kind].items()} for kind in folds},
        "pooled": figures(rows, single & selecting),
        "pooled_share_constrained": figures(rows, constrained),
        "pooled_composites": figures(rows, selecting - single),
        "nested": {kind: nested(iso, folds[kind], patients_of, constrained.__contains__,
                                selection_folds=selection_folds) for kind in folds},
        "best_alone": {name: best_alone(v) for name, v in folds["source"].items()},
        "failures": failures([s for s in rows if s.name in selecting]),
        "chosen_any_padding": list(any_padding),
        "any_padding_fold_scores": {k: round(v, 4) for k, v in any_detail["fold_scores"].items()},
        "chosen_fold_scores": {k: round(v, 4) for k, v in detail["fold_scores"].items()},
        "volumes": [vars(s) for s in rows],
    }
    for subset, sub_entries in (report or {}).items():
        sub_rows = [score(e, chosen) for e in sub_entries]
        sub_folds = folds_of(sub_entries)["source"]
        result[f"report_{subset}"] = {
            "note": "scored with the chosen setting for information, not used for the choice",
            **{name: {"score": round(fold_score([s for s in sub_rows if s.name in v]), 4),
                      **figures(sub_rows, v)} for name, v in sub_folds.items()}}
    return result


OBJECTIVE = (f"cross-validation over the validation patients by source (leave one source out; "
             f"an extra source the network never trained on is a held-out fold only): among the settings whose "
             f"mean ROI share of the recipe's single volumes is <= {MAX_MEAN_ROI_SHARE:.0%} at x2 "
             f"and at x4, the fewest volumes whose lesion no ROI touches or whose composite "
             f"tumours share an ROI, then the best worst source fold (its worse input factor's "
             f"acceptable + perfect lesion-slice shares + share of lesions touched), then the best "
             f"mean over folds; ties: the smaller smallest component kept (recall), then the "
             f"smaller ROI share")


def markdown(result: dict[str, Any]) -> str:
    """The cross-validation as a Markdown page: the chosen setting, per-fold figures with it,
    the nested estimates and the information-only subsets."""
    def cells(fold: dict[str, Any]) -> str:
        return " | ".join(
            f"{fold[f]['acceptable']:.0%} / {fold[f]['perfect']:.0%} / {fold[f]['mean_roi_share']:.1%}"
            if f in fold else "-" for f in ("x2", "x4"))

    t, m, pxy, pz = result["chosen"]
    lines = ["# Lesion localiser calibration by cross-validation", "",
             f"Command: `{result['command']}`", "",
             f"Chosen: threshold {t}, smallest component {m} mm^3, box padding {pxy} mm "
             f"(margin {roi.DEFAULT_MARGIN_MM} mm, the user's default). "
             f"{result['settings_scored']} settings scored, {result['admissible_settings']} "
             f"admissible with one padding; {result['cpu_seconds']} CPU s "
             f"({result['cpu_seconds_maps']} for the probability maps), one torch thread.", "",
             f"Objective: {result['objective']}.", "",
             f"Selecting sources: {', '.join(result['selection_sources'])}. Volumes missed "
             f"entirely or composites whose tumours share an ROI, with the chosen setting: "
             f"{result['failures']}.", "",
             "Cells: acceptable / perfect lesion slices / mean ROI share, with the chosen setting.", ""]
    for kind in ("source", "patient"):
        lines += [f"## Folds by {kind}", "", "| fold | score | x2 | x4 |", "|---|---|---|---|"]
        for name, fold in result["folds"][kind].items():
            lines.append(f"| {name} | {fold['score']:.3f} | {cells(fold)} |")
        lines += ["", f"Nested (leave one {kind} out: the setting chosen on the other folds, "
                  "scored on the held-out one):", "",
                  "| held out | setting chosen without it | score | x2 | x4 |", "|---|---|---|---|---|"]
        for name, fold in result["nested"][kind].items():
            if fold.get("setting") is None:
                lines.append(f"| {name} | - ({fold['note']}) | - | - | - |")
                continue
            lines.append(f"| {name} | {'/'.join(f'{v:g}' for v in fold['setting'])} | "
                         f"{fold['score']:.3f} | {cells(fold)} |")
        lines.append("")
    lines += ["## Each source's own best setting (in-sample, optimistic)", "",
              "What per-source (per-modality) settings could at most gain: the best setting on "
              "that source's volumes alone (its own ROI share within the limit).", "",
              "| source | its best setting | score | x2 | x4 |", "|---|---|---|---|---|"]
    for name, fold in result["best_alone"].items():
        lines.append(f"| {name} | {'/'.join(f'{v:g}' for v in fold['setting'])} | "
                     f"{fold['score']:.3f} | {cells(fold)} |")
    lines.append("")
    lines += ["## Pooled (recipe volumes)", "", "| volumes | x2 | x4 |", "|---|---|---|",
              f"| single volumes | {cells(result['pooled'])} |",
              f"| composites | {cells(result['pooled_composites'])} |", ""]
    any_padding = result["chosen_any_padding"]
    lines += [f"With a separate padding along z (not a card setting today): "
              f"{'/'.join(f'{v:g}' for v in any_padding)} (threshold/min/xy/z), fold scores "
              f"{result['any_padding_fold_scores']} vs {result['chosen_fold_scores']}.", ""]
    for key in (k for k in result if k.startswith("report_")):
        lines += [f"## {key[7:]} patients (information only: {result[key]['note']})", "",
                  "| source | score | x2 | x4 |", "|---|---|---|---|"]
        for name, fold in result[key].items():
            if name != "note":
                lines.append(f"| {name} | {fold['score']:.3f} | {cells(fold)} |")
        lines.append("")
    return "\n".join(lines)


def compact(fold: dict[str, Any]) -> dict[str, Any]:
    """A fold's figures for the card: setting (nested) and score, and per factor the lesion
    slices, acceptable and perfect shares and mean ROI share."""
    keys = ("lesion_slices", "acceptable", "perfect", "mean_roi_share", "volumes_entirely_missed")
    out = {k: fold[k] for k in ("setting", "score", "note") if k in fold}
    out.update({f: {k: fold[f][k] for k in keys} for f in ("x2", "x4") if f in fold})
    return out


def write_calibration(card_path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Replace the `calibration` block of the card at `card_path` (JSON) with the chosen
    setting, its objective, per-fold figures and CPU seconds (the old grid and key go); the
    weights are not touched."""
    card = json.loads(card_path.read_text(encoding="utf-8"))
    threshold, min_mm3, pad_xy, _ = result["chosen"]
    card["calibration"] = {
        "threshold": threshold, "min_component_mm3": min_mm3, "padding_mm": pad_xy,
        "margin_mm": roi.DEFAULT_MARGIN_MM,
        "chosen_on": "cross-validation over the validation patients (x2 and x4 inputs, their "
                     "two-patient composites included), never the test patients",
        "objective": result["objective"],
        "selection_sources": result["selection_sources"],
        "lesion_masks": "MedSRLib.training.localiser.lesion_mask: BraTS T1c = tumour core "
                        "(labels 1, 3, 4), FLAIR = whole tumour (1-4), sarcoma and extra = "
                        "mask > 0",
        "folds": {kind: {name: compact(fold) for name, fold in folds.items()}
                  for kind, folds in result["folds"].items()},
        "nested": {kind: {name: compact(fold) for name, fold in folds.items()}
                   for kind, folds in result["nested"].items()},
        "validation": result["pooled"],
        "validation_composites": result["pooled_composites"],
        "separate_z_padding": {"best": result["chosen_any_padding"],
                               "fold_scores": result["any_padding_fold_scores"],
                               "note": "threshold / min mm^3 / pad x,y mm / pad z mm; the "
                                       "finder reads one padding_mm"},
        **({"training_patients": {k: compact(v) for k, v in result["report_train"].items()
                                  if k != "note"},
            "training_patients_note": "scored with the chosen setting, not used for the choice "
                                      "(their maps are over-confident)"}
           if "report_train" in result else {}),
        "cpu_seconds": result["cpu_seconds"],
        "command": result["command"],
    }
    card.pop("calibration_grid", None)
    card.pop("calibration_key", None)
    card["calibration"].pop("stale", None)
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return card


if __name__ == "__main__":
    raise SystemExit(main())
