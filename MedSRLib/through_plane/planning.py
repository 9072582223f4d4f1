"""Planning a through-plane run: real per-axis factors (from `scale` or `target_spacing`), the
through-plane axis, the assumed slice profile and the exact output grid.

Rules (x, y, z = SimpleITK image axes; see README "Thick slices to thin"):
- `target_spacing` T (one number): the axis of largest spacing gets factor spacing / T (any
  real factor); another axis is refined only when spacing / T is an integer 2-4 (a 2 mm pixel
  to 1 mm), else it keeps its spacing (0.9 mm pixels stay 0.9 mm with T = 0.8). (x, y, z)
  targets: factor spacing / target per axis, and a target coarser than the spacing (a factor
  below 1) is an error.
- per-axis `scale` (x, y, z): real factors >= 1.
- The through-plane axis (`axis` forces it): the only axis with a non-integer or > 4 factor;
  else the one whose factor differs from two equal others (1,1,3 -> z); with three equal
  factors, the axis of largest spacing (ties -> z); else the largest factor.
  Its factor may be any real number in [1, MAX_THROUGH_FACTOR]; the two others are the in-plane
  factors, integers 1-4 run by the in-plane network.
- Output grid: the through-plane axis gets m = round(n * factor) slices (half up) spaced n * spacing / m, so
  the output covers exactly the input's extent (voxel-boundary corners coincide, direction kept;
  the effective factor m / n is within 0.5 / n of the request); in-plane axes as
  `geometry.upscaled_grid`.
- Slice thickness: `slice_thickness` (mm), else the DICOM SliceThickness the reader kept, else
  the slice spacing (contiguous slices). A thickness below the spacing means a gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..transforms import geometry
from ..errors import InputError
from ..planning.run_plan import ScalePlan, _parse_axis
from ..models.through_plane_io import MODEL_NAME
from ..transforms.slice_profile import PROFILES, SliceProfile

#: Largest through-plane factor (e.g. 8 mm slices to 1 mm).
MAX_THROUGH_FACTOR = 8.0
#: Factors within this of an integer count as that integer.
INTEGER_TOLERANCE = 1e-6
#: Metadata key where `io.read_volume` keeps a DICOM series' SliceThickness (mm).
DICOM_THICKNESS_KEY = "medsr_dicom_slice_thickness"  # = io.SLICE_THICKNESS_KEY


@dataclass(frozen=True)
class ThroughPlanePlan:
    """A run of the through-plane network, after an optional integer in-plane pass.

    axis_xyz: the through-plane (slice) axis; factor: the requested factor along it;
    out_slices: slices of the output along it; inplane: the integer in-plane pass (slice axis =
    axis_xyz) or None; profile: the assumed slice profile; grid: the exact output grid.
    """

    axis_xyz: int
    factor: float
    in_slices: int
    out_slices: int
    inplane: ScalePlan | None
    profile: SliceProfile
    grid: geometry.Grid
    adapt_seconds: float | None = None

    @property
    def axis_kji(self) -> int:
        return 2 - self.axis_xyz

    @property
    def effective_factor(self) -> float:
        """Output over input slices: the factor the output grid actually has."""
        return self.out_slices / self.in_slices

    @property
    def factors_xyz(self) -> tuple[float, float, float]:
        """Per-axis effective factors (x, y, z)."""
        factors = [1.0, 1.0, 1.0] if self.inplane is None else [float(f) for f in self.inplane.factors_xyz]
        factors[self.axis_xyz] = self.effective_factor
        return tuple(factors)  # type: ignore[return-value]


def _as_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    return number


def factors_from_target(spacing_xyz: Sequence[float], target: float | Sequence[float]) -> tuple[float, float, float]:
    """Per-axis factors spacing / target (see the module rules); InputError for a target that
    is not positive, or (per axis) coarser than the spacing."""
    if isinstance(target, (str, bytes)) or (not isinstance(target, Sequence) and
                                            not isinstance(target, (int, float, np.number))):
        raise InputError(f"target spacing must be a number or (x, y, z) numbers of mm, got {target!r}")
    if isinstance(target, Sequence):
        if len(target) != 3:
            raise InputError(f"target spacing needs 1 or 3 values (x, y, z) in mm, got {tuple(target)}")
        targets = [_as_number(t, "target spacing") for t in target]
        per_axis = True
    else:
        targets = [_as_number(target, "target spacing")] * 3
        per_axis = False
    if any(t <= 0 for t in targets):
        raise InputError(f"target spacing must be positive (mm), got {target!r}")
    factors = []
    thick = max(range(3), key=lambda a: (round(spacing_xyz[a], 6), a))
    for axis, (s, t) in enumerate(zip(spacing_xyz, targets)):
        f = s / t
        if f < 1.0 - INTEGER_TOLERANCE:
            if per_axis:
                raise InputError(
                    f"target spacing {t:g} mm along {'xyz'[axis]} is coarser than the input's "
                    f"{s:g} mm (factor {f:.3g} < 1): MedSR does not downsample")
            f = 1.0
        if not per_axis and axis != thick:
            snapped = round(f)
            f = float(snapped) if 2 <= snapped <= geometry.MAX_FACTOR and abs(f - snapped) <= 1e-3 * snapped else 1.0
        factors.append(max(1.0, f))
    return tuple(factors)  # type: ignore[return-value]


def _snap(f: float) -> float:
    return float(round(f)) if abs(f - round(f)) <= INTEGER_TOLERANCE * max(1.0, f) else f


def parse_factors(scale: object) -> tuple[float, float, float] | None:
    """Per-axis real factors from a 3-value `scale`, or None for an integer (in-plane) scale."""
    if isinstance(scale, (str, bytes, bool)) or scale is None:
        return None
    if not isinstance(scale, Sequence):
        return None
    if len(scale) != 3:
        raise InputError(f"scale factors need 3 values (x, y, z), got {tuple(scale)}")
    factors = tuple(_snap(_as_number(f, "scale factor")) for f in scale)
    if any(f < 1.0 for f in factors):
        raise InputError(f"scale factors must be >= 1 (MedSR does not downsample), got {tuple(scale)}")
    return factors  # type: ignore[return-value]


def through_axis(factors: Sequence[float], spacing_xyz: Sequence[float], axis: str | int) -> int:
    """The through-plane axis (module rules)."""
    forced = _parse_axis(axis)
    if forced is not None:
        return forced
    special = [a for a in range(3) if not float(factors[a]).is_integer() or factors[a] > geometry.MAX_FACTOR]
    if len(special) == 1:
        return special[0]
    if factors[0] == factors[1] == factors[2]:
        return max(range(3), key=lambda a: (round(spacing_xyz[a], 6), a))
    for a in (2, 1, 0):
        others = [factors[b] for b in range(3) if b != a]
        if others[0] == others[1]:
            return a
    return max(range(3), key=lambda a: (factors[a], round(spacing_xyz[a], 6), a))


def wants_through_plane(factors: Sequence[float] | None, model: str | None) -> bool:
    """True when the through-plane network should run: per-axis factors with a non-integer or
    > 4 factor, or with one axis scaled differently from the two others (or 3 equal factors)
    and no other model asked for."""
    if factors is None:
        return False
    if model not in (None, MODEL_NAME):
        return False
    return max(factors) > 1.0


def slice_profile(image: sitk.Image, axis_xyz: int, thickness_mm: float | None, kind: str) -> SliceProfile:
    """The assumed slice profile along `axis_xyz` (module rules)."""
    if kind not in PROFILES:
        raise InputError(f"slice profile (--slice-profile) must be one of {', '.join(PROFILES)}, got {kind!r}")
    spacing = float(image.GetSpacing()[axis_xyz])
    if thickness_mm is not None:
        thickness = _as_number(thickness_mm, "slice thickness (--slice-thickness)")
        if thickness <= 0:
            raise InputError(f"slice thickness (--slice-thickness) must be positive (mm), got {thickness_mm!r}")
        return SliceProfile(kind, thickness, spacing, "--slice-thickness")
    if axis_xyz == 2 and image.HasMetaDataKey(DICOM_THICKNESS_KEY):
        try:
            thickness = float(image.GetMetaData(DICOM_THICKNESS_KEY))
        except ValueError:
            thickness = 0.0
        if math.isfinite(thickness) and thickness > 0:
            return SliceProfile(kind, thickness, spacing,
                                "DICOM SliceThickness vs the spacing of the slice positions")
    return SliceProfile(kind, spacing, spacing, "no thickness given: assumed equal to the slice spacing")


def output_grid(grid: geometry.Grid, size_xyz: Sequence[int]) -> geometry.Grid:
    """The grid of `size_xyz` voxels over exactly the physical extent of `grid` (same
    convention as `geometry.upscaled_grid`: voxel-boundary corners coincide)."""
    geometry.check_spacing(grid.spacing)
    direction = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)
    old_spacing = np.asarray(grid.spacing, dtype=np.float64)
    new_spacing = old_spacing * np.asarray(grid.size, dtype=np.float64) / np.asarray(size_xyz, dtype=np.float64)
    new_origin = np.asarray(grid.origin, dtype=np.float64) + direction @ ((new_spacing - old_spacing) / 2.0)
    return geometry.Grid(size=tuple(int(n) for n in size_xyz), spacing=tuple(float(s) for s in new_spacing),
                         origin=tuple(float(o) for o in new_origin),
                         direction=tuple(float(d) for d in direction.reshape(-1)))


def plan(image: sitk.Image, scale: object, axis: str | int, target_spacing: object = None,
         slice_thickness: float | None = None, profile_kind: str = "box",
         model: str | None = None) -> ThroughPlanePlan | None:
    """The through-plane plan, or None when the request is for the in-plane/isotropic path
    (an integer `scale`, or integer per-axis factors with another model named)."""
    spacing, size = image.GetSpacing(), image.GetSize()
    if target_spacing is not None:
        factors = factors_from_target(spacing, target_spacing)
        if max(factors) <= 1.0 + INTEGER_TOLERANCE:
            raise InputError(f"target spacing {target_spacing!r} mm is not finer than the input's "
                             f"spacing {tuple(round(s, 4) for s in spacing)} mm along any axis")
        factors = tuple(_snap(f) for f in factors)
    else:
        factors = parse_factors(scale)
    if factors is None:
        return None
    if model not in (None, MODEL_NAME):
        if all(float(f).is_integer() and f <= geometry.MAX_FACTOR for f in factors):
            return None
        raise InputError(f"model {model!r} takes integer factors 1-{geometry.MAX_FACTOR}; factors "
                         f"{tuple(round(f, 4) for f in factors)} need the through-plane model "
                         f"({MODEL_NAME}, the default without --model)")
    a = through_axis(factors, spacing, axis)
    through = factors[a]
    if through > MAX_THROUGH_FACTOR + INTEGER_TOLERANCE:
        raise InputError(f"through-plane factor {through:.4g} along {'xyz'[a]} is above the limit "
                         f"{MAX_THROUGH_FACTOR:g} (e.g. {spacing[a]:g} mm slices to at most "
                         f"{spacing[a] / MAX_THROUGH_FACTOR:.3g} mm)")
    inplane = [1 if b == a else factors[b] for b in range(3)]
    for b in range(3):
        if b != a and not (float(inplane[b]).is_integer() and 1 <= inplane[b] <= geometry.MAX_FACTOR):
            raise InputError(
                f"in-plane factor {inplane[b]:.4g} along {'xyz'[b]} must be an integer 1-"
                f"{geometry.MAX_FACTOR}; only the through-plane axis ({'xyz'[a]}) takes any factor "
                "(give per-axis target spacings that divide the pixel size, or per-axis --scale)")
    inplane_int = tuple(int(f) for f in inplane)
    if through <= 1.0 + INTEGER_TOLERANCE:
        if max(inplane_int) < 2:
            raise InputError(f"scale factors {tuple(factors)} leave the volume unchanged")
        return None  # purely in-plane: the existing path
    if size[a] < 2:
        raise InputError(f"cannot upscale along axis {'xyz'[a]}: the volume has {size[a]} voxel there")
    inplane_plan = ScalePlan(inplane_int, a) if max(inplane_int) >= 2 else None  # type: ignore[arg-type]
    out_slices = max(size[a], int(math.floor(size[a] * through + 0.5)))  # half up
    out_size = [n * f for n, f in zip(size, inplane_int)]
    out_size[a] = out_slices
    grid = output_grid(geometry.Grid.of(image), out_size)
    return ThroughPlanePlan(a, through, int(size[a]), out_slices, inplane_plan,
                            slice_profile(image, a, slice_thickness, profile_kind), grid)


def default_target_spacing(spacing_xyz: Sequence[float]) -> float:
    """The natural target of "make slices thinner": the in-plane pixel size (the smaller
    spacing of the two axes other than the largest-spacing one)."""
    thick = max(range(3), key=lambda a: (round(spacing_xyz[a], 6), a))
    return float(min(spacing_xyz[a] for a in range(3) if a != thick))


def thinning_summary(spacing_xyz: Sequence[float], size_xyz: Sequence[int], target_spacing: float,
                     adapt_seconds: float | None = None) -> dict:
    """What `upscale(target_spacing=...)` would do, for a panel: {"axis", "factor",
    "in_slices", "out_slices", "text"}; InputError (its message) when it cannot."""
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    grid_probe = _SizedProbe(image, tuple(int(n) for n in size_xyz))
    thin = plan(grid_probe, None, "auto", target_spacing=target_spacing)  # type: ignore[arg-type]
    if thin is None:
        raise InputError(f"target spacing {target_spacing:g} mm needs no through-plane step")
    axis = "xyz"[thin.axis_xyz]
    text = (f"{axis}: {spacing_xyz[thin.axis_xyz]:.3g} mm -> {thin.grid.spacing[thin.axis_xyz]:.3g} mm, "
            f"factor x{thin.effective_factor:.3g} ({thin.in_slices} -> {thin.out_slices} slices)")
    if thin.inplane is not None:
        text += ", in-plane x" + "/".join(str(f) for a, f in enumerate(thin.inplane.factors_xyz) if a != thin.axis_xyz)
    if adapt_seconds:
        text += f"; adaptation adds up to {adapt_seconds / 60:.1f} CPU minutes"
    return {"axis": thin.axis_xyz, "factor": thin.effective_factor, "in_slices": thin.in_slices,
            "out_slices": thin.out_slices, "text": text}


class _SizedProbe:
    """The few SimpleITK image methods `plan` reads, with a size but no voxels."""

    def __init__(self, image: sitk.Image, size: tuple[int, int, int]):
        self._image, self._size = image, size

    def GetSpacing(self):  # noqa: N802 - SimpleITK's name
        return self._image.GetSpacing()

    def GetSize(self):  # noqa: N802
        return self._size

    def GetOrigin(self):  # noqa: N802
        return self._image.GetOrigin()

    def GetDirection(self):  # noqa: N802
        return self._image.GetDirection()

    def HasMetaDataKey(self, key: str) -> bool:  # noqa: N802
        return False
