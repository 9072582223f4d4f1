"""FMEN, the fast and memory-efficient network (Du et al., CVPRW 2022), described in paper 001
(Xu et al., "FMEN" section and Fig. 2; parameter count in Table 2).

    head conv3x3 -> warm-up conv3x3 -> HFAB -> [ERB -> HFAB] x 4 -> conv3x3 -> (+ head) ->
    conv3x3 to C*s^2 -> pixel shuffle x s

ERB (enhanced residual block) = RRRB - LeakyReLU(0.1) - RRRB. In the training form each RRRB
("residual in residual re-parameterisable block") is conv1x1 (expand x2) -> conv3x3 (+ skip)
-> conv1x1 (reduce) (+ skip); at inference it is merged into one plain 3x3 conv.

HFAB (high-frequency attention block): BN -> conv3x3 (squeeze to 16, or 12 in the warm-up
HFAB) -> LeakyReLU -> ERBs -> LeakyReLU -> BN -> conv3x3 (excite) -> BN -> sigmoid, which
multiplies the block input. The BNs give global context in training and are merged into the
convolutions at inference.

The training-form convolutions inside RRRB/HFAB are unpadded; their input is padded with the
value the preceding affine layer gives a zero input (expand-conv bias, BN shift), exactly as in
the authors' code. That makes the merged 3x3 convs with zero padding equal, border included, so
`reparameterize()` returns a deploy-form network whose eval output equals the training form's
(tested with `torch.allclose`, atol 1e-5).

Parameter counts (paper 001 Table 2: FMEN 341,066): the paper config (50 features, 16 mid
features, 4 ERB-HFAB pairs, HFABs with 2,1,1,1,1 ERBs, expand ratio 2, x4) in the *deploy*
form on 3-channel RGB has exactly 341,066 parameters. See networks/README.md for the training
form and the 1-channel counts.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import SubpixelUpsample
from torch import nn


def pad_with(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Pad one pixel on every side of a (N, C, H, W) map with a per-channel `value` (C,)."""
    value = value.view(1, -1, 1, 1)
    return F.pad(x - value, (1, 1, 1, 1)) + value


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with bn(x) = s * x + t under the running statistics (eval mode)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def conv3x3(in_channels: int, out_channels: int, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, 1, padding)


class RRRB(nn.Module):
    """Residual-in-residual re-parameterisable block (training form of one 3x3 conv)."""

    def __init__(self, num_features: int, expand_ratio: int = 2):
        super().__init__()
        wide = expand_ratio * num_features
        self.expand_conv = nn.Conv2d(num_features, wide, 1)
        self.fea_conv = conv3x3(wide, wide, padding=0)
        self.reduce_conv = nn.Conv2d(wide, num_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expanded = self.expand_conv(x)
        out = self.fea_conv(pad_with(expanded, self.expand_conv.bias)) + expanded
        return self.reduce_conv(out) + x

    @torch.no_grad()
    def merged(self) -> nn.Conv2d:
        """The single zero-padded 3x3 conv equal to this block."""
        k0, b0 = self.expand_conv.weight[:, :, 0, 0], self.expand_conv.bias
        k1, b1 = self.fea_conv.weight, self.fea_conv.bias
        k2, b2 = self.reduce_conv.weight[:, :, 0, 0], self.reduce_conv.bias
        k01 = torch.einsum("omhw,mi->oihw", k1, k0)
        k01[:, :, 1, 1] += k0
        b01 = b1 + k1.sum((2, 3)) @ b0 + b0
        kernel = torch.einsum("po,oihw->pihw", k2, k01)
        kernel[:, :, 1, 1] += torch.eye(kernel.shape[0], dtype=kernel.dtype)
        conv = conv3x3(kernel.shape[1], kernel.shape[0])
        conv.weight.copy_(kernel)
        conv.bias.copy_(k2 @ b01 + b2)
        return conv


class ERB(nn.Module):
    """Enhanced residual block: conv - LeakyReLU - conv, each conv an RRRB in training."""

    def __init__(self, num_features: int, expand_ratio: int = 2, negative_slope: float = 0.1,
                 deploy: bool = False):
        super().__init__()
        self.conv1 = conv3x3(num_features, num_features) if deploy else RRRB(num_features, expand_ratio)
        self.conv2 = conv3x3(num_features, num_features) if deploy else RRRB(num_features, expand_ratio)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))

    @torch.no_grad()
    def load_merged_from(self, trained: "ERB") -> None:
        """Fill this deploy-form block with `trained`'s RRRBs merged into 3x3 convs."""
        for name in ("conv1", "conv2"):
            getattr(self, name).load_state_dict(getattr(trained, name).merged().state_dict())


class HFAB(nn.Module):
    """High-frequency attention block; BN-free plain convs when `deploy`."""

    def __init__(self, num_features: int, num_erbs: int, mid_features: int, expand_ratio: int = 2,
                 negative_slope: float = 0.1, deploy: bool = False):
        super().__init__()
        self.deploy = deploy
        padding = 1 if deploy else 0
        if not deploy:
            self.bn1 = nn.BatchNorm2d(num_features)
            self.bn2 = nn.BatchNorm2d(mid_features)
            self.bn3 = nn.BatchNorm2d(num_features)
        self.squeeze = conv3x3(num_features, mid_features, padding)
        self.convs = nn.Sequential(*[ERB(mid_features, expand_ratio, negative_slope, deploy)
                                     for _ in range(num_erbs)])
        self.excitate = conv3x3(mid_features, num_features, padding)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            out = self.act(self.convs(self.act(self.squeeze(x))))
            return torch.sigmoid(self.excitate(out)) * x
        out = pad_with(self.bn1(x), bn_scale_shift(self.bn1)[1])
        out = self.act(self.convs(self.act(self.squeeze(out))))
        out = pad_with(self.bn2(out), bn_scale_shift(self.bn2)[1])
        return torch.sigmoid(self.bn3(self.excitate(out))) * x

    @torch.no_grad()
    def load_merged_from(self, trained: "HFAB") -> None:
        """Fill this deploy-form block with `trained`'s BNs folded into its convolutions."""
        s1, t1 = bn_scale_shift(trained.bn1)
        s2, t2 = bn_scale_shift(trained.bn2)
        s3, t3 = bn_scale_shift(trained.bn3)
        w, b = trained.squeeze.weight, trained.squeeze.bias
        self.squeeze.weight.copy_(w * s1.view(1, -1, 1, 1))
        self.squeeze.bias.copy_(b + w.sum((2, 3)) @ t1)
        w, b = trained.excitate.weight, trained.excitate.bias
        w2, b2 = w * s2.view(1, -1, 1, 1), b + w.sum((2, 3)) @ t2
        self.excitate.weight.copy_(w2 * s3.view(-1, 1, 1, 1))
        self.excitate.bias.copy_(b2 * s3 + t3)
        for deploy_erb, trained_erb in zip(self.convs, trained.convs):
            deploy_erb.load_merged_from(trained_erb)


class FMEN(nn.Module):
    """Fast and memory-efficient SR network; post-upsampling. Defaults are the paper's (x4).

    Args:
        spatial_dims: only 2.
        in_channels: image channels (1 = grayscale; the paper trains RGB, 3).
        num_features: trunk features (50).
        mid_features: HFAB branch features (16; the warm-up HFAB uses mid_features - 4 = 12).
        num_down_blocks: ERB-HFAB pairs in the trunk (4).
        num_erbs_per_hfab: ERBs inside each HFAB, warm-up first ((2, 1, 1, 1, 1)).
        backbone_expand_ratio: RRRB expansion in trunk ERBs (2).
        attention_expand_ratio: RRRB expansion in HFAB ERBs (2).
        scale: upscaling factor (one pixel-shuffle stage of that factor).
        negative_slope: LeakyReLU slope (0.1).
        deploy: build the re-parameterised inference form (plain 3x3 convs, no BN).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_features: int = 50,
                 mid_features: int = 16, num_down_blocks: int = 4,
                 num_erbs_per_hfab: Sequence[int] = (2, 1, 1, 1, 1),
                 backbone_expand_ratio: int = 2, attention_expand_ratio: int = 2, scale: int = 4,
                 negative_slope: float = 0.1, deploy: bool = False):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"spatial_dims must be 2 for FMEN, got {spatial_dims}")
        if len(num_erbs_per_hfab) != num_down_blocks + 1:
            raise ValueError(f"num_erbs_per_hfab needs num_down_blocks + 1 = {num_down_blocks + 1} "
                             f"entries, got {list(num_erbs_per_hfab)}")
        self.config = dict(spatial_dims=spatial_dims, in_channels=in_channels,
                           num_features=num_features, mid_features=mid_features,
                           num_down_blocks=num_down_blocks,
                           num_erbs_per_hfab=tuple(num_erbs_per_hfab),
                           backbone_expand_ratio=backbone_expand_ratio,
                           attention_expand_ratio=attention_expand_ratio, scale=scale,
                           negative_slope=negative_slope)
        self.deploy = deploy
        f, slope = num_features, negative_slope
        self.head = conv3x3(in_channels, f)
        self.warmup = nn.Sequential(
            conv3x3(f, f),
            HFAB(f, num_erbs_per_hfab[0], mid_features - 4, attention_expand_ratio, slope, deploy))
        self.erbs = nn.ModuleList(ERB(f, backbone_expand_ratio, slope, deploy)
                                  for _ in range(num_down_blocks))
        self.hfabs = nn.ModuleList(HFAB(f, n, mid_features, attention_expand_ratio, slope, deploy)
                                   for n in num_erbs_per_hfab[1:])
        self.lr_conv = conv3x3(f, f)
        self.tail = SubpixelUpsample(2, f, in_channels, scale_factor=scale, apply_pad_pool=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.head(x)
        h = self.warmup(shallow)
        for erb, hfab in zip(self.erbs, self.hfabs):
            h = hfab(erb(h))
        return self.tail(self.lr_conv(h) + shallow)

    @torch.no_grad()
    def reparameterize(self) -> "FMEN":
        """The deploy form (eval mode) computing the same function as this network in eval mode."""
        if self.deploy:
            return self.eval()
        deployed = FMEN(**self.config, deploy=True).to(next(self.parameters()).device)
        for name in ("head", "lr_conv", "tail"):
            getattr(deployed, name).load_state_dict(getattr(self, name).state_dict())
        deployed.warmup[0].load_state_dict(self.warmup[0].state_dict())
        deployed.warmup[1].load_merged_from(self.warmup[1])
        for deploy_erb, trained_erb in zip(deployed.erbs, self.erbs):
            deploy_erb.load_merged_from(trained_erb)
        for deploy_hfab, trained_hfab in zip(deployed.hfabs, self.hfabs):
            deploy_hfab.load_merged_from(trained_hfab)
        return deployed.eval()
