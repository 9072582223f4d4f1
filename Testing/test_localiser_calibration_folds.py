"""The lesion localiser's mask convention (BraTS tumour core on T1c, whole tumour on FLAIR) and
its calibration by cross-validation over sources and patients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MedSRLib.training import localiser, localiser_calibration as calib
from MedSRLib.training import localiser_cross_validation as cv


# ---------------------------------------------------------------------------------------------
# Mask convention


def test_lesion_mask_keeps_the_listed_labels_or_any_nonzero():
    labels = np.array([[0, 1, 2], [3, 4, 0]], dtype=np.float32)
    core = localiser.lesion_mask(labels, localiser.BRATS_TUMOUR_CORE)
    assert core.tolist() == [[False, True, False], [True, True, False]]      # oedema (2) out
    whole = localiser.lesion_mask(labels, localiser.BRATS_WHOLE_TUMOUR)
    assert whole.tolist() == (labels > 0).tolist()
    assert localiser.lesion_mask(labels).tolist() == (labels > 0).tolist()
    with pytest.raises(ValueError, match="nonzero"):
        localiser.lesion_mask(labels, (0, 1))


def test_brats_t1c_reads_the_tumour_core_and_flair_the_whole_tumour(shared_data):
    by_image = {c.image: c for c in localiser.cases("validation")}
    t1c = by_image["brats/brats_2013_pat0005_1/T1c_subtrMeanDivStd.nii.gz"]
    flair = by_image["brats/brats_2013_pat0005_1/Flair_subtrMeanDivStd.nii.gz"]
    assert t1c.labels == (1, 3, 4) and flair.labels == (1, 2, 3, 4)
    sarcoma = by_image["sarcoma/STS_008/MR_T1_image.nii.gz"]
    assert sarcoma.labels is None
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / t1c.mask)))
    _, core, _ = localiser.read_case(shared_data, t1c)
    _, whole, _ = localiser.read_case(shared_data, flair)
    assert np.array_equal(whole, raw > 0)
    assert np.array_equal(core, np.isin(raw, (1, 3, 4)))
    assert core.sum() < whole.sum() and not core[raw == 2].any()
    # the calibration and the benchmark read the same lesion
    name, _, hr_mask = calib.read_hr(shared_data, t1c)
    assert name == t1c.image and np.array_equal(hr_mask, core)


# ---------------------------------------------------------------------------------------------
# Scoring on the low-resolution grid


def synthetic_entry(factor: int = 2) -> tuple[cv.Entry, np.ndarray, sitk.Image]:
    """Two lesions on a (10, 24, 32) HR grid and a LR map that finds the first fully and the
    second only in part."""
    hr = np.zeros((10, 24, 32), dtype=bool)
    hr[2:5, 4:10, 4:12] = True
    hr[6:9, 14:20, 22:30] = True
    probability = np.full((10, 24 // factor, 32 // factor), 0.02, np.float32)
    probability[2:5, 2:5, 2:6] = 0.9
    probability[7:8, 8:9, 12:14] = 0.6
    lr = sitk.GetImageFromArray(probability)
    lr.SetSpacing((1.0 * factor, 1.0 * factor, 3.0))
    spacing = lr.GetSpacing()
    first, second = hr.copy(), hr.copy()
    first[:, :, 16:] = False
    second[:, :, :16] = False
    parts = [np.flatnonzero(cv.lesion_counts(part, factor)) for part in (first, second)]
    entry = cv.Entry("v", factor, "s", ("p", "q"), True, False, probability,
                     cv.lesion_counts(hr, factor), spacing,
                     cv.component_cells(hr, factor, float(np.prod(spacing)) / factor ** 2), parts)
    return entry, hr, lr


@pytest.mark.parametrize("setting", [(0.5, 0.0, 0.0), (0.5, 0.0, 2.5), (0.3, 0.0, 0.0),
                                     (0.7, 0.0, 0.0), (0.3, 30.0, 5.0)])
def test_low_resolution_scoring_equals_the_high_resolution_protocol(setting):
    entry, hr, lr = synthetic_entry()
    for margin in (0.0, 2.0):
        expected = calib.score_settings(entry.probability_kji, lr, hr, 2, [setting], margin, "v")[0]
        got = cv.score(entry, (*setting, setting[2]), margin_mm=margin)
        assert (got.lesion_slices, got.perfect, got.acceptable, got.rois, got.lesion_components,
                got.missed_components) == (expected.lesion_slices, expected.perfect,
                                           expected.acceptable, expected.rois,
                                           expected.lesion_components, expected.missed_components)
        assert got.roi_share == pytest.approx(expected.roi_share, abs=1e-4)
        assert got.dice == pytest.approx(expected.dice, abs=1e-4)


def test_padding_along_z_grows_boxes_along_z_only():
    entry, _, _ = synthetic_entry()
    flat = cv.score(entry, (0.5, 0.0, 0.0, 0.0), margin_mm=0.0)
    taller = cv.score(entry, (0.5, 0.0, 0.0, 3.0), margin_mm=0.0)
    wider = cv.score(entry, (0.5, 0.0, 2.0, 0.0), margin_mm=0.0)
    assert taller.roi_share > flat.roi_share and wider.roi_share > flat.roi_share
    assert cv.padding_voxels(2.0, 3.0, (2.0, 2.0, 3.0)) == (1, 1, 1)
    assert cv.padding_voxels(0.0, 7.0, (2.0, 2.0, 3.0)) == (0, 0, 3)


# ---------------------------------------------------------------------------------------------
# Selection by cross-validation


def row(name: str, factor: int, acceptable: int, perfect: int, share: float,
        missed: int = 0) -> cv.Score:
    return cv.Score(name, factor, 10, perfect, acceptable, share, 1, 1, missed,
                    0.0 if acceptable == 0 else 0.9, 0.5)


def test_selection_maximises_the_worst_fold_within_the_roi_share_limit():
    # A is best on average but fails source "b"; B is worse on "a" and fine on "b"; C covers
    # everything but its ROIs are too large
    table = {
        (0.5, 0.0, 0.0, 0.0): [row("a1", f, 10, 10, 0.1) for f in (2, 4)]
                              + [row("b1", f, 5, 2, 0.1) for f in (2, 4)],
        (0.3, 0.0, 0.0, 0.0): [row("a1", f, 9, 8, 0.2) for f in (2, 4)]
                              + [row("b1", f, 9, 8, 0.2) for f in (2, 4)],
        (0.1, 0.0, 0.0, 0.0): [row("a1", f, 10, 10, 0.3) for f in (2, 4)]
                              + [row("b1", f, 10, 10, 0.3) for f in (2, 4)],
    }
    folds = {"a": {"a1"}, "b": {"b1"}}
    setting, detail = cv.select(table, folds, lambda name: True, max_mean_share=0.25)
    assert setting == (0.3, 0.0, 0.0, 0.0)
    assert detail["admissible_settings"] == 2
    assert detail["fold_scores"] == pytest.approx({"a": 1.7 + 1, "b": 1.7 + 1})
    # a lesion missed entirely ranks a setting last whatever its coverage elsewhere
    table[(0.3, 0.0, 0.0, 0.0)][2] = row("b1", 2, 0, 0, 0.2, missed=1)
    assert cv.failures(table[(0.3, 0.0, 0.0, 0.0)]) == 1
    assert cv.select(table, folds, lambda name: True, 0.25)[0] == (0.5, 0.0, 0.0, 0.0)
    # the ROI share limit holds only for the volumes `single` names (not lesion crops): none here
    assert cv.select(table, folds, lambda name: False, 0.25)[0] == (0.1, 0.0, 0.0, 0.0)


def test_nested_estimate_selects_without_the_held_out_fold():
    # on fold "a" alone the tight setting looks best; held out, "b" shows it fails there
    table = {
        (0.5, 0.0, 0.0, 0.0): [row("a1", 2, 10, 10, 0.1), row("b1", 2, 2, 1, 0.1)],
        (0.3, 0.0, 0.0, 0.0): [row("a1", 2, 9, 9, 0.2), row("b1", 2, 9, 9, 0.2)],
    }
    folds = {"a": {"a1"}, "b": {"b1"}}
    patients = {"a1": {"p1"}, "b1": {"p2"}}
    out = cv.nested(table, folds, patients, lambda name: True, 0.25)
    assert out["b"]["setting"] == [0.5, 0.0, 0.0, 0.0]          # chosen on "a" only
    assert out["b"]["x2"]["acceptable"] == pytest.approx(0.2)
    assert out["a"]["setting"] == [0.3, 0.0, 0.0, 0.0]          # chosen on "b" only


def test_calibration_block_records_the_setting_folds_and_cpu_seconds(tmp_path):
    card_path = tmp_path / "card.json"
    card_path.write_text(json.dumps({"model": "lesion_segmenter", "calibration": {"threshold": 0.9},
                                     "calibration_grid": {}}), encoding="utf-8")
    entry, _, _ = synthetic_entry()
    result = cv.cross_validate([entry], settings=[(0.5, 0.0, 0.0, 0.0), (0.3, 0.0, 2.5, 2.5)])
    result.update({"cpu_seconds": 1.5, "command": "python -m ..."})
    card = cv.write_calibration(card_path, result)
    saved = json.loads(card_path.read_text(encoding="utf-8"))
    assert saved == card and "calibration_grid" not in saved
    block = saved["calibration"]
    assert [block["threshold"], block["min_component_mm3"], block["padding_mm"]] == \
        result["chosen"][:3]
    assert block["cpu_seconds"] == 1.5 and "s" in block["folds"]["source"]
    assert block["folds"]["source"]["s"]["x2"]["lesion_slices"] == 6


def test_a_composites_two_tumours_in_one_roi_are_not_separated():
    entry, _, _ = synthetic_entry()
    assert cv.score(entry, (0.5, 0.0, 0.0, 0.0), margin_mm=0.0).separated
    merged = cv.score(entry, (0.5, 0.0, 0.0, 0.0), margin_mm=20.0)   # margins touch: one ROI
    assert merged.rois == 1 and not merged.separated
    found_one = cv.score(entry, (0.8, 0.0, 0.0, 0.0), margin_mm=0.0)  # second lesion missed
    assert found_one.missed_components == 1 and not found_one.separated


# ---------------------------------------------------------------------------------------------
# Extra lesion volumes


def write_extra_case(root, source: str, case: str) -> None:
    folder = root / source / case
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
    lesion = np.zeros((4, 8, 8), np.uint8)
    lesion[1:3, 3:5, 3:5] = 1
    mask = sitk.GetImageFromArray(lesion)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(mask, str(folder / "mask.nii.gz"))


def test_extra_volumes_split_by_patient_skip_when_absent_and_refuse_reserved(tmp_path):
    assert localiser.extra_cases(root=tmp_path / "absent") == []
    write_extra_case(tmp_path, "lidc-voi", "LIDC-IDRI-0001_R_1")
    write_extra_case(tmp_path, "lidc-slab", "LIDC-IDRI-0001")
    write_extra_case(tmp_path, "lidc-voi", "LIDC-IDRI-0007_R_1")
    write_extra_case(tmp_path, "lidc-voi", "LIDC-IDRI-0044_R_3")
    write_extra_case(tmp_path, "pyradiomics", "brain2")
    found = localiser.extra_cases(root=tmp_path)
    assert {(c.patient, c.subset, c.crop) for c in found} == {
        ("LIDC-IDRI-0001", "test", True), ("LIDC-IDRI-0001", "test", False),
        ("LIDC-IDRI-0007", "train", True), ("LIDC-IDRI-0044", "validation", True),
        ("brain2", "validation", False)}
    case = next(c for c in found if c.patient == "LIDC-IDRI-0044")
    _, mask, _ = localiser.read_case(tmp_path, case)            # absolute paths, any root
    assert mask.sum() == 8
    assert [c.image for c in localiser.extra_cases("validation", root=tmp_path)] == [
        c.image for c in found if c.subset == "validation"]
    write_extra_case(tmp_path, "lidc-voi", "LIDC-IDRI-0314_R_1")
    with pytest.raises(ValueError, match="reserved"):
        localiser.extra_cases(root=tmp_path)


def test_extra_training_volumes_train_and_never_a_test_or_undocumented_patient(tmp_path, monkeypatch):
    write_extra_case(tmp_path, "lidc-voi", "LIDC-IDRI-0007_R_1")
    write_extra_case(tmp_path, "lidc-voi", "LIDC-IDRI-0001_R_1")
    write_extra_case(tmp_path, "lidc-voi", "LIDC-IDRI-0044_R_3")
    monkeypatch.setenv("MEDSR_EXTRA_LESIONS", str(tmp_path))
    trained = localiser.training_cases()
    extra_trained = [c for c in trained if c.source.startswith("lidc-voi")]
    assert [c.patient for c in extra_trained] == ["LIDC-IDRI-0007"]
    assert {c.patient for c in trained} >= set(localiser.RECIPE["split"]["sarcoma"]["train"])
    assert not {c.patient for c in trained} & {c.patient for c in localiser.cases("test")}
    assert localiser.training_cases(extra=None) == localiser.cases("train")
    both = {**localiser.EXTRA_LESIONS, "train": [*localiser.EXTRA_LESIONS["train"], "LIDC-IDRI-0001"]}
    with pytest.raises(ValueError, match="LIDC-IDRI-0001 is in both test and train"):
        localiser.extra_cases(extra=both, root=tmp_path)
    undocumented = {**localiser.EXTRA_LESIONS, "train": ["brain2"], "patients": {}}
    write_extra_case(tmp_path, "pyradiomics", "brain2")
    with pytest.raises(ValueError, match="undocumented patient cannot be a train volume"):
        localiser.extra_cases(extra=undocumented, root=tmp_path)


def test_composite_lesions_follow_the_mask_convention_of_their_parts(shared_data):
    from MedSRLib.training import lesion_composites
    composite = next(c for c in localiser.composite_cases("validation") if c.modality == "MR")
    image, parts = calib.read_composite_lesions(shared_data, composite)
    reference, reference_parts = lesion_composites.read_composite(shared_data, composite)
    assert image.GetSize() == reference.GetSize()       # sarcoma masks: any nonzero, as before
    assert all(np.array_equal(a, b) for a, b in zip(parts, reference_parts))
    assert [c.patient for c in calib.composite_parts(composite)] == ["STS_008", "STS_010"]


def test_an_extra_source_selects_once_the_network_trained_on_its_other_patients(tmp_path, monkeypatch):
    class Flat:    # the map's values do not matter here, only which entries may select
        def probability(self, units, spacing, **options):
            return np.zeros(units.shape, np.float32)

    write_extra_case(tmp_path, "lidc-voi", "LIDC-IDRI-0044_R_3")      # validation patient
    write_extra_case(tmp_path, "pyradiomics", "brain2")               # calibration only
    monkeypatch.setenv("MEDSR_EXTRA_LESIONS", str(tmp_path))
    validation = localiser.extra_cases("validation")

    def held_out() -> dict[str, bool]:
        return {e.source: e.extra for e in cv.entries_of(tmp_path, validation, [1], Flat(), "d", None)}

    assert held_out() == {"lidc-voi": True, "pyradiomics": True}      # no training patient yet
    write_extra_case(tmp_path, "lidc-voi", "LIDC-IDRI-0007_R_1")      # a training patient
    assert held_out() == {"lidc-voi": False, "pyradiomics": True}
