"""The one public door: SimpleITK image in, super-resolved SimpleITK image out.

The CLI and the Slicer module both call `upscale`. Geometry (LPS, mm) comes from
`geometry.py`, intensities from `intensity.py`, the voxel work from `engine.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from . import geometry, intensity, io, memory_budget, zoo
from .engine import (CancelToken, EngineOptions, ProgressCallback, plan_passes,
                     super_resolve_volume)
from .errors import InputError

AXIS_NAMES = {"x": 0, "y": 1, "z": 2, "i": 0, "j": 1, "k": 2}

#: Metadata keys written on the output image.
MODEL_KEY = "medsr_model"
FACTORS_KEY = "medsr_scale_factors_xyz"


@dataclass(frozen=True)
class ScalePlan:
    """Per-axis factors and slice axis, both in SimpleITK (x, y, z) order."""

    factors_xyz: tuple[int, int, int]
    slice_axis_xyz: int

    @property
    def factors_kji(self) -> tuple[int, int, int]:
        return self.factors_xyz[::-1]  # type: ignore[return-value]

    @property
    def slice_axis_kji(self) -> int:
        return 2 - self.slice_axis_xyz

    @property
    def network_scale(self) -> int:
        return max(self.factors_xyz)


def _parse_axis(axis: str | int) -> int | None:
    if isinstance(axis, str):
        key = axis.strip().lower()
        if key == "auto":
            return None
        if key in AXIS_NAMES:
            return AXIS_NAMES[key]
        if key.isdigit():
            axis = int(key)
        else:
            raise InputError(f"axis must be auto, x, y, z or 0-2, got {axis!r}")
    if isinstance(axis, (int, np.integer)) and 0 <= int(axis) <= 2:
        return int(axis)
    raise InputError(f"axis must be auto, x, y, z or 0-2, got {axis!r}")


def plan_scale(scale: int | Sequence[int], axis: str | int, spacing_xyz: Sequence[float],
               size_xyz: Sequence[int]) -> ScalePlan:
    """Turn the user's `scale` and `axis` into per-axis factors and a slice axis (x, y, z order).

    An integer scale is in-plane: it applies to the two axes other than the slice axis. A
    3-tuple gives each axis its factor. "auto" slices along the axis of largest spacing (for a
    tuple: among the axes with the smallest factor); a one-slice volume is sliced along z.
    """
    axis_index = _parse_axis(axis)
    single_slice = size_xyz[2] == 1
    if isinstance(scale, bool):
        raise InputError(f"scale must be an integer 2-4 or (x, y, z) integers 1-4, got {scale!r}")
    if isinstance(scale, (int, np.integer)) or (isinstance(scale, float) and scale.is_integer()):
        if axis_index is None:
            axis_index = 2 if single_slice else _largest_spacing_axis(spacing_xyz, (0, 1, 2))
        factors = [int(scale)] * 3
        factors[axis_index] = 1
    else:
        if isinstance(scale, (str, bytes, bool)) or not isinstance(scale, Sequence):
            raise InputError(f"scale must be an integer 2-4 or (x, y, z) integers 1-4, got {scale!r}")
        factors = list(geometry.check_scale_factors(tuple(scale)))
        if axis_index is None:
            smallest = min(factors)
            candidates = tuple(a for a in range(3) if factors[a] == smallest)
            axis_index = 2 if single_slice and 2 in candidates else \
                _largest_spacing_axis(spacing_xyz, candidates)
    factors_xyz = geometry.check_scale_factors(factors)
    for a, (f, n) in enumerate(zip(factors_xyz, size_xyz)):
        if f > 1 and n < 2:
            raise InputError(f"cannot upscale along axis {'xyz'[a]}: the volume has {n} voxel there")
    return ScalePlan(factors_xyz, axis_index)


def _largest_spacing_axis(spacing: Sequence[float], candidates: Sequence[int]) -> int:
    # Ties go to the later axis (z before y before x): the usual through-plane axis.
    return max(candidates, key=lambda a: (round(spacing[a], 6), a))


def validate_image(image: sitk.Image, name: str = "input") -> sitk.Image:
    """`image` as a finite scalar 3-D volume with positive spacing, or InputError."""
    image = io.as_scalar_volume(image, name)
    geometry.check_spacing(image.GetSpacing())
    intensity.check_finite(sitk.GetArrayViewFromImage(image), name)
    return image


def check_memory(image: sitk.Image, plan: ScalePlan, output_float: bool) -> None:
    """InputError before any voxel work when the output (and its intermediate) cannot fit in
    the memory available: the output array and its SimpleITK copy, plus the float32 result of
    the in-plane pass when a second (through-plane) pass follows."""
    input_voxels = float(np.prod(image.GetSize()))
    output_voxels = input_voxels * float(np.prod(plan.factors_xyz))
    itemsize = 4 if output_float else np.dtype(sitk.GetArrayViewFromImage(image).dtype).itemsize
    needed = 2 * output_voxels * itemsize
    if plan.factors_xyz[plan.slice_axis_xyz] > 1:
        needed += output_voxels / plan.factors_xyz[plan.slice_axis_xyz] * 4
    output_size = tuple(n * f for n, f in zip(image.GetSize(), plan.factors_xyz))
    memory_budget.check_fits(int(needed), f"upscaling to {output_size} voxels (x, y, z)")


def choose_model(model: str | None, image: sitk.Image, modality: str | None, scale: int) -> str:
    """`model`, or the registry's default for the image's modality and `scale`."""
    if model:
        return model
    return zoo.default_model(modality or io.modality_of(image), scale)


def model_loader(name: str, allow_untrained: bool = False, weights: str | None = None,
                 modality: str | None = None) -> Callable[[tuple[int, int]], tuple[zoo.SRModel, bool]]:
    """The engine's `model_for`: loads `name` (its weights for `modality`) once per 2-D factor
    pair, returns (model, learned)."""
    loaded: dict[tuple[int, int], zoo.SRModel] = {}

    def model_for(factors: tuple[int, int]) -> tuple[zoo.SRModel, bool]:
        if factors not in loaded:
            loaded[factors] = zoo.load_model(name, factors, allow_untrained=allow_untrained,
                                             weights_path=weights, modality=modality)
        return loaded[factors], loaded[factors].spec.needs_weights

    return model_for


def upscale(
    image: sitk.Image,
    model: str | None = None,
    scale: int | Sequence[int] = 2,
    axis: str | int = "auto",
    device: str = "auto",
    precision: str = "auto",
    tile: int | None = None,
    batch_size: int = 4,
    threads: int | None = None,
    modality: str | None = None,
    allow_untrained: bool = False,
    output_float: bool = False,
    weights: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    roi: "str | tuple | sitk.Image | None" = None,
    roi_model: str | None = None,
) -> sitk.Image:
    """Super-resolve a volume; the input is never modified.

    Args:
        image: scalar 2-D or 3-D SimpleITK image (LPS geometry).
        model: registry name; None picks the default for the modality and scale.
        scale: in-plane integer factor, or per-axis (x, y, z) factors 1-4.
        axis: slice axis, "auto" (largest spacing), "x"/"y"/"z" or 0/1/2.
        device, precision, tile, batch_size, threads: see `engine.EngineOptions`.
        modality: "CT", "MR" or "XR" to choose the default model (else read from DICOM tags).
        allow_untrained: run a learned model with random weights (plumbing tests only).
        output_float: return float32 voxels instead of the input's pixel type.
        weights: a safetensors file to use instead of the shipped weights.
        progress: called with (fraction done in [0, 1], message).
        cancel: CancelToken; cancelling raises CancelledError.
        roi: lesion-focused mode (paper 003): "auto" (lesion detector), a box
            (x0, y0, z0, x1, y1, z1) of input voxel indices (lower inclusive, upper exclusive) or
            "x0,y0,z0,x1,y1,z1", a mask image on the input's grid, or a mask file. `roi_model`
            runs inside the ROI plus a margin, `model` elsewhere, feathered together; see
            `roi.upscale_with_roi` (its report is also in the output's "medsr_roi_*" metadata).
        roi_model: registry name of the model inside the ROI (default: lfsr, the LFSR generator, when it ships).

    Returns:
        A new image covering the input's physical extent on the finer grid, same direction,
        intensities in the input's units and pixel type (rounded and clipped), with metadata
        "medsr_model" naming the model used.
    """
    if roi is not None:
        from .roi import upscale_with_roi
        return upscale_with_roi(
            image, roi, roi_model=roi_model, model=model, scale=scale, axis=axis, device=device,
            precision=precision, tile=tile, batch_size=batch_size, threads=threads,
            modality=modality, allow_untrained=allow_untrained, output_float=output_float,
            weights=weights, progress=progress, cancel=cancel)[0]
    if roi_model is not None:
        raise InputError("roi_model is only used with roi (lesion-focused mode)")
    options = EngineOptions(device=device, precision=precision, tile=tile,
                            batch_size=batch_size, threads=threads)  # checks each option
    image = validate_image(image)
    plan = plan_scale(scale, axis, image.GetSpacing(), image.GetSize())
    check_memory(image, plan, output_float)
    modality = modality or io.modality_of(image)
    name = choose_model(model, image, modality, plan.network_scale)
    model_for = model_loader(name, allow_untrained, weights, modality)
    # Load every pass's model before any voxel work, so model/scale errors come first.
    for slice_pass in plan_passes(plan.factors_kji, plan.slice_axis_kji):
        model_for(slice_pass.plane_factors)

    voxels = sitk.GetArrayViewFromImage(image)
    mapping = intensity.fit_mapping(voxels)
    out_dtype = np.dtype(np.float32) if output_float else voxels.dtype
    result = super_resolve_volume(
        voxels, plan.factors_kji, plan.slice_axis_kji, model_for,
        to_unit=mapping.to_unit,
        from_unit=lambda units: intensity.cast_to_dtype(mapping.from_unit(units), out_dtype),
        out_dtype=out_dtype, options=options, progress=progress, cancel=cancel)
    output = sitk.GetImageFromArray(result, isVector=False)
    del result
    geometry.upscaled_grid(geometry.Grid.of(image), plan.factors_xyz).apply_to(output)
    for key in image.GetMetaDataKeys():
        if key.startswith("medsr_"):
            output.SetMetaData(key, image.GetMetaData(key))
    output.SetMetaData(MODEL_KEY, name)
    output.SetMetaData(FACTORS_KEY, " ".join(str(f) for f in plan.factors_xyz))
    return output


def list_models() -> list[dict]:
    """Registry metadata of every model (name, title, kind, scales, weights, ...)."""
    return zoo.describe_all()
