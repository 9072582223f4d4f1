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

from .edsr import ResidualBlockNoBN

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
    like = dict(dtype=image.dtype, device=image.device)
    phase = phase_rows.to(**like).view(1, 1, h, 1).expand(n, 1, h, w)
    factor_map = torch.full((n, 1, h, w), (float(factor) - 1.0) / 7.0, **like)
    ratio_map = torch.full((n, 1, h, w), float(thickness_ratio), **like)
    return torch.cat([image, phase, factor_map, ratio_map], dim=1)


class ThroughPlaneEDSR(nn.Module):
    """Any-factor through-plane SR on the thick grid: an EDSR trunk (head, residual blocks; can
    start from the shipped `edsr_lite` weights) computes features on the thick plane, the
    features are cubic-resampled along the rows to the target slices, and a small tail (with
    the phase, factor and thickness-ratio channels) predicts the residual over the cubic
    resampling of the image itself.

    `forward(thick, positions, factor, thickness_ratio)`: thick (N, 1, n, W) with rows along the
    slice axis, positions (m,) input-row coordinates of the m output rows (`profile.
    sample_positions`) -> (N, 1, m, W). The last conv starts at zero (exactly cubic).

    `refine_blocks` residual blocks run on the output grid between the tail's two convs (they
    see the resampled rows, which the thick-grid trunk cannot); each starts as the identity, so
    a network grown from one without them starts with that network's output.
    """

    def __init__(self, num_features: int = 48, num_blocks: int = 8, tail_features: int = 32,
                 refine_blocks: int = 0):
        super().__init__()
        from .edsr import ResidualTrunk
        self.head = Convolution(2, 1, num_features, kernel_size=3, conv_only=True)
        self.trunk = ResidualTrunk(2, num_features, num_blocks, 1.0)
        self.tail = nn.Sequential(
            Convolution(2, num_features + 3, tail_features, kernel_size=3, act="relu", norm=None),
            Convolution(2, tail_features, 1, kernel_size=3, conv_only=True))
        self.refine = nn.Sequential(*[ResidualBlockNoBN(2, tail_features) for _ in range(refine_blocks)])
        for block in self.refine:
            closing = [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1]
            nn.init.zeros_(closing.weight)
            nn.init.zeros_(closing.bias)
        last = [m for m in self.tail.modules() if isinstance(m, nn.Conv2d)][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        #: Autocast dtype of trunk and tail at inference (e.g. torch.bfloat16), None = fp32;
        #: the cubic resampling of the image itself stays fp32.
        self.autocast_dtype: torch.dtype | None = None

    def residual(self, thick: torch.Tensor, matrix: torch.Tensor,
                 conditioning: torch.Tensor) -> torch.Tensor:
        """The learned residual (N, 1, m, W) of thick planes (N, 1, n, W), given the cubic
        resampling `matrix` (m, n) and the `conditioning` rows (1, 3, m, 1): phase, factor and
        thickness-ratio channels. Runs in the dtype of `thick` (or the enclosing autocast)."""
        features = self.trunk(self.head(thick))
        resampled = torch.einsum("mr,ncrw->ncmw", matrix.to(features.dtype), features)
        extra = conditioning.to(resampled.dtype).expand(thick.shape[0], 3, matrix.shape[0], thick.shape[3])
        hidden = self.tail[0](torch.cat([resampled, extra], dim=1))
        return self.tail[1](self.refine(hidden))

    def forward(self, thick: torch.Tensor, positions: torch.Tensor, factor: float,
                thickness_ratio: float) -> torch.Tensor:
        from ...transforms.slice_profile import cubic_matrix, phase_map
        pos = positions.detach().cpu().numpy()
        like = dict(dtype=thick.dtype, device=thick.device)
        matrix = torch.from_numpy(cubic_matrix(thick.shape[2], pos).astype("float32")).to(**like)
        upsampled = torch.einsum("mr,nrw->nmw", matrix, thick[:, 0])[:, None]  # fp32 always
        m = matrix.shape[0]
        conditioning = torch.stack([torch.from_numpy(phase_map(pos)).to(**like),
                                    torch.full((m,), (float(factor) - 1.0) / 7.0, **like),
                                    torch.full((m,), float(thickness_ratio), **like)]).view(1, 3, m, 1)
        dtype = self.autocast_dtype
        with torch.autocast(thick.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            residual = self.residual(thick, matrix, conditioning)
        return upsampled + residual.float()

    def load_edsr_trunk(self, weights_path: str) -> None:
        """Copy head and trunk tensors from an `edsr_lite` safetensors file (same width)."""
        from safetensors.torch import load_file
        state = load_file(weights_path)
        own = self.state_dict()
        picked = {k: v for k, v in state.items() if k.startswith(("head.", "trunk.")) and k in own
                  and own[k].shape == v.shape}
        missing = [k for k in own if k.startswith(("head.", "trunk.")) and k not in picked]
        if missing:
            raise ValueError(f"{weights_path}: no tensors for {missing[:3]}")
        self.load_state_dict({**own, **picked})

    def load_grown(self, weights_path: str) -> None:
        """Every tensor of a through-plane safetensors file with fewer (or as many) refine
        blocks; the others keep their initial values (identity blocks). ValueError when a
        tensor outside the refine blocks is missing or has another shape."""
        from safetensors.torch import load_file
        state = load_file(weights_path)
        own = self.state_dict()
        wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        missing = [k for k in own if k not in state and not k.startswith("refine.")]
        if wrong or missing:
            raise ValueError(f"{weights_path}: does not fit this network ({(wrong + missing)[:3]})")
        self.load_state_dict({**own, **state})


def run_planes(net: nn.Module, thick: torch.Tensor, positions: torch.Tensor, factor: float,
               thickness_ratio: float) -> torch.Tensor:
    """Restore thick planes (N, 1, n, W) (rows along the slice axis) to the output rows at
    input-row `positions` (m,): (N, 1, m, W), for either architecture."""
    if isinstance(net, ThroughPlaneEDSR):
        return net(thick, positions, factor, thickness_ratio)
    from ...transforms.slice_profile import cubic_matrix, phase_map
    pos = positions.detach().cpu().numpy()
    matrix = torch.from_numpy(cubic_matrix(thick.shape[2], pos).astype("float32")).to(thick.device)
    upsampled = torch.einsum("mr,nrw->nmw", matrix, thick[:, 0])[:, None]
    return net(conditioning(upsampled, torch.from_numpy(phase_map(pos)), factor, thickness_ratio))
