"""Planning one run before any voxel work: the checked input, per-axis factors and slice axis,
the model by name, its loader, and the memory the output needs.

Shared by `api.upscale` and its steps (`roi.py`), so no step has to import the door itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from ..transforms import geometry, intensity
from ..io import volumes as io
from ..runtime import memory_budget, model_cache
from ..models import registry as zoo
from ..errors import InputError

AXIS_NAMES = {"x": 0, "y": 1, "z": 2, "i": 0, "j": 1, "k": 2}

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

    An integer scale is in-plane: it applies to the two axes other than the slice axis, and
    "auto" means the plane of the stored slices (slice axis z), whatever the spacings (a 1.5 mm
    pixel, 1 mm slice volume scales its stored x-y plane). A 3-tuple gives each axis its
    factor; there "auto" slices along the axis of largest spacing among the axes with the
    smallest factor (a one-slice volume along z).
    """
    axis_index = _parse_axis(axis)
    single_slice = size_xyz[2] == 1
    if isinstance(scale, bool):
        raise InputError(f"scale must be an integer 2-4 or (x, y, z) integers 1-4, got {scale!r}")
    if isinstance(scale, (int, np.integer)) or (isinstance(scale, float) and scale.is_integer()):
        if axis_index is None:
            axis_index = 2  # the stored slices' plane (issue 16)
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
    geometry.check_grid(image, name)
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


def choose_model(model: str | None, image: sitk.Image, modality: str | None, scale: int,
                 slices: int | None = None) -> str:
    """`model`, or the registry's default for the image's modality, `scale` and number of
    `slices` along the slice axis (a single slice gets a 2-D model, `zoo.default_model`)."""
    if model:
        return model
    return zoo.default_model(modality or io.modality_of(image), scale, slices)


def model_loader(name: str, allow_untrained: bool = False, weights: str | None = None,
                 modality: str | None = None) -> Callable[[tuple[int, int]], tuple[zoo.SRModel, bool]]:
    """The engine's `model_for`: loads `name` (its weights for `modality`) once per 2-D factor
    pair, returns (model, learned)."""
    loaded: dict[tuple[int, int], zoo.SRModel] = {}

    def model_for(factors: tuple[int, int]) -> tuple[zoo.SRModel, bool]:
        if factors not in loaded:
            loaded[factors] = model_cache.load_model(name, factors, allow_untrained=allow_untrained,
                                                     weights_path=weights, modality=modality)
        return loaded[factors], loaded[factors].spec.needs_weights

    return model_for
