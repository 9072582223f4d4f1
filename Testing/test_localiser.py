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
from MedSRLib import api, lesion_localiser as loc, roi, roi_boxes, zoo
from MedSRLib.errors import InputError
from MedSRLib.training import localiser, localiser_calibration as calib


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
    report = json.loads(report_path.read_text())
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
    assert loc.pad_to_multiple(torch.ones(1, 3, 150, 15)).shape == (1, 3, 160, 16)


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
    assert json.loads((tmp_path / "run" / "train.json").read_text()) == summary
    for name in ("best", "last"):
        network = zoo.build_network("lesion_segmenter", features=list(features))
        network.load_state_dict(load_file(str(tmp_path / "run" / f"{name}.safetensors")))


def test_calibration_picks_the_best_coverage_within_the_roi_share_limit():
    def result(threshold, acceptable, share, covered=0.9):
        return calib.CaseResult("v", 2, threshold, 0.0, 10, acceptable - 1, acceptable, 0, 0,
                                covered, share, 1, (0.9,), 1, 0, 0.5)
    results = [result(0.1, 10, 0.40), result(0.3, 9, 0.18), result(0.5, 9, 0.12),
               result(0.7, 4, 0.05, covered=0.0)]
    setting, table = calib.choose_setting(results, max_mean_share=0.2)
    assert setting == (0.5, 0.0)              # ties on coverage: the higher threshold
    assert table[(0.1, 0.0)]["mean_roi_share"] == pytest.approx(0.40)
    assert calib.choose_setting(results[:1], max_mean_share=0.2)[0] == (0.1, 0.0)  # fallback


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
    assert roi_boxes.union_mask(boxes, hr_mask.shape).mean() < 0.4

