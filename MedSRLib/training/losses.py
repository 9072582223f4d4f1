"""Training losses: pixel losses (L1, MSE, SSIM), VGG19 perceptual, adversarial, box regression.

A config's `loss:` list names weighted terms, e.g.

    loss:
      - {type: mse, weight: 1.0}
      - {type: vgg, weight: 0.006, layer: relu5_4, weights: /path/vgg19.safetensors}

`build_loss` turns it into a module returning (total, {term: value}). Nothing is ever
downloaded: the VGG19 weights come from a local file (safetensors, or a PyTorch state dict read
with `weights_only=True`) whose keys are torchvision's `features.<i>.weight/bias` (or `<i>.*`);
`allow_random_weights: true` builds a randomly initialised VGG19 (tests, plumbing only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from torch import nn

#: torchvision's VGG19 `features` layout: channel counts, "M" = 2x2 max-pool.
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg19_layer_names() -> list[str]:
    names, block, conv = [], 1, 1
    for item in VGG19_LAYOUT:
        if item == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return names


def vgg19_features(last_layer: str = "relu5_4") -> nn.Sequential:
    """torchvision-compatible VGG19 `features`, truncated after `last_layer` (e.g. relu5_4)."""
    names = _vgg19_layer_names()
    if last_layer not in names:
        raise ValueError(f"last_layer must be a VGG19 layer name like relu5_4, got {last_layer!r}")
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG19_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return nn.Sequential(*layers[: names.index(last_layer) + 1])


def load_vgg19_weights(features: nn.Sequential, path: str | Path) -> None:
    """Load torchvision VGG19 `features` weights from a local safetensors or .pth file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGG19 weights file {path} does not exist (nothing is downloaded; "
                                "give a local file in the config's loss entry 'weights')")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()}
    wanted = features.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"{path}: not VGG19 features weights (missing {missing[:3]})")
    features.load_state_dict({k: state[k] for k in wanted})


class VGGPerceptualLoss(nn.Module):
    """MSE between VGG19 feature maps of prediction and target (SRGAN's l_VGG, paper 003).

    Inputs are 1-channel images in unit range; they are repeated to RGB and normalised with the
    ImageNet statistics the VGG was trained with. The VGG is frozen.
    """

    def __init__(self, layer: str = "relu5_4", weights: str | Path | None = None,
                 allow_random_weights: bool = False):
        super().__init__()
        self.features = vgg19_features(layer)
        if weights is not None:
            load_vgg19_weights(self.features, weights)
        elif not allow_random_weights:
            raise ValueError("the vgg loss needs 'weights' (a local VGG19 file); set "
                             "allow_random_weights: true only for tests")
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> "VGGPerceptualLoss":
        super().train(mode)
        self.features.eval()
        return self

    def _embed(self, image: torch.Tensor) -> torch.Tensor:
        rgb = image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image
        return self.features((rgb - self.mean) / self.std)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self._embed(prediction), self._embed(target).detach())


class AdversarialLoss(nn.Module):
    """Non-saturating GAN loss on discriminator logits (SRGAN; the -log D form of paper 003's l_GD).

    `generator_loss(fake_logits)` = BCE(D(G(x)), real);
    `discriminator_loss(real_logits, fake_logits)` = BCE(D(HR), real) + BCE(D(G(x)), fake).
    """

    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def box_l2_loss(predicted_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """L2 (mean squared) box regression loss, paper 003's lesion detector; boxes (N, 4)."""
    if predicted_boxes.shape != target_boxes.shape:
        raise ValueError(f"predicted_boxes {tuple(predicted_boxes.shape)} and target_boxes "
                         f"{tuple(target_boxes.shape)} must have the same shape")
    return F.mse_loss(predicted_boxes, target_boxes)


class SSIMLossTerm(nn.Module):
    """1 - SSIM (MONAI SSIMLoss, 2-D, unit data range)."""

    def __init__(self, data_range: float = 1.0):
        super().__init__()
        self.loss = SSIMLoss(spatial_dims=2, data_range=data_range)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(prediction.float(), target.float())


PIXEL_LOSSES = ("l1", "mse", "ssim", "vgg")


class CompositeLoss(nn.Module):
    """Weighted sum of image losses; forward returns (total, {name: unweighted value})."""

    def __init__(self, terms: Sequence[dict[str, Any]]):
        super().__init__()
        if not terms:
            raise ValueError("loss must list at least one term")
        self.names: list[str] = []
        self.weights: list[float] = []
        self.terms = nn.ModuleList()
        for term in terms:
            kind = term.get("type")
            options = {k: v for k, v in term.items() if k not in ("type", "weight")}
            if kind == "l1":
                module: nn.Module = nn.L1Loss()
            elif kind == "mse":
                module = nn.MSELoss()
            elif kind == "ssim":
                module = SSIMLossTerm(**options)
            elif kind == "vgg":
                module = VGGPerceptualLoss(**options)
            else:
                raise ValueError(f"unknown loss type {kind!r}; known: {', '.join(PIXEL_LOSSES)}")
            self.names.append(kind)
            self.weights.append(float(term.get("weight", 1.0)))
            self.terms.append(module)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, float]]:
        total = prediction.new_zeros(())
        parts: dict[str, float] = {}
        for name, weight, term in zip(self.names, self.weights, self.terms):
            value = term(prediction.float(), target.float())
            parts[name] = float(value.detach())
            total = total + weight * value
        return total, parts


def build_loss(terms: Sequence[dict[str, Any]]) -> CompositeLoss:
    return CompositeLoss(terms)
