"""The through-plane restoration network: a small 2-D residual CNN (MONAI blocks) on planes
that contain the slice axis, after the thick slices were resampled to the target grid.

Input (N, 4, H, W), rows (H) along the slice axis:
  0: the image cubic-resampled along the rows to the target slice grid (network units);
  1: per row, the distance to the nearest thick-slice centre (`profile.phase_map`, 0..1);
  2: (factor - 1) / 7, the through-plane factor;
  3: the thickness ratio (slice thickness / slice spacing; < 1 = gap).
Output (N, 1, H, W): channel 0 plus the learned residual (the last conv starts at zero, so an
untrained network is exactly cubic interpolation).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn

from ..networks.edsr import ResidualBlockNoBN

IN_CHANNELS = 4


class ThroughPlaneNet(nn.Module):
    """Head conv, `num_blocks` residual blocks (no BN) with a global skip, tail conv."""

    def __init__(self, num_features: int = 32, num_blocks: int = 4, in_channels: int = IN_CHANNELS):
        super().__init__()
        self.head = Convolution(2, in_channels, num_features, kernel_size=3, conv_only=True)
        self.blocks = nn.Sequential(*[ResidualBlockNoBN(2, num_features) for _ in range(num_blocks)])
        self.tail = Convolution(2, num_features, 1, kernel_size=3, conv_only=True)
        last = [m for m in self.tail.modules() if isinstance(m, nn.Conv2d)][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        return x[:, :1] + self.tail(features + self.blocks(features))


def conditioning(image: torch.Tensor, phase_rows: torch.Tensor, factor: float,
                 thickness_ratio: float) -> torch.Tensor:
    """The network input for images (N, 1, H, W) whose rows sample the slice axis with
    `phase_rows` (H,) (see `profile.phase_map`)."""
    n, _, h, w = image.shape
    phase = phase_rows.to(image.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
    factor_map = torch.full((n, 1, h, w), (float(factor) - 1.0) / 7.0, dtype=image.dtype)
    ratio_map = torch.full((n, 1, h, w), float(thickness_ratio), dtype=image.dtype)
    return torch.cat([image, phase, factor_map, ratio_map], dim=1)
