"""Quality inside lesion masks: the protocol behind the ROI-model choice (`roi.roi_models`) and
the lesion-focused benchmark (`benchmarks/lesion_focus.py`).

Protocol: a high-resolution volume is degraded in-plane (x, y) by the factor (anti-aliased
bicubic per axial slice, `training.localiser_calibration.low_resolution`, cropped to a multiple
of the factor); PSNR and SSIM are computed over the lesion mask's voxels only, in the HR
volume's units, with the HR volume's 0.5-99.5 percentile span as data range. SSIM: MONAI's
Gaussian 11x11 map of each axial slice, averaged over the mask's voxels. The lesion mask: a
sarcoma *_mask's nonzero voxels; BraTS OTMultiClass labels 1, 3, 4 (tumour core) for T1c and
1-4 (whole tumour) for FLAIR (`training.localiser.lesion_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics.regression import compute_ssim_and_cs

from ..metrics import SSIM_WINDOW
from ..training.localiser import extra_cases, lesion_mask
from ..training.localiser_calibration import low_resolution

#: BraTS OTMultiClass labels that make the lesion, per sequence (file name prefix).
BRATS_LESION_LABELS = {"T1c": (1, 3, 4), "Flair": (1, 2, 3, 4)}


@dataclass(frozen=True)
class LesionVolume:
    """An image and its lesion mask (paths relative to the data root, or absolute), the
    modality that picks the models, and the mask labels that make the lesion (None: nonzero)."""

    image: str
    mask: str
    modality: str
    labels: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return self.image.removesuffix(".nii.gz")


def _sarcoma(patient: str, sequence: str, modality: str) -> LesionVolume:
    return LesionVolume(f"sarcoma/{patient}/{sequence}_image.nii.gz",
                        f"sarcoma/{patient}/{sequence}_mask.nii.gz", modality)


def _brats(patient: str, sequence: str) -> LesionVolume:
    folder = f"brats/brats_2013_{patient}_1"
    return LesionVolume(f"{folder}/{sequence}_subtrMeanDivStd.nii.gz", f"{folder}/OTMultiClass.nii.gz",
                        "MR", BRATS_LESION_LABELS[sequence])


#: Validation lesion patients (ROI-model choice): sarcoma STS_008, STS_010; BraTS pat0005.
VALIDATION_VOLUMES = tuple(
    [_sarcoma(p, "CT", "CT") for p in ("STS_008", "STS_010")]
    + [_sarcoma(p, "MR_T1", "MR") for p in ("STS_008", "STS_010")]
    + [_brats("pat0005", "T1c"), _brats("pat0005", "Flair")])
#: Test lesion patients (the benchmark; never used for a choice): STS_012, STS_014; pat0006.
TEST_VOLUMES = tuple(
    [_sarcoma(p, "CT", "CT") for p in ("STS_012", "STS_014")]
    + [_sarcoma(p, "MR_T1", "MR") for p in ("STS_012", "STS_014")]
    + [_brats("pat0006", "T1c"), _brats("pat0006", "Flair")])


def extra_volumes(folder: Path | None = None) -> list[LesionVolume]:
    """The extra public lesion volumes of the finder's TEST patients
    (`training.localiser.extra_cases("test")`: patients never calibrated or selected on;
    `folder`: their root, default `extra_root()`); empty when the folder is absent."""
    return [LesionVolume(c.image, c.mask, c.modality, c.labels)
            for c in extra_cases("test", root=folder)]


def read_lesion_volume(root: Path, volume: LesionVolume) -> tuple[sitk.Image, np.ndarray]:
    """(HR image as float32, lesion mask (K, J, I) bool). ValueError when the mask is on another
    grid (size)."""
    image = sitk.Cast(sitk.ReadImage(str(root / volume.image)), sitk.sitkFloat32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(root / volume.mask)))
    if labels.shape != sitk.GetArrayViewFromImage(image).shape:
        raise ValueError(f"{volume.mask}: mask grid {labels.shape} differs from the image's")
    return image, lesion_mask(labels, volume.labels)


@dataclass
class DegradedCase:
    """One volume at one factor: the LR input, the HR truth (K, J, I) float32 cropped like it,
    the lesion mask on the HR grid, on the LR grid (an LR voxel whose block holds any lesion
    voxel) and the PSNR data range (HR 0.5-99.5 percentile span)."""

    lr: sitk.Image
    truth: np.ndarray
    mask: np.ndarray
    mask_lr: np.ndarray
    value_range: float


def degraded_case(hr: sitk.Image, mask_kji: np.ndarray, factor: int) -> DegradedCase:
    """The protocol's LR input of `hr` at in-plane `factor`, with its truth and masks."""
    size = [n // factor * factor if a < 2 else n for a, n in enumerate(hr.GetSize())]
    cropped = hr[:size[0], :size[1], :]
    mask = np.ascontiguousarray(mask_kji[:, :size[1], :size[0]])
    truth = sitk.GetArrayFromImage(cropped).astype(np.float32)
    k, j, i = mask.shape
    mask_lr = mask.reshape(k, j // factor, factor, i // factor, factor).any(axis=(2, 4))
    value_range = float(np.percentile(truth, 99.5) - np.percentile(truth, 0.5))
    return DegradedCase(low_resolution(cropped, factor), truth, mask, mask_lr, value_range)


def inside_scores(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray,
                  value_range: float) -> tuple[float, float]:
    """(PSNR dB, SSIM) of `estimate` against `truth` (both (K, J, I), the same units) over the
    voxels of `mask`; SSIM maps per axial slice (zero-padded borders excluded: a window centred
    within 5 px of the slice edge is not scored)."""
    estimate = np.asarray(estimate, dtype=np.float64)
    mse = float(np.mean((estimate[mask] - truth[mask]) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(value_range ** 2 / mse)
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    half = SSIM_WINDOW // 2
    total, count = 0.0, 0
    for start in range(0, len(slices), 16):
        chosen = slices[start:start + 16]
        x = torch.from_numpy(estimate[chosen].astype(np.float32))[:, None]
        y = torch.from_numpy(truth[chosen].astype(np.float32))[:, None]
        ssim_map, _ = compute_ssim_and_cs(x, y, spatial_dims=2, kernel_size=(SSIM_WINDOW,) * 2,
                                          kernel_sigma=(1.5, 1.5), data_range=value_range)
        inner = mask[chosen][:, half:mask.shape[1] - half, half:mask.shape[2] - half]
        values = ssim_map[:, 0].numpy()[inner]
        total += float(values.sum())
        count += values.size
    return psnr, (total / count if count else float("nan"))


def _roi_array(report, shape_kji: Sequence[int], factor: int, processed: bool) -> np.ndarray:
    """Union of a RoiReport's boxes (lesion boxes, or with `processed` the boxes plus margin) on
    the HR grid (K, J, I) of an in-plane `factor` run."""
    inside = np.zeros(tuple(shape_kji), dtype=bool)
    for region in report.regions:
        lower, upper = region["processed_index_xyz" if processed else "index_xyz"]
        inside[lower[2]:upper[2], lower[1] * factor:upper[1] * factor,
               lower[0] * factor:upper[0] * factor] = True
    return inside


def benchmark_case(volume: LesionVolume, factor: int, hr: sitk.Image, mask_kji: np.ndarray,
                   rounds: int = 2) -> dict:
    """One test volume at one factor: the lesion finder's coverage (Zhu et al.'s perfect and
    acceptable lesion slices, `roi.focus.lesion_coverage`, of the region the ROI model refines:
    the lesion boxes grown by the margin; ROI share of the volume; the bare boxes' figures
    too), the PSNR and
    SSIM gains over bicubic inside the lesion mask of the plain default run and of
    `upscale(roi="auto")`, and the wall time of the latter over the former (median of `rounds`
    interleaved pairs after a warm-up pair, same process)."""
    import time

    from .. import api
    from ..roi import focus

    case = degraded_case(hr, mask_kji, factor)
    run = dict(scale=factor, modality=volume.modality, output_float=True)

    def timed(**kwargs) -> tuple[sitk.Image, float]:
        start = time.perf_counter()
        out = api.upscale(case.lr, **run, **kwargs)
        return out, time.perf_counter() - start

    scores = {"bicubic": inside_scores(sitk.GetArrayFromImage(api.upscale(case.lr, model="bicubic",
                                                                          **run)),
                                       case.truth, case.mask, case.value_range)}
    plain, _ = timed()
    focused, _ = timed(roi="auto")
    focus.detect_lesions(case.lr)
    times: dict[str, list[float]] = {"plain": [], "roi": [], "finder": []}
    for _ in range(rounds):
        times["plain"].append(timed()[1])
        times["roi"].append(timed(roi="auto")[1])
        start = time.perf_counter()
        focus.detect_lesions(case.lr)
        times["finder"].append(time.perf_counter() - start)
    scores["plain"] = inside_scores(sitk.GetArrayFromImage(plain), case.truth, case.mask,
                                    case.value_range)
    scores["roi"] = inside_scores(sitk.GetArrayFromImage(focused), case.truth, case.mask,
                                  case.value_range)
    report = focus.RoiReport.from_image(focused)
    # coverage of the region the ROI model refines (lesion boxes grown by the margin), as the
    # finder's own benchmark scores it; the bare lesion boxes' figures are kept beside it
    processed = _roi_array(report, case.mask.shape, factor, True)
    lesion_boxes = _roi_array(report, case.mask.shape, factor, False)
    coverage = focus.lesion_coverage(case.mask, processed)
    box_coverage = focus.lesion_coverage(case.mask, lesion_boxes)
    bicubic_psnr, bicubic_ssim = scores["bicubic"]
    return {
        "volume": volume.name, "modality": volume.modality, "factor": factor,
        "lesion_slices": int(coverage.lesion_slices), "perfect": int(coverage.perfect),
        "acceptable": int(coverage.acceptable), "voxel_coverage": float(coverage.voxel_fraction),
        "box_perfect": int(box_coverage.perfect), "box_acceptable": int(box_coverage.acceptable),
        "rois": len(report.regions), "roi_share": float(processed.mean()),
        "box_share": float(lesion_boxes.mean()),
        "roi_model": report.roi_model, "roi_self_ensemble": report.roi_self_ensemble,
        "model": report.model,
        "bicubic": {"psnr": bicubic_psnr, "ssim": bicubic_ssim},
        "plain_gain_db": scores["plain"][0] - bicubic_psnr,
        "roi_gain_db": scores["roi"][0] - bicubic_psnr,
        "plain_ssim_gain": scores["plain"][1] - bicubic_ssim,
        "roi_ssim_gain": scores["roi"][1] - bicubic_ssim,
        "plain_seconds": times["plain"], "roi_seconds": times["roi"],
        "finder_seconds": times["finder"],
        "time_ratio": float(np.median(times["roi"]) / np.median(times["plain"])),
        # the run without its lesion finder (roi - finder) over the plain run: the ROI model's share
        "time_ratio_without_finder": float(
            (np.median(times["roi"]) - np.median(times["finder"])) / np.median(times["plain"])),
    }


def markdown_table(rows: Sequence[dict]) -> list[str]:
    """The benchmark's rows as a Markdown table, then the mean per (modality, factor)."""
    lines = ["| volume | x | lesion slices perfect / acceptable / all (lesion boxes alone) | "
             "ROIs | ROI share (lesion boxes alone) | plain gain dB (SSIM) | roi auto gain dB "
             "(SSIM) | roi - plain dB | time roi/plain (without finder) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['volume']} | {r['factor']} | {r['perfect']} / {r['acceptable']} / "
            f"{r['lesion_slices']} ({r['box_perfect']} / {r['box_acceptable']}) | {r['rois']} | "
            f"{r['roi_share']:.2f} ({r['box_share']:.2f}) "
            f"| {r['plain_gain_db']:+.2f} ({r['plain_ssim_gain']:+.4f}) | {r['roi_gain_db']:+.2f} "
            f"({r['roi_ssim_gain']:+.4f}) | {r['roi_gain_db'] - r['plain_gain_db']:+.3f} | "
            f"{r['time_ratio']:.2f} ({r['time_ratio_without_finder']:.2f}) |")
    lines += ["", "| modality | x | volumes | plain gain dB | roi auto gain dB | roi - plain dB | "
                  "SSIM roi - plain | time roi/plain, mean (without finder) |",
              "|---|---|---|---|---|---|---|---|"]
    for modality, factor in sorted({(r["modality"], r["factor"]) for r in rows}):
        chosen = [r for r in rows if (r["modality"], r["factor"]) == (modality, factor)]
        plain = float(np.mean([r["plain_gain_db"] for r in chosen]))
        roi = float(np.mean([r["roi_gain_db"] for r in chosen]))
        ssim = float(np.mean([r["roi_ssim_gain"] - r["plain_ssim_gain"] for r in chosen]))
        ratio = float(np.mean([r["time_ratio"] for r in chosen]))
        bare = float(np.mean([r["time_ratio_without_finder"] for r in chosen]))
        lines.append(f"| {modality} | {factor} | {len(chosen)} | {plain:+.2f} | {roi:+.2f} | "
                     f"{roi - plain:+.3f} | {ssim:+.4f} | {ratio:.2f} ({bare:.2f}) |")
    return lines
