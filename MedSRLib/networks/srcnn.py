"""SRCNN (Dong et al., 2014): three convolutions on the pre-upsampled image.

Placeholder-free minimal version; the networks issue refines it with MONAI blocks.
"""

from __future__ import annotations

import torch
from torch import nn


class SRCNN(nn.Module):
    """9-5-5 SRCNN with 64/32 filters; input is the interpolated (HR-sized) image.

    Convolutions are zero-padded ("same") so the output has the input's size.
    """

    def __init__(self, in_channels: int = 1, features: tuple[int, int] = (64, 32),
                 kernel_sizes: tuple[int, int, int] = (9, 5, 5)):
        super().__init__()
        f1, f2 = features
        k1, k2, k3 = kernel_sizes
        self.patch_extraction = nn.Conv2d(in_channels, f1, k1, padding=k1 // 2)
        self.nonlinear_mapping = nn.Conv2d(f1, f2, k2, padding=k2 // 2)
        self.reconstruction = nn.Conv2d(f2, in_channels, k3, padding=k3 // 2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.patch_extraction(x))
        x = self.relu(self.nonlinear_mapping(x))
        return self.reconstruction(x)
