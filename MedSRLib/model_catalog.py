"""The registry's entries: one `register(ModelSpec(...))` per model name.

Adding a network is one file under `networks/` plus one entry here.
"""

from __future__ import annotations

from functools import partial

from .networks.interpolation import Interpolation, Lanczos
from .networks.srcnn import SRCNN
from .zoo import ModelSpec, register

# ---- interpolation baselines ------------------------------------------------------------------
for _mode, _title in (("nearest", "Nearest neighbour"), ("linear", "Bilinear (in-plane)"),
                      ("bicubic", "Bicubic (Keys a=-0.75, torch)")):
    register(ModelSpec(
        name=_mode, title=_title,
        builder=partial(Interpolation, "bilinear" if _mode == "linear" else _mode),
        kind="interpolation", paper="-", scales=(2, 3, 4),
        description=f"{_title} interpolation baseline, no learning."))

register(ModelSpec(
    name="lanczos", title="Lanczos-3", builder=Lanczos, kind="interpolation", paper="-",
    scales=(2, 3, 4), description="Separable Lanczos-3 windowed-sinc baseline, no learning."))

# ---- learned networks -------------------------------------------------------------------------
register(ModelSpec(
    name="srcnn", title="SRCNN 9-5-5", builder=SRCNN, kind="pre_upsampled",
    paper="Dong et al. 2014; paper 000 (Gao et al.) baseline", scales=(2, 3, 4),
    default_config={"in_channels": 1, "features": [64, 32], "kernel_sizes": [9, 5, 5]},
    description="Three-layer CNN on the bicubic-upsampled slice."))
