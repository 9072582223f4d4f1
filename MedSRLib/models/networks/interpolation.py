"""Interpolation baselines as parameter-free modules: (N, C, h, w) -> (N, C, h*sy, w*sx).

Pixel centres follow the half-pixel convention (`align_corners=False`), so the output covers
exactly the input's extent, as the geometry module assumes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _as_pair(scale: int | tuple[int, int]) -> tuple[int, int]:
    return (scale, scale) if isinstance(scale, int) else (int(scale[0]), int(scale[1]))


class Interpolation(nn.Module):
    """torch interpolation (`nearest`, `bilinear` or `bicubic`) by integer factors (sy, sx)."""

    def __init__(self, mode: str = "bicubic", scale: int | tuple[int, int] = 2):
        super().__init__()
        if mode not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"mode must be nearest, bilinear or bicubic, got {mode!r}")
        self.mode = mode
        self.scale = _as_pair(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2] * self.scale[0], x.shape[-1] * self.scale[1])
        if self.mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest-exact")
        return F.interpolate(x, size=size, mode=self.mode, align_corners=False)


def lanczos_phase_kernels(scale: int, lobes: int = 3) -> torch.Tensor:
    """Lanczos-`lobes` weights, shape (scale, 2*lobes+1): row p gives the taps for output phase p.

    Output pixel j = q*scale + p sits at input coordinate q + (p + 0.5)/scale - 0.5; each row is
    normalised to sum 1 so constants are preserved.
    """
    taps = torch.arange(-lobes, lobes + 1, dtype=torch.float64)
    rows = []
    for phase in range(scale):
        offset = (phase + 0.5) / scale - 0.5
        d = taps - offset
        w = torch.where(d.abs() < lobes, torch.sinc(d) * torch.sinc(d / lobes), torch.zeros_like(d))
        rows.append(w / w.sum())
    return torch.stack(rows).float()


class Lanczos(nn.Module):
    """Separable Lanczos-3 upsampling by integer factors (sy, sx), edges replicated.

    Hand-written because torch has no Lanczos mode: one strided-free conv per phase, interleaved.
    """

    def __init__(self, scale: int | tuple[int, int] = 2, lobes: int = 3):
        super().__init__()
        self.scale = _as_pair(scale)
        self.lobes = lobes
        self.register_buffer("kernel_y", lanczos_phase_kernels(self.scale[0], lobes), persistent=False)
        self.register_buffer("kernel_x", lanczos_phase_kernels(self.scale[1], lobes), persistent=False)

    def _upsample_last_axis(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        s = kernel.shape[0]
        if s == 1:
            return x
        n, c, h, w = x.shape
        padded = F.pad(x.reshape(n * c, 1, h, w), (self.lobes, self.lobes, 0, 0), mode="replicate")
        phases = F.conv2d(padded, kernel.to(x.dtype).view(s, 1, 1, -1))  # (n*c, s, h, w)
        return phases.permute(0, 2, 3, 1).reshape(n, c, h, w * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._upsample_last_axis(x, self.kernel_x)
        x = self._upsample_last_axis(x.transpose(-1, -2), self.kernel_y).transpose(-1, -2)
        return x.contiguous()

