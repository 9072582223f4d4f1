"""Reading and writing volumes: round trips per format, real DICOM, bad files, atomic writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedSRLib.io import volumes as io
from MedSRLib.errors import InputError

from conftest import make_volume, oblique_direction


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_volume_round_trip_keeps_voxels_and_geometry(tmp_path, suffix):
    image = make_volume(direction=oblique_direction())
    path = io.write_volume(image, tmp_path / f"vol{suffix}")
    back = io.read_volume(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert back.GetPixelID() == image.GetPixelID()
    # NIfTI stores geometry in float32 (GOTCHAS): allow its rounding, demand double elsewhere.
    tolerance = 1e-4 if suffix.startswith(".nii") else 1e-9
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=tolerance)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=tolerance)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=tolerance)


def test_png_round_trip_as_one_slice_volume(tmp_path):
    values = (np.arange(30 * 40).reshape(30, 40) % 251).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / "xray.png"))
    volume = io.read_volume(tmp_path / "xray.png")
    assert volume.GetDimension() == 3 and volume.GetSize() == (40, 30, 1)
    io.write_volume(volume, tmp_path / "copy.png")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "copy.png"))), values)


def test_real_dicom_series_reads_with_modality(shared_data):
    volume = io.read_volume(shared_data / "ct" / "crlm-ct-1004-dicom")
    assert volume.GetSize() == (512, 512, 41)
    np.testing.assert_allclose(volume.GetSpacing(), (0.796875, 0.796875, 5.0), atol=1e-6)
    assert io.modality_of(volume) == "CT"
    voxels = sitk.GetArrayViewFromImage(volume)
    assert voxels.min() < -900 and voxels.max() > 1000  # HU, rescale applied


def test_jpeg2000_compressed_dicom_series_decodes(shared_data):
    volume = io.read_volume(shared_data / "ct" / "totalseg-example-ct-dicom-j2k")
    assert volume.GetSize() == (512, 512, 20)
    voxels = sitk.GetArrayViewFromImage(volume)
    assert voxels.std() > 100  # real decoded anatomy, not a blank


def test_folder_with_two_series_lists_them_and_reads_the_chosen_one(tmp_path, shared_data):
    ct_files = sorted((shared_data / "ct" / "crlm-ct-1004-dicom").iterdir())[:3]
    mr_files = sorted((shared_data / "mr" / "pelvis-t2-dicom").iterdir())[:3]
    for f in ct_files + mr_files:
        shutil.copy(f, tmp_path / f"{f.parent.name}_{f.name}")
    series = io.list_dicom_series(tmp_path)
    assert len(series) == 2
    with pytest.raises(InputError, match="--series") as info:
        io.read_volume(tmp_path)
    for entry in series:
        assert entry.uid in str(info.value)
    mr_uid = next(s.uid for s in series if s.modality == "MR")
    chosen = io.read_volume(tmp_path, series_uid=mr_uid)
    assert chosen.GetSize()[2] == 3 and io.modality_of(chosen) == "MR"
    with pytest.raises(InputError, match="no series with UID"):
        io.read_volume(tmp_path, series_uid="1.2.3.4")


def test_rgb_image_is_refused(tmp_path):
    rgb = sitk.GetImageFromArray(np.zeros((8, 9, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.png"))
    with pytest.raises(InputError, match="RGB"):
        io.read_volume(tmp_path / "rgb.png")


def test_4d_volume_is_refused(tmp_path):
    four_d = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False)
    sitk.WriteImage(four_d, str(tmp_path / "four_d.nrrd"))
    with pytest.raises(InputError, match="4-D"):
        io.read_volume(tmp_path / "four_d.nrrd")


def test_corrupt_and_missing_files_are_refused(tmp_path):
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(b"this is not a nifti file at all" * 10)
    with pytest.raises(InputError, match="broken.nii.gz: cannot read"):
        io.read_volume(corrupt)
    with pytest.raises(InputError, match="no such file"):
        io.read_volume(tmp_path / "absent.nrrd")


@pytest.mark.parametrize("spacing_text", [b"0 1 1", b"1 -2 1"])
def test_zero_or_negative_header_spacing_is_refused(tmp_path, spacing_text):
    path = tmp_path / "bad_spacing.mha"
    sitk.WriteImage(make_volume(spacing=(1.0, 1.0, 1.0)), str(path), False)
    content = path.read_bytes()
    assert b"ElementSpacing = 1 1 1" in content
    path.write_bytes(content.replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = " + spacing_text))
    with pytest.raises(InputError, match="zero, negative or non-finite voxel spacing"):
        io.read_volume(path)


def test_failed_write_leaves_no_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.nrrd"

    def write_half_then_fail(image, name, *args):
        Path(name).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(io.sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(io.WriteError, match="out.nrrd: cannot write .disk full.; nothing was written"):
        io.write_volume(make_volume(), target)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_input_is_protected(tmp_path):
    image = make_volume()
    path = io.write_volume(image, tmp_path / "vol.mha")
    before = path.read_bytes()
    with pytest.raises(InputError, match="exists"):
        io.write_volume(image, path)
    with pytest.raises(InputError, match="overwrite the input"):
        io.check_output_path(path, path, overwrite=True)
    assert path.read_bytes() == before
    io.write_volume(make_volume(seed=3), path, overwrite=True)
    assert path.read_bytes() != before


def test_png_output_refuses_multi_slice_and_float(tmp_path):
    with pytest.raises(InputError, match="one slice"):
        io.write_volume(make_volume(), tmp_path / "x.png")
    flat = make_volume(shape_kji=(1, 8, 8), dtype=np.float32)
    with pytest.raises(InputError, match="unsigned"):
        io.write_volume(flat, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_new_volume_view_writes_into_the_image_itself(dtype):
    image, voxels = io.new_volume((5, 4, 3), np.dtype(dtype))
    assert voxels.shape == (3, 4, 5) and voxels.dtype == np.dtype(dtype) and voxels.flags.writeable
    assert image.GetSize() == (5, 4, 3) and not voxels.any()
    voxels[1, 2, 3] = 7
    voxels[2] = 1
    expected = np.zeros((3, 4, 5), dtype)
    expected[1, 2, 3], expected[2] = 7, 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
    del image  # the view keeps the image's buffer alive
    voxels[0, 0, 0] = 3
    assert voxels[0, 0, 0] == 3 and voxels[1, 2, 3] == 7
