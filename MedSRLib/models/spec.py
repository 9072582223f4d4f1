"""`ModelSpec`: what the registry knows about one model name (no registry, no weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

#: Ways a network consumes its input.
KINDS = ("interpolation", "pre_upsampled", "post_upsampled", "multi_scale", "detector",
         "through_plane")


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model name.

    kind:
      - "interpolation": parameter-free baseline; `builder(scale=(sy, sx))`.
      - "pre_upsampled": the network sees the bicubic-upsampled image (SRCNN, VDSR);
        `builder(**config)`, same size in and out.
      - "post_upsampled": the network upsamples itself; `builder(scale=s, **config)`.
      - "multi_scale": one network for several scales; `builder(scales=..., **config)` and
        `forward(x, scale)`.
      - "detector": not an SR model (lesion detector).
      - "through_plane": restores thick-slice volumes along one axis after cubic resampling to
        any real factor (`through_plane/`); run by `upscale` for through-plane factors, not
        by the slice engine.
    """

    name: str
    title: str
    builder: Callable[..., nn.Module]
    kind: str
    paper: str
    scales: tuple[int, ...] = (2, 3, 4)
    default_config: dict[str, Any] = field(default_factory=dict)
    modalities: tuple[str, ...] = ("CT", "MR", "XR")
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def pre_upsampled(self) -> bool:
        return self.kind == "pre_upsampled"

    @property
    def multi_scale(self) -> bool:
        return self.kind == "multi_scale"

    @property
    def needs_weights(self) -> bool:
        return self.kind != "interpolation"
