"""VDSR (Kim, Lee and Lee, CVPR 2016), as described in paper 001 ("SDSR" section, Fig. 4) and
paper 002 (section 1.1): 20 convolutions 3x3 with 64 filters and ReLU, the first mapping the
image to 64 channels and the last back to the image; global residual learning on the
interpolated (pre-upsampled) input: output = input + network(input). Gradient clipping is a
training concern and lives in the training script.

Parameter count: paper 001 Table 2 gives VDSR 667,008. That is exactly 20 bias-free 3x3 convs
on 3-channel RGB: 3*64*9 + 18*64*64*9 + 64*3*9 = 1,728 + 663,552 + 1,728 = 667,008 (the common
PyTorch VDSR port uses bias=False). Kim et al.'s Caffe model had biases (3 channels: 668,227).
Our default (`bias=False`, 1 channel) has 576 + 663,552 + 576 = 664,704; with biases, 665,921.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn


class VDSR(nn.Module):
    """Very deep SR network: `num_layers` 3x3 convs, ReLU between, global residual.

    Args:
        spatial_dims: 2 for slices (MONAI blocks also allow 3).
        in_channels: image channels (1 = grayscale); output has the same number.
        num_features: filters of the hidden layers (64).
        num_layers: total convolution layers including first and last (20).
        bias: convolution biases; False reproduces paper 001 Table 2 (667,008 at 3 channels).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_features: int = 64,
                 num_layers: int = 20, bias: bool = False):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers must be >= 2, got {num_layers}")
        layers = [Convolution(spatial_dims, in_channels, num_features, kernel_size=3, act="relu",
                              norm=None, bias=bias)]
        layers += [Convolution(spatial_dims, num_features, num_features, kernel_size=3, act="relu",
                               norm=None, bias=bias) for _ in range(num_layers - 2)]
        layers.append(Convolution(spatial_dims, num_features, in_channels, kernel_size=3,
                                  conv_only=True, bias=bias))
        self.residual = nn.Sequential(*layers)
        # He et al. initialisation, as Kim et al.: PyTorch's default conv init shrinks the signal
        # ~6x per ReLU layer, so after 20 layers the residual (and its gradient) is ~0 in bf16.
        # The last conv starts 1000x smaller (ours): the untrained network is the bicubic input
        # to ~1e-4 and trains from there; not zero, so every layer gets a gradient from step one.
        convs = [m for m in self.residual.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        with torch.no_grad():
            convs[-1].weight.mul_(1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)
