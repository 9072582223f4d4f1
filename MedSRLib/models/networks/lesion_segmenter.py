"""Lesion segmenter: a small 2.5-D MONAI BasicUNet that gives a per-pixel lesion probability.

Input (N, context, H, W): `context` adjacent slices (the slice itself in the middle channel),
in the SR models' network units (`intensity.fit_mapping`). Output (N, 2, H, W) logits, channel 1
= lesion (softmax over the two channels). Tensors in, tensors out: slicing, resizing and the
3-D fusion live in `MedSRLib.roi.localiser`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import BasicUNet
from torch import nn


class LesionSegmenter(nn.Module):
    """BasicUNet(spatial_dims=2) with `in_channels` slices of context and 2 output classes."""

    def __init__(self, in_channels: int = 3,
                 features: Sequence[int] = (16, 16, 32, 64, 128, 16), dropout: float = 0.0):
        super().__init__()
        self.in_channels = int(in_channels)
        self.unet = BasicUNet(spatial_dims=2, in_channels=self.in_channels, out_channels=2,
                              features=tuple(int(f) for f in features), dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, 2, H, W) logits; H and W multiples of 16."""
        return self.unet(x)

    @staticmethod
    def lesion_probability(logits: torch.Tensor) -> torch.Tensor:
        """(N, 2, H, W) logits -> (N, H, W) lesion probability."""
        return torch.softmax(logits.float(), dim=1)[:, 1]
