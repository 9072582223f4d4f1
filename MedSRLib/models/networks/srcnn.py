"""SRCNN (Dong et al., ECCV 2014 / TPAMI 2016), the baseline of paper 000 (Gao et al., Fig. 1).

Pre-upsampling: the input is the bicubic-interpolated (HR-sized) slice and the output has the
same size. The 9-5-5 configuration with 64/32 filters is the paper's; convolutions are
zero-padded ("same"), so no border is lost (the original trained without padding).
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn


class SRCNN(nn.Module):
    """Patch extraction (9x9, 64) -> non-linear mapping (5x5, 32) -> reconstruction (5x5).

    Args:
        spatial_dims: 2 for slices (3 works too: MONAI blocks are dimension-generic).
        in_channels: image channels (1 = grayscale); the output has the same number.
        features: filters of the first two layers (n1, n2) = (64, 32) in the paper.
        kernel_sizes: (f1, f2, f3) = (9, 5, 5) in the paper (Dong et al. 2016, 9-5-5).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1,
                 features: Sequence[int] = (64, 32), kernel_sizes: Sequence[int] = (9, 5, 5)):
        super().__init__()
        f1, f2 = features
        k1, k2, k3 = kernel_sizes
        self.patch_extraction = Convolution(spatial_dims, in_channels, f1, kernel_size=k1,
                                            act="relu", norm=None)
        self.nonlinear_mapping = Convolution(spatial_dims, f1, f2, kernel_size=k2,
                                             act="relu", norm=None)
        self.reconstruction = Convolution(spatial_dims, f2, in_channels, kernel_size=k3,
                                          conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruction(self.nonlinear_mapping(self.patch_extraction(x)))
