"""The lesion localiser (issue 19): ROIs from a probability map, several ROIs through the
lesion-focused path, the patient split of its training, and the shipped segmenter on real
held-out lesions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_volume
from MedSRLib import api
from MedSRLib.roi import localiser as loc, focus as roi, boxes as roi_boxes
from MedSRLib.models import registry as zoo
from MedSRLib.errors import InputError, WeightsError
from MedSRLib.training import lesion_composites, localiser, localiser_calibration as calib


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float64)


def blob_map(shape_kji=(12, 40, 50)) -> np.ndarray:
    """Probability map with two lesions (peaks 0.9 and 0.7) and one small speck (0.95)."""
    probability = np.full(shape_kji, 0.02, np.float32)
    probability[2:6, 5:15, 4:12] = 0.9        # x 4..11, y 5..14, z 2..5
    probability[3, 9, 8] = 0.97               # its peak
    probability[7:11, 20:30, 30:45] = 0.7     # x 30..44, y 20..29, z 7..10
    probability[10, 35, 2] = 0.95             # a one-voxel speck
    return probability


# ---------------------------------------------------------------------------------------------
# ROIs from a probability map


def test_one_box_per_component_with_its_peak_as_confidence_most_confident_first():
    regions = roi_boxes.regions_from_probability(blob_map(), 0.5, (1.0, 1.0, 2.0))
    assert [r.box for r in regions] == [roi.RoiBox((4, 5, 2), (12, 15, 6)),
                                        roi.RoiBox((2, 35, 10), (3, 36, 11)),
                                        roi.RoiBox((30, 20, 7), (45, 30, 11))]
    assert [r.confidence for r in regions] == pytest.approx([0.97, 0.95, 0.7])
    assert regions[0].voxels == 4 * 10 * 8


def test_small_components_and_a_higher_threshold_drop_regions():
    probability = blob_map()
    kept = roi_boxes.regions_from_probability(probability, 0.5, (1.0, 1.0, 2.0), min_volume_mm3=3.0)
    assert [r.box.lower_xyz for r in kept] == [(4, 5, 2), (30, 20, 7)]   # the 2 mm^3 speck is gone
    assert len(roi_boxes.regions_from_probability(probability, 0.8, (1.0, 1.0, 2.0), 3.0)) == 1
    assert roi_boxes.regions_from_probability(np.zeros((3, 4, 5)), 0.5, (1, 1, 1)) == []
    with pytest.raises(InputError, match="threshold"):
        roi_boxes.regions_from_probability(probability, 0.0, (1, 1, 1))


def test_boxes_whose_margins_touch_merge_and_separate_ones_stay_apart():
    a = roi_boxes.LesionRegion(roi.RoiBox((0, 0, 0), (5, 5, 2)), 0.6, 50)
    b = roi_boxes.LesionRegion(roi.RoiBox((8, 0, 0), (12, 5, 2)), 0.9, 40)
    c = roi_boxes.LesionRegion(roi.RoiBox((30, 30, 5), (34, 34, 7)), 0.7, 30)
    apart = roi_boxes.merge_overlapping([a, b, c], (1, 1, 1), (40, 40, 10))
    assert [r.box for r in apart] == [b.box, c.box, a.box]               # 2 voxels of gap each side
    merged = roi_boxes.merge_overlapping([a, b, c], (2, 2, 1), (40, 40, 10))
    assert merged[0] == roi_boxes.LesionRegion(roi.RoiBox((0, 0, 0), (12, 5, 2)), 0.9, 90)
    assert merged[1].box == c.box and len(merged) == 2


# ---------------------------------------------------------------------------------------------
# Several ROIs through api.upscale


def test_roi_argument_names_a_finder_or_several_boxes():
    assert roi.resolve_roi_argument("auto") == ("auto", None)
    assert roi.resolve_roi_argument(" auto:lesion_detector ") == ("auto", "lesion_detector")
    with pytest.raises(InputError, match="unknown lesion finder 'nope'"):
        roi.resolve_roi_argument("auto:nope")
    boxes = ("boxes", (roi.RoiBox((1, 2, 0), (5, 6, 2)), roi.RoiBox((9, 9, 1), (12, 14, 3))))
    assert roi.resolve_roi_argument("1,2,0,5,6,2; 9,9,1,12,14,3") == boxes
    assert roi.resolve_roi_argument([(1, 2, 0, 5, 6, 2), roi.RoiBox((9, 9, 1), (12, 14, 3))]) == boxes
    assert roi.resolve_roi_argument([(1, 2, 0, 5, 6, 2)]) == ("box", boxes[1][0])


def test_two_boxes_are_both_refined_and_reported_and_nothing_else_changes():
    image = make_volume(shape_kji=(8, 40, 48), dtype=np.int16)
    boxes = [(4, 4, 1, 12, 12, 4), (30, 24, 3, 40, 34, 7)]
    run = dict(model="bicubic", roi_model="lanczos", roi_margin_mm=1.0, output_float=True)
    whole = array(api.upscale(image, model="bicubic", output_float=True))
    result = api.upscale(image, roi=boxes, **run)
    report = roi.RoiReport.from_image(result)
    assert report.source == "boxes" and len(report.regions) == 2 and not report.fallback
    assert [r["index_xyz"] for r in report.regions] == [((4, 4, 1), (12, 12, 4)),
                                                       ((30, 24, 3), (40, 34, 7))]
    assert report.roi_index_xyz == ((4, 4, 1), (12, 12, 4))
    assert result.GetMetaData(roi.ROI_ALL_INDEX_KEY) == "4 4 1 12 12 4; 30 24 3 40 34 7"
    assert result.GetMetaData(roi.ROI_CONFIDENCE_KEY) == "none none"
    out = array(result)
    untouched = np.ones(out.shape, bool)
    for region in report.regions:
        box = roi.RoiBox(*region["index_xyz"]).scaled(report.scale_factors_xyz)
        assert np.abs(out[box.slices_kji] - whole[box.slices_kji]).max() > 1.0   # lanczos ran here
        untouched[roi.RoiBox(*region["processed_index_xyz"]).scaled(
            report.scale_factors_xyz).slices_kji] = False
    np.testing.assert_array_equal(out[untouched], whole[untouched])
    with pytest.raises(InputError, match="ROI box 2 .* outside the volume"):
        api.upscale(image, roi=[boxes[0], (30, 24, 3, 60, 34, 7)], **run)


def test_cli_takes_several_boxes_and_a_named_finder(tmp_path, capsys):
    from MedSRLib import cli

    path = tmp_path / "input.mha"
    sitk.WriteImage(make_volume(shape_kji=(6, 20, 24)), str(path))
    out, report_path = tmp_path / "out.nrrd", tmp_path / "roi.json"
    code = cli.main(["upscale", str(path), str(out), "--model", "nearest", "--roi",
                     "2,3,1,8,9,3;14,11,2,22,18,5", "--roi-model", "lanczos",
                     "--roi-json", str(report_path)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "2 ROIs ((2, 3, 1), (8, 9, 3)), ((14, 11, 2), (22, 18, 5))" in err
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert [r["index_xyz"] for r in report["regions"]] == [[[2, 3, 1], [8, 9, 3]],
                                                          [[14, 11, 2], [22, 18, 5]]]
    assert sitk.ReadImage(str(out)).GetMetaData(roi.ROI_ALL_INDEX_KEY) == "2 3 1 8 9 3; 14 11 2 22 18 5"
    code = cli.main(["upscale", str(path), str(tmp_path / "o2.nrrd"), "--model", "nearest",
                     "--roi", "auto:nothing", "--roi-model", "lanczos"])
    assert code == 2 and "unknown lesion finder 'nothing'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Training data: three patient sets kept apart


def test_training_validation_and_test_patients_never_mix():
    by_subset = {name: {c.patient for c in localiser.cases(name)}
                 for name in ("train", "validation", "test")}
    assert not by_subset["train"] & by_subset["validation"]
    assert not (by_subset["train"] | by_subset["validation"]) & by_subset["test"]
    # the test patients are those of the old detector's README table, for the comparison
    assert by_subset["test"] == {"STS_012", "STS_014", "brats_2013_pat0006_1"}
    bad = {**localiser.RECIPE, "split": {"sarcoma": {"train": ["STS_001"], "test": ["STS_001"]}}}
    with pytest.raises(ValueError, match="STS_001 is in both"):
        localiser.cases(recipe=bad)


def window_offset(window: np.ndarray, plane: np.ndarray) -> tuple[int, int] | None:
    """(top, left) where `window` (C, c, c) sits in `plane` (C, h, w), or None."""
    c = window.shape[-1]
    for top in range(plane.shape[-2] - c + 1):
        for left in range(plane.shape[-1] - c + 1):
            if np.allclose(plane[:, top:top + c, left:left + c], window, atol=2e-3):
                return top, left
    return None


def test_degraded_training_mask_keeps_the_lesion_and_stacks_match_inference(shared_data):
    case = next(c for c in localiser.cases("train") if c.image.endswith("STS_002/CT_image.nii.gz"))
    voxels, mask, spacing = localiser.read_case(shared_data, case)
    low, low_mask = localiser.degrade_inplane(voxels, mask, 4)
    low_spacing = (spacing[0] * 4, spacing[1] * 4, spacing[2])
    assert low.shape == (voxels.shape[0], voxels.shape[1] // 4, voxels.shape[2] // 4)
    lesion_slices = np.flatnonzero(mask.any(axis=(1, 2)))
    assert np.array_equal(np.flatnonzero(low_mask.any(axis=(1, 2))), lesion_slices)
    crop = localiser.RECIPE["crop"]
    inputs, targets = localiser.stacks_of_case(low, low_mask, low_spacing, localiser.RECIPE,
                                               {"lesion": 4, "background": 2},
                                               np.random.default_rng(0))
    assert inputs.shape == (3 * 6, 3, crop, crop) and targets.shape == (3 * 6, crop, crop)
    assert targets[:4].any(axis=(1, 2)).all() and not targets[4:6].any()
    inputs, targets = localiser.stacks_of_case(low, low_mask, low_spacing, localiser.RECIPE,
                                               {"lesion": 1000, "background": 0},
                                               np.random.default_rng(0))
    assert len(inputs) == sum(low_mask.any(axis=tuple(a for a in range(3) if a != axis)).sum()
                              for axis in range(3))                     # every lesion slice
    # the first stack is a window of the first lesion slice along x as the inference code
    # builds it: resampled to the recipe's 2 mm pixels (z 3.27 mm, y 3.9 mm here), zero-padded
    units = loc.units_of(low)
    first = np.flatnonzero(low_mask.any(axis=(0, 1)))[0]
    slicing = loc.Slicing(3, localiser.RECIPE["input_spacing_mm"])
    plane = slicing.plane_shape(units.shape[:2], loc.plane_spacing(low_spacing, 0))
    assert plane == (round(units.shape[0] * spacing[2] / 2),
                     round(units.shape[1] * spacing[1] * 4 / 2))
    expected = loc.network_stacks(loc.slice_axis_view(units, 0), [first], 3, plane)[0].numpy()
    padded = np.pad(expected, [(0, 0)] + [(crop, crop)] * 2)        # the crop may hang over
    assert window_offset(inputs[0].astype(np.float32), padded) is not None


def test_a_training_crop_holds_lesion_anywhere_and_pads_small_slices():
    rng = np.random.default_rng(1)
    stack = torch.arange(1, 2 * 40 * 50 + 1, dtype=torch.float32).reshape(2, 40, 50)
    target = torch.zeros(40, 50, dtype=torch.bool)
    target[30:33, 40:44] = True
    places = set()
    for _ in range(30):
        x, y = localiser.random_crop(stack, target, 16, rng)
        assert x.shape == (2, 16, 16) and y.shape == (16, 16) and y.any()
        offset = window_offset(x.numpy(), stack.numpy())
        assert offset is not None and np.array_equal(y.numpy(), target.numpy()[
            offset[0]:offset[0] + 16, offset[1]:offset[1] + 16])
        places.add(tuple(np.argwhere(y.numpy())[0]))
    assert len(places) > 5                    # the lesion is not always at the same place
    x, y = localiser.random_crop(stack[:, :10, :12], target[:10, :12], 16, rng)
    assert x.shape == (2, 16, 16) and not y.any() and (x == 0).sum() == 2 * (256 - 120)


def test_slices_are_resampled_to_the_cards_pixel_spacing_and_padded_for_the_network():
    slicing = loc.Slicing.of_card({"config": {"in_channels": 3}, "input_spacing_mm": 2.0})
    assert slicing.plane_shape((100, 60), (3.0, 0.5)) == (150, 15)
    assert loc.plane_spacing((0.5, 0.7, 3.0), 2) == (0.7, 0.5)   # axial: rows y, columns x
    assert loc.plane_spacing((0.5, 0.7, 3.0), 0) == (3.0, 0.7)   # sagittal: rows z, columns y
    legacy = loc.Slicing.of_card({"input_size": 128})           # the first segmenter's cards
    assert legacy.spacing_mm is None and legacy.plane_shape((100, 60), (3.0, 0.5)) == (128, 128)
    assert loc.pad_to_multiple(torch.ones(1, 3, 150, 15)).shape == (1, 3, 160, 32)  # at least 32: 2 x 2 at the deepest level


def test_slices_closer_than_a_network_pixel_are_interpolated_not_run(monkeypatch):
    """Along an axis whose slices are closer than the network's pixels (fixed, or a whole slice's
    extent / 128), every n-th slice runs (the last one always) and the others are interpolated
    linearly."""
    assert loc.sampled_slices(10, 3) == [0, 3, 6, 9] and loc.sampled_slices(11, 3)[-2:] == [9, 10]
    assert loc.sampled_slices(5, 1) == [0, 1, 2, 3, 4] and loc.sampled_slices(1, 4) == [0]
    two_mm = loc.Slicing(3, 2.0, window=96)
    assert [two_mm.slice_step(s) for s in (0.8, 1.0, 0.49, 2.0, 3.0)] == [2, 2, 4, 1, 1]
    whole = loc.Slicing(3, None, 128)                  # pixels: the finer extent / 128
    assert whole.slice_step(0.5) == 1 and whole.slice_step(0.8, (300.0, 410.0)) == 2
    assert whole.slice_step(1.0, (410.0, 410.0)) == 3 and whole.slice_step(1.0, (120.0, 150.0)) == 1
    out = np.zeros((11, 2, 3), dtype=np.float32)
    indices = loc.sampled_slices(11, 4)                          # [0, 4, 8, 10]
    loc.add_interpolated(out, indices, np.stack([np.full((2, 3), i, np.float32) for i in indices]))
    assert np.allclose(out[:, 0, 0], np.arange(11))             # a ramp comes back exactly
    torch.manual_seed(0)
    network = zoo.build_network("lesion_segmenter", features=[4, 4, 8, 8, 16, 4]).eval()
    units = np.random.default_rng(5).random((9, 40, 36), dtype=np.float32)
    spacing = (2.0, 2.0, 0.5)                                   # z slices 4x finer than 2 mm
    fast = loc.probability_map(units, network, spacing, two_mm, axes_xyz=(2,))
    monkeypatch.setattr(loc.Slicing, "slice_step", lambda self, *spacings: 1)
    full = loc.probability_map(units, network, spacing, two_mm, axes_xyz=(2,))
    assert np.allclose(fast[[0, 4, 8]], full[[0, 4, 8]], atol=1e-6)
    assert np.allclose(fast[2], (full[0] + full[4]) / 2, atol=1e-6)
    assert not np.allclose(fast, full, atol=1e-6)


def test_a_short_training_run_writes_best_weights_and_its_summary(shared_data, tmp_path):
    """The training loop end to end on a tiny cache cut from one real training volume: Dice +
    CE steps, validation, best/last safetensors that load into the architecture, a summary."""
    from safetensors.torch import load_file

    case = next(c for c in localiser.cases("train") if c.image.endswith("STS_002/MR_T1_image.nii.gz"))
    voxels, mask, _ = localiser.read_case(shared_data, case)
    low, low_mask = localiser.degrade_inplane(voxels, mask, 2)
    x, y = localiser.stacks_of_case(low, low_mask, (2, 2, 3.3), localiser.RECIPE,
                                    {"lesion": 3, "background": 1}, np.random.default_rng(0))
    np.savez(tmp_path / "train.npz", inputs=x, targets=y)
    np.savez(tmp_path / "validation.npz", inputs=x[:4], targets=y[:4])
    features = (4, 4, 8, 8, 16, 4)
    summary = localiser.train(tmp_path, tmp_path / "run", steps=4, batch_size=2, val_every=2,
                              features=features)
    assert summary["steps"] == 4 and 0.0 <= summary["best_validation_dice"] <= 1.0
    assert json.loads((tmp_path / "run" / "train.json").read_text(encoding="utf-8")) == summary
    for name in ("best", "last"):
        network = zoo.build_network("lesion_segmenter", features=list(features))
        network.load_state_dict(load_file(str(tmp_path / "run" / f"{name}.safetensors")))


def test_calibration_picks_the_best_coverage_within_the_roi_share_limit():
    def result(threshold, acceptable, share, covered=0.9, padding=0.0, missed=0):
        return calib.CaseResult("v", 2, threshold, 0.0, padding, 10, acceptable - 1, acceptable,
                                0, 0, covered, share, 1, (0.9,), 2, missed, 0.5)
    results = [result(0.1, 10, 0.40), result(0.3, 9, 0.18), result(0.5, 9, 0.12),
               result(0.7, 4, 0.05, covered=0.0), result(0.5, 9, 0.15, padding=2.5)]
    setting, table = calib.choose_setting(results, max_mean_share=0.2)
    assert setting == (0.5, 0.0, 0.0)         # ties on coverage: higher threshold, less padding
    assert table[(0.1, 0.0, 0.0)]["mean_roi_share"] == pytest.approx(0.40)
    assert calib.choose_setting(results[:1], max_mean_share=0.2)[0] == (0.1, 0.0, 0.0)  # fallback
    # a setting whose ROIs miss one of two lesions loses to one that touches both, even with
    # fewer acceptable slices (the second tumour of a composite)
    results = [result(0.5, 10, 0.1, missed=1), result(0.4, 8, 0.1, padding=5.0)]
    assert calib.choose_setting(results, max_mean_share=0.2)[0] == (0.4, 0.0, 5.0)


def test_checkpoint_candidates_are_every_nth_validated_step_and_always_the_last(tmp_path):
    assert calib.candidate_checkpoints(tmp_path) == [tmp_path / "best.safetensors"]
    for step in (200, 400, 600, 800, 1000):
        (tmp_path / f"step_{step:05d}.safetensors").write_bytes(b"")
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    assert names(calib.candidate_checkpoints(tmp_path, every=2)) == [
        "step_00200.safetensors", "step_00600.safetensors", "step_01000.safetensors"]
    assert names(calib.candidate_checkpoints(tmp_path, every=2, first_step=400)) == [
        "step_00400.safetensors", "step_00800.safetensors", "step_01000.safetensors"]


# ---------------------------------------------------------------------------------------------
# The shipped segmenter on real held-out lesions


def test_shipped_card_records_patients_licences_and_the_validation_calibration():
    path = zoo.shipped_weights(zoo.get_spec("lesion_segmenter"), 1)
    if path is None:
        pytest.skip("no lesion segmenter ships")
    card = zoo.read_card(path)
    patients = {key: {f.split("/")[1] for f in card[key]}
                for key in ("training_data", "validation_data", "test_data")}
    assert not patients["training_data"] & patients["validation_data"]
    assert not (patients["training_data"] | patients["validation_data"]) & patients["test_data"]
    assert patients["test_data"] == {c.patient for c in localiser.cases("test")}
    assert any("non-commercial" in licence for licence in card["licence"])
    calibration = card["calibration"]
    assert 0 < calibration["threshold"] < 1 and "validation" in calibration["chosen_on"]
    assert (card["cpu_seconds"] or card["wall_seconds_training"]) > 0
    assert card["parameter_count"] == 496_210 and card["checkpoint_selection"]["candidates"]
    network, loaded = loc.load_localiser()          # strict load into the architecture
    assert loaded == card and not network.training
    ensemble = loc.load_ensemble()                  # and every member its card lists
    assert len(ensemble.members) == 1 + len(card.get("ensemble", {}).get("members", []))
    for member_path in loc.ensemble_member_paths(path, card):
        member_card = zoo.read_card(member_path)
        assert member_card["training_data"] and "ensemble member" in member_card["status"]
        assert any("non-commercial" in licence for licence in member_card["licence"])


def test_auto_roi_on_a_held_out_x2_mr_holds_its_tumour(shared_data):
    """The shipped segmenter through `upscale(roi="auto")` on held-out STS_012's MR degraded x2
    (never trained on, never used for the threshold): one ROI, with the card's confidence
    threshold passed, holds the whole tumour (benchmarks/results/localiser: 100 % acceptable)."""
    if zoo.shipped_weights(zoo.get_spec("lesion_segmenter"), 1) is None:
        pytest.skip("no lesion segmenter ships")
    folder = shared_data / "sarcoma" / "STS_012"
    hr = sitk.ReadImage(str(folder / "MR_T1_image.nii.gz"))
    size = [n // 2 * 2 if a < 2 else n for a, n in enumerate(hr.GetSize())]
    hr_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "MR_T1_mask.nii.gz")))[
        :, :size[1], :size[0]] > 0
    lr = calib.low_resolution(hr[:size[0], :size[1], :], 2)
    result = api.upscale(lr, scale=2, model="bicubic", roi="auto", roi_model="lanczos",
                         output_float=True)
    report = roi.RoiReport.from_image(result)
    assert report.finder == "lesion_segmenter" and not report.fallback
    threshold = zoo.read_card(zoo.shipped_weights(zoo.get_spec("lesion_segmenter"), 1))[
        "calibration"]["threshold"]
    assert all(threshold <= r["confidence"] <= 1 for r in report.regions)
    boxes = [roi.RoiBox(*r["processed_index_xyz"]).scaled((2, 2, 1)) for r in report.regions]
    coverage = roi.lesion_coverage(hr_mask, roi_boxes.union_mask(boxes, hr_mask.shape))
    assert coverage.acceptable_share >= 0.95 and coverage.voxel_fraction >= 0.95
    # not the whole volume: the recall-first calibration takes 60 % of this 5 cm crop
    # (benchmarks/results/localiser/coverage.md; the whole crop would be 100 %)
    assert roi_boxes.union_mask(boxes, hr_mask.shape).mean() < 0.7



# ---------------------------------------------------------------------------------------------
# Multi-lesion composites, box padding and ensembles


def test_composite_places_patients_side_by_side_with_one_mask_each(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(100, 10, (5, 10, 9)), rng.normal(-500, 50, (7, 8, 11))
    mask_a, mask_b = np.zeros(a.shape, bool), np.zeros(b.shape, bool)
    mask_a[1:3, 2:5, 2:4], mask_b[4:6, 1:3, 6:9] = True, True
    image, masks = lesion_composites.side_by_side([a, b], [mask_a, mask_b], (0.5, 0.5, 2.0))
    voxels = sitk.GetArrayFromImage(image)
    assert voxels.shape == (7, 8, 20)          # z, y: the largest; x: 9 + 11 cut to 4 * 5
    assert image.GetSpacing() == (0.5, 0.5, 2.0)
    assert 0 <= voxels.min() and voxels.max() <= 1000   # each part on its own percentile scale
    assert voxels[:5, :8, :9].mean() == pytest.approx(voxels[:, :8, 9:20].mean(), rel=0.5)
    assert [int(m.sum()) for m in masks] == [int(mask_a.sum()), int(mask_b.sum())]
    assert masks[0][:, :, 9:].sum() == 0 and masks[1][:, :, :9].sum() == 0   # apart along x
    assert np.array_equal(masks[1][4:6, 1:3, 15:18], np.ones((2, 2, 3), bool))


def test_composites_take_patients_of_their_own_subset_only(tmp_path):
    validation = localiser.composite_cases("validation")
    test = localiser.composite_cases("test")
    assert validation and test
    patients = lambda cs: {p for c in cs for p in ("STS_008", "STS_010", "STS_012", "STS_014")  # noqa: E731
                           if p in c.name}
    assert patients(validation) == {"STS_008", "STS_010"} and patients(test) == {"STS_012", "STS_014"}
    bad = {**localiser.RECIPE, "composites": {**localiser.RECIPE["composites"],
                                              "validation": [["STS_008", "STS_012"]]}}
    with pytest.raises(ValueError, match="every patient must be a validation patient"):
        localiser.composite_cases("validation", bad)
    for n, spacing in enumerate([(1.0, 1.0, 3.0), (1.2, 1.0, 3.0)]):
        volume = make_volume((6, 8, 8), spacing=spacing)
        sitk.WriteImage(volume, str(tmp_path / f"v{n}.nii.gz"))
        sitk.WriteImage(sitk.Cast(volume > 1e9, sitk.sitkUInt8), str(tmp_path / f"m{n}.nii.gz"))
    composite = lesion_composites.Composite(("v0.nii.gz", "v1.nii.gz"), ("m0.nii.gz", "m1.nii.gz"),
                                            "CT", "validation")
    with pytest.raises(ValueError, match="voxel spacings differ"):
        lesion_composites.read_composite(tmp_path, composite)


def test_box_padding_grows_each_region_by_whole_voxels_within_the_volume():
    plain = loc.regions_of_map(blob_map(), (1.0, 1.0, 2.0), 0.5, min_volume_mm3=3.0)
    padded = loc.regions_of_map(blob_map(), (1.0, 1.0, 2.0), 0.5, min_volume_mm3=3.0,
                                padding_mm=2.5)
    assert [r.box for r in plain] == [roi.RoiBox((4, 5, 2), (12, 15, 6)),
                                      roi.RoiBox((30, 20, 7), (45, 30, 11))]
    # 2.5 mm: 3 voxels in x and y (1 mm), 2 in z (2 mm); clipped at the volume's edge (z 12)
    assert [r.box for r in padded] == [roi.RoiBox((1, 2, 0), (15, 18, 8)),
                                       roi.RoiBox((27, 17, 5), (48, 33, 12))]
    assert [r.confidence for r in padded] == [r.confidence for r in plain]


def tiny_segmenter(tmp_path, name: str, card_extra: dict, seed: int):
    torch.manual_seed(seed)
    features = [4, 4, 8, 8, 16, 4]
    network = zoo.build_network("lesion_segmenter", features=features)
    card = {"model": "lesion_segmenter", "scales": [1],
            "config": {"in_channels": 3, "features": features}, **card_extra}
    zoo.save_weights(network, tmp_path / name, card)
    return network.eval()


def test_an_ensemble_card_averages_its_members_maps_each_with_its_own_slicing(tmp_path):
    first = tiny_segmenter(tmp_path, "seg.safetensors", {
        "ensemble": {"members": ["seg_member_1.safetensors"]},
        "calibration": {"threshold": 0.5, "padding_mm": 2.0}}, seed=1)
    member = tiny_segmenter(tmp_path, "seg_member_1.safetensors", {"input_spacing_mm": 2.0},
                            seed=2)
    ensemble = loc.load_ensemble(tmp_path / "seg.safetensors")
    assert [s for _, s in ensemble.members] == [loc.Slicing(3, None, 128), loc.Slicing(3, 2.0)]
    assert ensemble.card["calibration"]["padding_mm"] == 2.0
    units = np.random.default_rng(3).random((6, 20, 24), dtype=np.float32)
    spacing = (1.0, 1.5, 3.0)
    expected = (loc.probability_map(units, first, spacing, loc.Slicing(3, None, 128))
                + loc.probability_map(units, member, spacing, loc.Slicing(3, 2.0))) / 2
    assert np.allclose(ensemble.probability(units, spacing), expected, atol=1e-6)
    alone = loc.load_localiser(tmp_path / "seg.safetensors")
    assert np.allclose(loc.Localiser.of_network(*alone).probability(units, spacing),
                       loc.probability_map(units, first, spacing, loc.Slicing(3, None, 128)))
    (tmp_path / "seg_member_1.safetensors").unlink()
    with pytest.raises(WeightsError, match="seg_member_1.safetensors"):
        loc.load_ensemble(tmp_path / "seg.safetensors")
    for bad in ("../elsewhere/seg_member_1.safetensors", "seg_member_1.pt"):
        with pytest.raises(WeightsError, match="members must be .safetensors files beside it"):
            loc.ensemble_member_paths(tmp_path / "seg.safetensors", {"ensemble": {"members": [bad]}})


def test_the_ensemble_is_loaded_once_per_process_until_one_of_its_files_changes(tmp_path):
    """A second finder run reuses the loaded networks (and so their compiled models); a
    retrained member or a re-calibrated card is read again."""
    import json
    import os

    path = tmp_path / "seg.safetensors"
    tiny_segmenter(tmp_path, path.name, {"ensemble": {"members": ["seg_member_1.safetensors"]},
                                         "calibration": {"threshold": 0.5}}, seed=1)
    tiny_segmenter(tmp_path, "seg_member_1.safetensors", {"input_spacing_mm": 2.0}, seed=2)
    first = loc.load_ensemble(path)
    assert loc.load_ensemble(path) is first
    member = tmp_path / "seg_member_1.safetensors"
    tiny_segmenter(tmp_path, member.name, {"input_spacing_mm": 2.0}, seed=3)
    os.utime(member, ns=(member.stat().st_mtime_ns + 10**9,) * 2)
    retrained = loc.load_ensemble(path)
    assert retrained is not first
    stack = torch.ones(1, 3, 32, 32)
    assert not torch.allclose(retrained.members[1][0](stack), first.members[1][0](stack))
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["calibration"]["threshold"] = 0.25
    card_path.write_text(json.dumps(card), encoding="utf-8")
    os.utime(card_path, ns=(card_path.stat().st_mtime_ns + 10**9,) * 2)
    assert loc.load_ensemble(path).card["calibration"]["threshold"] == 0.25


def test_export_writes_the_members_beside_the_weights_with_the_calibration(tmp_path):
    tiny_segmenter(tmp_path, "a.safetensors", {"title": "A", "input_size": 64}, seed=4)
    tiny_segmenter(tmp_path, "b.safetensors", {"title": "B", "input_spacing_mm": 1.5,
                                               "status": "candidate, NOT shipped"}, seed=5)
    setting = (0.4, 500.0, 2.5)
    table = {setting: {"acceptable": 0.9, "perfect": 0.8, "mean_roi_share": 0.15}}
    out = tmp_path / "shipped" / "lesion_segmenter.safetensors"
    card = calib.export([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], out, setting,
                        table, 5.0, 1.0, {"a+b": {"perfect": 0.8}})
    assert card["ensemble"]["members"] == ["lesion_segmenter_member_1.safetensors"]
    assert card["calibration"]["padding_mm"] == 2.5 and card["title"] == "A"
    member_card = zoo.read_card(out.parent / "lesion_segmenter_member_1.safetensors")
    assert "NOT shipped" not in member_card["status"] and member_card["input_spacing_mm"] == 1.5
    assert set(member_card["training_data"]) == {c.image for c in localiser.cases("train")}
    ensemble = loc.load_ensemble(out)
    assert [s for _, s in ensemble.members] == [loc.Slicing(3, None, 64), loc.Slicing(3, 1.5)]
    found = loc.find_regions(make_volume((6, 20, 24)), localiser=ensemble)
    assert found.threshold == 0.4


def test_a_refit_trains_on_training_and_validation_patients_never_test_ones():
    plain, refit = localiser.training_cases(), localiser.training_cases(refit=True)
    assert {c.subset for c in plain} == {"train"}
    assert {c.subset for c in refit} == {"train", "validation"}
    assert set(refit) - set(plain) == set(localiser.cases("validation"))
    assert "brats_2013_pat0005_1" in {c.patient for c in refit}


def two_network_ensemble(tmp_path):
    """A tiny exported ensemble (a 64-px first network, a 2 mm member) calibrated at threshold
    0.4; returns its weights path."""
    tiny_segmenter(tmp_path, "a.safetensors", {"title": "A", "input_size": 64}, seed=4)
    tiny_segmenter(tmp_path, "b.safetensors", {"title": "B", "input_spacing_mm": 2.0}, seed=5)
    setting = (0.4, 500.0, 2.5)
    table = {setting: {"acceptable": 0.9, "perfect": 0.8, "mean_roi_share": 0.15}}
    out = tmp_path / "shipped" / "lesion_segmenter.safetensors"
    calib.export([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], out, setting,
                 table, 5.0, 1.0)
    return out


def test_a_refit_replaces_one_member_and_keeps_the_calibration(tmp_path):
    """The final fit (`prepare --refit`): member 1 is replaced by a run trained on the training
    and validation patients; its card says so, the ensemble's calibration stays, and a run
    without the validation patients is refused."""
    out = two_network_ensemble(tmp_path)
    run = tmp_path / "refit_run"
    refit_net = tiny_segmenter(run, "step_02400.safetensors", {}, seed=6)
    summary = {"in_channels": 3, "features": [4, 4, 8, 8, 16, 4], "cpu_seconds": 1.0,
               "best_validation_dice": 0.5, "input_spacing_mm": 2.0, "crop": 96}
    (run / "train.json").write_text(json.dumps({**summary, "refit": False}), encoding="utf-8")
    with pytest.raises(ValueError, match="not a refit"):
        calib.refit_member(out, 1, run / "step_02400.safetensors")
    (run / "train.json").write_text(json.dumps({**summary, "refit": True}), encoding="utf-8")
    with pytest.raises(ValueError, match="1 ensemble member"):
        calib.refit_member(out, 2, run / "step_02400.safetensors")
    card = calib.refit_member(out, 1, run / "step_02400.safetensors")
    assert card["calibration"]["threshold"] == 0.4 and card["ensemble"]["refit"]["member"] == 1
    assert card["source_checkpoints"][1] == str(run / "step_02400.safetensors")
    member_card = zoo.read_card(out.parent / "lesion_segmenter_member_1.safetensors")
    assert member_card["refit_of"] == str(tmp_path / "b.safetensors")
    patients = {c.image for name in ("train", "validation") for c in localiser.cases(name)}
    assert set(member_card["training_data"]) == patients
    assert not patients & set(member_card["test_data"])
    ensemble = loc.load_ensemble(out)
    units = np.random.default_rng(3).random((6, 20, 24), dtype=np.float32)
    assert np.allclose(ensemble.members[1][0](torch.ones(1, 3, 32, 32)).detach(),
                       refit_net(torch.ones(1, 3, 32, 32)).detach())
    assert ensemble.probability(units, (1.0, 1.0, 2.0)).shape == units.shape


def test_auto_roi_on_two_held_out_tumours_gives_two_rois_and_improves_both(shared_data):
    """Issue 19's two-lesion case: held-out STS_012 and STS_014 T1 MR side by side (the recipe's
    test composite, never trained or calibrated on), degraded x2. `upscale(roi="auto")` with
    the shipped localiser returns one ROI per tumour (benchmarks/two_lesion_roi.py: 100 % of
    STS_014's tumour in one, 70 % of STS_012's in the other) and the output beats bicubic inside
    both tumours."""
    if zoo.shipped_weights(zoo.get_spec("lesion_segmenter"), 1) is None:
        pytest.skip("no lesion segmenter ships")
    composite = next(c for c in localiser.composite_cases("test") if c.modality == "MR")
    hr, tumours = lesion_composites.read_composite(shared_data, composite)
    lr = calib.low_resolution(hr, 2)
    result = api.upscale(lr, scale=2, roi="auto", output_float=True)
    report = roi.RoiReport.from_image(result)
    assert report.finder == "lesion_segmenter" and len(report.regions) == 2
    boxes = [roi.RoiBox(*r["processed_index_xyz"]).scaled((2, 2, 1)) for r in report.regions]
    owners = []
    for tumour in tumours:   # most of each tumour lies in one ROI, none of it in the other
        shares = [roi.lesion_coverage(tumour, roi_boxes.union_mask([box], tumour.shape))
                  .voxel_fraction for box in boxes]
        assert max(shares) >= 0.6 and min(shares) == 0.0
        owners.append(int(np.argmax(shares)))
    assert sorted(owners) == [0, 1]
    truth = array(hr)
    bicubic = array(api.upscale(lr, scale=2, model="bicubic", output_float=True))
    output = array(result)
    for tumour in tumours:
        error = lambda estimate: float(((estimate[tumour] - truth[tumour]) ** 2).mean())  # noqa: E731
        assert error(output) < 0.9 * error(bicubic)     # > 0.45 dB better inside each tumour


def test_replacing_a_member_marks_the_calibration_stale_and_lists_what_the_new_one_trained_on(tmp_path):
    """A member trained on more data (extra public volumes: their cache records them) replaces
    member 1; its card lists those volumes and their licence, and the ensemble's calibration is
    marked stale until the cross-validation writes a new one."""
    from MedSRLib.training import localiser_cross_validation as cv
    out = two_network_ensemble(tmp_path)
    run = tmp_path / "run"
    new_net = tiny_segmenter(run, "step_02000.safetensors", {}, seed=7)
    images = ["sarcoma/STS_001/CT_image.nii.gz", "extra/lidc-voi/LIDC-IDRI-0007_R_1"]
    (run / "train.json").write_text(json.dumps({
        "in_channels": 3, "features": [4, 4, 8, 8, 16, 4], "cpu_seconds": 1.0, "refit": False,
        "best_validation_dice": 0.5, "input_spacing_mm": 2.0, "crop": 96, "training_images": images}), encoding="utf-8")
    card = calib.replace_member(out, 1, run / "step_02000.safetensors", why="lung nodules")
    assert card["ensemble"]["replaced"] == [{"member": 1, "checkpoint": str(run / "step_02000.safetensors"),
                                             "replaces": str(tmp_path / "b.safetensors"), "why": "lung nodules"}]
    assert "stale" in card["calibration"] and card["calibration"]["threshold"] == 0.4
    assert any("LIDC-IDRI" in licence for licence in card["licence"])
    member_card = zoo.read_card(out.parent / "lesion_segmenter_member_1.safetensors")
    assert member_card["training_data"] == images and "refit_of" not in member_card
    assert np.allclose(loc.load_ensemble(out).members[1][0](torch.ones(1, 3, 32, 32)).detach(),
                       new_net(torch.ones(1, 3, 32, 32)).detach())
    first = tiny_segmenter(run, "step_00600.safetensors", {}, seed=9)   # the first network too
    card = calib.replace_member(out, 0, run / "step_00600.safetensors", why="core masks")
    assert [r["member"] for r in card["ensemble"]["replaced"]] == [1, 0]
    assert card["source_checkpoints"] == [str(run / "step_00600.safetensors"),
                                          str(run / "step_02000.safetensors")]
    assert card["training_data"] == images and card["ensemble"]["members"] == ["lesion_segmenter_member_1.safetensors"]
    ensemble = loc.load_ensemble(out)
    assert np.allclose(ensemble.members[0][0](torch.ones(1, 3, 32, 32)).detach(),
                       first(torch.ones(1, 3, 32, 32)).detach())
    assert np.allclose(ensemble.members[1][0](torch.ones(1, 3, 32, 32)).detach(),
                       new_net(torch.ones(1, 3, 32, 32)).detach())
    with pytest.raises(ValueError, match="1 ensemble member"):
        calib.replace_member(out, 2, run / "step_00600.safetensors", why="none")
    result = {"chosen": [0.3, 0.0, 0.0, 0.0], "objective": "o", "selection_sources": [], "folds": {},
              "nested": {}, "pooled": {}, "pooled_composites": {}, "chosen_any_padding": [],
              "any_padding_fold_scores": {}, "cpu_seconds": 1.0, "command": "c"}
    rewritten = cv.write_calibration(out.with_suffix(".json"), result)
    assert "stale" not in rewritten["calibration"] and rewritten["calibration"]["threshold"] == 0.3


def test_a_cache_records_the_images_it_trained_on_extra_volumes_by_source_and_case(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSR_EXTRA_LESIONS", str(tmp_path / "extra"))
    assert localiser.cached_training_images(tmp_path) is None
    case = tmp_path / "extra" / "lidc-voi" / "LIDC-IDRI-0007_R_1" / "image.nii.gz"
    (tmp_path / "cache.json").write_text(json.dumps({"subsets": {"train": [
        "sarcoma/STS_001/CT_image.nii.gz x1: 10 stacks", "sarcoma/STS_001/CT_image.nii.gz x2: 9 stacks",
        f"{case} x4: 3 stacks"]}}), encoding="utf-8")
    assert localiser.cached_training_images(tmp_path) == [
        "extra/lidc-voi/LIDC-IDRI-0007_R_1", "sarcoma/STS_001/CT_image.nii.gz"]


def test_whole_slice_training_stacks_and_their_card_match_the_first_networks_slicing(shared_data, tmp_path):
    """`prepare --input-size 128` cuts whole slices resized to 128 x 128 (the ensemble's first
    network's input, no crop); a run on such a cache gets a card whose slicing is that one."""
    recipe = {**localiser.RECIPE, "input_spacing_mm": None, "input_size": 64}
    slicing = localiser.input_slicing(recipe)
    assert (slicing.spacing_mm, slicing.size) == (None, 64)
    case = next(c for c in localiser.cases("train") if c.image.endswith("STS_002/MR_T1_image.nii.gz"))
    voxels, mask, spacing = localiser.read_case(shared_data, case)
    x, y = localiser.stacks_of_case(voxels, mask, spacing, recipe, {"lesion": 2, "background": 1},
                                    np.random.default_rng(0))
    assert x.shape[1:] == (3, 64, 64) and y.shape[1:] == (64, 64)
    assert y.reshape(len(y), -1).any(axis=1).sum() >= 6       # two lesion slices per axis kept whole
    (tmp_path / "cache.json").write_text(json.dumps({"recipe": recipe, "refit": False}), encoding="utf-8")
    assert localiser.slicing_of_cache(tmp_path) == {"input_spacing_mm": None, "input_size": 64,
                                                    "crop": 64, "refit": False}
    run = tmp_path / "run"
    tiny_segmenter(run, "step_00010.safetensors", {}, seed=8)
    (run / "train.json").write_text(json.dumps({
        "in_channels": 3, "features": [4, 4, 8, 8, 16, 4], "cpu_seconds": 1.0, "refit": False,
        "best_validation_dice": 0.5, **localiser.slicing_of_cache(tmp_path)}), encoding="utf-8")
    _, card = calib.base_card(run / "step_00010.safetensors")
    assert card["input_size"] == 64 and "input_spacing_mm" not in card and "training_crop" not in card
    assert loc.Slicing.of_card(card) == loc.Slicing(3, None, 64, None)
    assert "whole slices" in card["augmentation"] and "resized to 64 x 64" in card["inference"]
