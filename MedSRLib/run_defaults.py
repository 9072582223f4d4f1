"""The choices a run makes when the user does not: the modality that picks the model, and one
line naming every such choice (modality, model, axis, backend) for the command line.

The line is planned with the same functions `api.upscale` runs (`run_plan`, `through_plane`,
`engine.resolve_backend`), so it names what the run then does.
"""

from __future__ import annotations

from typing import Sequence

import SimpleITK as sitk

from . import io

#: Modality assumed for a 2-D image (one slice) whose file names none: PNG and JPEG pictures
#: are most often radiographs, and the CT/MR networks were not trained on them.
TWO_D_MODALITY = "XR"


def modality_for(image: sitk.Image, modality: str | None) -> str | None:
    """The modality that picks the default model: `modality` when given, else the DICOM
    modality the reader stored, else `TWO_D_MODALITY` for a one-slice image, else None."""
    if modality:
        return modality
    stored = io.modality_of(image)
    if stored:
        return stored
    return TWO_D_MODALITY if image.GetDimension() == 2 or image.GetSize()[2] == 1 else None


def _modality_phrase(image: sitk.Image, given: str | None) -> str | None:
    if given:
        return None
    stored = io.modality_of(image)
    if stored:
        return f"modality {stored} (from DICOM)"
    assumed = modality_for(image, None)
    if assumed:
        return (f"modality {assumed} (a 2-D image without one: X-ray assumed; --modality "
                "to change)")
    return "modality unknown (--modality CT, MR or XR to pick its model)"


def describe_choices(image: sitk.Image, *, model: str | None, scale: object, axis: str | int,
                     device: str, backend: str, precision: str, modality: str | None,
                     target_spacing: "float | Sequence[float] | None" = None,
                     slice_thickness: float | None = None, slice_profile: str = "box",
                     roi: object = None) -> str | None:
    """One line naming each choice made for the user ("defaults: modality XR (...), model
    srcnn (XR x4 default), axis z, backend openvino"), or None when every one was given. Raises what `api.upscale`
    would raise for the same request (InputError), before any voxel work."""
    from . import run_plan
    from .engine import resolve_backend, resolve_device
    from .through_plane import run as through_plane

    image = io.as_scalar_volume(image)
    parts = [_modality_phrase(image, modality)]
    chosen_modality = modality_for(image, modality)
    if scale is None:
        scale = 2 if target_spacing is None else None
    thin, inplane_scale = through_plane.plan_request(image, scale, axis, target_spacing,
                                                     slice_thickness, slice_profile, model,
                                                     roi=roi)
    if thin is not None:
        if model is None:
            parts.append("model through_plane_net")
        if str(axis).lower() == "auto":
            parts.append(f"axis {'xyz'[thin.axis_xyz]} (thick slices)")
        return _join(parts)
    plan = run_plan.plan_scale(inplane_scale, axis, image.GetSpacing(), image.GetSize())
    slices = image.GetSize()[plan.slice_axis_xyz]  # as `api.upscale` counts them
    name = run_plan.choose_model(model, image, chosen_modality, plan.network_scale, slices)
    if model is None:
        parts.append(f"model {name} ({chosen_modality or 'any modality'} "
                     f"x{plan.network_scale} default)")
    if str(axis).lower() == "auto":
        parts.append(f"axis {'xyz'[plan.slice_axis_xyz]}")
    if backend == "auto":
        from . import zoo
        learned = zoo.get_spec(name).needs_weights
        factors = tuple(f for a, f in enumerate(plan.factors_xyz) if a != plan.slice_axis_xyz)
        used = resolve_backend("auto", resolve_device(device), learned, factors, precision)
        parts.append(f"backend {used}")
    return _join(parts)


def _join(parts: list[str | None]) -> str | None:
    chosen = [part for part in parts if part]
    return "defaults: " + ", ".join(chosen) if chosen else None
