"""EDSR and its multi-scale form MDRN, paper 004 (Ren et al., "Towards efficient medical lesion
image super-resolution based on deep residual networks"), after Lim et al. (CVPRW 2017).

Residual block without batch norm (paper 004 section 3.1 / Fig. 2): conv3x3 - ReLU - conv3x3,
scaled by `res_scale`, plus the input. Trunk: head conv3x3 -> B blocks -> conv3x3 -> + head
(global residual, Algorithm 2 line 11: upsample(I_LR + R_t, S)) -> sub-pixel upsampling ->
conv3x3 to the image.

- `EDSR`: single scale. Default = EDSR baseline (16 blocks, 64 filters, res_scale 1); the EDSR
  final model of paper 004 is 32 blocks x 256 filters with res_scale 0.1.
- `MultiScaleEDSR` (MDRN, section 4.3): one shared trunk of 80 blocks x 64 filters, a
  scale-specific pre-processing module in front (two residual blocks with 5x5 kernels per
  scale, as in Lim et al.'s MDSR) and parallel scale-specific upsampling heads behind;
  `forward(x, scale)` picks the branch.

Lim et al. subtract the RGB mean of DIV2K (MeanShift); medical slices are normalised by the
engine, so there is no mean shift here.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from .srresnet import zero_last_conv
from .upsampling import subpixel_upsampler


class ResidualBlockNoBN(nn.Module):
    """conv - ReLU - conv, times `res_scale`, plus the input (no batch norm)."""

    def __init__(self, spatial_dims: int, num_features: int, kernel_size: int = 3,
                 res_scale: float = 1.0):
        super().__init__()
        self.res_scale = res_scale
        self.body = nn.Sequential(
            Convolution(spatial_dims, num_features, num_features, kernel_size=kernel_size,
                        act="relu", norm=None),
            Convolution(spatial_dims, num_features, num_features, kernel_size=kernel_size,
                        conv_only=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.body(x)


class ResidualTrunk(nn.Module):
    """B residual blocks and a closing conv, with the global skip around them."""

    def __init__(self, spatial_dims: int, num_features: int, num_blocks: int, res_scale: float):
        super().__init__()
        self.blocks = nn.Sequential(*[ResidualBlockNoBN(spatial_dims, num_features, 3, res_scale)
                                      for _ in range(num_blocks)])
        self.conv = Convolution(spatial_dims, num_features, num_features, kernel_size=3,
                                conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.blocks(x))


def _upsampling_head(spatial_dims: int, num_features: int, out_channels: int,
                     scale: int) -> nn.Sequential:
    return nn.Sequential(
        subpixel_upsampler(spatial_dims, num_features, scale),
        Convolution(spatial_dims, num_features, out_channels, kernel_size=3, conv_only=True))


class EDSR(nn.Module):
    """Single-scale EDSR; post-upsampling. Defaults: EDSR baseline (paper 004 section 3.1).

    Args:
        spatial_dims: 2 for slices (MONAI blocks also allow 3).
        in_channels: image channels (1 = grayscale); output has the same number.
        num_features: filters (64).
        num_blocks: residual blocks (16).
        res_scale: residual scaling (1.0 baseline; 0.1 for the 32x256 final model).
        scale: 2, 3 or 4.
        bicubic_residual: add the bicubic-upsampled input to the output, so the network learns
            only the high-frequency residual (VDSR's global residual on a post-upsampling
            network; not in EDSR, off by default). It makes short CPU training converge faster.
        context_slices: neighbouring slices seen besides the one super-resolved (0, 2 or 4; a
            "2.5-D" network). The input then holds (context_slices + 1) * in_channels channels,
            slices in order along the slice axis with the target slice in the middle; the
            output is the middle slice only, and the bicubic residual is the middle slice's.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_features: int = 64,
                 num_blocks: int = 16, res_scale: float = 1.0, scale: int = 4,
                 bicubic_residual: bool = False, context_slices: int = 0):
        super().__init__()
        if bicubic_residual and spatial_dims != 2:
            raise ValueError("bicubic_residual needs spatial_dims=2")
        if context_slices < 0 or context_slices % 2:
            raise ValueError(f"context_slices must be an even number >= 0, got {context_slices}")
        self.scale = scale
        self.bicubic_residual = bicubic_residual
        self.in_channels = in_channels
        self.context_slices = context_slices
        self.head = Convolution(spatial_dims, in_channels * (context_slices + 1), num_features,
                                kernel_size=3, conv_only=True)
        self.trunk = ResidualTrunk(spatial_dims, num_features, num_blocks, res_scale)
        self.tail = _upsampling_head(spatial_dims, num_features, in_channels, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tail(self.trunk(self.head(x)))
        if self.bicubic_residual:
            centre = self.context_slices // 2 * self.in_channels
            middle = x[:, centre:centre + self.in_channels] if self.context_slices else x
            out = out + F.interpolate(middle, scale_factor=self.scale, mode="bicubic",
                                      align_corners=False)
        return out


class MultiScaleEDSR(nn.Module):
    """MDRN: shared trunk, per-scale pre-processing and upsampling heads; `forward(x, scale)`.

    Defaults are paper 004's MDRN (80 blocks x 64 filters, x2/x3/x4).

    Args:
        spatial_dims: 2 for slices (MONAI blocks also allow 3).
        in_channels: image channels (1 = grayscale); output has the same number.
        num_features: filters (64).
        num_blocks: residual blocks of the shared trunk (80).
        res_scale: residual scaling (1.0).
        scales: the supported factors, one pre-processing module and one head each.
        preprocess_blocks: residual blocks per pre-processing module (2).
        preprocess_kernel_size: their kernel size (5).
        bicubic_residual: add the bicubic-upsampled input to every head's output (as in
            `EDSR`; not in paper 004, off by default). The pre-processing blocks then start as
            the identity (last conv zeroed), so a trunk and heads copied from single-scale
            `EDSR(bicubic_residual=True)` weights keep their output at the start of training.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_features: int = 64,
                 num_blocks: int = 80, res_scale: float = 1.0, scales: Sequence[int] = (2, 3, 4),
                 preprocess_blocks: int = 2, preprocess_kernel_size: int = 5,
                 bicubic_residual: bool = False):
        super().__init__()
        if bicubic_residual and spatial_dims != 2:
            raise ValueError("bicubic_residual needs spatial_dims=2")
        self.bicubic_residual = bicubic_residual
        self.scales = tuple(int(s) for s in scales)
        self.head = Convolution(spatial_dims, in_channels, num_features, kernel_size=3,
                                conv_only=True)
        self.preprocess = nn.ModuleDict({
            f"x{s}": nn.Sequential(*[ResidualBlockNoBN(spatial_dims, num_features,
                                                       preprocess_kernel_size, res_scale)
                                     for _ in range(preprocess_blocks)])
            for s in self.scales})
        self.trunk = ResidualTrunk(spatial_dims, num_features, num_blocks, res_scale)
        self.tails = nn.ModuleDict({
            f"x{s}": _upsampling_head(spatial_dims, num_features, in_channels, s)
            for s in self.scales})
        if bicubic_residual:
            for block in self.preprocess.modules():
                if isinstance(block, ResidualBlockNoBN):
                    zero_last_conv(block.body)

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        key = f"x{int(scale)}"
        if key not in self.tails:
            raise ValueError(f"scale must be one of {self.scales}, got {scale!r}")
        features = self.preprocess[key](self.head(x))
        out = self.tails[key](self.trunk(features))
        if self.bicubic_residual:
            out = out + F.interpolate(x, scale_factor=int(scale), mode="bicubic", align_corners=False)
        return out
