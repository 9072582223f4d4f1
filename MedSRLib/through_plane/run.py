"""The through-plane step `api.upscale` composes: plan the request, run the integer in-plane
pass (engine, the in-plane default model) if asked, then the through-plane network (optionally
adapted to the volume first), and record the assumed slice profile on the output.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from ..transforms import intensity
from ..io import volumes as io
from ..models import registry as zoo
from ..runtime.engine import (CancelToken, EngineOptions, ProgressCallback, check_finite_output,
                              super_resolve_volume)
from ..runtime.openvino_through_plane import device_and_precision, plane_runner
from ..errors import InputError

if TYPE_CHECKING:  # annotations only: torch is imported where a network runs
    import torch
from ..planning.run_plan import model_loader
from . import apply, planning
from ..models import through_plane_io as model_io
from ..models.networks.through_plane import ThroughPlaneEDSR

#: Output metadata keys.
PROFILE_KEY = "medsr_slice_profile"
THROUGH_PLANE_KEY = "medsr_through_plane"


def plan_request(image: sitk.Image, scale: object, axis: str | int, target_spacing: object,
                 slice_thickness: float | None, slice_profile: str, model: str | None,
                 adapt: bool = False, adapt_seconds: float | None = None,
                 roi: object = None) -> tuple[planning.ThroughPlanePlan | None, object]:
    """(the through-plane plan, None) for an `upscale` request, or (None, the scale for the
    in-plane path: `scale`, or the integer factors a `target_spacing` asks for). InputError for
    options that only the through-plane path takes, used without it."""
    thin = planning.plan(image, scale, axis, target_spacing, slice_thickness, slice_profile, model)
    if thin is None:
        if target_spacing is not None:
            scale = tuple(int(round(f)) for f in planning.factors_from_target(image.GetSpacing(),
                                                                              target_spacing))
        for name, value in (("slice_thickness (--slice-thickness)", slice_thickness),
                            ("adapt (--adapt)", adapt or None), ("adapt_seconds", adapt_seconds)):
            if value is not None:
                raise InputError(f"{name} is for through-plane SR (a per-axis scale such as "
                                 "1,1,2.5 or a target spacing)")
        if slice_profile != "box":
            raise InputError("slice_profile (--slice-profile) is for through-plane SR")
        return None, scale
    if roi is not None:
        raise InputError("lesion-focused mode (roi) is not available with through-plane SR")
    if adapt_seconds is not None and not adapt:
        raise InputError("adapt_seconds needs adapt=True (--adapt)")
    if adapt:
        seconds = DEFAULT_ADAPT_SECONDS if adapt_seconds is None else adapt_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise InputError(f"adapt_seconds (--adapt-seconds) must be a positive number, got {seconds!r}")
        thin = dataclasses.replace(thin, adapt_seconds=float(seconds))
    return thin, None


#: Default CPU budget of `adapt` (seconds): about 3 minutes for a 512x512x60 CT.
DEFAULT_ADAPT_SECONDS = 180.0


def load_network(weights: str | None, allow_untrained: bool) -> "torch.nn.Module":
    """The shipped (or `weights`) through-plane network; with `allow_untrained` and none
    shipped, an untrained one (exactly cubic interpolation: its last conv is zero)."""
    if weights is None and not model_io.WEIGHTS_FILE.is_file():
        if allow_untrained:
            return ThroughPlaneEDSR().eval()
        raise InputError(f"the through-plane network has no trained weights ({model_io.WEIGHTS_FILE.name})")
    return model_io.load(weights)


def super_resolve(voxels: np.ndarray, thin: planning.ThroughPlanePlan, modality: str | None,
                  allow_untrained: bool, weights: str | None, options: EngineOptions,
                  out_dtype: np.dtype, progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None) -> tuple[sitk.Image, str]:
    """(output image of the voxels (K, J, I) in `out_dtype`, no geometry set yet; model names
    used) for `voxels` (K, J, I)."""
    import torch

    cancel = cancel or CancelToken()
    report = progress or (lambda fraction, message: None)
    device_and_precision(options)  # InputError before any voxel work
    net = load_network(weights, allow_untrained)
    names = [model_io.MODEL_NAME]
    mapping = intensity.fit_mapping(voxels)
    adapt_seconds = thin.adapt_seconds
    shares = [0.0, 0.0, 1.0]  # in-plane, adaptation, through-plane
    if thin.inplane is not None:
        shares[0] = 0.5
    if adapt_seconds:
        shares[1] = 0.4
    total = sum(shares)
    if options.threads:
        torch.set_num_threads(int(options.threads))
    if adapt_seconds:
        from . import adapt
        start = shares[0] / total
        net = adapt.adapt_network(mapping.to_unit(voxels), thin.axis_kji, thin.profile, net,
                                  seconds=adapt_seconds, factor=thin.effective_factor, cancel=cancel,
                                  progress=lambda f, m: report(start + shares[1] / total * f, m))
        if getattr(net, "adapted_steps", 0):
            names.append("adapted")
        else:
            from ..runtime.engine import notice
            notice("adaptation skipped: the stored slices are too small for training pairs")
    if thin.inplane is not None:
        in_name = zoo.default_model(modality, thin.inplane.network_scale)
        names.insert(0, in_name)
        units = super_resolve_volume(
            voxels, thin.inplane.factors_kji, thin.inplane.slice_axis_kji,
            model_loader(in_name, allow_untrained, None, modality), to_unit=mapping.to_unit,
            from_unit=lambda u: u, out_dtype=np.dtype(np.float32), options=options,
            progress=lambda f, m: report(shares[0] / total * f, f"in-plane {in_name}: {m}"),
            cancel=cancel)
    else:
        units = mapping.to_unit(voxels)
    offset = (shares[0] + shares[1]) / total
    runner, _ = plane_runner(net, options)
    restored = apply.restore(units, thin.axis_kji, thin.out_slices, thin.profile.thickness_ratio,
                             net, progress=lambda f, m: report(offset + (1 - offset) * f, m),
                             cancel=cancel, runner=runner)
    del units
    check_finite_output(restored, net)
    output, result = io.new_volume(restored.shape[::-1], out_dtype)  # no second full copy
    for start in range(0, restored.shape[0], 8):
        result[start:start + 8] = intensity.cast_to_dtype(mapping.from_unit(restored[start:start + 8]),
                                                          out_dtype, in_place=True)
    del result
    cancel.raise_if_cancelled()
    return output, " + ".join(names)


def annotate(output: sitk.Image, thin: planning.ThroughPlanePlan) -> None:
    """Record the assumed slice profile and the through-plane factor on the output image."""
    output.SetMetaData(PROFILE_KEY, thin.profile.describe())
    output.SetMetaData(THROUGH_PLANE_KEY,
                       f"axis {'xyz'[thin.axis_xyz]}, requested factor {thin.factor:.6g}, "
                       f"{thin.in_slices} -> {thin.out_slices} slices (effective factor "
                       f"{thin.effective_factor:.6g})")
