"""Sub-pixel upsampling stages shared by the post-upsampling networks.

Shi et al. 2016 (ESPCN) sub-pixel convolution, as used by SRResNet (Ledig et al. 2017), EDSR /
MDRN (paper 004) and FMEN (paper 001): a x4 head is two x2 stages (conv to 4F channels, pixel
shuffle), a x3 head is one x3 stage (conv to 9F channels, pixel shuffle). Each stage is MONAI's
`SubpixelUpsample` with its 3x3 "default" conv (ICNR-initialised) and *without* the pad-and-
average-pool blur (`apply_pad_pool=False`), so the layer is the papers' plain sub-pixel conv.
"""

from __future__ import annotations

import copy

from monai.networks.blocks import SubpixelUpsample
from torch import nn


def upscale_steps(scale: int) -> list[int]:
    """Per-stage factors for an integer `scale`: powers of two as x2 stages, 3 as one x3 stage.

    >>> upscale_steps(4)
    [2, 2]
    """
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    steps: list[int] = []
    remaining = scale
    while remaining % 2 == 0:
        steps.append(2)
        remaining //= 2
    if remaining == 3:
        steps.append(3)
    elif remaining != 1:
        raise ValueError(f"scale must be 2**k or 3*2**k, got {scale}")
    return steps


def subpixel_upsampler(spatial_dims: int, num_features: int, scale: int,
                       act: nn.Module | None = None) -> nn.Sequential:
    """A chain of sub-pixel stages reaching `scale`; `act` (e.g. PReLU) is copied after each."""
    layers: list[nn.Module] = []
    for step in upscale_steps(scale):
        layers.append(SubpixelUpsample(spatial_dims, num_features, num_features, scale_factor=step,
                                       apply_pad_pool=False))
        if act is not None:
            layers.append(copy.deepcopy(act))
    return nn.Sequential(*layers)
