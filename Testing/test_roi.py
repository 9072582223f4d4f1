"""Lesion-focused SR (issue 7, item 3): ROI sources, detector evaluation helpers, the feathered
blend (identity where the models agree, no seam on real data), errors, fallback and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSRLib import api, cli
from MedSRLib.roi import blend, focus as roi, roi_models
from MedSRLib.models import registry as zoo
from MedSRLib.errors import InputError, WeightsError

from conftest import make_volume


def upscale_with_report(image, roi_argument, **options):
    """`api.upscale` in lesion-focused mode, and the RoiReport it left in the output."""
    output = api.upscale(image, roi=roi_argument, **options)
    return output, roi.RoiReport.from_image(output)

SARCOMA_PATIENT = "STS_012"  # a suggested hold-out patient: never used to tune anything
#: Crop of STS_012's CT (x, y, z index ranges) around its tumour, small enough for quick runs.
SARCOMA_CROP = (slice(30, 130), slice(30, 125), slice(14, 40))


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float64)


@pytest.fixture(scope="module")
def sarcoma(shared_data) -> tuple[sitk.Image, sitk.Image]:
    """(CT crop, tumour mask crop) of a real sarcoma patient; image and mask share a grid."""
    folder = shared_data / "sarcoma" / SARCOMA_PATIENT
    image = sitk.ReadImage(str(folder / "CT_image.nii.gz"))
    mask = sitk.ReadImage(str(folder / "CT_mask.nii.gz"))
    return image[SARCOMA_CROP], mask[SARCOMA_CROP]


def mask_like(image: sitk.Image, box_kji: tuple[slice, slice, slice]) -> sitk.Image:
    values = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    values[box_kji] = 1
    mask = sitk.GetImageFromArray(values)
    mask.CopyInformation(image)
    return mask


# ---------------------------------------------------------------------------------------------
# The ROI box and its sources


def test_roi_from_known_mask_is_its_exact_bounding_box_in_xyz_order():
    image = make_volume(shape_kji=(6, 20, 24))
    mask = mask_like(image, (slice(2, 4), slice(5, 9), slice(10, 17)))  # z, y, x
    box = roi.roi_from_mask(mask, image)
    assert box.lower_xyz == (10, 5, 2) and box.upper_xyz == (17, 9, 4)
    assert box.size_xyz == (7, 4, 2)
    values = sitk.GetArrayViewFromImage(mask)
    assert values[box.slices_kji].sum() == values.sum()


def test_roi_margin_grows_each_side_and_clips_at_the_volume_border():
    image = make_volume(shape_kji=(6, 20, 24))
    mask = mask_like(image, (slice(0, 2), slice(5, 9), slice(20, 23)))
    box = roi.roi_from_mask(mask, image, margin_xyz=(3, 2, 1))
    assert box.lower_xyz == (17, 3, 0)      # z clipped at 0
    assert box.upper_xyz == (24, 11, 3)     # x clipped at the size 24


def test_roi_from_real_tumour_mask_matches_numpy(sarcoma):
    image, mask = sarcoma
    box = roi.roi_from_mask(mask, image)
    z, y, x = np.nonzero(sitk.GetArrayViewFromImage(mask))
    assert box.lower_xyz == (x.min(), y.min(), z.min())
    assert box.upper_xyz == (x.max() + 1, y.max() + 1, z.max() + 1)


def test_margin_in_mm_becomes_whole_voxels_per_axis():
    assert roi.margin_voxels(5.0, (0.98, 0.98, 3.27)) == (6, 6, 2)
    assert roi.margin_voxels(2.0, (1.0, 1.0, 1.0)) == (2, 2, 2)
    assert roi.margin_voxels(0.0, (1.0, 1.0, 1.0)) == (0, 0, 0)
    with pytest.raises(InputError, match="margin"):
        roi.margin_voxels(-1.0, (1.0, 1.0, 1.0))


def test_box_text_and_tuples_parse_to_the_same_roi():
    assert roi.parse_box("1, 2,3,4,5,6") == roi.RoiBox((1, 2, 3), (4, 5, 6))
    assert roi.resolve_roi_argument((1, 2, 3, 4, 5, 6)) == ("box", roi.RoiBox((1, 2, 3), (4, 5, 6)))
    assert roi.resolve_roi_argument(((1, 2, 3), (4, 5, 6)))[1] == roi.RoiBox((1, 2, 3), (4, 5, 6))
    assert roi.resolve_roi_argument(" AUTO ") == ("auto", None)


def test_roi_bounds_are_the_voxel_boundary_corners_in_lps():
    image = make_volume(shape_kji=(6, 20, 24), spacing=(0.8, 0.9, 3.0), origin=(-10.0, 20.0, 5.5))
    low, high = roi.RoiBox((2, 3, 1), (5, 7, 2)).bounds_lps(image)
    assert np.allclose(low, (-10.0 + 1.5 * 0.8, 20.0 + 2.5 * 0.9, 5.5 + 0.5 * 3.0))
    assert np.allclose(high, (-10.0 + 4.5 * 0.8, 20.0 + 6.5 * 0.9, 5.5 + 1.5 * 3.0))


# ---------------------------------------------------------------------------------------------
# Detector evaluation helpers


def test_per_slice_boxes_of_a_mask_and_their_aggregation_with_margin():
    mask = np.zeros((5, 10, 12), np.uint8)   # (z, y, x)
    mask[1, 2:4, 3:6] = 1
    mask[3, 5:8, 1:4] = 2                    # any nonzero label is lesion
    boxes = roi.slice_boxes_from_mask(mask, slice_axis_xyz=2)
    assert boxes == [roi.SliceBox(1, (3, 2), (6, 4)), roi.SliceBox(3, (1, 5), (4, 8))]
    box = roi.aggregate_slice_boxes(boxes, 2, (12, 10, 5))
    assert box == roi.RoiBox((1, 2, 1), (6, 8, 4))
    grown = roi.aggregate_slice_boxes(boxes, 2, (12, 10, 5), margin_xyz=(2, 3, 2))
    assert grown == roi.RoiBox((0, 0, 0), (8, 10, 5))
    assert roi.aggregate_slice_boxes([], 2, (12, 10, 5)) is None
    # The same ROI whichever axis the slices go along.
    for axis in (0, 1):
        along = roi.slice_boxes_from_mask(mask, slice_axis_xyz=axis)
        assert roi.aggregate_slice_boxes(along, axis, (12, 10, 5)) == box
    # Along x, the in-plane axes are (y, z): slice x=3 holds y 2..3 (z=1) and y 5..7 (z=3).
    along_x = {b.slice_index: b for b in roi.slice_boxes_from_mask(mask, slice_axis_xyz=0)}
    assert along_x[3] == roi.SliceBox(3, (2, 1), (8, 4))


def test_coverage_counts_perfect_and_acceptable_slices_as_the_paper():
    mask = np.zeros((4, 10, 30), bool)
    mask[0, 0:2, 0:10] = True     # 20 voxels, fully inside x < 10      -> 100 %
    mask[1, 0:2, 0:10] = True     # 20 voxels + 1 outside (x = 10)      -> 20/21 = 95.2 %
    mask[1, 0, 10] = True
    mask[2, 0:2, 5:15] = True     # 20 voxels, half inside              -> 50 %
    box = roi.RoiBox((0, 0, 0), (10, 10, 4))
    coverage = roi.lesion_coverage(mask, box)
    assert coverage.lesion_slices == 3               # slice 3 holds no lesion
    assert coverage.slice_fractions == pytest.approx((1.0, 20 / 21, 0.5))
    assert (coverage.perfect, coverage.acceptable) == (1, 2)
    assert coverage.perfect_share == pytest.approx(1 / 3)
    assert coverage.acceptable_share == pytest.approx(2 / 3)
    assert coverage.voxel_fraction == pytest.approx(50 / 61)
    # A boolean ROI array (e.g. per-slice predictions) works the same; no ROI covers nothing.
    inside = np.zeros_like(mask)
    inside[box.slices_kji] = True
    assert roi.lesion_coverage(mask, inside) == coverage
    assert roi.lesion_coverage(mask, None).perfect == 0
    # Exactly 95 % is acceptable.
    edge = np.zeros((1, 1, 20), bool)
    edge[0, 0, :] = True
    assert roi.lesion_coverage(edge, roi.RoiBox((0, 0, 0), (19, 1, 1))).acceptable == 1


def test_aggregated_mask_boxes_cover_the_real_tumour_perfectly(sarcoma):
    _, mask = sarcoma
    values = sitk.GetArrayFromImage(mask)
    box = roi.aggregate_slice_boxes(roi.slice_boxes_from_mask(values, 2), 2, mask.GetSize())
    coverage = roi.lesion_coverage(values, box)
    assert coverage.perfect == coverage.lesion_slices > 10
    shrunk = roi.RoiBox(box.lower_xyz, (box.upper_xyz[0] - 3, *box.upper_xyz[1:]))
    assert roi.lesion_coverage(values, shrunk).perfect < coverage.lesion_slices


# ---------------------------------------------------------------------------------------------
# The feathered blend


def test_feather_weights_are_zero_to_one_ramps_inside_the_box_and_flat_on_open_faces():
    profile = blend.ramp_profile(12, 4, 0)
    assert np.all(np.diff(profile[:5]) > 0) and np.all(profile[4:] == 1.0)
    assert 0 < profile[0] < 0.25
    weights = blend.feather_weights((3, 10, 12), (0, 3, 4), (0, 3, 0))
    assert weights.shape == (3, 10, 12) and weights.max() == 1.0 and weights.min() > 0
    assert np.all(weights[:, 3:7, 4:] == 1.0)       # core
    # Steepest step of a raised cosine over r voxels: below pi / (2 (r + 1)) per voxel.
    assert np.abs(np.diff(weights, axis=2)).max() <= math.pi / (2 * 5) + 1e-6


@pytest.mark.parametrize("models, scale", [(("bicubic", "bicubic"), 2),
                                           (("linear", "linear"), (1, 1, 3)),
                                           (("srcnn", "srcnn"), 2)])
def test_blend_is_the_identity_where_both_models_agree(models, scale):
    """Same model inside and outside: the output equals the whole-volume run, so the ROI crop's
    context covers the model's receptive field (srcnn: a learned 9-5-5 network, random weights
    from the same seed in both runs, fp32)."""
    image = make_volume(shape_kji=(8, 40, 44), dtype=np.int16)
    run = dict(scale=scale, output_float=True, allow_untrained=True, precision="fp32")
    torch.manual_seed(0)
    whole = api.upscale(image, model=models[1], **run)
    torch.manual_seed(0)
    result, report = upscale_with_report(image, (14, 14, 2, 26, 24, 5), roi_model=models[0],
                                          model=models[1], roi_margin_mm=1.0, **run)
    assert not report.fallback and report.processed_index_xyz != report.roi_index_xyz
    np.testing.assert_allclose(array(result), array(whole), atol=1e-4, rtol=0)
    # Output on the same grid as the whole-volume run.
    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(result, getter)() == pytest.approx(getattr(whole, getter)(), abs=1e-9)


def _gradient_profiles(volume: np.ndarray, core: roi.RoiBox, processed: roi.RoiBox, axis_xyz: int,
                       side: str) -> np.ndarray:
    """Mean |forward difference| along `axis_xyz` over the core's face, one value per position
    from one voxel outside `processed` to the core's face (the ramp and the steps onto it)."""
    array_axis = 2 - axis_xyz
    if side == "lower":
        first, stop = processed.lower_xyz[axis_xyz] - 1, core.lower_xyz[axis_xyz]
    else:
        first, stop = core.upper_xyz[axis_xyz] - 1, processed.upper_xyz[axis_xyz]
    values = []
    for k in range(first, stop):
        after, before = list(core.slices_kji), list(core.slices_kji)
        after[array_axis], before[array_axis] = k + 1, k
        values.append(np.abs(volume[tuple(after)] - volume[tuple(before)]).mean())
    return np.asarray(values)


def _seam_ratios(blended, roi_run, fast_run, report, shape_kji):
    """Per blended face: (band-mean ratio, worst per-position ratio) of the output's gradient
    to the larger of the two models' gradients on the same voxels."""
    factors = report.scale_factors_xyz
    core = roi.RoiBox(*report.roi_index_xyz).scaled(factors)
    processed = roi.RoiBox(*report.processed_index_xyz).scaled(factors)
    ratios = {}
    for axis in range(3):
        for side in ("lower", "upper"):
            on_border = (processed.lower_xyz[axis] == 0 if side == "lower" else
                         processed.upper_xyz[axis] == shape_kji[2 - axis])
            if on_border:
                continue  # no fast-model region beyond this face: nothing to blend
            g_out, g_roi, g_fast = (_gradient_profiles(v, core, processed, axis, side)
                                    for v in (blended, roi_run, fast_run))
            ratios["xyz"[axis] + side] = (g_out.mean() / max(g_roi.mean(), g_fast.mean()),
                                          (g_out / np.maximum(g_roi, g_fast)).max())
    return ratios


def test_feathered_blend_shows_no_seam_on_real_ct(sarcoma):
    """No seam, measured on a real sarcoma CT with its tumour mask as the ROI, Lanczos inside
    and nearest neighbour outside (x2 in-plane).

    Band: for each face of the processed box (ROI + margin) with fast-model output beyond it,
    the output voxels from one voxel outside the processed box up to the ROI's face, over the
    ROI's extent on the other two axes. g_X(k) = mean |X[k+1] - X[k]| (forward difference along
    the face normal) over the face, at band position k. X is the blended output O, the
    whole-volume run of the ROI model A (the region inside) and of the fast model B (the region
    outside). No seam: mean_k g_O <= max(mean_k g_A, mean_k g_B) on every face, and at every
    position g_O(k) <= 1.02 max(g_A(k), g_B(k)).

    The regions' gradients are taken on the same voxels rather than on the ROI's core and the
    outside: the tumour's edge lies in the band, so even a plain whole-volume run has a larger
    band gradient than the tumour's (smooth) core or the surroundings there.
    """
    image, mask = sarcoma
    blended, report = upscale_with_report(image, mask, roi_model="lanczos", model="nearest",
                                           output_float=True)
    roi_run = array(api.upscale(image, model="lanczos", output_float=True))
    fast_run = array(api.upscale(image, model="nearest", output_float=True))
    out = array(blended)
    ratios = _seam_ratios(out, roi_run, fast_run, report, out.shape)
    assert len(ratios) >= 4, ratios
    for face, (band_ratio, worst_ratio) in ratios.items():
        assert band_ratio <= 1.0 and worst_ratio <= 1.02, (face, ratios)
    # The ROI itself is the lesion model's and the volume beyond the margin the fast model's.
    core = roi.RoiBox(*report.roi_index_xyz).scaled(report.scale_factors_xyz).slices_kji
    np.testing.assert_allclose(out[core], roi_run[core], atol=1e-3)
    outside = np.ones(out.shape, bool)
    outside[roi.RoiBox(*report.processed_index_xyz).scaled(report.scale_factors_xyz).slices_kji] = False
    np.testing.assert_array_equal(out[outside], fast_run[outside])


def test_seam_measure_catches_a_hard_paste(sarcoma):
    """The measure has teeth: pasting the ROI model's output into the processed box without
    feathering (bicubic inside, linear outside) breaks the per-position bound; feathering
    the same two models keeps it."""
    image, mask = sarcoma
    roi_run = array(api.upscale(image, model="bicubic", output_float=True))
    fast_run = array(api.upscale(image, model="linear", output_float=True))
    blended, report = upscale_with_report(image, mask, roi_model="bicubic", model="linear",
                                           output_float=True)
    hard = fast_run.copy()
    box = roi.RoiBox(*report.processed_index_xyz).scaled(report.scale_factors_xyz).slices_kji
    hard[box] = roi_run[box]
    hard_ratios = _seam_ratios(hard, roi_run, fast_run, report, hard.shape)
    assert max(worst for _, worst in hard_ratios.values()) > 1.05, hard_ratios
    soft_ratios = _seam_ratios(array(blended), roi_run, fast_run, report, hard.shape)
    assert max(worst for _, worst in soft_ratios.values()) <= 1.02, soft_ratios


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("box, message", [
    ((0, 0, 0, 30, 10, 3), "outside the volume along x"),
    ((-1, 0, 0, 5, 5, 3), "outside the volume along x"),
    ((2, 2, 5, 8, 8, 9), "outside the volume along z"),
    ((5, 2, 1, 3, 8, 4), "inverted along x"),
    ((2, 2, 3, 8, 8, 3), "empty or inverted along z"),
])
def test_bad_boxes_are_clear_input_errors(box, message):
    image = make_volume(shape_kji=(6, 20, 24))
    with pytest.raises(InputError, match=message):
        api.upscale(image, model="bicubic", roi=box, roi_model="bicubic")


def test_empty_mask_and_mask_on_another_grid_are_clear_input_errors():
    image = make_volume(shape_kji=(6, 20, 24))
    empty = mask_like(image, (slice(0, 0),) * 3)
    with pytest.raises(InputError, match="empty"):
        api.upscale(image, model="bicubic", roi=empty, roi_model="bicubic")
    moved = mask_like(image, (slice(1, 3),) * 3)
    moved.SetOrigin((image.GetOrigin()[0] + 0.4, *image.GetOrigin()[1:]))
    with pytest.raises(InputError, match="another grid: origin"):
        api.upscale(image, model="bicubic", roi=moved, roi_model="bicubic")
    smaller = mask_like(make_volume(shape_kji=(6, 20, 20)), (slice(1, 3),) * 3)
    with pytest.raises(InputError, match="another grid: size"):
        api.upscale(image, model="bicubic", roi=smaller, roi_model="bicubic")
    finer = mask_like(image, (slice(1, 3),) * 3)
    finer.SetSpacing((0.5, 0.9, 3.0))
    with pytest.raises(InputError, match="another grid: spacing"):
        roi.roi_from_mask(finer, image)


def test_float32_rounded_nifti_geometry_still_counts_as_the_same_grid():
    image = make_volume(shape_kji=(6, 20, 24), origin=(-147.46098327636, -110.3516, -838.62))
    mask = mask_like(image, (slice(1, 3),) * 3)
    mask.SetOrigin(tuple(float(np.float32(o)) for o in image.GetOrigin()))
    assert roi.roi_from_mask(mask, image).lower_xyz == (1, 1, 1)


def test_auto_roi_without_detector_weights_is_a_clear_input_error(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)          # no detector ships here
    image = make_volume()
    with pytest.raises(InputError, match="no trained lesion detector ships; pass a box or a mask"):
        api.upscale(image, model="bicubic", roi="auto", roi_model="bicubic")
    with pytest.raises(InputError, match="no trained lesion detector ships"):
        roi.detect_lesion(image)


def test_without_shipped_roi_weights_the_run_keeps_its_own_model_inside_the_roi(tmp_path,
                                                                              monkeypatch):
    """The measured ROI default needs its weights: without them the run's own model stays in the
    ROI (or, with no fallback, a clear error naming roi_model); untrained runs may use it."""
    image = make_volume()
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)          # nothing ships here
    table_default = roi_models.default_roi_choice("CT", 2)
    assert table_default is not None
    assert roi.choose_roi_model(None, 2, False, "CT", fallback="bicubic") == "bicubic"
    assert roi.choose_roi_model(None, 2, True, "CT") == table_default.model
    with pytest.raises(InputError, match="roi_model"):
        roi.choose_roi_model(None, 2, False, "CT")
    result = api.upscale(image, model="bicubic", roi=(0, 0, 0, 4, 4, 2), modality="CT")
    assert roi.RoiReport.from_image(result).roi_model == "bicubic"
    assert result.GetSize() == tuple(2 * n if a < 2 else n for a, n in enumerate(image.GetSize()))
    with pytest.raises(InputError, match="only used with roi"):
        api.upscale(image, model="bicubic", roi_model="bicubic")


# ---------------------------------------------------------------------------------------------
# The detector path, with hand-set weights (none ship yet)


def _fixed_detector(path: Path, box_cxcywh, score_logit: float) -> Path:
    """Detector weights whose output is the same box and score on every slice."""
    network = zoo.build_network("lesion_detector")
    with torch.no_grad():
        network.head.weight.zero_()
        logits = [math.log(v / (1 - v)) for v in box_cxcywh]
        network.head.bias.copy_(torch.tensor([*logits, score_logit]))
    spec = zoo.get_spec("lesion_detector")
    zoo.save_weights(network, path, {"model": spec.name, "scales": [1],
                                     "config": spec.default_config, "score_threshold": 0.5})
    return path


def test_detected_roi_is_the_aggregated_slice_boxes(tmp_path):
    image = make_volume(shape_kji=(6, 20, 24))  # x 24, y 20: box x 6..18, y 5..15
    weights = _fixed_detector(tmp_path / "lesion_detector.safetensors", (0.5, 0.5, 0.5, 0.5), 5.0)
    detection = roi.detect_lesion_roi(image, weights_path=weights, margin_mm=0.0)
    assert detection.slice_axis_xyz == 2 and detection.roi == roi.RoiBox((6, 5, 0), (18, 15, 6))
    assert detection.score == pytest.approx(1 / (1 + math.exp(-5.0)), rel=1e-4)
    lower, upper = roi.detect_lesion(image, weights_path=weights, margin_mm=1.0)
    assert lower == (4, 3, 0) and upper == (20, 17, 6)     # 2, 2, 1 voxels of margin, clipped
    result, report = upscale_with_report(image, "auto", roi_model="lanczos", model="bicubic",
                                          detector_weights=weights, roi_margin_mm=0.0)
    assert report.source == "auto" and report.roi_index_xyz == ((6, 5, 0), (18, 15, 6))
    assert float(result.GetMetaData(roi.ROI_SCORE_KEY)) == pytest.approx(detection.score, rel=1e-4)
    assert result.GetMetaData(roi.ROI_FALLBACK_KEY) == "0"


def test_narrow_detector_loads_its_widths_from_the_card_and_resizes_slices(tmp_path):
    """A detector trained with other widths and on 16x16 whole slices: the card's config builds
    the network, inference resamples each slice to 16x16, and the kept per-slice boxes come back."""
    config = {"in_channels": 1, "stem_features": 4, "features": [4, 8]}
    network = zoo.build_network("lesion_detector", **config)
    with torch.no_grad():
        network.head.weight.zero_()
        network.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0]))  # box 0.5 wide, centred
    path = tmp_path / "lesion_detector.safetensors"
    zoo.save_weights(network, path, {"model": "lesion_detector", "scales": [1], "config": config,
                                     "training_config": {"data": {"whole_slice_size": 16}}})
    seen = []
    original_forward = type(network).forward

    def spy(self, x):
        seen.append(tuple(x.shape[-2:]))
        return original_forward(self, x)

    image = make_volume(shape_kji=(3, 20, 24))
    try:
        type(network).forward = spy
        detection = roi.detect_lesion_roi(image, weights_path=path, margin_mm=0.0)
    finally:
        type(network).forward = original_forward
    assert seen and set(seen) == {(16, 16)}
    assert detection.roi == roi.RoiBox((6, 5, 0), (18, 15, 3))
    assert [b.slice_index for b in detection.slice_boxes] == [0, 1, 2]
    assert detection.slice_boxes[0].lower_ab == (6, 5) and detection.slice_boxes[0].upper_ab == (18, 15)
    wrong = {**config, "features": [4, 16]}
    zoo.save_weights(network, path, {"model": "lesion_detector", "scales": [1], "config": wrong})
    with pytest.raises(WeightsError, match="do not match"):
        roi.load_detector(path)


def test_resized_mask_keeps_a_one_pixel_lesion_and_its_normalised_box():
    from MedSRLib.models.networks.lesion_detector import resize_slices
    from MedSRLib.training.data import BoxFromMaskd
    mask = torch.zeros(1, 1, 40, 60)
    mask[0, 0, 10, 33] = 1
    small = resize_slices(mask, 8, mask=True)
    assert small.shape == (1, 1, 8, 8) and int(small.sum()) == 1
    big_box = BoxFromMaskd()({"mask": mask[0]})["box"]
    small_box = BoxFromMaskd()({"mask": small[0]})["box"]
    assert torch.all((small_box[:2] - big_box[:2]).abs() <= 0.5 / 8)   # centre within one output pixel
    image = torch.rand(2, 1, 40, 60)
    assert resize_slices(image, 8).shape == (2, 1, 8, 8) and resize_slices(image, None) is image


def test_shipped_detector_finds_the_held_out_sarcoma_and_auto_mode_uses_it(shared_data):
    """Real data, the shipped detector: on the whole held-out STS_012 CT (never trained on) the
    detected 3-D ROI covers the tumour (benchmarks/results/detector: 100 % of its slices)."""
    if zoo.shipped_weights(zoo.get_spec("lesion_detector"), 1) is None:
        pytest.skip("no lesion detector ships")
    folder = shared_data / "sarcoma" / SARCOMA_PATIENT
    image = sitk.ReadImage(str(folder / "CT_image.nii.gz"))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "CT_mask.nii.gz")))
    detection = roi.detect_lesion_roi(image)
    assert detection.roi is not None and detection.score >= detection.threshold
    coverage = roi.lesion_coverage(mask, detection.roi)
    assert coverage.voxel_fraction >= 0.95 and coverage.acceptable_share >= 0.9
    size = np.prod(image.GetSize())
    assert np.prod(np.subtract(detection.roi.upper_xyz, detection.roi.lower_xyz)) < 0.5 * size


def test_no_lesion_volume_falls_back_to_the_fast_model_and_says_so(tmp_path, capsys):
    image = make_volume(shape_kji=(6, 20, 24))
    weights = _fixed_detector(tmp_path / "lesion_detector.safetensors", (0.5, 0.5, 0.5, 0.5), -8.0)
    whole = api.upscale(image, model="bicubic", output_float=True)
    result, report = upscale_with_report(image, "auto", roi_model="lanczos", model="bicubic",
                                          detector_weights=weights, output_float=True)
    assert report.fallback and report.roi_index_xyz is None and "no lesion" in report.message
    assert report.score < 0.5
    np.testing.assert_array_equal(array(result), array(whole))
    assert result.GetMetaData(roi.ROI_FALLBACK_KEY) == "1"
    assert result.GetMetaData(roi.ROI_INDEX_KEY) == "none"
    with pytest.raises(InputError, match="found no lesion"):
        roi.detect_lesion(image, weights_path=weights)


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def input_volume(tmp_path) -> Path:
    path = tmp_path / "input.mha"
    sitk.WriteImage(make_volume(shape_kji=(6, 20, 24)), str(path))
    return path


def test_cli_box_roi_writes_output_and_json_report(tmp_path, input_volume, capsys):
    out, report_path = tmp_path / "out.nrrd", tmp_path / "out_roi.json"
    code, _, err = run_cli(["upscale", input_volume, out, "--model", "nearest", "--roi",
                            "2,3,1,10,12,4", "--roi-model", "lanczos", "--roi-margin", "2",
                            "--roi-json", report_path, "--quiet"], capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["roi_index_xyz"] == [[2, 3, 1], [10, 12, 4]] and report["fallback"] is False
    assert report["roi_model"] == "lanczos" and report["model"] == "nearest"
    written = sitk.ReadImage(str(out))
    assert written.GetMetaData(roi.ROI_INDEX_KEY) == "2 3 1 10 12 4"
    assert written.GetSize() == (48, 40, 6)
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]


def test_cli_mask_file_roi(tmp_path, input_volume, capsys):
    image = sitk.ReadImage(str(input_volume))
    mask_path = tmp_path / "mask.nrrd"
    sitk.WriteImage(mask_like(image, (slice(1, 3), slice(4, 8), slice(5, 9))), str(mask_path))
    out = tmp_path / "out.nrrd"
    code, _, err = run_cli(["upscale", input_volume, out, "--model", "bicubic", "--roi",
                            mask_path, "--roi-model", "lanczos", "--quiet"], capsys)
    assert code == 0, err
    assert sitk.ReadImage(str(out)).GetMetaData(roi.ROI_INDEX_KEY) == "5 4 1 9 8 3"


@pytest.mark.parametrize("roi_arg, message", [
    ("0,0,0,99,5,2", "outside the volume"),
    ("6,2,1,3,8,4", "inverted"),
    ("auto", "no trained lesion detector ships"),
    ("no_such_mask.nii.gz", "neither auto, a box"),
    ("EMPTY", "empty"),
    ("OTHER_GRID", "another grid"),
])
def test_cli_bad_roi_exits_2_and_writes_nothing(tmp_path, input_volume, capsys, roi_arg, message,
                                                monkeypatch):
    image = sitk.ReadImage(str(input_volume))
    if roi_arg == "auto":
        monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "no_weights")
    if roi_arg == "EMPTY":
        roi_arg = tmp_path / "empty.nrrd"
        sitk.WriteImage(mask_like(image, (slice(0, 0),) * 3), str(roi_arg))
    elif roi_arg == "OTHER_GRID":
        roi_arg = tmp_path / "other.nrrd"
        sitk.WriteImage(mask_like(make_volume(shape_kji=(6, 20, 20)), (slice(1, 3),) * 3),
                        str(roi_arg))
    out, report_path = tmp_path / "out.nrrd", tmp_path / "roi.json"
    code, _, err = run_cli(["upscale", input_volume, out, "--model", "bicubic", "--roi", roi_arg,
                            "--roi-model", "bicubic", "--roi-json", report_path, "--quiet"], capsys)
    assert code == 2 and message in err, err
    assert not out.exists() and not report_path.exists()


def test_cli_roi_options_need_roi(tmp_path, input_volume, capsys):
    code, _, err = run_cli(["upscale", input_volume, tmp_path / "o.nrrd", "--model", "bicubic",
                            "--roi-model", "lanczos", "--quiet"], capsys)
    assert code == 2 and "--roi-model needs --roi" in err


def test_cli_no_lesion_fallback_says_so_on_stderr(tmp_path, input_volume, capsys, monkeypatch):
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "weights")
    _fixed_detector(tmp_path / "weights" / "lesion_detector.safetensors", (0.5, 0.5, 0.5, 0.5), -8.0)
    out, report_path = tmp_path / "out.nrrd", tmp_path / "roi.json"
    code, _, err = run_cli(["upscale", input_volume, out, "--model", "bicubic", "--roi", "auto",
                            "--roi-model", "lanczos", "--roi-json", report_path, "--quiet"], capsys)
    assert code == 0, err
    assert "no lesion found" in err and "ran everywhere" in err
    assert json.loads(report_path.read_text(encoding="utf-8"))["fallback"] is True
    assert sitk.ReadImage(str(out)).GetMetaData(roi.ROI_FALLBACK_KEY) == "1"


def test_cli_roi_self_ensemble_reaches_the_roi_model_and_needs_roi(tmp_path, capsys):
    source = tmp_path / "in.nrrd"
    sitk.WriteImage(make_volume(), str(source))
    out = tmp_path / "out.nrrd"
    code, _, err = run_cli(["upscale", source, out, "--model", "srcnn", "--scale", "2",
                        "--roi", "2,2,0,10,10,2", "--roi-model", "srcnn",
                        "--roi-self-ensemble", "4"], capsys)
    assert code == 0, err
    written = sitk.ReadImage(str(out))
    assert written.GetMetaData(roi.ROI_ENSEMBLE_KEY) == "4"
    assert written.GetMetaData(roi.ROI_MODEL_KEY) == "srcnn"
    code, _, err = run_cli(["upscale", source, tmp_path / "b.nrrd", "--roi-self-ensemble", "2"],
                       capsys)
    assert code == 2 and "--roi-self-ensemble needs --roi" in err
