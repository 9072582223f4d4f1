"""Lesion detector LD of paper 003 (Zhu, Yang and Lio, "Lesion focused super-resolution",
section 2.1): "a max pooling residual block and an input-scale free residual neural network
LD ... a max pooling layer is added after two residual blocks, which include two skip
connections between four convolution and batch normalization layers".

Architecture (widths are not given in the paper; our choice): stem conv3x3 (32) - BN - ReLU,
then `len(features)` max-pooling residual stages, each = residual block - residual block -
max-pool 2x2 (the first block of a stage projects with a 1x1 conv when the width changes),
then global average pooling (so any input size works: fully convolutional) and a linear head
giving 4 box numbers and 1 score per 2-D slice.

Box convention: `boxes[n] = (cx, cy, w, h)`, the box centre and size *normalised* to [0, 1] by
the slice width (x, last axis) and height (y, second-to-last axis), through a sigmoid. The score
is a logit (sigmoid gives the probability that the slice holds a lesion). The paper trains LD
with an L2 loss on the box.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn


class ResidualBlockBN(nn.Module):
    """conv-BN-ReLU-conv-BN + skip (1x1 projection when widths differ), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            Convolution(2, in_channels, out_channels, kernel_size=3, act="relu", norm="batch"),
            Convolution(2, out_channels, out_channels, kernel_size=3, act=None, norm="batch"))
        self.skip = (nn.Identity() if in_channels == out_channels else
                     Convolution(2, in_channels, out_channels, kernel_size=1, conv_only=True))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.skip(x) + self.body(x))


class MaxPoolResidualStage(nn.Module):
    """Two residual blocks (four conv+BN, two skips) followed by 2x2 max pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.blocks = nn.Sequential(ResidualBlockBN(in_channels, out_channels),
                                    ResidualBlockBN(out_channels, out_channels))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(x))


class LesionDetector(nn.Module):
    """Input-size-free lesion box regressor; `forward(x) -> (boxes (N, 4), score_logits (N,))`.

    Args:
        spatial_dims: only 2 (one box per slice).
        in_channels: image channels (1 = grayscale MR in the paper).
        stem_features: width of the first conv (32).
        features: widths of the max-pooling residual stages ((32, 64, 128, 256)).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, stem_features: int = 32,
                 features: Sequence[int] = (32, 64, 128, 256)):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"spatial_dims must be 2 for LesionDetector, got {spatial_dims}")
        self.stem = Convolution(2, in_channels, stem_features, kernel_size=3, act="relu",
                                norm="batch")
        widths = [stem_features, *features]
        self.stages = nn.Sequential(*[MaxPoolResidualStage(a, b)
                                      for a, b in zip(widths[:-1], widths[1:])])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))
        return torch.sigmoid(out[:, :4]), out[:, 4]


def resize_slices(slices: torch.Tensor, size: int | None, mask: bool = False) -> torch.Tensor:
    """(N, C, H, W) slices resampled to (N, C, size, size), the detector's whole-slice input.

    Images: bilinear with antialiasing. Masks: area fraction > 0, so a lesion pixel never
    vanishes (its box can only grow by under one output pixel). size None: unchanged.
    Normalised boxes (cx, cy, w, h) are the same before and after (both axes rescale).
    """
    if size is None or tuple(slices.shape[-2:]) == (size, size):
        return slices
    if mask:
        return (torch.nn.functional.interpolate(slices.float(), size=(size, size), mode="area") > 0).to(slices.dtype)
    return torch.nn.functional.interpolate(slices.float(), size=(size, size), mode="bilinear",
                                           align_corners=False, antialias=True)
