"""Improved medical SRCNN of paper 000 (Gao et al., "A deep convolutional network for medical
image super-resolution"), Table I and Fig. 2.

Table I, layer by layer (all stride 1):
    Conv1   9x9, 32 filters, ReLU
    Pool1   overlapping max-pool 2x2, stride 1
    Conv2   5x5, 32 -> 32, ReLU          (the added "secondary feature extraction" layer)
    Pool2   overlapping max-pool 2x2, stride 1
    Link    11x11, 32 -> 1, from Pool2 straight to the output (local features)
    Conv3   7x7, 32 -> 32, ReLU          (non-linear mapping, on Pool2)
    Conv4   5x5, 32 -> 1                 (reconstruction)
    output = Link(Pool2) + Conv4(Conv3(Pool2))

Pre-upsampling, like SRCNN: the input is the interpolated slice; the output has its size.

Padding choices (the paper does not state them): convolutions are zero-padded "same"
(k // 2 each side). A 2x2 stride-1 pool shrinks a map by one row and one column, so before each
pool the map is padded by one row at the bottom and one column at the right by *replicating*
the edge: for a max this is the same as ignoring the missing neighbours (-inf padding), so
pixel (i, j) becomes max of its 2x2 window {i, i+1} x {j, j+1} clipped to the image. The two
pools therefore shift features by half a pixel each towards the top-left; the link layer and
the Conv3-Conv4 path both see the same shifted maps and learn to compensate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn


class OverlappingMaxPool(nn.Module):
    """Max-pool `size` x `size` with stride 1 that keeps the map size (edge-replicate padding
    of size-1 rows/columns at the bottom/right; equivalent to ignoring out-of-image pixels)."""

    def __init__(self, size: int = 2):
        super().__init__()
        self.size = size
        self.pool = nn.MaxPool2d(size, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.size - 1
        return self.pool(F.pad(x, (0, pad, 0, pad), mode="replicate"))


class ImprovedSRCNN(nn.Module):
    """Gao et al. (paper 000) Table I network; defaults are the paper's.

    Args:
        spatial_dims: only 2 (the stride-1 pooling here is 2-D).
        in_channels: image channels (1 = grayscale CT in the paper); output has the same number.
        num_features: filters of Conv1, Conv2 and Conv3 (32).
        kernel_sizes: (Conv1, Conv2, Link, Conv3, Conv4) = (9, 5, 11, 7, 5).
        pool_size: overlapping pool window (2, stride 1).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_features: int = 32,
                 kernel_sizes: tuple[int, int, int, int, int] = (9, 5, 11, 7, 5),
                 pool_size: int = 2):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"spatial_dims must be 2 for ImprovedSRCNN, got {spatial_dims}")
        k1, k2, k_link, k3, k4 = kernel_sizes
        f = num_features
        self.conv1 = Convolution(2, in_channels, f, kernel_size=k1, act="relu", norm=None)
        self.pool1 = OverlappingMaxPool(pool_size)
        self.conv2 = Convolution(2, f, f, kernel_size=k2, act="relu", norm=None)
        self.pool2 = OverlappingMaxPool(pool_size)
        self.link = Convolution(2, f, in_channels, kernel_size=k_link, conv_only=True)
        self.conv3 = Convolution(2, f, f, kernel_size=k3, act="relu", norm=None)
        self.conv4 = Convolution(2, f, in_channels, kernel_size=k4, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.link(local) + self.conv4(self.conv3(local))
