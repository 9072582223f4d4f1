"""Issue 17: the super-resolved volume as a valid derived DICOM series ("back to the PACS").

Real data: 4-slice crops (symlinked files, UIDs untouched) of the shared CT, MR and JPEG 2000 CT
series, super-resolved with `medsr upscale ... --model bicubic` (in-process CLI). Every written
series is checked with dciodvfy (dicom3tools; `make test` installs it through
Testing/install_test_tools.sh), re-read with SimpleITK against the NRRD output of the same
command, and read file by file with pydicom for the identity and geometry tags.
"""

from __future__ import annotations

import datetime
import errno
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import MedSRLib
from MedSRLib import cli
from MedSRLib.io import dicom_export, volumes as io
from conftest import REPO_ROOT

CROP_SLICES = 4
SERIES = {  # case: (folder under shared data, --scale, expected (x, y, z) factors)
    "ct": ("ct/crlm-ct-1004-dicom", "2", (2, 2, 1)),
    "ct_through_plane": ("ct/crlm-ct-1004-dicom", "1,1,2", (1, 1, 2)),
    "mr": ("mr/pelvis-t2-dicom", "2", (2, 2, 1)),
    "ct_jpeg2000": ("ct/totalseg-example-ct-dicom-j2k", "2", (2, 2, 1)),
}

#: dciodvfy errors left in our output, each also in the source's own report, with the reason.
INHERITED_ERRORS = {
    "ct_jpeg2000": {
        "Error - Missing attribute Type 2C Conditional Element=<Laterality> Module=<GeneralSeries>":
            "the source slices carry no Laterality (BodyPartExamined PARTIALBODY); MedSR copies "
            "the patient's series attributes and does not invent a laterality",
    },
}
#: dciodvfy warnings in our output that the source's report does not have, with the reason.
#: None remain: every warning of the written series is one the source already has (retired or
#: non-standard attributes, vendor coding schemes, a retired Person Name form, an empty Study ID).
NEW_WARNINGS: dict[str, dict[str, str]] = {}


def run_cli(*arguments) -> int:
    return cli.main(["upscale", *map(str, arguments), "-q"])


@pytest.fixture(scope="module")
def crops(shared_data, tmp_path_factory):
    """Folder of CROP_SLICES consecutive middle slices (symlinks to the real files) per series."""
    root = tmp_path_factory.mktemp("sources")
    folders = {}
    for name in {folder for folder, _, _ in SERIES.values()}:
        files = io.list_dicom_series(shared_data / name)[0].files
        start = (len(files) - CROP_SLICES) // 2
        crop = root / Path(name).name
        crop.mkdir()
        for path in files[start:start + CROP_SLICES]:
            (crop / Path(path).name).symlink_to(path)
        folders[name] = crop
    return folders


@pytest.fixture(scope="module", params=sorted(SERIES))
def exported(request, crops, tmp_path_factory):
    """One case: (case, source crop, DICOM folder, NRRD of the same command, factors)."""
    case = request.param
    name, scale, factors = SERIES[case]
    out = tmp_path_factory.mktemp(case)
    dicom_folder, nrrd = out / "series", out / "sr.nrrd"
    common = ("--model", "bicubic", "--scale", scale)
    assert run_cli(crops[name], dicom_folder, *common) == 0  # no suffix + DICOM input: DICOM
    assert run_cli(crops[name], nrrd, *common) == 0
    return case, crops[name], dicom_folder, nrrd, factors


def read_series(folder: Path) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    return sorted(datasets, key=lambda ds: int(ds.InstanceNumber))


def source_headers(folder: Path) -> list[pydicom.Dataset]:
    return list(dicom_export.load_source(folder).headers)


def representable(nrrd_voxels: np.ndarray, source: pydicom.Dataset) -> np.ndarray:
    """The NRRD voxels clipped to what the source's stored representation can hold."""
    bits, signed = int(source.BitsStored), int(source.PixelRepresentation) == 1
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    slope = float(source.get("RescaleSlope", 1))
    intercept = float(source.get("RescaleIntercept", 0))
    return np.clip(nrrd_voxels, low * slope + intercept, high * slope + intercept)


# -- validation with an independent tool ------------------------------------------------------

def dciodvfy_report(path: Path) -> set[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return {line.strip() for line in lines if line.startswith(("Error", "Warning"))}


def source_report(path: Path, tmp_path: Path) -> set[str]:
    """dciodvfy's report of a source file; an empty SOP Class/Instance UID (the JPEG 2000
    series is over-anonymised: dciodvfy then stops at "Information Object Not found") is
    filled from the file meta first, so that the source is checked against its IOD too."""
    ds = pydicom.dcmread(path)
    if not ds.get("SOPClassUID"):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        path = tmp_path / f"{path.name}.dcm"
        ds.save_as(path)
    return dciodvfy_report(path)


def test_written_series_passes_dciodvfy_without_errors_of_its_own(exported, tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; `make test` installs "
                    "it through Testing/install_test_tools.sh when apt-get is usable (root)")
    case, source, folder, _, _ = exported
    ours = set().union(*(dciodvfy_report(p) for p in sorted(folder.iterdir())))
    theirs = set().union(*(source_report(p, tmp_path) for p in sorted(source.iterdir())))
    errors = {line for line in ours if line.startswith("Error")}
    assert errors == set(INHERITED_ERRORS.get(case, {})), errors
    assert errors <= theirs  # each remaining error is the source's own
    new_warnings = {line for line in ours if line.startswith("Warning")} - theirs
    assert new_warnings == set(NEW_WARNINGS.get(case, {})), new_warnings


# -- geometry and voxels ----------------------------------------------------------------------

def corners(image: sitk.Image) -> np.ndarray:
    size = image.GetSize()
    return np.array([image.TransformIndexToPhysicalPoint(
        (i * (size[0] - 1), j * (size[1] - 1), k * (size[2] - 1)))
        for i in (0, 1) for j in (0, 1) for k in (0, 1)])


def test_series_rereads_with_simpleitk_to_the_nrrd_grid_and_voxels(exported):
    case, source, folder, nrrd, factors = exported
    reader = sitk.ImageSeriesReader()
    assert len(reader.GetGDCMSeriesIDs(str(folder))) == 1  # one series in the folder
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    from_dicom, expected = reader.Execute(), sitk.ReadImage(str(nrrd))
    assert from_dicom.GetSize() == expected.GetSize()
    assert expected.GetSize()[2] == CROP_SLICES * factors[2]
    np.testing.assert_allclose(corners(from_dicom), corners(expected), rtol=0, atol=1e-4)
    np.testing.assert_allclose(from_dicom.GetDirection(), expected.GetDirection(), atol=1e-9)
    voxels = sitk.GetArrayFromImage(expected).astype(np.float64)
    stored_range = representable(voxels, source_headers(source)[0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_dicom), stored_range)
    clipped = np.count_nonzero(stored_range != voxels)
    # Only the 12-bit JPEG 2000 CT (HU -1024..3071) clips: bicubic undershoot below -1024 HU.
    assert (clipped > 0) == (case == "ct_jpeg2000")


def test_every_slice_has_the_sr_grid_and_the_source_stored_representation(exported):
    _, source, folder, nrrd, factors = exported
    expected = sitk.ReadImage(str(nrrd))
    voxels = sitk.GetArrayFromImage(expected).astype(np.float64)
    first = source_headers(source)[0]
    spacing, direction = expected.GetSpacing(), np.reshape(expected.GetDirection(), (3, 3))
    datasets = read_series(folder)
    assert len(datasets) == expected.GetSize()[2]
    for k, ds in enumerate(datasets):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   expected.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-4)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient],
                                   [*direction[:, 0], *direction[:, 1]], atol=1e-9)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [spacing[1], spacing[0]])
        assert float(ds.SpacingBetweenSlices) == pytest.approx(spacing[2])
        assert float(ds.SliceThickness) == pytest.approx(float(first.SliceThickness) / factors[2])
        assert (ds.Rows, ds.Columns) == (expected.GetSize()[1], expected.GetSize()[0])
        for keyword in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                        "PhotometricInterpretation", "WindowCenter", "WindowWidth"):
            assert ds.get(keyword) == first.get(keyword), keyword
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            assert (keyword in ds) == (keyword in first)
            assert float(ds.get(keyword, 0)) == float(first.get(keyword, 0)), keyword
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.pixel_array.dtype.kind == ("i" if first.PixelRepresentation else "u")
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        units = ds.pixel_array * slope + intercept
        np.testing.assert_array_equal(units, representable(voxels[k], first))


# -- identity ---------------------------------------------------------------------------------

PATIENT_STUDY_KEYWORDS = ("StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
                          "StudyID", "ReferringPhysicianName", "FrameOfReferenceUID",
                          "Modality", "PatientIdentityRemoved", "DeidentificationMethod")


def test_series_has_the_source_identity_and_the_derived_series_tags(exported):
    case, source, folder, _, factors = exported
    sources = source_headers(source)
    first = sources[0]
    datasets = read_series(folder)
    today = datetime.date.today().strftime("%Y%m%d")
    series_uids = {str(ds.SeriesInstanceUID) for ds in datasets}
    sop_uids = [str(ds.SOPInstanceUID) for ds in datasets]
    assert len(series_uids) == 1 and first.get("SeriesInstanceUID") not in series_uids
    assert len(set(sop_uids)) == len(datasets)
    assert not set(sop_uids) & {str(h.get("SOPInstanceUID")) for h in sources}
    assert all(uid.startswith(dicom_export.UID_ROOT) for uid in [*series_uids, *sop_uids])
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, len(datasets) + 1))
    private = [e.tag for h in sources for e in h if e.tag.is_private]
    assert private, "the sources carry private tags; none may be copied"
    factors_text = ",".join(map(str, factors))
    for ds in datasets:
        assert ds.SOPClassUID == dicom_export.load_source(source).storage_class
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for element in first.group_dataset(0x0010):  # the whole Patient group, unchanged
            assert ds[element.tag].value == element.value, element.keyword
        for keyword in PATIENT_STUDY_KEYWORDS:
            assert ds.get(keyword) == first.get(keyword), keyword
        if first.get("StudyInstanceUID"):
            assert ds.StudyInstanceUID == first.StudyInstanceUID
        assert int(ds.SeriesNumber) == int(first.get("SeriesNumber") or 0) + 1000
        assert ds.SeriesDescription == f"{first.SeriesDescription} MedSR x{factors_text} bicubic"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "bicubic" in ds.DerivationDescription
        assert "weights none (interpolation)" in ds.DerivationDescription
        assert f"x{factors_text} (x,y,z)" in ds.DerivationDescription
        assert ds.DerivationCodeSequence[0].CodeMeaning == "Spatial resampling"
        assert ds.ContentDate == today and ds.SeriesDate == today and ds.ContentTime
        assert ds.Manufacturer == "MedSR"
        assert ds.SoftwareVersions == f"MedSRLib {MedSRLib.__version__}"
        assert not any(e.tag.is_private for e in ds.iterall())
        assert "DeviceSerialNumber" not in ds and "StationName" not in ds
    if case == "ct_jpeg2000":
        # Over-anonymised source: no Study/Series/SOP Instance UID. The study UID is derived
        # from the source (one study for every export of it); no references can be written.
        assert not first.get("StudyInstanceUID") and not first.get("SOPInstanceUID")
        assert len({ds.StudyInstanceUID for ds in datasets}) == 1
        assert all("SourceImageSequence" not in ds and "ReferencedSeriesSequence" not in ds
                   for ds in datasets)
        return
    by_position = {h.SOPInstanceUID: float(h.ImagePositionPatient[2]) for h in sources}
    for ds in datasets:
        referenced = [item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence]
        assert all(item.ReferencedSOPClassUID == ds.SOPClassUID for item in ds.SourceImageSequence)
        z = float(ds.ImagePositionPatient[2])
        spacing = abs(np.diff(sorted(by_position.values()))[0])
        assert all(abs(by_position[uid] - z) < spacing for uid in referenced)
        assert 1 <= len(referenced) <= 2
        (series,) = ds.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == first.SeriesInstanceUID
        instances = {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence}
        assert instances == set(by_position)
    if factors[2] == 1:  # in-plane: each slice lies on one source slice
        assert all(len(ds.SourceImageSequence) == 1 for ds in datasets)
    else:  # through-plane: slices between two source slices reference both
        assert any(len(ds.SourceImageSequence) == 2 for ds in datasets)


# -- CLI: format choice, checks before computing, no partial series ---------------------------

@pytest.fixture
def no_compute(monkeypatch):
    """api.upscale must not run: the CLI checks the output before computing."""
    from MedSRLib import api

    def refuse(*args, **kwargs):
        raise AssertionError("upscale ran although the command was refused")

    monkeypatch.setattr(api, "upscale", refuse)


def test_non_dicom_input_needs_a_template(tmp_path, capsys, no_compute):
    sample = REPO_ROOT / "MedSRLib" / "data" / "ct_abdomen_sample.nrrd"
    assert run_cli(sample, tmp_path / "series", "--format", "dicom") == 2
    assert "--dicom-template" in capsys.readouterr().err
    assert not (tmp_path / "series").exists()
    assert run_cli(sample, tmp_path / "sr.nrrd", "--dicom-template", tmp_path) == 2
    assert "--dicom-template is for a DICOM series output" in capsys.readouterr().err


def test_template_gives_identity_without_source_references(crops, tmp_path):
    """The bundled sample is a crop of patient CRLM-CT-1004; the CT series is its template."""
    sample = REPO_ROOT / "MedSRLib" / "data" / "ct_abdomen_sample.nrrd"
    template = crops["ct/crlm-ct-1004-dicom"]
    assert run_cli(sample, tmp_path / "series", "--dicom-template", template,
                   "--model", "nearest") == 0  # no suffix + a template: DICOM
    first = source_headers(template)[0]
    datasets = read_series(tmp_path / "series")
    image = sitk.ReadImage(str(sample))
    assert len(datasets) == image.GetSize()[2]
    assert {float(ds.SliceThickness) for ds in datasets} == {image.GetSpacing()[2]}
    for ds in datasets:
        assert (ds.PatientID, ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (
            first.PatientID, first.StudyInstanceUID, first.FrameOfReferenceUID)
        assert "SourceImageSequence" not in ds and "ReferencedSeriesSequence" not in ds
        assert "identity from template series" in ds.DerivationDescription


def test_existing_output_folder_needs_overwrite_and_only_holds_dicom(crops, tmp_path, capsys,
                                                                      no_compute):
    source = crops["ct/crlm-ct-1004-dicom"]
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me", encoding="utf-8")
    assert run_cli(source, folder) == 2
    assert "not empty" in capsys.readouterr().err
    assert run_cli(source, folder, "--overwrite") == 2  # never deletes non-DICOM files
    assert "not a DICOM file" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert run_cli(source, source / "inside") == 2
    assert "inside" in capsys.readouterr().err
    assert run_cli(source, tmp_path / "sr.nii.gz", "--format", "dicom") == 2
    assert "folder" in capsys.readouterr().err


def test_overwrite_replaces_a_previous_series_only_when_the_new_one_is_complete(
        crops, tmp_path, capsys, monkeypatch):
    source = crops["ct/crlm-ct-1004-dicom"]
    folder = tmp_path / "series"
    assert run_cli(source, folder, "--model", "nearest") == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    before_uid = read_series(folder)[0].SeriesInstanceUID

    real_save, calls = dicom_export._save, []

    def disk_full_on_third_file(ds, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(ds, path)

    monkeypatch.setattr(dicom_export, "_save", disk_full_on_third_file)
    assert run_cli(source, folder, "--model", "nearest", "--overwrite") == 2
    assert "no space left" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]  # no temporary folder left
    monkeypatch.undo()

    assert run_cli(source, folder, "--model", "nearest", "--overwrite") == 0
    after = read_series(folder)
    assert len(after) == len(before)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} != before  # the new series replaced it
    assert {ds.SeriesInstanceUID for ds in after} == {before_uid}  # same source, model, scale: same UIDs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]


def test_failed_first_write_leaves_no_folder(crops, tmp_path, monkeypatch):
    source = crops["ct/crlm-ct-1004-dicom"]
    image = MedSRLib.upscale(io.read_volume(source), model="nearest", scale=2)

    def interrupted(ds, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(dicom_export, "_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MedSRLib.write_dicom_series(image, source, tmp_path / "series")
    assert list(tmp_path.iterdir()) == []


def test_library_call_takes_model_and_factors_from_the_image(crops, tmp_path):
    source = crops["mr/pelvis-t2-dicom"]
    assert "write_dicom_series" in MedSRLib.__all__
    image = MedSRLib.upscale(io.read_volume(source), model="nearest", scale=(1, 1, 3))
    path = MedSRLib.write_dicom_series(image, source, tmp_path / "series", uid_root=None,
                                       series_number=77, series_description="T2 SR")
    datasets = read_series(path)
    assert len(datasets) == CROP_SLICES * 3
    assert all(str(ds.SOPInstanceUID).startswith("2.25.") for ds in datasets)
    assert {(int(ds.SeriesNumber), ds.SeriesDescription) for ds in datasets} == {(77, "T2 SR")}
    assert "model nearest" in datasets[0].DerivationDescription
    assert "x1,1,3 (x,y,z)" in datasets[0].DerivationDescription
    other = MedSRLib.write_dicom_series(image, source, tmp_path / "own_weights",
                                        model="edsr_lite", weights="/w/my_ct_x3.safetensors")
    description = read_series(other)[0].DerivationDescription
    assert "model edsr_lite, weights my_ct_x3.safetensors" in description
    from MedSRLib.models import registry as zoo

    shipped = zoo.shipped_weights(zoo.get_spec("edsr_lite"), 3, modality="MR")
    assert dicom_export._weights_name("edsr_lite", (1, 1, 3), None, "MR") == shipped.name
    plain = sitk.Image(image)
    for key in plain.GetMetaDataKeys():
        plain.EraseMetaData(key)
    with pytest.raises(MedSRLib.InputError, match="model"):
        MedSRLib.write_dicom_series(plain, source, tmp_path / "other")


# -- Slicer: the module's output in the input's study, exported through the library call ------

class DatabaseOfFiles:
    """FAKE slicer.dicomDatabase (see Testing/slicer_module/fakes/fake_dicom_database.py) whose
    instances are real files: fileForInstance(uid) -> path, fileValue(path, tag) -> Modality."""

    def __init__(self, files):
        self.file_of = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f)
                        for f in files}

    def fileForInstance(self, uid):
        return self.file_of.get(uid, "")

    def fileValue(self, path, tag):
        return str(pydicom.dcmread(path, stop_before_pixels=True).Modality) if path else ""


def test_slicer_output_sits_in_the_input_study_and_exports_as_derived_series(
        crops, tmp_path, monkeypatch):
    pytest.importorskip("slicer_core", reason="needs slicer-core (pip install slicer-core)")
    pytest.importorskip("PySide6", reason="needs PySide6-Essentials")
    sys.path.insert(0, str(REPO_ROOT / "Testing" / "slicer_module"))
    try:
        importlib.import_module("harness")  # installs the documented fakes (qt, slicer.app, ...)
    finally:
        sys.path.remove(str(REPO_ROOT / "Testing" / "slicer_module"))
    import slicer

    import MedSR

    source = crops["ct/crlm-ct-1004-dicom"]
    headers = source_headers(source)
    slicer.mrmlScene = slicer.vtkMRMLScene()
    try:
        logic = MedSR.MedSRLogic()
        image = io.read_volume(source)
        node = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image),
                                              ijkToRAS=logic.ijkToRASFromImage(image), name="CT")
        node.SetAttribute("DICOM.instanceUIDs", " ".join(h.SOPInstanceUID for h in headers))
        monkeypatch.setattr(slicer, "dicomDatabase", DatabaseOfFiles(source.iterdir()),
                            raising=False)
        sh = slicer.mrmlScene.GetSubjectHierarchyNode()
        patient = sh.CreateSubjectItem(sh.GetSceneItemID(), str(headers[0].PatientName))
        study = sh.CreateStudyItem(patient, str(headers[0].StudyDescription))
        sh.CreateItem(study, node)

        output = logic.process(node, model="bicubic", scale=2, show=False)
        output_item = sh.GetItemByDataNode(output)
        assert sh.GetItemParent(output_item) == study
        assert sh.GetItemAncestorAtLevel(output_item, "Patient") == patient

        folder = logic.exportDICOMSeries(output, node, tmp_path / "from_slicer")
        datasets = read_series(folder)
        voxels_kji = slicer.util.arrayFromVolume(output)
        assert len(datasets) == voxels_kji.shape[0]
        first = headers[0]
        sources = {h.SOPInstanceUID for h in headers}
        lps_origin = logic.volumeNodeToImage(output).GetOrigin()
        np.testing.assert_allclose([float(v) for v in datasets[0].ImagePositionPatient],
                                   lps_origin, atol=1e-4)
        for ds, voxels in zip(datasets, voxels_kji):
            assert (ds.PatientID, ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (
                first.PatientID, first.StudyInstanceUID, first.FrameOfReferenceUID)
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            assert ds.SeriesDescription == f"{first.SeriesDescription} MedSR x2,2,1 bicubic"
            assert "model bicubic" in ds.DerivationDescription
            assert {i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence} <= sources
            assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
            np.testing.assert_array_equal(
                ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), voxels)
    finally:
        slicer.mrmlScene.Clear(1)
