"""SRGAN + VDSR hybrid generator of paper 002 (Saeedi, "Single image super-resolution for chest
X-ray images", section 2 layer list; discriminator and losses are SRGAN's).

Section 2, in order, and how each line is built here:
  1. conv 9x9, 64 filters, PReLU                       -> `head`
  2. 8 residual blocks (2 conv 3x3 64, PReLU, BN)      -> `blocks` (SRResNet blocks)
  3. 20 conv 3x3 64 + PReLU ("VDSR network")           -> `vdsr_trunk`
  4. 1 batch normalisation layer                       -> `trunk_norm`
  5. 1 residual layer (elementwise sum)                -> `head output + trunk_norm(...)`
  6. conv "3 filters 3x3", tanh, non-trainable sharpening layer -> `sharpen` (+ tanh)
  7. 1 up-sampling block                               -> `upsample`
  8. conv 3x3, 16 filters, PReLU                       -> `refine`
  9. conv 5x5, 3 filters, tanh                         -> `output` (in_channels filters)

Choices where the paper is ambiguous (ours, stated here):
  - Line 6: the "3 filters" are read as 3x3 kernels applied to each feature map: a *fixed*
    depthwise Laplacian sharpening kernel [[0,-1,0],[-1,5,-1],[0,-1,0]] (a buffer, not a
    parameter) on all `num_features` maps, then tanh. The other reading (64 -> 3 RGB channels
    before upsampling) would squeeze a grayscale slice through a 1-channel bottleneck.
  - Line 7: the SRGAN up-sampling block (conv 3x3 to 4F, pixel shuffle x2, PReLU), repeated as
    needed. The paper's input is the LR image bicubic-upsampled x2 (section 3.1: down x4, up x2)
    and the block does the remaining x2. Here `input_upsampling` (2) does that bicubic step
    inside `forward`, so the network takes the LR slice; the block upsamples by
    scale / input_upsampling. With the paper's input_upsampling=2 the supported scales are x2
    (the block is then a conv 3x3 + PReLU without shuffle) and x4; x3 needs input_upsampling 1
    or 3.
  - Line 9: tanh output, as in the paper (targets in [-1, 1]); `output_activation=None` drops it.
  - `bicubic_residual=True` (not in the paper, off by default) adds the bicubic-upsampled LR
    slice to the output and zeroes the output conv, so the untrained network is bicubic and
    learns only the residual: what a CPU budget of a few hundred steps needs. It needs
    `output_activation=None` (a tanh on top would bend the intensities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from .srresnet import SRResidualBlock, zero_last_conv
from .upsampling import subpixel_upsampler

SHARPEN_KERNEL = ((0.0, -1.0, 0.0), (-1.0, 5.0, -1.0), (0.0, -1.0, 0.0))


class FixedSharpening(nn.Module):
    """Non-trainable depthwise 3x3 sharpening (zero padding), one copy per channel."""

    def __init__(self, channels: int):
        super().__init__()
        kernel = torch.tensor(SHARPEN_KERNEL).expand(channels, 1, 3, 3).clone()
        self.register_buffer("kernel", kernel)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel.to(x.dtype), padding=1, groups=self.channels)


class HybridSRGANVDSR(nn.Module):
    """Paper 002 generator; post-upsampling (takes the LR slice). Defaults are the paper's.

    Args:
        spatial_dims: only 2.
        in_channels: image channels (1 = grayscale chest X-ray); output has the same number.
        num_features: filters of head, residual blocks and VDSR trunk (64).
        num_res_blocks: SRGAN residual blocks (8).
        num_vdsr_layers: VDSR convolutions (20).
        refine_features: filters of the conv after upsampling (16).
        scale: total factor; must be a multiple of `input_upsampling`.
        input_upsampling: bicubic pre-upsampling factor applied in `forward` (2, paper 3.1).
        output_activation: "tanh" (paper) or None.
        bicubic_residual: learn only the residual over bicubic (see the module docstring).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_features: int = 64,
                 num_res_blocks: int = 8, num_vdsr_layers: int = 20, refine_features: int = 16,
                 scale: int = 4, input_upsampling: int = 2, output_activation: str | None = "tanh",
                 bicubic_residual: bool = False):
        super().__init__()
        if bicubic_residual and output_activation is not None:
            raise ValueError("bicubic_residual needs output_activation=None")
        if spatial_dims != 2:
            raise ValueError(f"spatial_dims must be 2 for HybridSRGANVDSR, got {spatial_dims}")
        if scale % input_upsampling != 0:
            raise ValueError(f"scale must be a multiple of input_upsampling={input_upsampling}, "
                             f"got {scale}")
        if output_activation not in (None, "tanh"):
            raise ValueError(f"output_activation must be None or 'tanh', got {output_activation!r}")
        f = num_features
        self.input_upsampling = input_upsampling
        self.head = Convolution(2, in_channels, f, kernel_size=9, act="prelu", norm=None)
        self.blocks = nn.Sequential(*[SRResidualBlock(2, f) for _ in range(num_res_blocks)])
        self.vdsr_trunk = nn.Sequential(*[Convolution(2, f, f, kernel_size=3, act="prelu", norm=None)
                                          for _ in range(num_vdsr_layers)])
        self.trunk_norm = nn.BatchNorm2d(f)
        self.sharpen = FixedSharpening(f)
        block_factor = scale // input_upsampling
        self.upsample = (subpixel_upsampler(2, f, block_factor, act=nn.PReLU()) if block_factor > 1
                         else Convolution(2, f, f, kernel_size=3, act="prelu", norm=None))
        self.refine = Convolution(2, f, refine_features, kernel_size=3, act="prelu", norm=None)
        self.output = Convolution(2, refine_features, in_channels, kernel_size=5, conv_only=True)
        self.output_activation = nn.Tanh() if output_activation == "tanh" else nn.Identity()
        self.scale = scale
        self.bicubic_residual = bicubic_residual
        if bicubic_residual:
            zero_last_conv(self.output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lr = x
        if self.input_upsampling > 1:
            x = F.interpolate(x, scale_factor=self.input_upsampling, mode="bicubic",
                              align_corners=False)
        features = self.head(x)
        features = features + self.trunk_norm(self.vdsr_trunk(self.blocks(features)))
        features = torch.tanh(self.sharpen(features))
        out = self.output(self.refine(self.upsample(features)))
        if self.bicubic_residual:
            out = out + F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.output_activation(out)
