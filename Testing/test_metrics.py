"""Metrics: identical images, known values, UQI against its formula, masks."""

import math

import pytest
import torch

from MedSRLib import metrics


def test_identical_images_give_inf_psnr_and_unit_similarities():
    image = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    assert metrics.psnr(image, image) == math.inf
    assert metrics.ssim(image, image) == pytest.approx(1.0, abs=1e-6)
    assert metrics.ms_ssim(image, image) == pytest.approx(1.0, abs=1e-6)
    assert metrics.uqi(image, image) == pytest.approx(1.0, abs=1e-9)
    big = torch.rand(1, 1, 192, 176)
    assert metrics.ms_ssim(big, big) == pytest.approx(1.0, abs=1e-6)


def test_psnr_of_a_known_error():
    target = torch.zeros(1, 1, 16, 16)
    prediction = torch.full_like(target, 0.1)  # MSE 0.01
    assert metrics.psnr(prediction, target, data_range=1.0) == pytest.approx(20.0, abs=1e-5)
    assert metrics.psnr(prediction, target, data_range=10.0) == pytest.approx(40.0, abs=1e-5)


def test_uqi_matches_the_formula_on_a_hand_example():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    y = torch.tensor([[2.0, 2.0], [4.0, 4.0]]).view(1, 1, 2, 2)
    # mu_x 2.5, mu_y 3, var_x 1.25, var_y 1, cov 1: Q = 4*1*2.5*3 / ((1.25+1)(2.5^2+3^2))
    expected = 30.0 / (2.25 * 15.25)
    assert metrics.uqi(x, y, window=2) == pytest.approx(expected, abs=1e-12)


def test_degraded_image_scores_below_identity():
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(1, 1, 64, 64, generator=generator)
    noisy = image + 0.1 * torch.randn(image.shape, generator=generator)
    assert metrics.psnr(noisy, image) == pytest.approx(20.0, abs=0.5)
    assert metrics.ssim(noisy, image) < 0.97 and metrics.uqi(noisy, image) < 0.97


def test_mask_restricts_the_average_to_the_foreground():
    target = torch.rand(1, 1, 40, 40)
    prediction = target.clone()
    prediction[..., :, :10] += 0.5  # errors only in the left border
    mask = torch.zeros(1, 1, 40, 40, dtype=torch.bool)
    mask[..., 10:30, 20:35] = True
    assert metrics.psnr(prediction, target, mask=mask) == math.inf
    assert metrics.psnr(prediction, target) < 20
    assert metrics.ssim(prediction, target, mask=mask) == pytest.approx(1.0, abs=1e-6)
    result = metrics.all_metrics(prediction, target, mask=mask)
    assert result["psnr_fg"] == math.inf and result["psnr"] < 20


def test_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="same shape|one shape"):
        metrics.psnr(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9))
