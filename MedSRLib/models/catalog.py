"""The registry's entries: one `ENTRIES.append(ModelSpec(...))` per model name.

Adding a network is one file under `networks/` plus one entry here.
"""

from __future__ import annotations

from functools import partial

from .networks.interpolation import Interpolation, Lanczos
from .networks.edsr import EDSR, MultiScaleEDSR
from .networks.fmen import FMEN
from .networks.hybrid import HybridSRGANVDSR
from .networks.improved_srcnn import ImprovedSRCNN
from .networks.lesion_detector import LesionDetector
from .networks.lesion_segmenter import LesionSegmenter
from .networks.srcnn import SRCNN
from .networks.srresnet import SRResNet
from .networks.vdsr import VDSR
from .networks.through_plane import ThroughPlaneEDSR
from .spec import ModelSpec

#: Every entry, in registration order.
ENTRIES: list[ModelSpec] = []

# ---- interpolation baselines ------------------------------------------------------------------
for _mode, _title in (("nearest", "Nearest neighbour"), ("linear", "Bilinear (in-plane)"),
                      ("bicubic", "Bicubic (Keys a=-0.75, torch)")):
    ENTRIES.append(ModelSpec(
        name=_mode, title=_title,
        builder=partial(Interpolation, "bilinear" if _mode == "linear" else _mode),
        kind="interpolation", paper="-", scales=(2, 3, 4),
        description=f"{_title} interpolation baseline, no learning."))

ENTRIES.append(ModelSpec(
    name="lanczos", title="Lanczos-3", builder=Lanczos, kind="interpolation", paper="-",
    scales=(2, 3, 4), description="Separable Lanczos-3 windowed-sinc baseline, no learning."))

# ---- learned networks -------------------------------------------------------------------------
ENTRIES.append(ModelSpec(
    name="srcnn", title="SRCNN 9-5-5", builder=SRCNN, kind="pre_upsampled",
    paper="Dong et al. 2014; paper 000 (Gao et al.) baseline", scales=(2, 3, 4),
    default_config={"in_channels": 1, "features": [64, 32], "kernel_sizes": [9, 5, 5]},
    description="Three-layer CNN on the bicubic-upsampled slice."))

ENTRIES.append(ModelSpec(
    name="improved_srcnn", title="Improved medical SRCNN (Gao et al.)", builder=ImprovedSRCNN,
    kind="pre_upsampled", paper="paper 000 (Gao et al.), Table I", scales=(2, 3, 4),
    default_config={"in_channels": 1, "num_features": 32, "kernel_sizes": [9, 5, 11, 7, 5],
                    "pool_size": 2},
    modalities=("CT", "MR", "XR"),
    description="SRCNN + second conv, two overlapping 2x2/1 max-pools and an 11x11 link layer "
                "summed with the reconstruction; on the bicubic-upsampled slice."))

ENTRIES.append(ModelSpec(
    name="vdsr", title="VDSR (20 layers)", builder=VDSR, kind="pre_upsampled",
    paper="Kim et al. 2016; papers 001 (Table 2) and 002", scales=(2, 3, 4),
    default_config={"in_channels": 1, "num_features": 64, "num_layers": 20, "bias": False},
    description="20 3x3 convs with 64 filters and ReLU, global residual on the bicubic input."))

ENTRIES.append(ModelSpec(
    name="fmen", title="FMEN (HFAB + ERB, re-parameterised)", builder=FMEN,
    kind="post_upsampled", paper="Du et al. 2022; paper 001 (Fig. 2, Table 2)", scales=(2, 3, 4),
    default_config={"in_channels": 1, "num_features": 50, "mid_features": 16,
                    "num_down_blocks": 4, "num_erbs_per_hfab": [2, 1, 1, 1, 1],
                    "backbone_expand_ratio": 2, "attention_expand_ratio": 2},
    description="Fast and memory-efficient network; weights are stored in the training form "
                "and the engine runs the re-parameterised deploy form."))

_SRRESNET_CONFIG = {"in_channels": 1, "num_features": 64, "num_blocks": 16, "bicubic_residual": False}
ENTRIES.append(ModelSpec(
    name="srresnet", title="SRResNet (16 blocks, MSE)", builder=SRResNet, kind="post_upsampled",
    paper="Ledig et al. 2017; papers 003 (LFSR generator) and 001", scales=(2, 3, 4),
    default_config=dict(_SRRESNET_CONFIG),
    description="16 residual blocks with BN and PReLU, sub-pixel upsampling; trained with a "
                "pixel loss."))

ENTRIES.append(ModelSpec(
    name="srgan", title="SRGAN generator (adversarial)", builder=SRResNet, kind="post_upsampled",
    paper="Ledig et al. 2017; papers 001, 002, 003", scales=(2, 3, 4),
    default_config=dict(_SRRESNET_CONFIG),
    description="SRResNet architecture trained with perceptual + adversarial losses "
                "(discriminator: networks.srresnet.SRGANDiscriminator); separate weights."))

ENTRIES.append(ModelSpec(
    name="hybrid", title="SRGAN + VDSR hybrid generator", builder=HybridSRGANVDSR,
    kind="post_upsampled", paper="paper 002 (Saeedi), section 2", scales=(2, 4),
    default_config={"in_channels": 1, "num_features": 64, "num_res_blocks": 8,
                    "num_vdsr_layers": 20, "refine_features": 16, "input_upsampling": 2,
                    "output_activation": "tanh", "bicubic_residual": False},
    modalities=("XR", "CT", "MR"),
    description="9x9 head, 8 SRGAN blocks, 20-layer VDSR trunk, BN, sum, fixed sharpening, "
                "upsampling block, 16-filter conv, 5x5 tanh output; bicubic x2 inside."))

ENTRIES.append(ModelSpec(
    name="edsr_baseline", title="EDSR baseline (16x64, no BN)", builder=EDSR,
    kind="post_upsampled", paper="Lim et al. 2017; paper 004", scales=(2, 3, 4),
    default_config={"in_channels": 1, "num_features": 64, "num_blocks": 16, "res_scale": 1.0},
    description="16 residual blocks without batch norm, 64 filters, sub-pixel upsampling."))

_EDSR_LITE_CONFIG = {"in_channels": 1, "num_features": 48, "num_blocks": 8, "res_scale": 1.0,
                     "bicubic_residual": True}
ENTRIES.append(ModelSpec(
    name="edsr_lite", title="EDSR lite (8x48; 12x48 at x4): MedSR's default", builder=EDSR,
    kind="post_upsampled", paper="EDSR design (Lim et al. 2017; paper 004), CPU-sized",
    scales=(2, 3, 4), modalities=("CT", "MR"),
    default_config=dict(_EDSR_LITE_CONFIG),
    description="EDSR without BN at 8 blocks x 48 filters (the x4 weights: 12 blocks) plus a "
                "global bicubic residual: trainable and fast on CPU; the default CT/MR model."))

ENTRIES.append(ModelSpec(
    name="edsr_lite_25d", title="EDSR lite 2.5-D (8x48, slice and 2 neighbours in)",
    builder=EDSR, kind="post_upsampled",
    paper="EDSR design (Lim et al. 2017; paper 004), CPU-sized, neighbouring slices as channels",
    scales=(2, 3, 4), modalities=("CT", "MR"),
    default_config={**_EDSR_LITE_CONFIG, "context_slices": 2},
    description="edsr_lite that also sees the slice above and below (input channels; edge "
                "slices replicated) and returns the middle slice; trained from the edsr_lite "
                "weights with the neighbours' first-layer kernels starting at zero."))

ENTRIES.append(ModelSpec(
    name="lfsr", title="LFSR generator (GAN on lesion ROIs)", builder=EDSR,
    kind="post_upsampled", paper="paper 003 (Zhu et al.), LFSR; EDSR-lite generator",
    scales=(2, 3, 4), modalities=("MR", "CT"),
    default_config=dict(_EDSR_LITE_CONFIG),
    description="Paper 003's lesion-focused generator, trained adversarially on lesion-centred "
                "crops from the edsr_lite weights (SRResNet without BN: the BN SRResNet did not "
                "reach bicubic in our CPU budget); the perceptual choice inside upscale(roi=...), "
                "below the default in PSNR there (roi_model='lfsr')."))

ENTRIES.append(ModelSpec(
    name="mdrn", title="MDRN (multi-scale EDSR, 80x64)", builder=MultiScaleEDSR,
    kind="multi_scale", paper="paper 004 (Ren et al.), sections 3.1 and 4.3", scales=(2, 3, 4),
    default_config={"in_channels": 1, "num_features": 64, "num_blocks": 80, "res_scale": 1.0,
                    "preprocess_blocks": 2, "preprocess_kernel_size": 5,
                    "bicubic_residual": False},
    description="Shared 80-block trunk, per-scale 5x5 pre-processing blocks and parallel "
                "x2/x3/x4 upsampling heads; scale chosen per call. The shipped weights add a "
                "global bicubic residual and start from edsr_multiscale, expanded without "
                "changing its output (docs/mdrn.md); the slowest in-plane model."))

ENTRIES.append(ModelSpec(
    name="edsr_multiscale", title="Multi-scale EDSR (16x64)", builder=MultiScaleEDSR,
    kind="multi_scale", paper="paper 004 (MDRN design, baseline depth)", scales=(2, 3, 4),
    default_config={"in_channels": 1, "num_features": 64, "num_blocks": 16, "res_scale": 1.0,
                    "preprocess_blocks": 2, "preprocess_kernel_size": 5,
                    "bicubic_residual": False},
    description="The MDRN design with a 16-block trunk: the CPU-trainable multi-scale model."))

ENTRIES.append(ModelSpec(
    name="lesion_detector", title="Lesion detector (LFSR LD)", builder=LesionDetector,
    kind="detector", paper="paper 003 (Zhu et al.), section 2.1", scales=(1,),
    default_config={"in_channels": 1, "stem_features": 32, "features": [32, 64, 128, 256]},
    modalities=("MR",),
    description="Max-pooling residual network, any input size; per slice a box (cx, cy, w, h "
                "normalised to [0, 1]) and a score logit. Not an SR model (scale x1)."))

ENTRIES.append(ModelSpec(
    name="through_plane_net", title="Through-plane network (thick slices to thin, any factor)",
    builder=ThroughPlaneEDSR, kind="through_plane",
    paper="SMORE / ECLARE idea (Zhao et al. 2020; Remedios et al. 2024), CPU-sized",
    scales=(1,), modalities=("CT", "MR"),
    default_config={"num_features": 48, "num_blocks": 8},
    description="EDSR-lite trunk (MONAI blocks, started from edsr_lite x4) on the thick "
                "coronal and sagittal planes, its features cubic-resampled along the slice "
                "axis to any real factor 1-8, a small tail predicting the residual over cubic "
                "interpolation; both orientations averaged; trained on one-axis slice-profile "
                "degradations (box, box with gap, Gaussian). The default for through-plane "
                "factors (MedSRLib/through_plane/)."))

ENTRIES.append(ModelSpec(
    name="lesion_segmenter", title="Lesion segmenter (2.5-D BasicUNet localiser)",
    builder=LesionSegmenter, kind="detector", paper="issue 19 (MONAI BasicUNet, Dice + CE)",
    scales=(1,), default_config={"in_channels": 3, "features": [16, 16, 32, 64, 128, 16]},
    modalities=("CT", "MR"),
    description="Per-pixel lesion probability from 3 adjacent slices, run along all three axes "
                "and averaged; ROIs are its connected components (MedSRLib.roi.localiser). "
                "Not an SR model (scale x1)."))
