"""check_series_files: DICOM series that GDCM/ITK read into a wrongly sampled volume are refused.

Each defective series is 8 consecutive real CT slices (1-11.dcm .. 1-18.dcm of
crlm-ct-1004-dicom, z = -225 .. -260 mm, 5 mm apart) with one file damaged by pydicom; the
file list and series UID come from SimpleITK's GDCM calls, as in MedSRLib.io.volumes. The comments
record what SimpleITK 2.5 (ITK 5.4) does with the same folder: it reads every one of them
without an exception, at most printing an ITK warning.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk

from MedSRLib.io.dicom_checks import check_series_files
from MedSRLib.errors import InputError

CT_SERIES = "ct/crlm-ct-1004-dicom"
SLICES = [f"1-{i:02d}.dcm" for i in range(11, 19)]
DAMAGED = "1-14.dcm"  # 4th of the 8, at z = -240 mm; its neighbours are 1-13.dcm and 1-15.dcm


@pytest.fixture
def ct_copy(shared_data, tmp_path) -> Path:
    """A writable copy of 8 consecutive slices of the real CT series."""
    folder = tmp_path / "series"
    folder.mkdir()
    for name in SLICES:
        shutil.copyfile(shared_data / CT_SERIES / name, folder / name)  # sources are read-only
    return folder


def gdcm_series(folder: Path) -> tuple[list[str], str]:
    """The one series' file list and UID, exactly as the caller (MedSRLib.io.volumes) obtains them."""
    reader = sitk.ImageSeriesReader()
    uids = reader.GetGDCMSeriesIDs(str(folder))
    assert len(uids) == 1
    return list(reader.GetGDCMSeriesFileNames(str(folder), uids[0])), uids[0]


def refusal(folder: Path) -> str:
    files, uid = gdcm_series(folder)
    with pytest.raises(InputError) as caught:
        check_series_files(folder, files, uid)
    message = str(caught.value)
    assert message.startswith(f"{folder}: ")
    return message


def edit(path: Path, change) -> None:
    dataset = pydicom.dcmread(path)
    change(dataset)
    dataset.save_as(path)


def test_clean_copy_passes(ct_copy):
    files, uid = gdcm_series(ct_copy)
    assert check_series_files(ct_copy, files, uid) is None


@pytest.mark.parametrize("series", [CT_SERIES, "mr/pelvis-t2-dicom",
                                    "ct/totalseg-example-ct-dicom-j2k"])  # JPEG 2000, empty UID
def test_real_full_series_pass(shared_data, series):
    folder = shared_data / series
    files, uid = gdcm_series(folder)
    check_series_files(folder, files, uid)


def test_truncated_file_is_named_though_the_reader_dropped_it(ct_copy):
    path = ct_copy / DAMAGED
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # SimpleITK: GDCM leaves 1-14.dcm out of the file list (listed explicitly, Execute raises
    # "Cannot read requested file"); the 7 others read as a volume of spacing 5.83 mm with
    # only a "Non uniform sampling" warning (issue 14: 6.25 mm in the full series).
    message = refusal(ct_copy)
    assert (f"{DAMAGED} is truncated or unreadable: pixel data holds 260548 of 524288 bytes"
            in message)
    assert "left it out of the series" in message
    assert ("10.0 mm between 1-15.dcm and 1-13.dcm, 5.0 mm elsewhere (a slice is missing?)"
            in message)


def test_short_pixel_data_element_is_named(ct_copy):
    edit(ct_copy / DAMAGED,
         lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2]))
    # SimpleITK: GDCM lists the file and Execute reads it with no warning at all; half of
    # that slice's voxels are whatever the reader fills in.
    assert refusal(ct_copy) == (f"{ct_copy}: {DAMAGED} is truncated or unreadable: "
                                "pixel data holds 262144 of 524288 bytes")


def test_file_without_image_position_is_named(ct_copy):
    edit(ct_copy / DAMAGED, lambda ds: ds.__delattr__("ImagePositionPatient"))
    # SimpleITK: GDCM lists 1-14.dcm last; spacing 55.05 mm (issue 14: 75.7 mm).
    assert refusal(ct_copy) == (f"{ct_copy}: {DAMAGED} has no ImagePositionPatient: "
                                "slice geometry unknown")


def test_duplicated_slice_position_is_named(ct_copy):
    neighbour = pydicom.dcmread(ct_copy / "1-13.dcm", stop_before_pixels=True)
    edit(ct_copy / DAMAGED, lambda ds: setattr(ds, "ImagePositionPatient",
                                               neighbour.ImagePositionPatient))
    # SimpleITK: GDCM drops position order for instance-number order; spacing 5.0 mm but the
    # slice axis is flipped (direction z = -1) (issue 14: 2 mm and flipped).
    assert refusal(ct_copy) == (f"{ct_copy}: 1-13.dcm and {DAMAGED} are at the same slice "
                                "position (duplicated slice)")


def test_missing_middle_slice_is_reported_as_uneven_spacing(ct_copy):
    (ct_copy / DAMAGED).unlink()
    # SimpleITK: 7 slices at spacing 5.83 mm instead of 5 mm, a "Non uniform sampling" warning.
    assert refusal(ct_copy) == (f"{ct_copy}: slice positions are not evenly spaced: 10.0 mm "
                                "between 1-15.dcm and 1-13.dcm, 5.0 mm elsewhere "
                                "(a slice is missing?)")


def test_file_of_another_orientation_is_named(ct_copy):
    edit(ct_copy / DAMAGED, lambda ds: setattr(ds, "ImageOrientationPatient",
                                               [1, 0, 0, 0, 0.9848078, -0.1736482]))  # 10 deg tilt
    # SimpleITK: reads spacing 5.0 mm and the identity direction, no warning at all.
    message = refusal(ct_copy)
    assert f"{DAMAGED} has ImageOrientationPatient (1, 0, 0, 0, 0.9848, -0.1736)" in message
    assert "unlike the other 7 files (1, 0, 0, 0, 1, 0)" in message
    assert "different orientations" in message


def test_float_jitter_in_positions_passes(ct_copy):
    def nudge(ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 0.004]  # 0.08 % of the 5 mm gap
    edit(ct_copy / DAMAGED, nudge)
    files, uid = gdcm_series(ct_copy)
    check_series_files(ct_copy, files, uid)


def test_file_order_that_is_not_slice_order_is_refused(ct_copy):
    files, uid = gdcm_series(ct_copy)
    files[2], files[3] = files[3], files[2]  # what ITK would then stack in the wrong place
    with pytest.raises(InputError, match="file order is not the slice order"):
        check_series_files(ct_copy, files, uid)


def test_hidden_and_non_dicom_files_are_ignored(ct_copy):
    data = (ct_copy / DAMAGED).read_bytes()
    (ct_copy / ".partial.dcm").write_bytes(data[: len(data) // 2])
    (ct_copy / "notes.txt").write_text("not DICOM", encoding="utf-8")
    files, uid = gdcm_series(ct_copy)
    check_series_files(ct_copy, files, uid)


def test_single_file_series_skips_geometry_checks(ct_copy):
    for name in SLICES[1:]:
        (ct_copy / name).unlink()
    edit(ct_copy / SLICES[0], lambda ds: ds.__delattr__("ImagePositionPatient"))
    files, uid = gdcm_series(ct_copy)
    check_series_files(ct_copy, files, uid)
