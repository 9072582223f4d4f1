"""Degradation models: shapes, constants preserved, noise level, MATLAB-compatible bicubic kernel."""

import math

import numpy as np
import pytest
import torch

from MedSRLib.transforms import degrade


def _smooth_image(h=64, w=48):
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    return (0.5 + 0.3 * torch.sin(x / 7.0) * torch.cos(y / 5.0)).float()


@pytest.mark.parametrize("function", [
    lambda im: degrade.bicubic_downsample(im, 3),
    lambda im: degrade.gaussian_downsample(im, 2),
    lambda im: degrade.gaussian_downsample(im, (4, 1)),
    lambda im: degrade.kspace_truncate(im, 4),
    lambda im: degrade.kspace_truncate(im, 2, same_size=True),
    lambda im: degrade.thick_slice(im, 4, axis=-2),
    lambda im: degrade.thick_slice(im, 3, axis=-1, profile="gaussian"),
])
def test_downsampling_a_constant_image_is_constant(function):
    image = torch.full((2, 1, 36, 48), 0.37)
    low = function(image)
    assert torch.allclose(low, torch.full_like(low, 0.37), atol=1e-5)


def test_output_sizes_crop_to_a_multiple_of_the_factor():
    image = torch.rand(1, 1, 50, 37)
    assert degrade.bicubic_downsample(image, 4).shape == (1, 1, 12, 9)
    assert degrade.gaussian_downsample(image, (3, 2)).shape == (1, 1, 16, 18)
    assert degrade.kspace_truncate(image, 2).shape == (1, 1, 25, 18)
    assert degrade.thick_slice(image, 5, axis=-2).shape == (1, 1, 10, 37)
    assert degrade.thick_slice(torch.rand(12, 5, 7), 4, axis=0).shape == (3, 5, 7)
    assert degrade.pipeline_factors([{"type": "bicubic", "scale": 2},
                                     {"type": "kspace_noise", "sigma": 20}]) == (2, 2)


def test_inputs_are_not_modified():
    image = torch.rand(1, 1, 32, 32)
    before = image.clone()
    degrade.apply_pipeline(image, [{"type": "bicubic", "scale": 2}, {"type": "kspace_noise", "sigma": 40}])
    degrade.thick_slice(image, 2)
    assert torch.equal(image, before)


def _matlab_imresize_weights(in_len, scale):
    """MATLAB imresize contributions (bicubic a=-0.5, antialiasing, symmetric borders), 1-D."""
    def cubic(x):
        ax = np.abs(x)
        return ((1.5 * ax ** 3 - 2.5 * ax ** 2 + 1) * (ax <= 1)
                + (-0.5 * ax ** 3 + 2.5 * ax ** 2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))
    s = 1.0 / scale
    out_len = in_len // scale
    width = 4.0 / s
    matrix = np.zeros((out_len, in_len))
    for i in range(1, out_len + 1):
        u = i / s + 0.5 * (1 - 1 / s)
        left = math.floor(u - width / 2)
        indices = left + np.arange(math.ceil(width) + 2)
        weights = s * cubic(s * (u - indices))
        weights /= weights.sum()
        for index, weight in zip(indices, weights):
            j = index - 1
            j = -j - 1 if j < 0 else (2 * in_len - j - 1 if j >= in_len else j)  # symmetric
            matrix[i - 1, j] += weight
    return matrix


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_matches_matlab_imresize_away_from_the_border(scale):
    rng = np.random.default_rng(0)
    image = rng.random((48, 60))
    expected = _matlab_imresize_weights(48, scale) @ image @ _matlab_imresize_weights(60, scale).T
    low = degrade.bicubic_downsample(torch.from_numpy(image), scale).numpy()
    interior = (slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(low[interior], expected[interior], atol=1e-6)
    assert np.abs(low - expected).max() > 1e-4  # the documented border difference is real


def test_gaussian_decimation_samples_block_centres():
    ramp = torch.arange(24, dtype=torch.float64).repeat(8, 1)  # value = column index
    low = degrade.gaussian_downsample(ramp, (1, 4), sigma=(0.0, 1.0))
    expected = torch.arange(6, dtype=torch.float64) * 4 + 1.5  # centre of columns 4i..4i+3
    assert torch.allclose(low[:, 1:-1], expected[1:-1].expand(8, -1), atol=1e-9)


def test_kspace_truncation_keeps_a_band_limited_image():
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    image = 1.0 + 0.5 * torch.cos(2 * math.pi * 3 * x / 64) * torch.cos(2 * math.pi * 2 * y / 64)
    same = degrade.kspace_truncate(image.double(), 4, same_size=True)
    assert torch.allclose(same, image.double(), atol=1e-9)
    small = degrade.kspace_truncate(image.double(), 2)
    expected = image.double()[::2, ::2]  # sampling a band-limited signal
    assert torch.allclose(small, expected, atol=1e-9)


@pytest.mark.parametrize("sigma", [20.0, 40.0])
def test_measured_kspace_noise_matches_sigma_over_255(sigma):
    image = torch.full((256, 256), 0.5, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    noisy = degrade.add_kspace_noise(image, sigma, generator=generator)
    measured = float((noisy - image).std())
    assert measured == pytest.approx(sigma / 255.0, rel=0.02)
    assert abs(float((noisy - image).mean())) < 0.1 * sigma / 255.0


def test_magnitude_noise_is_rician_and_non_negative():
    image = torch.zeros(128, 128, dtype=torch.float64)
    noisy = degrade.add_kspace_noise(image, 20, generator=torch.Generator().manual_seed(0), magnitude=True)
    assert float(noisy.min()) >= 0
    rayleigh_mean = 20 / 255 * math.sqrt(math.pi / 2)
    assert float(noisy.mean()) == pytest.approx(rayleigh_mean, rel=0.03)


def test_thick_slice_box_profile_averages_consecutive_slices():
    volume = torch.arange(8 * 3 * 2, dtype=torch.float32).reshape(8, 3, 2)
    thick = degrade.thick_slice(volume, 4, axis=0)
    assert torch.allclose(thick[0], volume[:4].mean(0)) and torch.allclose(thick[1], volume[4:].mean(0))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="scale"):
        degrade.bicubic_downsample(torch.rand(8, 8), 0)
    with pytest.raises(ValueError, match="profile"):
        degrade.thick_slice(torch.rand(8, 8), 2, profile="triangle")
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade.apply_pipeline(torch.rand(8, 8), [{"type": "jpeg"}])
