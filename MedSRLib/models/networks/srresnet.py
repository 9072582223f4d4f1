"""SRResNet generator and SRGAN discriminator (Ledig et al., CVPR 2017), as used by paper 003
(LFSR: "SRResNet ... 16 residual blocks, and following sub-pixel convolution layers"), paper 001
(SRGAN, Fig. 3) and paper 002 (Fig. 2, "k3n64s1" notation).

Generator (Ledig Fig. 4): k9n64s1 + PReLU -> B residual blocks (k3n64s1, BN, PReLU, k3n64s1,
BN, skip) -> k3n64s1 + BN -> long skip (elementwise sum) -> sub-pixel stages (k3n256s1, pixel
shuffle x2, PReLU; two of them for x4, one x3 stage (k3n576s1) for x3) -> k9n{C}s1.
There is no output activation by default (medical intensities are not [-1, 1]);
`output_activation="tanh"` gives Ledig's range-limited output.

Discriminator (Ledig Fig. 4): k3n64s1 + LeakyReLU(0.2), then seven conv-BN-LeakyReLU blocks
k3n64s2, k3n128s1, k3n128s2, k3n256s1, k3n256s2, k3n512s1, k3n512s2, then the dense head
Dense(1024) - LeakyReLU - Dense(1). Ledig flattens a 6x6x512 map (96x96 crops); here the map is
globally average-pooled first so any input size works, which turns Dense(1024) into 512x1024
weights. It returns a logit (use BCEWithLogits); the sigmoid is in the loss.

Parameter counts (paper 001 Table 2 gives "SRGAN 5,949,644"): that number is generator +
discriminator of the widely used PyTorch SRGAN port on RGB at x4 with *5* residual blocks:
generator 734,219 + discriminator 5,215,425 = 5,949,644, which
`SRResNet(in_channels=3, num_blocks=5, scale=4)` + `SRGANDiscriminator(in_channels=3)` reproduce
exactly (see Testing/test_networks.py and networks/README.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from .upsampling import subpixel_upsampler


def zero_last_conv(module: nn.Module) -> None:
    """Zero the weights and bias of the last conv in `module` (a residual branch that starts as 0)."""
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    nn.init.zeros_(convs[-1].weight)
    if convs[-1].bias is not None:
        nn.init.zeros_(convs[-1].bias)


class SRResidualBlock(nn.Module):
    """conv-BN-PReLU-conv-BN with an identity skip (Ledig et al. Fig. 4)."""

    def __init__(self, spatial_dims: int, num_features: int, kernel_size: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            Convolution(spatial_dims, num_features, num_features, kernel_size=kernel_size,
                        act="prelu", norm="batch"),
            Convolution(spatial_dims, num_features, num_features, kernel_size=kernel_size,
                        act=None, norm="batch"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    """SRResNet / SRGAN generator; post-upsampling (input is the LR slice).

    Args:
        spatial_dims: 2 for slices (MONAI blocks also allow 3).
        in_channels: image channels (1 = grayscale); output has the same number.
        num_features: filters everywhere (64).
        num_blocks: residual blocks (16 in Ledig et al. and paper 003).
        scale: upscaling factor, 2, 3 or 4 (any 2**k or 3*2**k).
        head_kernel_size: first and last conv kernel (9).
        output_activation: None or "tanh".
        bicubic_residual: add the bicubic-upsampled input to the output (before the output
            activation), so the network learns only the residual (as `EDSR(bicubic_residual=True)`;
            not in Ledig et al., off by default). The last conv then starts at zero, so the
            untrained network is exactly bicubic. Short CPU training needs both to beat bicubic.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_features: int = 64,
                 num_blocks: int = 16, scale: int = 4, head_kernel_size: int = 9,
                 output_activation: str | None = None, bicubic_residual: bool = False):
        super().__init__()
        if bicubic_residual and spatial_dims != 2:
            raise ValueError("bicubic_residual needs spatial_dims=2")
        self.bicubic_residual = bicubic_residual
        if output_activation not in (None, "tanh"):
            raise ValueError(f"output_activation must be None or 'tanh', got {output_activation!r}")
        f = num_features
        self.scale = scale
        self.head = Convolution(spatial_dims, in_channels, f, kernel_size=head_kernel_size,
                                act="prelu", norm=None)
        self.blocks = nn.Sequential(*[SRResidualBlock(spatial_dims, f) for _ in range(num_blocks)])
        self.body_end = Convolution(spatial_dims, f, f, kernel_size=3, act=None, norm="batch")
        self.upsample = subpixel_upsampler(spatial_dims, f, scale, act=nn.PReLU())
        self.tail = Convolution(spatial_dims, f, in_channels, kernel_size=head_kernel_size,
                                conv_only=True)
        self.output_activation = nn.Tanh() if output_activation == "tanh" else nn.Identity()
        if bicubic_residual:
            zero_last_conv(self.tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        features = features + self.body_end(self.blocks(features))
        out = self.tail(self.upsample(features))
        if self.bicubic_residual:
            out = out + F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.output_activation(out)


class SRGANDiscriminator(nn.Module):
    """VGG-style SRGAN discriminator (Ledig et al. Fig. 4), any input size, returns logits (N, 1).

    Not a super-resolution model: it is not registered in the zoo; the GAN training imports it.

    Args:
        spatial_dims: 2 for slices.
        in_channels: image channels (1 = grayscale).
        channels: output channels of the eight convs (64, 64, 128, 128, 256, 256, 512, 512).
        strides: their strides (1, 2, 1, 2, 1, 2, 1, 2).
        dense_features: width of the hidden dense layer (1024).
        negative_slope: LeakyReLU slope (0.2).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1,
                 channels: Sequence[int] = (64, 64, 128, 128, 256, 256, 512, 512),
                 strides: Sequence[int] = (1, 2, 1, 2, 1, 2, 1, 2), dense_features: int = 1024,
                 negative_slope: float = 0.2):
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels and strides must have the same length, got "
                             f"{len(channels)} and {len(strides)}")
        act = ("leakyrelu", {"negative_slope": negative_slope})
        layers: list[nn.Module] = []
        previous = in_channels
        for index, (out, stride) in enumerate(zip(channels, strides)):
            layers.append(Convolution(spatial_dims, previous, out, strides=stride, kernel_size=3,
                                      act=act, norm=None if index == 0 else "batch"))
            previous = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(previous, dense_features),
                                  nn.LeakyReLU(negative_slope), nn.Linear(dense_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))
