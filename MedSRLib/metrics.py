"""Image-quality metrics for super-resolution: PSNR, SSIM, MS-SSIM and UQI, whole-image or masked.

Protocol, stated in every signature: images are torch tensors (N, C, H, W) in the same
intensity units, `data_range` is the span of those units that PSNR and the SSIM constants refer
to (1.0 for MedSR's unit normalisation), nothing is cropped unless `crop_border` > 0, and a
metric is the mean over the batch. A `mask` (N, 1, H, W), true on foreground, restricts the
average to foreground pixels (SSIM/UQI: windows centred on foreground pixels).

SSIM and MS-SSIM come from MONAI (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, the Wang et
al. 2004 constants). UQI (Wang and Bovik 2002) is written here from its formula:

    Q = 4 sigma_xy mu_x mu_y / ((sigma_x^2 + sigma_y^2) (mu_x^2 + mu_y^2)),

computed in 8x8 uniform sliding windows and averaged (the paper's protocol); windows where the
denominator is 0 (both windows constant) count as 1 if the windows are equal, else 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.metrics.regression import compute_ms_ssim, compute_ssim_and_cs

#: MONAI's (and Wang et al.'s) MS-SSIM scale weights.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11


def _check_pair(prediction: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(prediction, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("prediction and target must be torch tensors")
    if prediction.ndim != 4 or prediction.shape != target.shape:
        raise ValueError(f"prediction and target must both be (N, C, H, W) of one shape; got "
                         f"{tuple(prediction.shape)} and {tuple(target.shape)}")


def _crop(t: torch.Tensor | None, border: int) -> torch.Tensor | None:
    if t is None or border <= 0:
        return t
    return t[..., border:-border, border:-border]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of `values` (N, C, h, w), over `mask` (N, 1, h, w) when given."""
    if mask is None:
        return values.flatten(1).mean(1)
    weights = mask.to(values.dtype).expand_as(values)
    total = weights.flatten(1).sum(1)
    if torch.any(total == 0):
        raise ValueError("mask is empty for at least one image")
    return (values * weights).flatten(1).sum(1) / total


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
         mask: torch.Tensor | None = None, crop_border: int = 0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE), averaged over the batch.

    Identical images give +inf.
    """
    _check_pair(prediction, target)
    prediction, target, mask = (_crop(t, crop_border) for t in (prediction, target, mask))
    mse = _masked_mean((prediction.double() - target.double()) ** 2, mask)
    values = [math.inf if m == 0 else 10.0 * math.log10(data_range ** 2 / float(m)) for m in mse]
    return float(sum(values) / len(values))


def _window_mask(mask: torch.Tensor | None, window: int) -> torch.Tensor | None:
    """`mask` cut to the 'valid' region of a window x window filter (centre pixels)."""
    if mask is None:
        return None
    half = window // 2
    return mask[..., half:mask.shape[-2] - (window - 1 - half), half:mask.shape[-1] - (window - 1 - half)]


def ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
         mask: torch.Tensor | None = None, crop_border: int = 0) -> float:
    """Structural similarity (MONAI, Gaussian 11x11, sigma 1.5); identical images give 1."""
    _check_pair(prediction, target)
    prediction, target, mask = (_crop(t, crop_border) for t in (prediction, target, mask))
    ssim_map, _ = compute_ssim_and_cs(prediction.float(), target.float(), spatial_dims=2,
                                      kernel_size=(SSIM_WINDOW, SSIM_WINDOW),
                                      kernel_sigma=(1.5, 1.5), data_range=data_range)
    return float(_masked_mean(ssim_map, _window_mask(mask, SSIM_WINDOW)).mean())


def ms_ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
            crop_border: int = 0) -> float:
    """Multi-scale SSIM (MONAI, 5 scales, Wang et al. 2003 weights).

    Five scales need images of at least 176 px; smaller images use as many scales as fit
    (at least 1), with the weights of those scales renormalised to sum to 1.
    """
    _check_pair(prediction, target)
    prediction, target = _crop(prediction, crop_border), _crop(target, crop_border)
    size = min(prediction.shape[-2:])

    def fits(n: int) -> bool:  # the coarsest scale holds a window, and MONAI's own size check
        return size // 2 ** (n - 1) >= SSIM_WINDOW and size // max(1, n - 1) ** 2 > SSIM_WINDOW - 1
    n_scales = 1
    while n_scales < len(MS_SSIM_WEIGHTS) and fits(n_scales + 1):
        n_scales += 1
    if size < SSIM_WINDOW:
        raise ValueError(f"images of {size} px are smaller than the {SSIM_WINDOW} px SSIM window")
    weights = MS_SSIM_WEIGHTS[:n_scales]
    weights = tuple(w / sum(weights) for w in weights)
    value = compute_ms_ssim(prediction.float(), target.float(), spatial_dims=2,
                            data_range=data_range, weights=weights)
    return float(value.mean())


def uqi(prediction: torch.Tensor, target: torch.Tensor, window: int = 8,
        mask: torch.Tensor | None = None, crop_border: int = 0) -> float:
    """Universal quality index (Wang and Bovik 2002) in `window` x `window` uniform windows.

    The formula has no stabilising constants, so it does not depend on a data range.
    """
    _check_pair(prediction, target)
    prediction, target, mask = (_crop(t, crop_border) for t in (prediction, target, mask))
    x, y = prediction.double(), target.double()

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        # Uniform window mean over "valid" positions; avg_pool2d is ~12x faster than conv2d here.
        return F.avg_pool2d(t, window, stride=1)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = (local_mean(x * x) - mu_x ** 2).clamp_min(0)
    var_y = (local_mean(y * y) - mu_y ** 2).clamp_min(0)
    cov = local_mean(x * y) - mu_x * mu_y
    numerator = 4 * cov * mu_x * mu_y
    denominator = (var_x + var_y) * (mu_x ** 2 + mu_y ** 2)
    tiny = 1e-12
    equal = ((local_mean((x - y) ** 2)) < tiny).to(torch.float64)
    q_map = torch.where(denominator > tiny, numerator / denominator.clamp_min(tiny), equal)
    return float(_masked_mean(q_map, _window_mask(mask, window)).mean())


def all_metrics(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
                mask: torch.Tensor | None = None) -> dict[str, float]:
    """PSNR, SSIM, MS-SSIM and UQI over the whole image; PSNR/SSIM/UQI over `mask` if given."""
    result = {"psnr": psnr(prediction, target, data_range), "ssim": ssim(prediction, target, data_range),
              "ms_ssim": ms_ssim(prediction, target, data_range), "uqi": uqi(prediction, target)}
    if mask is not None and bool(mask.any()):
        result.update({"psnr_fg": psnr(prediction, target, data_range, mask=mask),
                       "ssim_fg": ssim(prediction, target, data_range, mask=mask),
                       "uqi_fg": uqi(prediction, target, mask=mask)})
    return result
