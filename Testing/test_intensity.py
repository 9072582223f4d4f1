"""Normalisation round trips exactly, and the output keeps the input's pixel type."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import MedSRLib
from MedSRLib.transforms import intensity
from MedSRLib.errors import InputError

from conftest import make_volume

RANGES = {
    "ct_hu_int16": (np.int16, -1024, 3071),
    "mr_float_arbitrary": (np.float32, 0.0, 1779.0),
    "xray_uint8": (np.uint8, 0, 255),
    "xray_uint16": (np.uint16, 0, 4095),
    "zscored_float_with_negatives": (np.float32, -3.16, 8.38),
}


@pytest.mark.parametrize("name", list(RANGES))
def test_unit_mapping_inverts_exactly(name):
    dtype, low, high = RANGES[name]
    rng = np.random.default_rng(1)
    values = rng.uniform(low, high, size=(4, 16, 16)).astype(dtype)
    mapping = intensity.fit_mapping(values)
    units = mapping.to_unit(values)
    assert units.dtype == np.float32
    assert -0.1 < np.percentile(units, 50) < 1.1
    restored = intensity.cast_to_dtype(mapping.from_unit(units), dtype)
    in_place = intensity.cast_to_dtype(mapping.from_unit(units), dtype, in_place=True)
    np.testing.assert_array_equal(in_place, restored)
    assert in_place.dtype == restored.dtype == np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        np.testing.assert_array_equal(restored, values)
    else:
        np.testing.assert_allclose(restored, values, rtol=1e-5, atol=1e-4 * (high - low))


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.uint16, np.int32, np.float32])
def test_nearest_x2_returns_input_values_in_input_dtype(dtype):
    image = make_volume(shape_kji=(3, 7, 9), dtype=dtype)
    out = MedSRLib.upscale(image, model="nearest", scale=2, axis="z")
    expected = np.kron(sitk.GetArrayFromImage(image), np.ones((1, 2, 2)))
    assert sitk.GetArrayViewFromImage(out).dtype == np.dtype(dtype)
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), expected.astype(dtype), rtol=1e-6, atol=1e-3)


def test_float_output_is_asked_explicitly():
    image = make_volume(dtype=np.int16)
    out = MedSRLib.upscale(image, model="bicubic", scale=2, output_float=True)
    assert out.GetPixelID() == sitk.sitkFloat32


def test_unsigned_output_is_clipped_not_wrapped():
    values = np.zeros((2, 8, 8), np.uint8)
    values[:, :, 4:] = 255  # a hard edge: bicubic overshoots below 0 and above 255
    out = MedSRLib.upscale(sitk.GetImageFromArray(values), model="bicubic", scale=2)
    result = sitk.GetArrayViewFromImage(out)
    assert result[:, :, :6].max() < 20 and result[:, :, 10:].min() > 235


def test_nan_and_inf_voxels_are_refused():
    values = np.ones((3, 8, 8), np.float32)
    values[1, 2, 3] = np.nan
    values[2, 2, 3] = np.inf
    with pytest.raises(InputError, match="2 NaN or infinite"):
        MedSRLib.upscale(sitk.GetImageFromArray(values), model="bicubic")


def test_constant_volume_round_trips():
    image = sitk.GetImageFromArray(np.full((2, 6, 6), 42, np.int16))
    out = MedSRLib.upscale(image, model="bicubic", scale=3)
    assert np.all(sitk.GetArrayViewFromImage(out) == 42)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int64])
def test_in_place_cast_rounds_and_saturates_like_the_copying_one(dtype):
    info = np.iinfo(dtype)
    values = np.array([-1e30, float(info.min) - 0.6, -2.5, -0.5, 0.49, 1.5, 2.5,
                       float(info.max) + 0.7, 1e30])
    expected = intensity.cast_to_dtype(values.copy(), dtype)
    np.testing.assert_array_equal(intensity.cast_to_dtype(values.copy(), dtype, in_place=True), expected)
    assert expected[0] == info.min and expected[-1] == info.max
