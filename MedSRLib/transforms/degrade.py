"""Degradation models that turn a high-resolution image into its low-resolution counterpart.

Pure functions on float torch tensors shaped (..., H, W) (a batch (N, C, H, W), a single
(H, W) slice, or a 3-D volume when an axis is named): inputs are never modified, and an image
whose size is not a multiple of the factor is first cropped to one (bottom/right rows dropped),
so LR pixel i covers HR pixels [i*s, (i+1)*s). Shared by the training data pipeline and the
benchmarks.

Bicubic kernel
--------------
`bicubic_downsample` is `torch.nn.functional.interpolate(mode="bicubic", antialias=True)`.
With `antialias=True` PyTorch uses the PIL/MATLAB cubic convolution kernel (Keys, a = -0.5)
stretched by the downsampling factor (support 4*s taps), i.e. the same filter as MATLAB's
`imresize(I, 1/s, 'bicubic')` (which also antialiases by default). It differs from MATLAB in
two ways only:

- borders: MATLAB mirrors the image (symmetric padding) under the stretched kernel, PyTorch
  drops the taps that fall outside and renormalises the remaining weights, so the outer ~2*s
  HR pixels (the outer 2 LR pixels) differ slightly; the interior agrees to float precision;
- size: MATLAB rounds the output size up (ceil), here the input is cropped to a multiple of s.

Upsampling for pre-upsampled networks (`bicubic_upsample`) uses PyTorch's plain bicubic
(a = -0.75, align_corners=False), the same call the inference path (`zoo.SRModel`) makes.

k-space noise convention (paper 003)
------------------------------------
Paper 003 adds white Gaussian noise "sigma = 20, 40" in k-space to 8-bit-scaled images. Here
images are in MedSR's unit range (see `MedSRLib.transforms.intensity`: 0.5th..99.5th percentile -> 0..1),
and `sigma` keeps the paper's 8-bit meaning: the unit range is 255 grey levels, so each of the
real and imaginary k-space components gets noise of standard deviation `sigma / 255`. The
orthonormal FFT preserves the noise level, so the image-domain noise (real part) has the same
standard deviation `sigma / 255` (tested).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

#: 8-bit grey levels that the unit intensity range stands for in the k-space noise convention.
GREY_LEVELS = 255.0


def _check_image(image: torch.Tensor, name: str = "image") -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(image).__name__}")
    if image.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {image.dtype}")


def _check_factor(factor: int, name: str = "factor") -> int:
    if isinstance(factor, bool) or int(factor) != factor or factor < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {factor!r}")
    return int(factor)


def _as_batch(image: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """(..., H, W) -> (B, 1, H, W) plus the leading shape to restore."""
    lead = image.shape[:-2]
    return image.reshape(-1, 1, *image.shape[-2:]), lead


def crop_to_multiple(image: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """`image` cropped (bottom/right) so H and W are multiples of factors (fy, fx)."""
    fy, fx = (_check_factor(f) for f in factors)
    h, w = image.shape[-2] // fy * fy, image.shape[-1] // fx * fx
    if h == 0 or w == 0:
        raise ValueError(f"image of size {tuple(image.shape[-2:])} is smaller than the factors {tuple(factors)}")
    return image[..., :h, :w]


def _pair(scale: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(scale, (list, tuple)):
        if len(scale) != 2:
            raise ValueError(f"scale must be an int or a pair (fy, fx), got {scale!r}")
        return _check_factor(scale[0], "scale"), _check_factor(scale[1], "scale")
    return _check_factor(scale, "scale"), _check_factor(scale, "scale")


def bicubic_downsample(image: torch.Tensor, scale: int | Sequence[int]) -> torch.Tensor:
    """Anti-aliased bicubic downsampling by integer `scale` (see the module doc for the kernel)."""
    _check_image(image)
    fy, fx = _pair(scale)
    image = crop_to_multiple(image, (fy, fx))
    batch, lead = _as_batch(image)
    size = (batch.shape[-2] // fy, batch.shape[-1] // fx)
    low = F.interpolate(batch, size=size, mode="bicubic", antialias=True, align_corners=False)
    return low.reshape(*lead, *size)


def bicubic_upsample(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Plain bicubic interpolation to `size` (H, W), as the inference path does."""
    _check_image(image)
    batch, lead = _as_batch(image)
    up = F.interpolate(batch, size=tuple(int(s) for s in size), mode="bicubic", align_corners=False)
    return up.reshape(*lead, *up.shape[-2:])


def _gaussian_kernel_1d(sigma: float, dtype: torch.dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def _blur_axis(batch: torch.Tensor, sigma: float, dim: int) -> torch.Tensor:
    """Gaussian blur of (B, 1, H, W) along dim -2 or -1, edges replicated."""
    if sigma <= 0:
        return batch
    kernel = _gaussian_kernel_1d(sigma, batch.dtype)
    radius = kernel.numel() // 2
    if dim == -2:
        padded = F.pad(batch, (0, 0, radius, radius), mode="replicate")
        return F.conv2d(padded, kernel.view(1, 1, -1, 1))
    padded = F.pad(batch, (radius, radius, 0, 0), mode="replicate")
    return F.conv2d(padded, kernel.view(1, 1, 1, -1))


def _centre_decimate(batch: torch.Tensor, factor: int, dim: int) -> torch.Tensor:
    """Samples at the centres of consecutive groups of `factor` pixels along `dim`."""
    if factor == 1:
        return batch
    n = batch.shape[dim] // factor * factor
    batch = batch.narrow(dim, 0, n)
    grouped = batch.unflatten(dim, (n // factor, factor))
    middle = dim if dim < 0 else dim + 1  # the new `factor` axis after unflatten
    if factor % 2:
        return grouped.select(middle, factor // 2)
    return 0.5 * (grouped.select(middle, factor // 2 - 1) + grouped.select(middle, factor // 2))


def gaussian_downsample(image: torch.Tensor, scale: int | Sequence[int],
                        sigma: float | Sequence[float] | None = None) -> torch.Tensor:
    """Gaussian blur (std `sigma` HR pixels, default 0.5 * factor) then decimation by `scale`.

    Each LR pixel is the blurred image at the centre of its s x s block of HR pixels.
    """
    _check_image(image)
    fy, fx = _pair(scale)
    if sigma is None:
        sy, sx = 0.5 * fy, 0.5 * fx
    elif isinstance(sigma, (list, tuple)):
        sy, sx = float(sigma[0]), float(sigma[1])
    else:
        sy = sx = float(sigma)
    if sy < 0 or sx < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    image = crop_to_multiple(image, (fy, fx))
    batch, lead = _as_batch(image)
    batch = _blur_axis(_blur_axis(batch, sy, -2), sx, -1)
    batch = _centre_decimate(_centre_decimate(batch, fy, -2), fx, -1)
    return batch.reshape(*lead, *batch.shape[-2:])


def _centred_slices(full: int, keep: int) -> slice:
    start = full // 2 - keep // 2
    return slice(start, start + keep)


def kspace_truncate(image: torch.Tensor, scale: int | Sequence[int],
                    same_size: bool = False) -> torch.Tensor:
    """MR low-resolution acquisition: keep the central 1/scale of k-space along each axis.

    Returns the (H/fy, W/fx) image reconstructed from the central k-space block (the image a
    scanner with that matrix would give), or with `same_size` the zero-filled (H, W)
    reconstruction (sinc interpolation, with its Gibbs ringing). Orthonormal FFTs, scaled so
    the mean intensity is preserved; the real part is returned.
    """
    _check_image(image)
    fy, fx = _pair(scale)
    image = crop_to_multiple(image, (fy, fx))
    h, w = image.shape[-2:]
    kh, kw = h // fy, w // fx
    kspace = torch.fft.fftshift(torch.fft.fft2(image.to(torch.float64), norm="ortho"), dim=(-2, -1))
    rows, cols = _centred_slices(h, kh), _centred_slices(w, kw)
    if same_size:
        kept = torch.zeros_like(kspace)
        kept[..., rows, cols] = kspace[..., rows, cols]
        result = torch.fft.ifft2(torch.fft.ifftshift(kept, dim=(-2, -1)), norm="ortho")
    else:
        block = kspace[..., rows, cols]
        result = torch.fft.ifft2(torch.fft.ifftshift(block, dim=(-2, -1)), norm="ortho")
        result = result * math.sqrt((kh * kw) / (h * w))
    return result.real.to(image.dtype)


def add_kspace_noise(image: torch.Tensor, sigma: float, generator: torch.Generator | None = None,
                     magnitude: bool = False) -> torch.Tensor:
    """Additive complex white Gaussian noise in k-space, paper 003's sigma (8-bit) convention.

    Each real/imaginary k-space component gets N(0, (sigma/255)^2) (unit intensity range =
    255 grey levels). Returns the real part of the reconstruction (noise std sigma/255), or
    with `magnitude` its modulus (Rician noise, as in magnitude MR images; only meaningful for
    non-negative images).
    """
    _check_image(image)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    std = float(sigma) / GREY_LEVELS
    kspace = torch.fft.fft2(image.to(torch.float64), norm="ortho")
    noise_real = torch.randn(kspace.shape, generator=generator, dtype=torch.float64)
    noise_imag = torch.randn(kspace.shape, generator=generator, dtype=torch.float64)
    noisy = kspace + std * torch.complex(noise_real, noise_imag).to(kspace.device)
    result = torch.fft.ifft2(noisy, norm="ortho")
    return (result.abs() if magnitude else result.real).to(image.dtype)


def thick_slice(image: torch.Tensor, factor: int, axis: int = -2, profile: str = "box") -> torch.Tensor:
    """Thick-slice acquisition along `axis`: slice-profile averaging, then one slice per `factor`.

    profile "box": each thick slice is the mean of `factor` consecutive thin slices (ideal
    rectangular profile, thickness = spacing). "gaussian": a Gaussian profile of FWHM `factor`
    thin slices, sampled at the centre of each group. Other axes are untouched.
    """
    _check_image(image)
    factor = _check_factor(factor)
    if not -image.ndim <= axis < image.ndim:
        raise ValueError(f"axis {axis} is out of range for an image of {image.ndim} dimensions")
    axis = axis % image.ndim
    n = image.shape[axis] // factor * factor
    if n == 0:
        raise ValueError(f"axis {axis} has {image.shape[axis]} slices, fewer than factor {factor}")
    moved = image.narrow(axis, 0, n).movedim(axis, -1)
    if profile == "box":
        result = moved.unflatten(-1, (n // factor, factor)).mean(-1)
    elif profile == "gaussian":
        batch = moved.reshape(-1, 1, 1, n)
        sigma = factor / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        batch = _centre_decimate(_blur_axis(batch, sigma, -1), factor, -1)
        result = batch.reshape(*moved.shape[:-1], n // factor)
    else:
        raise ValueError(f"profile must be 'box' or 'gaussian', got {profile!r}")
    return result.movedim(-1, axis).contiguous()


# ---------------------------------------------------------------------------------------------
# Declarative pipelines (what a training config's `degradation:` list holds)

DEGRADATION_TYPES = ("bicubic", "gaussian", "kspace_truncation", "kspace_noise", "thick_slice")


def pipeline_factors(steps: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Total (fy, fx) size reduction of a degradation pipeline."""
    fy = fx = 1
    for step in steps:
        kind = step.get("type")
        if kind in ("bicubic", "gaussian", "kspace_truncation"):
            sy, sx = _pair(step["scale"])
            fy, fx = fy * sy, fx * sx
        elif kind == "thick_slice":
            if step.get("axis", -2) in (-2, 0):
                fy *= _check_factor(step["factor"])
            else:
                fx *= _check_factor(step["factor"])
        elif kind != "kspace_noise":
            raise ValueError(f"unknown degradation type {kind!r}; known: {', '.join(DEGRADATION_TYPES)}")
    return fy, fx


def apply_pipeline(hr: torch.Tensor, steps: Sequence[dict[str, Any]],
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply a list of degradation steps (dicts with "type" and its arguments) to a batch.

    Example: [{"type": "bicubic", "scale": 4}, {"type": "kspace_noise", "sigma": 20}].
    `thick_slice` takes "axis" -2 (rows, H) or -1 (columns, W) of the 2-D image.
    """
    image = hr
    for step in steps:
        args = {k: v for k, v in step.items() if k != "type"}
        kind = step.get("type")
        if kind == "bicubic":
            image = bicubic_downsample(image, **args)
        elif kind == "gaussian":
            image = gaussian_downsample(image, **args)
        elif kind == "kspace_truncation":
            image = kspace_truncate(image, **args)
        elif kind == "kspace_noise":
            image = add_kspace_noise(image, generator=generator, **args)
        elif kind == "thick_slice":
            image = thick_slice(image, **args)
        else:
            raise ValueError(f"unknown degradation type {kind!r}; known: {', '.join(DEGRADATION_TYPES)}")
    return image


def with_scale(steps: Sequence[Mapping[str, Any]], scale: int) -> list[dict[str, Any]]:
    """Degradation steps with `scale` filled in where a step leaves it out (recipes state the
    degradation once for every scale of a multi-scale run)."""
    filled = []
    for step in steps:
        step = dict(step)
        if step.get("type") in ("bicubic", "gaussian", "kspace_truncation"):
            step.setdefault("scale", scale)
        if step.get("type") == "thick_slice":
            step.setdefault("factor", scale)
        filled.append(step)
    return filled
