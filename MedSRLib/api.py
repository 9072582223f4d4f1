"""The one public door: SimpleITK image in, super-resolved SimpleITK image out.

The CLI and the Slicer module both call `upscale`. It composes steps: planning
(`run_plan.py`), the voxel work (`engine.py`), lesion-focused refinement (`roi.py`, when asked),
geometry (`geometry.py`, LPS mm) and intensities (`intensity.py`). No step imports this module.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .transforms import geometry, intensity
from .io import volumes as io
from .runtime import memory_budget, no_telemetry  # noqa: F401 (no_telemetry: on import)
from .models import registry as zoo
from .roi import focus as lesion_roi
from .planning import defaults as run_defaults
from .runtime.engine import (CancelToken, EngineOptions, ProgressCallback, plan_passes,
                             super_resolve_volume)
from .errors import InputError
from .planning.run_plan import (AXIS_NAMES, ScalePlan, check_memory, choose_model,  # noqa: F401
                                model_loader, plan_scale, validate_image)
from .through_plane import run as through_plane

#: Metadata keys written on the output image.
MODEL_KEY = "medsr_model"
FACTORS_KEY = "medsr_scale_factors_xyz"


def upscale(
    image: sitk.Image,
    model: str | None = None,
    scale: int | Sequence[float] | None = None,
    axis: str | int = "auto",
    device: str = "auto",
    precision: str = "auto",
    tile: int | None = None,
    batch_size: int = 4,
    threads: int | None = None,
    backend: str = "auto",
    modality: str | None = None,
    allow_untrained: bool = False,
    output_float: bool = False,
    weights: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    roi: "str | tuple | sitk.Image | None" = None,
    roi_model: str | None = None,
    roi_weights: str | None = None,
    roi_self_ensemble: int | None = None,
    roi_margin_mm: float = lesion_roi.DEFAULT_MARGIN_MM,
    detector_weights: str | None = None,
    target_spacing: "float | Sequence[float] | None" = None,
    slice_thickness: float | None = None,
    slice_profile: str = "box",
    adapt: bool = False,
    adapt_seconds: float | None = None,
    before_compute: "Callable[[tuple[int, ...], np.dtype], None] | None" = None,
) -> sitk.Image:
    """Super-resolve a volume; the input is never modified.

    Args:
        image: scalar 2-D or 3-D SimpleITK image (LPS geometry).
        model: registry name; None picks the default for the modality and scale.
        scale: in-plane integer factor (default 2), or per-axis (x, y, z) factors: integers
            1-4, or through-plane any real factor 1-8 on one axis (see `target_spacing`).
        axis: slice axis, "auto", "x"/"y"/"z" or 0/1/2. "auto" with an integer (in-plane)
            scale: the stored slices' plane (z); with per-axis factors: the axis scaled
            differently from the two others, or the largest spacing (`run_plan.plan_scale`).
        device, precision, tile, batch_size, threads, backend: see `engine.EngineOptions`;
            backend "auto" runs learned networks through OpenVINO on the CPU (bf16 where the
            CPU has it) and through torch on CUDA (`engine.resolve_backend`).
        modality: "CT", "MR" or "XR" to choose the default model (else read from DICOM tags;
            a 2-D image without one is taken as XR: `run_defaults.modality_for`).
        allow_untrained: run a learned model with random weights (plumbing tests only).
        output_float: return float32 voxels instead of the input's pixel type.
        weights: a safetensors file to use instead of the shipped weights (for `model`).
        progress: called with (fraction done in [0, 1], message).
        cancel: CancelToken; cancelling raises CancelledError.
        roi: lesion-focused mode (Zhu, Yang and Lio, "Lesion focused super-resolution"): "auto"
            (the lesion segmenter: one ROI per lesion found; "auto:lesion_detector" for that
            paper's box detector), a box
            (x0, y0, z0, x1, y1, z1) of input voxel indices (lower inclusive, upper exclusive) or
            "x0,y0,z0,x1,y1,z1", a list of such boxes, a mask image on the input's grid, or a
            mask file. `roi_model` runs inside each ROI plus `roi_margin_mm`, `model` elsewhere,
            feathered together across the margin; the run's `roi.RoiReport` is in the output's
            metadata (`roi.RoiReport.from_image`).
        roi_model: registry name of the model inside the ROI (default: the one measured best
            inside validation lesions for the modality and scale within the time budget,
            `roi.roi_models.ROI_DEFAULTS`, e.g. edsr_lite with a 2-member self-ensemble; else
            the run's own model; "lfsr", the LFSR generator, is the perceptual choice);
            `roi_weights` its weights file instead of the shipped one.
        roi_self_ensemble: geometric self-ensemble members of the ROI model (1, 2, 4 or 8:
            outputs on in-plane flips/rotations of the input, averaged); None: the default's
            (1 for a named `roi_model`). When the ROI model is the run's own, the whole-volume
            pass is one of the members.
        roi_margin_mm: margin around the ROI (whole voxels per axis, >= 1 when > 0).
        detector_weights: lesion-finder weights instead of the shipped ones (roi="auto"; their
            card says which finder: lesion_segmenter or lesion_detector).
        target_spacing: output spacing in mm, one number (every coarser axis) or (x, y, z);
            the factors are computed from the input spacing (instead of `scale`).
        slice_thickness, slice_profile: the thick slices' thickness in mm (default: DICOM
            SliceThickness, else the slice spacing) and profile ("box" or "gaussian"); used by
            the through-plane network, which runs by default when a per-axis `scale` or
            `target_spacing` asks for a through-plane factor (any real factor up to 8; see
            `through_plane.planning`). The assumed profile is in the output's metadata.
        adapt: fine-tune a copy of the through-plane network on the volume's own in-plane
            slices first (`through_plane.adapt`), for at most `adapt_seconds` of CPU time
            (a finite positive number of seconds).
        before_compute: called with the output's size (x, y, z) and pixel type once the run is
            planned and the memory checked, before any voxel work; the CLI checks the free disk
            space for the output there. An exception it raises stops the run.

    Returns:
        A new image covering the input's physical extent on the finer grid, same direction,
        intensities in the input's units and pixel type (rounded and clipped), with metadata
        "medsr_model" naming the model used.
    """
    if roi is None:
        for argument, value in (("roi_model", roi_model), ("roi_weights", roi_weights),
                                ("roi_self_ensemble", roi_self_ensemble),
                                ("detector_weights", detector_weights)):
            if value is not None:
                raise InputError(f"{argument} is only used with roi (lesion-focused mode)")
    options = EngineOptions(device=device, precision=precision, tile=tile,
                            batch_size=batch_size, threads=threads,
                            backend=backend)  # checks each option
    if adapt_seconds is not None and (
            isinstance(adapt_seconds, bool) or not isinstance(adapt_seconds, (int, float))
            or not math.isfinite(adapt_seconds) or adapt_seconds <= 0):
        raise InputError(f"adapt_seconds must be a finite positive number of seconds, got "
                         f"{adapt_seconds!r}")
    image = validate_image(image)
    if scale is None:
        scale = 2 if target_spacing is None else None
    elif target_spacing is not None:
        raise InputError("give scale (--scale) or target_spacing (--target-spacing), not both")
    thin, scale = through_plane.plan_request(image, scale, axis, target_spacing, slice_thickness,
                                             slice_profile, model, adapt, adapt_seconds, roi)
    if thin is not None:  # thick slices to thin: in-plane pass (if any), then the network
        voxels = sitk.GetArrayViewFromImage(image)
        out_dtype = np.dtype(np.float32) if output_float else voxels.dtype
        _check_through_plane_memory(image, thin, out_dtype)
        if before_compute is not None:
            before_compute(tuple(int(n) for n in thin.grid.size), out_dtype)
        output, names = through_plane.super_resolve(
            voxels, thin, modality or io.modality_of(image), allow_untrained, weights, options,
            out_dtype, progress, cancel)
        thin.grid.apply_to(output)
        for key in image.GetMetaDataKeys():
            if key.startswith("medsr_") and key != io.SLICE_THICKNESS_KEY:
                output.SetMetaData(key, image.GetMetaData(key))
        output.SetMetaData(MODEL_KEY, names)
        output.SetMetaData(FACTORS_KEY, " ".join(f"{f:.6g}" for f in thin.factors_xyz))
        through_plane.annotate(output, thin)
        return output
    plan = plan_scale(scale, axis, image.GetSpacing(), image.GetSize())
    check_memory(image, plan, output_float)
    if before_compute is not None:
        before_compute(tuple(int(n * f) for n, f in zip(image.GetSize(), plan.factors_xyz)),
                       np.dtype(np.float32) if output_float else
                       np.dtype(sitk.GetArrayViewFromImage(image).dtype))
    modality = run_defaults.modality_for(image, modality)  # a 2-D image: XR
    slices = image.GetSize()[plan.slice_axis_xyz] if image.GetDimension() == 3 else 1
    name = choose_model(model, image, modality, plan.network_scale, slices)
    model_for = model_loader(name, allow_untrained, weights, modality)
    roi_name, roi_for, roi_members, roi_precision = None, None, 1, None
    if roi is not None:
        EngineOptions(self_ensemble=roi_self_ensemble or 1)  # checks the value
        choice = lesion_roi.choose_roi(roi_model, plan.network_scale, allow_untrained, modality,
                                       fallback=name, self_ensemble=roi_self_ensemble)
        roi_name, roi_members = choice.model, choice.self_ensemble
        roi_precision = choice.precision if precision == "auto" else None  # a user's wins
        roi_for = model_for if (roi_name, roi_weights) == (name, weights) else \
            model_loader(roi_name, allow_untrained, roi_weights, modality)
    # Load every pass's model before any voxel work, so model/scale errors come first.
    for slice_pass in plan_passes(plan.factors_kji, plan.slice_axis_kji):
        for load in filter(None, (model_for, roi_for)):
            load(slice_pass.plane_factors)
    region = None if roi is None else lesion_roi.plan_region(
        image, roi, plan, roi_name, roi_for, roi_margin_mm, detector_weights,
        roi_self_ensemble=roi_members, reuse_identity=roi_for is model_for,
        roi_precision=roi_precision)

    voxels = sitk.GetArrayViewFromImage(image)
    mapping = intensity.fit_mapping(voxels)
    out_dtype = np.dtype(np.float32) if output_float else voxels.dtype

    def to_output(units: np.ndarray) -> np.ndarray:
        return intensity.cast_to_dtype(mapping.from_unit(units), out_dtype, in_place=True)

    out_size = [n * f for n, f in zip(image.GetSize(), plan.factors_xyz)]
    output, result = io.new_volume(out_size, out_dtype)  # written in place: no second copy
    if region is None or region.processed is None or (
            roi_for is model_for and roi_members == 1 and roi_precision is None):  # the same run
        super_resolve_volume(
            voxels, plan.factors_kji, plan.slice_axis_kji, model_for, to_unit=mapping.to_unit,
            from_unit=to_output, out_dtype=out_dtype, options=options,
            progress=_stage(progress, 0.0, 1.0, f"fast model {name}" if region else ""),
            cancel=cancel, out=result)
    else:  # blend in network units, then map back once, a few slices at a time
        total = 1.0 + region.crop_share(image.GetSize())
        units = super_resolve_volume(
            voxels, plan.factors_kji, plan.slice_axis_kji, model_for, to_unit=mapping.to_unit,
            from_unit=lambda u: u, out_dtype=np.dtype(np.float32), options=options,
            progress=_stage(progress, 0.0, 1.0 / total, f"fast model {name}"), cancel=cancel)
        lesion_roi.refine_region(
            units, voxels, region, plan, roi_for, mapping.to_unit, options,
            progress=_stage(progress, 1.0 / total, (total - 1.0) / total, f"ROI model {roi_name}"),
            cancel=cancel)
        for start in range(0, units.shape[0], 8):
            result[start:start + 8] = to_output(units[start:start + 8])
        del units
    del result
    if cancel is not None:
        cancel.raise_if_cancelled()
    geometry.upscaled_grid(geometry.Grid.of(image), plan.factors_xyz).apply_to(output)
    for key in image.GetMetaDataKeys():
        if key.startswith("medsr_"):
            output.SetMetaData(key, image.GetMetaData(key))
    output.SetMetaData(MODEL_KEY, name)
    output.SetMetaData(FACTORS_KEY, " ".join(str(f) for f in plan.factors_xyz))
    if region is not None:
        lesion_roi.annotate(output, region, plan, name, image)
    return output


def _check_through_plane_memory(image: sitk.Image, thin, out_dtype: np.dtype) -> None:
    """InputError before any voxel work when a through-plane run cannot fit in memory: the
    output and its SimpleITK copy, the float32 network result, and the float32 in-plane pass."""
    out_voxels = float(np.prod([int(n) for n in thin.grid.size]))
    inplane_voxels = float(np.prod(image.GetSize())) * (
        1.0 if thin.inplane is None else float(np.prod(thin.inplane.factors_xyz)))
    needed = out_voxels * (2 * np.dtype(out_dtype).itemsize + 4) + inplane_voxels * 4
    memory_budget.check_fits(int(needed), f"upscaling to {tuple(thin.grid.size)} voxels (x, y, z)")


def _stage(progress: ProgressCallback | None, offset: float, weight: float,
           label: str) -> ProgressCallback | None:
    """`progress` for one stage of the run: its fraction mapped into [offset, offset + weight]."""
    if progress is None:
        return None
    if offset == 0.0 and weight == 1.0 and not label:
        return progress
    return lambda fraction, text: progress(offset + weight * fraction, f"{label}: {text}")


def list_models() -> list[dict]:
    """Registry metadata of every model (name, title, kind, scales, weights, ...)."""
    return zoo.describe_all()


def _modality_phrase(image: sitk.Image, given: str | None) -> str | None:
    if given:
        return None
    stored = io.modality_of(image)
    if stored:
        return f"modality {stored} (from DICOM)"
    assumed = run_defaults.modality_for(image, None)
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
    from .planning import run_plan
    from .runtime.engine import resolve_backend, resolve_device
    from .through_plane import run as through_plane

    image = io.as_scalar_volume(image)
    parts = [_modality_phrase(image, modality)]
    chosen_modality = run_defaults.modality_for(image, modality)
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
        if backend == "auto":
            from .runtime.openvino_through_plane import planned_backend
            options = EngineOptions(device=device, backend=backend, precision=precision)
            parts.append(f"backend {planned_backend(options)}")
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
        from .models import registry as zoo
        learned = zoo.get_spec(name).needs_weights
        factors = tuple(f for a, f in enumerate(plan.factors_xyz) if a != plan.slice_axis_xyz)
        used = resolve_backend("auto", resolve_device(device), learned, factors, precision)
        parts.append(f"backend {used}")
    return _join(parts)


def _join(parts: list[str | None]) -> str | None:
    chosen = [part for part in parts if part]
    return "defaults: " + ", ".join(chosen) if chosen else None
