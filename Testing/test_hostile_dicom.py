"""Hostile DICOM inputs and outputs: a template of another patient, a MONOCHROME1 series,
impossible rescales, `--overwrite` on a folder MedSR did not write, a mixed template folder and
a fractional through-plane factor with DICOM output.

Real data: 4 consecutive slices of the shared CT (CRLM-CT-1004) and MR (CMB-CRC-MSB-06489)
series, cropped in-plane to 48 x 48 pixels (16 x 16 for the through-plane network) with pydicom (ImagePositionPatient moved to the crop's
first pixel, every other tag kept), so each run takes about a second. Variants (another patient,
MONOCHROME1, a broken rescale) are made from them with pydicom; everything is read back with
SimpleITK (the reader MedSR uses) and pydicom (what a viewer does).
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataelem import DataElement
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid

import MedSRLib
from MedSRLib import cli
from MedSRLib.io import volumes as io
from MedSRLib.errors import InputError

CT_SERIES = "ct/crlm-ct-1004-dicom"
MR_SERIES = "mr/pelvis-t2-dicom"
CROP = 48  # in-plane pixels kept


def run_cli(args, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def write_crop(source_files: list[Path], folder: Path, edit=None, size: int = CROP) -> Path:
    """Centre `size` x `size` crops of `source_files` as a new series folder; `edit(ds)` may
    change each dataset before it is saved."""
    folder.mkdir(parents=True)
    for path in source_files:
        ds = pydicom.dcmread(path)
        rows, columns = int(ds.Rows), int(ds.Columns)
        r0, c0 = (rows - size) // 2, (columns - size) // 2
        pixels = ds.pixel_array[r0:r0 + size, c0:c0 + size].copy()
        cosines = np.asarray(ds.ImageOrientationPatient, float)
        spacing = np.asarray(ds.PixelSpacing, float)  # (between rows, between columns)
        position = (np.asarray(ds.ImagePositionPatient, float) + c0 * spacing[1] * cosines[:3]
                    + r0 * spacing[0] * cosines[3:])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.Rows, ds.Columns = size, size
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in ds:
                delattr(ds, keyword)
        if edit is not None:
            edit(ds)
        ds.save_as(folder / path.name)
    return folder


@pytest.fixture(scope="module")
def series(shared_data, tmp_path_factory):
    """Cropped real series: "ct" (patient CRLM-CT-1004), "mr" (another patient), "ct_other"
    (the CT slices re-labelled as another patient's: new PatientID, study and frame of
    reference) and "ct_same_study" (the CT slices as a second series of the same study)."""
    root = tmp_path_factory.mktemp("hostile_dicom")
    ct_files = sorted((shared_data / CT_SERIES).glob("*.dcm"))[18:22]
    mr_files = sorted((shared_data / MR_SERIES).glob("*.dcm"))[14:18]
    other = {"PatientID": "OTHER-PATIENT-7", "PatientName": "Other^Patient",
             "StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid(),
             "SeriesInstanceUID": generate_uid()}
    second_series = generate_uid()

    def as_other(ds):
        for keyword, value in other.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = generate_uid()

    def as_second_series(ds):
        ds.SeriesInstanceUID = second_series
        ds.SOPInstanceUID = generate_uid()

    return {
        "ct": write_crop(ct_files, root / "ct"),
        "mr": write_crop(mr_files, root / "mr"),
        "ct_other": write_crop(ct_files, root / "ct_other", as_other),
        "ct_same_study": write_crop(ct_files, root / "ct_same_study", as_second_series),
    }


@pytest.fixture
def no_compute(monkeypatch):
    """api.upscale must not run: the command is refused before any computation."""
    from MedSRLib import api

    def refuse(*args, **kwargs):
        raise AssertionError("upscale ran although the command was refused")

    monkeypatch.setattr(api, "upscale", refuse)


def headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- a template must be of the same patient, study (or frame of reference) and modality -------

def test_template_of_another_patient_is_refused_before_computing(series, tmp_path, capsys,
                                                                no_compute):
    out = tmp_path / "series"
    code, err = run_cli(["upscale", series["ct"], out, "--format", "dicom",
                         "--dicom-template", series["ct_other"], "-q"], capsys)
    assert code == 2
    assert str(series["ct_other"]) in err and str(series["ct"]) in err
    assert "CRLM-CT-1004" in err and "OTHER-PATIENT-7" in err  # both patients named
    assert "PatientID" in err and "StudyInstanceUID and FrameOfReferenceUID both differ" in err
    assert "Modality" not in err.split("does not match", 1)[1]  # both are CT
    assert "--accept-template-mismatch" in err
    assert not out.exists()


def test_template_of_another_modality_and_patient_names_every_mismatching_tag(
        series, tmp_path, capsys, no_compute):
    code, err = run_cli(["upscale", series["mr"], tmp_path / "series", "--format", "dicom",
                         "--dicom-template", series["ct"], "-q"], capsys)
    assert code == 2
    assert "CMB-CRC-MSB-06489" in err and "CRLM-CT-1004" in err
    assert "PatientID" in err and "Modality MR vs CT" in err
    assert not (tmp_path / "series").exists()


def test_template_of_the_same_patient_and_study_is_accepted(series, tmp_path, capsys):
    out = tmp_path / "series"
    code, err = run_cli(["upscale", series["ct"], out, "--format", "dicom", "--model", "nearest",
                         "--dicom-template", series["ct_same_study"], "-q"], capsys)
    assert code == 0, err
    template = headers(series["ct_same_study"])[0]
    written = headers(out)
    assert len(written) == 4
    assert {(ds.PatientID, ds.StudyInstanceUID) for ds in written} == {
        (template.PatientID, template.StudyInstanceUID)}


def test_accepted_mismatch_warns_naming_both_patients(series, tmp_path, capsys, caplog):
    out = tmp_path / "series"
    with caplog.at_level(logging.WARNING, logger="MedSRLib"):
        code, err = run_cli(["upscale", series["ct"], out, "--format", "dicom", "--model",
                             "nearest", "--dicom-template", series["ct_other"],
                             "--accept-template-mismatch", "-q"], capsys)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "does not match" in r.getMessage()]
    assert len(warnings) == 1  # once, not again when the series is written
    assert "CRLM-CT-1004" in warnings[0] and "OTHER-PATIENT-7" in warnings[0]
    assert {ds.PatientID for ds in headers(out)} == {"OTHER-PATIENT-7"}  # as the user asked


def test_non_dicom_input_takes_the_template_identity_but_its_given_modality_is_checked(
        series, tmp_path, capsys):
    volume = tmp_path / "mr.nii.gz"  # NIfTI keeps no modality: only the user can say it is MR
    sitk.WriteImage(io.read_volume(series["mr"]), str(volume))
    code, err = run_cli(["upscale", volume, tmp_path / "refused", "--format", "dicom",
                         "--dicom-template", series["ct"], "--modality", "MR", "-q"], capsys)
    assert code == 2
    assert "Modality MR vs CT" in err and "non-DICOM volume" in err
    assert not (tmp_path / "refused").exists()
    recorded = tmp_path / "mr.nrrd"  # NRRD keeps the modality MedSR read from DICOM
    io.write_volume(io.read_volume(series["mr"]), recorded)
    code, err = run_cli(["upscale", recorded, tmp_path / "refused", "--format", "dicom",
                         "--dicom-template", series["ct"], "-q"], capsys)
    assert code == 2 and "Modality MR vs CT" in err and str(recorded) in err
    assert not (tmp_path / "refused").exists()
    # Without a known modality the template supplies the identity, by design.
    code, err = run_cli(["upscale", volume, tmp_path / "series", "--format", "dicom",
                         "--dicom-template", series["mr"], "--model", "nearest", "-q"], capsys)
    assert code == 0, err
    assert {ds.PatientID for ds in headers(tmp_path / "series")} == {"CMB-CRC-MSB-06489"}


def test_library_template_is_checked_against_the_input_series(series, tmp_path, caplog):
    image = MedSRLib.upscale(io.read_volume(series["ct"]), model="nearest", scale=2)
    with pytest.raises(InputError, match="OTHER-PATIENT-7.*CRLM-CT-1004|CRLM-CT-1004.*OTHER"):
        MedSRLib.write_dicom_series(image, series["ct_other"], tmp_path / "a",
                                    derived_from_source=False, input_series=series["ct"])
    with pytest.raises(InputError, match="Modality CT vs MR"):  # the image says it is CT
        MedSRLib.write_dicom_series(image, series["mr"], tmp_path / "b",
                                    derived_from_source=False)
    with pytest.raises(InputError, match="image was read from a CT series"):
        MedSRLib.write_dicom_series(image, series["mr"], tmp_path / "c")  # wrong source
    assert not any(tmp_path.iterdir())
    with caplog.at_level(logging.WARNING, logger="MedSRLib"):
        MedSRLib.write_dicom_series(image, series["ct_other"], tmp_path / "d",
                                    derived_from_source=False, input_series=series["ct"],
                                    accept_template_mismatch=True)
    assert any("OTHER-PATIENT-7" in r.getMessage() and "CRLM-CT-1004" in r.getMessage()
               for r in caplog.records)


def test_mixed_template_folder_advice_names_the_template_option(series, tmp_path, capsys,
                                                                no_compute):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("ct_same_study", "mr"):
        for path in series[name].iterdir():
            shutil.copy(path, mixed / f"{name}_{path.name}")
    code, err = run_cli(["upscale", series["ct"], tmp_path / "series", "--format", "dicom",
                         "--dicom-template", mixed, "-q"], capsys)
    assert code == 2
    assert f"{mixed}: DICOM template holds 2 DICOM series" in err
    assert "--dicom-template-series UID" in err and "--series" not in err.replace(
        "--dicom-template-series", "")
    ct_uid = headers(series["ct_same_study"])[0].SeriesInstanceUID
    assert ct_uid in err


def test_template_series_option_picks_the_template(series, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("ct_same_study", "mr"):
        for path in series[name].iterdir():
            shutil.copy(path, mixed / f"{name}_{path.name}")
    ct_uid = headers(series["ct_same_study"])[0].SeriesInstanceUID
    code, err = run_cli(["upscale", series["ct"], tmp_path / "series", "--format", "dicom",
                         "--dicom-template", mixed, "--dicom-template-series", ct_uid,
                         "--model", "nearest", "-q"], capsys)
    assert code == 0, err
    assert "identity from template series " + ct_uid in headers(tmp_path / "series")[0]\
        .DerivationDescription


# -- MONOCHROME1: read, super-resolved and written so that it displays as the source ----------

def stored_range(ds: pydicom.Dataset) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def as_monochrome1(ds: pydicom.Dataset) -> None:
    """The MONOCHROME1 form of a MONOCHROME2 slice (PS3.3 C.7.6.3.1.2): stored values inverted
    within the range BitsStored allows, the window centre moved with them (same width; + 1:
    the LINEAR window function centres on c - 0.5, PS3.3 C.11.2.1.2.1)."""
    low, high = stored_range(ds)
    stored = ds.pixel_array.astype(np.int64)
    ds.PixelData = ((low + high) - stored).astype(ds.pixel_array.dtype).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    ds.WindowCenter = f"{slope * (low + high) + 2 * intercept - float(ds.WindowCenter) + 1:g}"


def displayed(ds: pydicom.Dataset) -> np.ndarray:
    """Grey levels 0 (black) .. 1 (white) a viewer shows: Modality LUT, the first window
    (PS3.3 C.11.2.1.2.1, linear), then MONOCHROME1 inverted."""
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    centre = ds.WindowCenter[0] if isinstance(ds.WindowCenter, pydicom.multival.MultiValue) \
        else ds.WindowCenter
    width = ds.WindowWidth[0] if isinstance(ds.WindowWidth, pydicom.multival.MultiValue) \
        else ds.WindowWidth
    grey = np.clip((values - (float(centre) - 0.5)) / (float(width) - 1) + 0.5, 0.0, 1.0)
    return 1.0 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey


def by_position(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def monochrome1(series, tmp_path_factory):
    """The cropped CT and its MONOCHROME1 form, made from the real files."""
    root = tmp_path_factory.mktemp("monochrome1")
    m1 = root / "m1"
    m1.mkdir()
    for path in series["ct"].iterdir():
        ds = pydicom.dcmread(path)
        as_monochrome1(ds)
        ds.save_as(m1 / path.name)
    return {"m2": series["ct"], "m1": m1}


def info_lines(folder: Path, capsys) -> dict[str, str]:
    assert cli.main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    return dict(re.findall(r"^(\w+)\s+(.+)$", out, flags=re.M))


def test_monochrome1_reads_with_the_values_of_its_monochrome2_form(monochrome1, capsys):
    m1, m2 = info_lines(monochrome1["m1"], capsys), info_lines(monochrome1["m2"], capsys)
    assert (m1["intensity_min"], m1["intensity_max"]) == (m2["intensity_min"],
                                                          m2["intensity_max"])
    source = by_position(headers(monochrome1["m2"]))
    hu = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in source])
    assert float(m2["intensity_min"]) == hu.min() and float(m2["intensity_max"]) == hu.max()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_volume(monochrome1["m1"])), hu)


@pytest.mark.parametrize("model", ["nearest", "bicubic"])
def test_monochrome1_round_trip_displays_the_source_grey_values(monochrome1, tmp_path, capsys,
                                                                model):
    outputs = {}
    for form in ("m1", "m2"):
        outputs[form] = tmp_path / form
        code, err = run_cli(["upscale", monochrome1[form], outputs[form], "--format", "dicom",
                             "--scale", "2", "--model", model, "-q"], capsys)
        assert code == 0, err
    source = by_position(headers(monochrome1["m1"]))
    written = by_position(headers(outputs["m1"]))
    assert {ds.PhotometricInterpretation for ds in written} == {"MONOCHROME2"}
    assert len(written) == len(source)
    for src, out in zip(source, written):
        shown, shown_source = displayed(out), displayed(src)
        assert shown.shape == (2 * CROP, 2 * CROP)
        if model == "nearest":  # every output pixel repeats one source pixel
            np.testing.assert_allclose(shown[::2, ::2], shown_source, atol=1e-9)
        else:  # interpolation error only: the 2x2 mean of the output is the source's grey
            means = shown.reshape(CROP, 2, CROP, 2).mean(axis=(1, 3))
            assert np.abs(means - shown_source).mean() < 0.02
    # The MONOCHROME1 source's output is the MONOCHROME2 source's output, grey for grey.
    for a, b in zip(written, by_position(headers(outputs["m2"]))):
        np.testing.assert_allclose(displayed(a), displayed(b), atol=1e-9)
        np.testing.assert_array_equal(apply_modality_lut(a.pixel_array, a),
                                      apply_modality_lut(b.pixel_array, b))
    # Re-read: the written series has the MONOCHROME2 form's range (info level).
    m1, m2 = info_lines(outputs["m1"], capsys), info_lines(outputs["m2"], capsys)
    assert (m1["intensity_min"], m1["intensity_max"]) == (m2["intensity_min"],
                                                          m2["intensity_max"])


# -- impossible rescales are refused on read, naming the file ----------------------------------

@pytest.mark.parametrize("keyword, value", [("RescaleSlope", "0"), ("RescaleSlope", "nan"),
                                            ("RescaleSlope", "inf"),
                                            ("RescaleIntercept", "-inf"),
                                            ("RescaleIntercept", "nan")])
def test_impossible_rescale_is_refused_naming_the_file(series, tmp_path, capsys, keyword, value):
    folder = tmp_path / "series"
    shutil.copytree(series["ct"], folder)
    broken = sorted(folder.iterdir())[2]
    ds = pydicom.dcmread(broken)
    tag = pydicom.datadict.tag_for_keyword(keyword)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that NaN/inf are not valid DS values
        ds[tag] = DataElement(tag, "DS", value)
    ds.save_as(broken)
    code, err = run_cli(["info", folder], capsys)
    assert code == 2
    assert broken.name in err and keyword in err
    code, err = run_cli(["info", broken], capsys)  # one file read alone
    assert code == 2
    assert str(broken) in err and keyword in err
    code, err = run_cli(["upscale", folder, tmp_path / "out.nrrd", "-q"], capsys)
    assert code == 2 and broken.name in err
    assert not (tmp_path / "out.nrrd").exists()


# -- --overwrite replaces a series MedSR wrote, never another folder of DICOM files ------------

def test_overwrite_refuses_a_folder_of_a_scanner_series(series, tmp_path, capsys, no_compute):
    folder = tmp_path / "original"
    shutil.copytree(series["ct_other"], folder)  # another patient's original series
    before = snapshot(folder)
    code, err = run_cli(["upscale", series["ct"], folder, "--format", "dicom", "--overwrite",
                         "-q"], capsys)
    assert code == 2
    assert str(folder) in err and "replaces only a DICOM series MedSR wrote" in err
    assert snapshot(folder) == before


def test_overwrite_replaces_a_medsr_series_but_not_one_with_a_foreign_file(series, tmp_path,
                                                                           capsys):
    folder = tmp_path / "series"
    args = ["upscale", series["ct"], folder, "--format", "dicom", "--model", "nearest", "-q"]
    assert run_cli(args, capsys)[0] == 0
    assert run_cli([*args, "--model", "bicubic", "--overwrite"], capsys)[0] == 0  # MedSR's own
    assert "model bicubic" in headers(folder)[0].DerivationDescription
    foreign = sorted(series["ct_other"].iterdir())[0]
    shutil.copy(foreign, folder / "foreign.dcm")
    before = snapshot(folder)
    code, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 2 and "foreign.dcm" in err and str(folder) in err
    assert snapshot(folder) == before


# -- a fractional through-plane factor is a new slice spacing for a DICOM series --------------

def test_fractional_through_plane_factor_writes_a_dicom_series(shared_data, tmp_path, capsys,
                                                                single_thread):
    files = sorted((shared_data / CT_SERIES).glob("*.dcm"))[18:22]  # 4 x 5 mm -> 10 x 2 mm
    small = write_crop(files, tmp_path / "ct", size=16)  # the through-plane network is slow
    out = tmp_path / "series"
    code, err = run_cli(["upscale", small, out, "--format", "dicom",
                         "--scale", "1,1,2.5", "-q"], capsys)
    assert code == 0, err
    written = by_position(headers(out))
    source = by_position(headers(small))
    reread = io.read_volume(out)
    assert reread.GetSize()[2] == len(written) > len(source)
    steps = np.diff([float(ds.ImagePositionPatient[2]) for ds in written])
    np.testing.assert_allclose(steps, float(written[0].SpacingBetweenSlices), rtol=1e-4)
    assert len(written) == 10
    assert float(written[0].SpacingBetweenSlices) == pytest.approx(2.0, abs=1e-4)
    assert float(written[0].SliceThickness) == pytest.approx(float(source[0].SliceThickness) / 2.5,
                                                              abs=1e-4)
    assert "x1,1,2.5" in written[0].SeriesDescription
    assert "through_plane_net.safetensors" in written[0].DerivationDescription
