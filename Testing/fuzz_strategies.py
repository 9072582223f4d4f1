"""Hypothesis strategies, result checks and guards for `test_fuzz_inputs.py`.

Profiles (chosen by the environment variable MEDSR_FUZZ):
  - "ci" (default): a few dozen examples per property, derandomized (the same examples on every
    run), small volumes; the whole fuzz file stays well under a minute on 2 cores.
  - "long": 1000 random examples per property and larger volumes (`MEDSR_FUZZ=long pytest
    Testing/test_fuzz_inputs.py`); failing examples are kept in .pytest_cache/hypothesis-medsr
    and replayed first on the next run.
MEDSR_FUZZ_EXAMPLES=N overrides the number of examples of either profile.

Guards: every example runs under `example_time_limit` (SIGALRM interrupts a Python-level hang,
faulthandler ends the process with a traceback if C code hangs past three times the limit).
upscale, read_volume and write_volume run in `GuardedWorker`, a separate process with a 3 GiB
address-space limit, so an input that makes SimpleITK abort, segfault, hang in C code (seen:
SetDirection on an output grid with overflowing spacing; reading some NIfTI headers) or
allocate without bound is reported as a failure of that example instead of killing (or
swapping) the test run.
"""

from __future__ import annotations

import base64
import contextlib
import faulthandler
import gzip
import io
import json
import math
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, Phase, assume, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.extra import numpy as hnp

from MedSRLib.transforms.geometry import Grid, corner_points

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Profiles

FUZZ_MODE = os.environ.get("MEDSR_FUZZ", "ci").strip().lower() or "ci"
if FUZZ_MODE not in ("ci", "long"):
    raise ValueError(f"MEDSR_FUZZ must be 'ci' or 'long', got {FUZZ_MODE!r}")
LONG = FUZZ_MODE == "long"

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.large_base_example]
# CI does not shrink: a failing example is reported as found (shrinking one that hangs would
# take minutes); `make fuzz` (MEDSR_FUZZ=long) shrinks to the minimal example.
settings.register_profile(
    "medsr-fuzz-ci", max_examples=30, deadline=None, derandomize=True, database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=_HEALTH, print_blob=True)
settings.register_profile(
    "medsr-fuzz-long", max_examples=1000, deadline=None, derandomize=False,
    database=DirectoryBasedExampleDatabase(str(REPO_ROOT / ".pytest_cache" / "hypothesis-medsr")),
    suppress_health_check=_HEALTH, print_blob=True)

_examples_override = os.environ.get("MEDSR_FUZZ_EXAMPLES")
FUZZ_SETTINGS = settings(
    settings.get_profile(f"medsr-fuzz-{FUZZ_MODE}"),
    **({"max_examples": int(_examples_override)} if _examples_override else {}))


def fuzz_settings(share: float = 1.0) -> settings:
    """The profile's settings with `share` of its examples (expensive properties take fewer)."""
    return settings(FUZZ_SETTINGS, max_examples=max(1, int(FUZZ_SETTINGS.max_examples * share)))


#: Seconds one example may take before it counts as a hang (in process / one worker request).
EXAMPLE_SECONDS = 60.0 if LONG else 20.0
WORKER_SECONDS = 30.0 if LONG else 10.0
#: Voxel budget of a generated volume; every axis may still reach AXIS_MAX on its own.
MAX_VOXELS = 60_000 if LONG else 3_000
AXIS_MAX = 400 if LONG else 300


class ExampleTimeout(Exception):
    """An example ran past EXAMPLE_SECONDS: a hang, as far as the fuzz suite is concerned."""


@contextlib.contextmanager
def example_time_limit(seconds: float = EXAMPLE_SECONDS):
    """Raise ExampleTimeout in the main thread after `seconds`; if C code keeps the
    interpreter from handling the signal, faulthandler ends the process (with every thread's
    traceback) after three times as long, so CI fails with a trace instead of timing out."""

    def on_alarm(signum, frame):
        raise ExampleTimeout(f"example still running after {seconds:.0f} s (hang guard)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    # To the real stderr: pytest's capture would swallow the stacks of a process that exits.
    faulthandler.dump_traceback_later(3 * seconds, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------------------------------------
# Pixel types

#: Real scalar SimpleITK pixel types and their numpy dtypes.
REAL_TYPES = {
    sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8, sitk.sitkUInt16: np.uint16,
    sitk.sitkInt16: np.int16, sitk.sitkUInt32: np.uint32, sitk.sitkInt32: np.int32,
    sitk.sitkUInt64: np.uint64, sitk.sitkInt64: np.int64, sitk.sitkFloat32: np.float32,
    sitk.sitkFloat64: np.float64,
}
COMPLEX_TYPES = {sitk.sitkComplexFloat32: np.complex64, sitk.sitkComplexFloat64: np.complex128}
#: Run-length label maps: touching their buffer from Python aborts the process (see tests).
LABEL_TYPES = (sitk.sitkLabelUInt8, sitk.sitkLabelUInt16, sitk.sitkLabelUInt32,
               sitk.sitkLabelUInt64)
#: numpy dtypes upscale may meet in memory: every real scalar type and complex ("bool" volumes
#: are generated as 0/1 masks of these, since SimpleITK has no boolean pixel type).
VOXEL_DTYPES = [np.dtype(t) for t in (*REAL_TYPES.values(), *COMPLEX_TYPES.values())]


def is_real(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


# ---------------------------------------------------------------------------------------------
# Shapes, voxels, geometry


@st.composite
def volume_shapes(draw, max_voxels: int | None = None, axis_max: int | None = None) -> tuple:
    """(K, J, I) = (z, y, x) sizes, 1 to `axis_max` per axis with at most `max_voxels` voxels:
    1x1x300 and 300x2x1 are in, 300x300x300 is not."""
    max_voxels = max_voxels or MAX_VOXELS
    axis_max = axis_max or AXIS_MAX
    shape = [1, 1, 1]
    budget = max_voxels
    for axis in draw(st.permutations([0, 1, 2])):
        n = draw(st.one_of(st.integers(2, 8), st.integers(1, 8), st.integers(1, axis_max),
                           st.sampled_from([1, 2, 3, 64, 127, 128, 129, 256, 300])))
        shape[axis] = max(1, min(n, budget, axis_max))
        budget = max(1, budget // shape[axis])
    return tuple(shape)


def _finite_elements(dtype: np.dtype, magnitude: float | None = None) -> st.SearchStrategy:
    if np.issubdtype(dtype, np.integer):
        if magnitude is not None:
            info = np.iinfo(dtype)
            return st.integers(max(int(info.min), -int(magnitude)), min(int(info.max), int(magnitude)))
        return hnp.from_dtype(dtype)
    if np.issubdtype(dtype, np.complexfloating):
        return hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    width = 32 if dtype == np.float32 else 64
    if magnitude is None:
        return st.floats(allow_nan=False, allow_infinity=False, width=width)
    return st.floats(-magnitude, magnitude, width=width)


@st.composite
def voxel_arrays(draw, shape: tuple, dtype: np.dtype) -> tuple[np.ndarray, str]:
    """Voxels of `dtype` and the name of their pattern: smooth (a ramp in some range), random,
    constant, mask (0/1, "bool"), extremes (the dtype's own limits) or special (NaN/inf)."""
    dtype = np.dtype(dtype)
    patterns = ["smooth", "random", "constant", "mask", "extremes"]
    if np.issubdtype(dtype, np.inexact):
        patterns.append("special")
    pattern = draw(st.sampled_from(patterns))
    n = int(np.prod(shape))
    if pattern == "smooth":
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            low = draw(st.integers(int(info.min), int(info.max)))
            high = draw(st.integers(low, int(info.max)))
        else:
            bound = draw(st.sampled_from([1.0, 1e3, 1e6, 1e30]))
            low = draw(st.floats(-bound, bound))
            high = draw(st.floats(low, bound))
        ramp = np.linspace(0.0, 1.0, n).reshape(shape)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        ramp = np.clip(ramp + 0.3 * rng.random(shape), 0.0, 1.0)
        values = low + (float(high) - float(low)) * ramp if not np.issubdtype(dtype, np.integer) else None
        if np.issubdtype(dtype, np.integer):
            # Python integers: float64 cannot hold every 64-bit value.
            span = int(high) - int(low)
            array = np.array([min(int(high), int(low) + int(r * span)) for r in ramp.reshape(-1)],
                             dtype=object).reshape(shape).astype(dtype)
        else:
            array = values.astype(dtype)
    elif pattern == "random":
        # Mostly magnitudes an image can have; sometimes the dtype's whole range.
        magnitude = draw(st.sampled_from([1e4, 1e4, 1e6, None]))
        array = draw(hnp.arrays(dtype, shape, elements=_finite_elements(dtype, magnitude)))
    elif pattern == "constant":
        array = np.full(shape, draw(_finite_elements(dtype)), dtype=dtype)
    elif pattern == "mask":
        array = draw(hnp.arrays(np.bool_, shape)).astype(dtype)
    elif pattern == "extremes":
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            choices = [info.min, info.max, 0, info.max - 1, info.min + 1]
        elif np.issubdtype(dtype, np.complexfloating):
            big = np.finfo(dtype).max
            choices = [big, -big, 1j * big, 0]
        else:
            info = np.finfo(dtype)
            choices = [info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, 0.0]
        picks = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, len(choices) - 1)))
        array = np.asarray(choices, dtype=dtype)[picks]
    else:  # special: NaN / inf sprinkled over finite values
        array = draw(hnp.arrays(dtype, shape, elements=_finite_elements(dtype, 1e3)))
        flat = array.reshape(-1)
        where = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4))
        flat[where] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return np.ascontiguousarray(array, dtype=dtype), pattern


def rotation(angles: Sequence[float]) -> np.ndarray:
    a, b, c = angles
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return rz @ ry @ rx


DIRECTION_KINDS = ("identity", "rotation", "reflection", "sheared", "scaled", "nearly_singular",
                   "permutation")


@st.composite
def directions(draw, kinds: Sequence[str] = DIRECTION_KINDS) -> tuple[np.ndarray, str]:
    """A 3x3 direction matrix and its kind: orthonormal (identity, rotation, reflection,
    permutation) or not (sheared, scaled columns, nearly singular)."""
    kind = draw(st.sampled_from(list(kinds)))
    angle = st.floats(-math.pi, math.pi)
    r = rotation(draw(st.tuples(angle, angle, angle)))
    if kind == "identity":
        matrix = np.eye(3)
    elif kind == "rotation":
        matrix = r
    elif kind == "reflection":
        signs = draw(st.tuples(*[st.sampled_from([1.0, -1.0])] * 3))
        matrix = r @ np.diag(signs)
    elif kind == "permutation":
        order = draw(st.permutations([0, 1, 2]))
        matrix = np.eye(3)[list(order)] * np.asarray(draw(st.tuples(*[st.sampled_from([1.0, -1.0])] * 3)))
    elif kind == "sheared":
        shear = np.eye(3)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            shear[i, j] = draw(st.floats(-3.0, 3.0))
        matrix = r @ shear
    elif kind == "scaled":
        matrix = r * draw(st.sampled_from([1e-3, 0.5, 2.0, 1e3]))
    else:
        eps = draw(st.sampled_from([1e-3, 1e-6, 1e-9]))
        matrix = r.copy()
        matrix[:, 2] = r[:, 1] + eps * r[:, 2]
    return matrix, kind


ORDINARY_SPACING = st.floats(0.01, 100.0)
EXTREME_SPACINGS = [5e-324, 1e-320, 1e-300, 1e-30, 1e-6, 1e6, 1e30, 1e300, 1.7e308,
                    math.nan, math.inf]


@st.composite
def spacings(draw) -> tuple[float, float, float]:
    """Ordinary spacings with at most one extreme value (or the same extreme on every axis):
    SimpleITK's own SetDirection never returns for some mixes (5e-324 and inf on two axes
    with a 1e-3-scaled direction), which would hang the generator, not the library."""
    values = list(draw(st.tuples(ORDINARY_SPACING, ORDINARY_SPACING, ORDINARY_SPACING)))
    mode = draw(st.sampled_from(["ordinary", "ordinary", "ordinary", "one_extreme", "all_extreme"]))
    if mode == "one_extreme":
        values[draw(st.integers(0, 2))] = draw(st.sampled_from(EXTREME_SPACINGS))
    elif mode == "all_extreme":
        values = [draw(st.sampled_from(EXTREME_SPACINGS))] * 3
    return tuple(values)  # type: ignore[return-value]


EXTREME_ORIGINS = [1e9, -1e12, 1e300, -1.7e308, math.nan, math.inf]


@st.composite
def origins(draw) -> tuple[float, float, float]:
    """Ordinary origins, or one coordinate extreme (huge, NaN, inf)."""
    values = list(draw(st.tuples(*[st.floats(-1e4, 1e4)] * 3)))
    if draw(st.integers(0, 3)) == 0:
        values[draw(st.integers(0, 2))] = draw(st.sampled_from(EXTREME_ORIGINS))
    return tuple(values)  # type: ignore[return-value]


def _setdirection_may_hang(direction: np.ndarray, spacing: Sequence[float]) -> bool:
    """SimpleITK's SetDirection inverts direction * diag(spacing) by SVD, which never returns
    for some non-finite or subnormal products: the generator keeps the identity there."""
    if np.allclose(direction, np.eye(3)):
        return False
    with np.errstate(all="ignore"):
        matrix = direction @ np.diag(np.asarray(spacing, dtype=np.float64))
        if not np.all(np.isfinite(matrix)):
            return True
        magnitudes = np.abs(matrix[matrix != 0])
        return bool(magnitudes.size and (magnitudes.min() < 1e-290 or magnitudes.max() > 1e290))


@dataclass
class VolumeCase:
    """A generated in-memory image and what went into it."""

    image: sitk.Image
    voxels: np.ndarray  # (K, J, I) or (J, I) or (T, K, J, I)
    pattern: str
    direction_kind: str
    ndim: int

    def describe(self) -> str:
        im = self.image
        return (f"{self.ndim}-D {im.GetPixelIDTypeAsString()} size {im.GetSize()} "
                f"spacing {im.GetSpacing()} origin {im.GetOrigin()} "
                f"direction {np.round(im.GetDirection(), 6).tolist()} ({self.direction_kind}) "
                f"voxels {self.pattern} range [{np.min(self.voxels) if self.voxels.size else None}, "
                f"{np.max(self.voxels) if self.voxels.size else None}]")


@st.composite
def volume_cases(draw, dtypes: Sequence[np.dtype] = tuple(VOXEL_DTYPES), allow_other_ndim: bool = True,
                 direction_kinds: Sequence[str] = DIRECTION_KINDS,
                 spacing_strategy: st.SearchStrategy = spacings(),
                 origin_strategy: st.SearchStrategy = origins(),
                 metadata: bool = True) -> VolumeCase:
    """An image of any real or complex scalar type, any shape (1 to a few hundred per axis),
    spacing (tiny, huge, NaN, inf), origin and direction (orthonormal or not), voxels from
    `voxel_arrays`; mostly 3-D, sometimes 2-D or 4-D (last axis 1) when `allow_other_ndim`."""
    dtype = np.dtype(draw(st.sampled_from(list(dtypes))))
    ndim = draw(st.sampled_from([3, 3, 3, 3, 2, 4])) if allow_other_ndim else 3
    shape = draw(volume_shapes())
    if ndim == 2:
        shape = shape[1:]
    elif ndim == 4:
        shape = (1, *shape)
    voxels, pattern = draw(voxel_arrays(shape, dtype))
    image = sitk.GetImageFromArray(voxels, isVector=False)
    spacing = draw(spacing_strategy)
    origin = draw(origin_strategy)
    direction, kind = draw(directions(direction_kinds)) if ndim == 3 else (None, "identity")
    dims = image.GetDimension()
    try:
        # SimpleITK itself refuses some spacings (zero determinant, e.g. 5e-324 with 1 mm).
        image.SetSpacing((*spacing, 1.0) if ndim == 4 else spacing[:dims])
    except RuntimeError:
        assume(False)
    image.SetOrigin((*origin, 0.0) if ndim == 4 else origin[:dims])
    if direction is not None and not _setdirection_may_hang(direction, image.GetSpacing()):
        try:
            image.SetDirection(tuple(float(v) for v in direction.reshape(-1)))
        except RuntimeError:  # SimpleITK refuses a singular matrix; keep the identity
            kind = "identity (singular refused by SimpleITK)"
    elif direction is not None:
        kind = "identity (SimpleITK would hang on this direction with this spacing)"
    if metadata:
        for key, value in draw(st.dictionaries(
                st.sampled_from(["medsr_modality", "medsr_note", "0008|0060", "comment"]),
                st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12),
                max_size=2)).items():
            image.SetMetaData(key, value)
    return VolumeCase(image, voxels, pattern, kind, ndim)


# ---------------------------------------------------------------------------------------------
# What upscale must return


def as_reference_volume(image: sitk.Image) -> tuple[Grid, np.ndarray]:
    """The 3-D grid and (K, J, I) voxels upscale must start from: a 2-D image is one slice
    (z spacing 1, origin 0), a 4-D image with one time point is its first volume."""
    voxels = sitk.GetArrayFromImage(image)
    dims = image.GetDimension()
    size, spacing, origin = list(image.GetSize()), list(image.GetSpacing()), list(image.GetOrigin())
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dims, dims)
    if dims == 2:
        d3 = np.eye(3)
        d3[:2, :2] = direction
        grid = Grid((*size, 1), (*spacing, 1.0), (*origin, 0.0), tuple(d3.reshape(-1)))
        voxels = voxels[None]
    elif dims == 4:
        grid = Grid(tuple(size[:3]), tuple(spacing[:3]), tuple(origin[:3]),
                    tuple(direction[:3, :3].reshape(-1)))
        voxels = voxels[0]
    else:
        grid = Grid(tuple(size), tuple(spacing), tuple(origin), tuple(direction.reshape(-1)))
    return grid, voxels


def float32_unit_tolerance(voxels: np.ndarray) -> float:
    """Slack for values that went through float32 network units: 2^-20 of the magnitudes."""
    if voxels.size == 0:
        return 0.0
    low, high = float(np.min(voxels)), float(np.max(voxels))
    return 2.0 ** -20 * abs(low) + 2.0 ** -20 * abs(high)


def image_snapshot(image: sitk.Image) -> dict[str, Any]:
    """Everything about `image` that upscale must leave untouched."""
    snapshot = {"size": image.GetSize(), "spacing": image.GetSpacing(), "origin": image.GetOrigin(),
                "direction": image.GetDirection(), "pixel": image.GetPixelID(),
                "metadata": {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}}
    if image.GetPixelID() not in LABEL_TYPES:
        snapshot["voxels"] = sitk.GetArrayFromImage(image)
    return snapshot


def assert_unchanged(image: sitk.Image, snapshot: dict[str, Any]) -> None:
    after = image_snapshot(image)
    for key in ("size", "pixel", "metadata"):
        assert after[key] == snapshot[key], f"upscale changed its input's {key}"
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_array_equal(after[key], snapshot[key], err_msg=f"upscale changed its input's {key}")
    if "voxels" in snapshot:
        np.testing.assert_array_equal(after["voxels"], snapshot["voxels"],
                                      err_msg="upscale changed its input's voxels")


def check_upscaled(source: sitk.Image, output: Any, factors_xyz: Sequence[int] | None,
                   model: str, output_float: bool = False) -> tuple[int, int, int]:
    """Assert that `output` is a correct upscale of `source` by `factors_xyz` (None: an in-plane
    integer scale on an axis upscale chose; then the factors must be a permutation of
    (s, s, 1) read off the sizes). Returns the factors."""
    assert isinstance(output, sitk.Image), f"upscale returned {type(output).__name__}, not an image"
    grid, voxels = as_reference_volume(source)
    assert output.GetDimension() == 3, f"output is {output.GetDimension()}-D"
    assert output.GetNumberOfComponentsPerPixel() == 1
    out_size = np.asarray(output.GetSize())
    in_size = np.asarray(grid.size)
    if factors_xyz is None:
        assert np.all(out_size % in_size == 0), f"output size {tuple(out_size)} is not a multiple of {grid.size}"
        factors = tuple(int(f) for f in out_size // in_size)
        assert sorted(factors)[0] == 1 and sorted(factors)[1] == sorted(factors)[2] > 1, \
            f"an integer scale must scale two axes alike and leave one, got factors {factors}"
    else:
        factors = tuple(int(f) for f in factors_xyz)
        assert tuple(out_size) == tuple(in_size * np.asarray(factors)), \
            f"output size {tuple(out_size)} != input size {grid.size} * factors {factors}"
    f = np.asarray(factors, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(output.GetSpacing()) * f, grid.spacing, rtol=1e-12, atol=0,
                               err_msg="output spacing * factors != input spacing")
    np.testing.assert_allclose(output.GetDirection(), grid.direction, rtol=1e-12, atol=1e-15,
                               err_msg="output direction differs from the input's")
    in_corners = corner_points(grid)
    out_corners = corner_points(Grid.of(output))
    scale_mm = float(np.max(np.abs(in_corners))) if np.all(np.isfinite(in_corners)) else 1.0
    np.testing.assert_allclose(out_corners, in_corners, rtol=0, atol=1e-9 * max(1.0, scale_mm),
                               err_msg="output voxel-boundary corners differ from the input's "
                                       "(physical extent not kept)")
    expected_pixel = sitk.sitkFloat32 if output_float else source.GetPixelID()
    assert output.GetPixelID() == expected_pixel, \
        f"output pixel type {output.GetPixelIDTypeAsString()} != {sitk.GetPixelIDValueAsString(expected_pixel)}"
    out = sitk.GetArrayFromImage(output)
    if np.issubdtype(out.dtype, np.inexact):
        bad = int(np.count_nonzero(~np.isfinite(out)))
        assert bad == 0, f"output holds {bad} NaN/inf voxel(s) of {out.size} (finite input)"
    if voxels.size and np.all(voxels == voxels.reshape(-1)[0]):
        expected = np.asarray(voxels.reshape(-1)[0]).astype(out.dtype)
        wrong = int(np.count_nonzero(out != expected))
        assert wrong == 0, (f"constant input {voxels.reshape(-1)[0]!r}: {wrong} output voxels differ, "
                            f"e.g. {out[out != expected][:3]}")
    tolerance = float32_unit_tolerance(voxels)
    low, high = float(np.min(voxels)), float(np.max(voxels))
    if model in ("nearest", "linear"):
        out64 = out.astype(np.float64)
        assert out64.min() >= low - tolerance and out64.max() <= high + tolerance, \
            (f"{model} output range [{out64.min()!r}, {out64.max()!r}] leaves the input range "
             f"[{low!r}, {high!r}] (tolerance {tolerance:.3g})")
    if model == "nearest":
        fx, fy, fz = factors
        repeated = np.repeat(np.repeat(np.repeat(voxels, fz, 0), fy, 1), fx, 2).astype(np.float64)
        error = np.abs(out.astype(np.float64) - repeated)
        assert float(error.max(initial=0.0)) <= tolerance, \
            (f"nearest output differs from the repeated input by up to {float(error.max()):.6g} "
             f"(tolerance {tolerance:.3g})")
    assert output.HasMetaDataKey("medsr_model") and output.GetMetaData("medsr_model") == model
    return factors


def intended_factors(scale: Any, axis: Any) -> tuple[tuple[int, int, int] | None, bool]:
    """How a user means `scale`/`axis`: (factors or None for "auto", valid?). Integers and
    integral floats 2-4 scale the two axes other than `axis`; a 3-sequence of integral values
    1-4 with one >= 2 gives per-axis factors. Anything else is invalid."""
    def integral(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
            return int(v)
        return None

    axis_index = None
    if isinstance(axis, str):
        key = axis.strip().lower()
        names = {"x": 0, "y": 1, "z": 2, "i": 0, "j": 1, "k": 2, "0": 0, "1": 1, "2": 2}
        if key == "auto":
            axis_index = None
        elif key in names:
            axis_index = names[key]
        else:
            return None, False
    elif isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= axis <= 2:
        axis_index = int(axis)
    else:
        return None, False
    if isinstance(scale, (list, tuple, np.ndarray)):
        values = [integral(v) for v in scale]
        if len(values) != 3 or any(v is None or not 1 <= v <= 4 for v in values) or max(values) < 2:
            return None, False
        return tuple(values), True  # type: ignore[return-value]
    s = integral(scale)
    if s is None or not 2 <= s <= 4:
        return None, False
    if axis_index is None:
        return None, True
    factors = [s, s, s]
    factors[axis_index] = 1
    return tuple(factors), True  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Header edits of written files

NUMBER_TOKENS = st.one_of(
    st.sampled_from(["0", "1", "-1", "2", "3", "4", "7", "255", "65535", "2147483647",
                     "2147483648", "4294967296", "9223372036854775807", "18446744073709551616",
                     "1e308", "1e309", "-1e308", "1e-320", "1e-300", "nan", "NaN", "inf", "-inf",
                     "0.5", "-0.5", "1.5", "0x10", "1e", "", "abc", "1,2", "--1", "+3", "3.", ".5"]),
    st.integers(-2**40, 2**40).map(str),
    st.floats().map(repr),
)
number_lists = st.lists(NUMBER_TOKENS, min_size=0, max_size=6).map(" ".join)
junk_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)

MHA_ELEMENT_TYPES = ["MET_UCHAR", "MET_CHAR", "MET_USHORT", "MET_SHORT", "MET_UINT", "MET_INT",
                     "MET_ULONG", "MET_LONG", "MET_ULONG_LONG", "MET_LONG_LONG", "MET_FLOAT",
                     "MET_DOUBLE", "MET_STRING", "MET_NONE", "MET_OTHER", "MET_FLOAT_ARRAY",
                     "MET_UCHAR_ARRAY", "MET_FLOAT_MATRIX", "MET_FOO"]
MHA_FIELDS: dict[str, st.SearchStrategy] = {
    "NDims": NUMBER_TOKENS,
    "DimSize": number_lists,
    "ElementSpacing": number_lists,
    "ElementSize": number_lists,
    "Offset": number_lists,
    "TransformMatrix": number_lists,
    "CenterOfRotation": number_lists,
    "ElementType": st.one_of(st.sampled_from(MHA_ELEMENT_TYPES), junk_text),
    "ElementNumberOfChannels": NUMBER_TOKENS,
    "CompressedData": st.sampled_from(["True", "False", "1", "yes", ""]),
    "CompressedDataSize": NUMBER_TOKENS,
    "BinaryData": st.sampled_from(["True", "False", "", "maybe"]),
    "BinaryDataByteOrderMSB": st.sampled_from(["True", "False", ""]),
    "HeaderSize": NUMBER_TOKENS,
    "ElementDataFile": st.sampled_from(["LOCAL", "LIST", "missing.raw", "", "missing_%03d.raw 1 3 1"]),
    "ObjectType": st.sampled_from(["Image", "Mesh", "", "Tube"]),
    "AnatomicalOrientation": st.sampled_from(["RAI", "LPS", "???", ""]),
}

NRRD_TYPES = ["uchar", "signed char", "short", "ushort", "int", "uint", "longlong", "ulonglong",
              "float", "double", "block", "complex", "int8", "uint64_t", "half", ""]
nrrd_vector = st.one_of(
    st.lists(NUMBER_TOKENS, min_size=0, max_size=4).map(lambda v: "(" + ",".join(v) + ")"),
    st.sampled_from(["none", "(1,2", "((1,0,0)", "()", "(nan,nan,nan)", "(0,0,0)"]))
nrrd_vectors = st.lists(nrrd_vector, min_size=0, max_size=4).map(" ".join)
NRRD_FIELDS: dict[str, st.SearchStrategy] = {
    "type": st.one_of(st.sampled_from(NRRD_TYPES), junk_text),
    "dimension": NUMBER_TOKENS,
    "sizes": number_lists,
    "space directions": nrrd_vectors,
    "spacings": number_lists,
    "space origin": nrrd_vector,
    "kinds": st.lists(st.sampled_from(["domain", "space", "time", "list", "RGB-color", "vector",
                                       "3-vector", "complex", "none", "???"]),
                      max_size=4).map(" ".join),
    "endian": st.sampled_from(["little", "big", "middle", ""]),
    "encoding": st.sampled_from(["raw", "gzip", "gz", "ascii", "text", "hex", "bzip2", "zip", ""]),
    "space": st.sampled_from(["left-posterior-superior", "right-anterior-superior", "RAS", "LPS",
                              "scanner-xyz", "3D-right-handed", "left-posterior-superior-time", "?"]),
    "byte skip": NUMBER_TOKENS,
    "line skip": NUMBER_TOKENS,
    "data file": st.sampled_from(["missing.raw", "LIST", "missing_%d.raw 1 3 1 2"]),
    "space units": st.sampled_from(['"mm" "mm" "mm"', '"mm"', "", "\"km\" \"?\" \"\""]),
    "thicknesses": number_lists,
    "measurement frame": nrrd_vectors,
}


@dataclass(frozen=True)
class HeaderEdit:
    """Replace (or delete, or add) one header field."""

    field: str
    value: str | None  # None deletes the field
    add: bool = False

    def __repr__(self) -> str:
        return f"HeaderEdit({self.field!r}, {self.value!r}{', add=True' if self.add else ''})"


@st.composite
def header_edits(draw, fields: dict[str, st.SearchStrategy], max_edits: int = 3) -> list[HeaderEdit]:
    edits = []
    for _ in range(draw(st.integers(1, max_edits))):
        name = draw(st.sampled_from(sorted(fields)))
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if action == "delete":
            edits.append(HeaderEdit(name, None))
        else:
            edits.append(HeaderEdit(name, draw(fields[name]), add=action == "add"))
    return edits


def split_text_header(data: bytes, suffix: str) -> tuple[list[str], bytes]:
    """Header lines and the bytes that follow them, for a one-file .mha or .nrrd."""
    if suffix == ".nrrd":
        end = data.index(b"\n\n")
        return data[:end].decode("latin-1").split("\n"), data[end + 2:]
    marker = b"ElementDataFile = LOCAL\n"
    end = data.index(marker) + len(marker)
    return data[:end].decode("latin-1").rstrip("\n").split("\n"), data[end:]


def apply_header_edits(data: bytes, suffix: str, edits: Sequence[HeaderEdit]) -> bytes:
    """`data` (a .mha or .nrrd written by SimpleITK) with `edits` applied to its text header."""
    lines, payload = split_text_header(data, suffix)
    separator = ": " if suffix == ".nrrd" else " = "

    def key_of(line: str) -> str:
        return line.split(":", 1)[0].strip() if suffix == ".nrrd" else line.split("=", 1)[0].strip()

    for edit in edits:
        new_line = f"{edit.field}{separator}{edit.value}"
        matches = [i for i, line in enumerate(lines) if key_of(line) == edit.field]
        if edit.value is None:
            lines = [line for i, line in enumerate(lines) if i not in matches]
        elif matches and not edit.add:
            lines[matches[0]] = new_line
        else:
            # MetaImage needs ElementDataFile last; NRRD has no order: insert before the end.
            at = len(lines) - 1 if suffix != ".nrrd" and lines and key_of(lines[-1]) == "ElementDataFile" \
                else len(lines)
            lines.insert(at, new_line)
    blank = "\n\n" if suffix == ".nrrd" else "\n"
    return ("\n".join(lines) + blank).encode("latin-1") + payload


#: NIfTI-1 header fields: name -> (byte offset, struct code, count).
NIFTI_FIELDS = {
    "sizeof_hdr": (0, "i", 1), "dim": (40, "h", 8), "intent_p": (56, "f", 3),
    "intent_code": (68, "h", 1), "datatype": (70, "h", 1), "bitpix": (72, "h", 1),
    "slice_start": (74, "h", 1), "pixdim": (76, "f", 8), "vox_offset": (108, "f", 1),
    "scl_slope": (112, "f", 1), "scl_inter": (116, "f", 1), "slice_end": (120, "h", 1),
    "slice_code": (122, "b", 1), "xyzt_units": (123, "B", 1), "cal_max": (124, "f", 1),
    "cal_min": (128, "f", 1), "qform_code": (252, "h", 1), "sform_code": (254, "h", 1),
    "quatern": (256, "f", 3), "qoffset": (268, "f", 3), "srow_x": (280, "f", 4),
    "srow_y": (296, "f", 4), "srow_z": (312, "f", 4), "magic": (344, "4s", 1),
}
NIFTI_DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048,
                   2304, 3, 255, -1, 32767]
_F32_MAX = float(np.finfo(np.float32).max)
_nifti_floats = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 352.0, 348.0, 1e-30, 1e-45, 1e30, _F32_MAX,
                     -_F32_MAX, math.nan, math.inf, -math.inf, 3.0e9]),
    st.floats(width=32))
_nifti_int16 = st.one_of(st.sampled_from([0, 1, -1, 2, 3, 4, 7, 8, 255, 256, 32767, -32768, 1000]),
                         st.integers(-32768, 32767))


@dataclass(frozen=True)
class NiftiEdit:
    field: str
    index: int
    value: Any

    def __repr__(self) -> str:
        return f"NiftiEdit({self.field!r}, {self.index}, {self.value!r})"


@st.composite
def nifti_edits(draw, max_edits: int = 3) -> list[NiftiEdit]:
    edits = []
    for _ in range(draw(st.integers(1, max_edits))):
        name = draw(st.sampled_from(sorted(NIFTI_FIELDS)))
        _, code, count = NIFTI_FIELDS[name]
        index = draw(st.integers(0, count - 1))
        if name == "datatype":
            value = draw(st.one_of(st.sampled_from(NIFTI_DATATYPES), _nifti_int16))
        elif name == "magic":
            value = draw(st.sampled_from([b"n+1\x00", b"ni1\x00", b"n+2\x00", b"\x00\x00\x00\x00", b"abcd"]))
        elif name == "sizeof_hdr":
            value = draw(st.sampled_from([348, 540, 0, -1, 2**31 - 1, 1543569408]))
        elif code == "h":
            value = draw(_nifti_int16)
        elif code == "b":
            value = draw(st.integers(-128, 127))
        elif code == "B":
            value = draw(st.integers(0, 255))
        else:
            value = draw(_nifti_floats)
        edits.append(NiftiEdit(name, index, value))
    return edits


def apply_nifti_edits(data: bytes, edits: Sequence[NiftiEdit], gzipped: bool) -> bytes:
    raw = bytearray(gzip.decompress(data) if gzipped else data)
    for edit in edits:
        offset, code, _ = NIFTI_FIELDS[edit.field]
        size = struct.calcsize("<" + code)
        struct.pack_into("<" + code, raw, offset + edit.index * size, edit.value)
    return gzip.compress(bytes(raw), mtime=0) if gzipped else bytes(raw)


@dataclass(frozen=True)
class ByteDamage:
    """Truncate the file to `truncate_to` bytes (None: keep) after setting `flips` bytes."""

    truncate_to: int | None
    flips: tuple[tuple[int, int], ...]


@st.composite
def byte_damage(draw) -> ByteDamage:
    truncate = draw(st.one_of(st.none(), st.integers(0, 1 << 16)))
    flips = tuple(draw(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=3)))
    return ByteDamage(truncate, flips)


def apply_damage(data: bytes, damage: ByteDamage) -> bytes:
    raw = bytearray(data)
    for position, value in damage.flips:
        raw[position % len(raw)] = value
    if damage.truncate_to is not None:
        raw = raw[: damage.truncate_to % max(1, len(raw))]
    return bytes(raw)


# ---------------------------------------------------------------------------------------------
# Reading files in a guarded worker process

#: Address-space limit of the worker: a header claiming 100 GB is refused by the allocator
#: instead of being granted by overcommit and then filled.
WORKER_MEMORY_BYTES = 3 << 30


def _metadata_of(image: sitk.Image) -> dict[str, str]:
    """The image's metadata; a key that SWIG cannot pass back (bytes that are not UTF-8, from a
    damaged header) is skipped."""
    metadata = {}
    for key in image.GetMetaDataKeys():
        try:
            metadata[key] = image.GetMetaData(key)
        except (TypeError, UnicodeError):
            continue
    return metadata


def describe_image(image: sitk.Image, voxels: bool) -> dict[str, Any]:
    """Geometry, type and (optionally) voxels of `image` as JSON-able data."""
    info: dict[str, Any] = {
        "dimension": image.GetDimension(), "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()), "pixel_id": image.GetPixelID(),
        "pixel_type": image.GetPixelIDTypeAsString(),
        "components": image.GetNumberOfComponentsPerPixel(),
        "metadata": _metadata_of(image),
    }
    if image.GetPixelID() in LABEL_TYPES:
        info["array_shape"] = None  # touching a label map's buffer aborts the process
        return info
    array = sitk.GetArrayFromImage(image)
    info["array_shape"] = list(array.shape)
    info["dtype"] = str(array.dtype)
    if voxels:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        info["voxels_npy"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return info


def image_from_description(info: dict[str, Any]) -> sitk.Image:
    """The image `describe_image` described (a label map comes back empty: no voxels)."""
    if info["pixel_id"] in LABEL_TYPES:
        image = sitk.Image(info["size"], info["pixel_id"])
    else:
        array = np.load(io.BytesIO(base64.b64decode(info["voxels_npy"])), allow_pickle=False)
        image = sitk.GetImageFromArray(array, isVector=info["components"] > 1)
    image.SetSpacing(info["spacing"])
    image.SetOrigin(info["origin"])
    image.SetDirection(info["direction"])
    for key, value in info["metadata"].items():
        image.SetMetaData(key, value)
    return image


def _outcome_of(call) -> tuple[dict[str, Any], Any]:
    from MedSRLib import InputError

    try:
        return {"outcome": "ok"}, call()
    except InputError as err:
        return {"outcome": "InputError", "message": str(err)}, None
    except Exception as err:  # noqa: BLE001 (the point: report every other exception)
        return {"outcome": "exception", "type": f"{type(err).__module__}.{type(err).__qualname__}",
                "message": str(err)[-2000:], "traceback": traceback.format_exc()[-4000:]}, None


def _same_description(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys on which two `describe_image` results differ (NaN equals NaN)."""
    differ = []
    for key in a:
        if key not in b:
            differ.append(key)
        elif key == "voxels_npy":
            x = np.load(io.BytesIO(base64.b64decode(a[key])), allow_pickle=False)
            y = np.load(io.BytesIO(base64.b64decode(b[key])), allow_pickle=False)
            if not np.array_equal(x, y, equal_nan=np.issubdtype(x.dtype, np.inexact)):
                differ.append("voxels")
        elif isinstance(a[key], list):
            if not np.array_equal(np.asarray(a[key], dtype=float), np.asarray(b[key], dtype=float),
                                  equal_nan=True):
                differ.append(key)
        elif a[key] != b[key]:
            differ.append(key)
    return differ


def serve() -> None:
    """Worker loop: one JSON request per stdin line, one JSON answer per line on the original
    stdout (fd 1 is pointed at stderr so nothing else can garble the answers).

    Requests: {"op": "upscale", "image": description, "kwargs": {...}} runs upscale on the
    image; {"op": "read", "path": ..., "write": description or None, "upscale": {...} or None}
    writes the image there with write_volume (if given), reads it with read_volume and
    upscales the result (if asked)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    faulthandler.enable()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    import torch

    torch.set_num_threads(1)
    from MedSRLib import read_volume, upscale, write_volume

    answers.write(json.dumps({"outcome": "ready"}) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        # On a hang the parent kills this process: leave the stack in stderr first.
        faulthandler.dump_traceback_later(max(1.0, request.get("seconds", 10.0) - 1.0))
        answer: dict[str, Any] = {}
        if request["op"] == "upscale":
            try:  # an image SimpleITK cannot rebuild here is no test of upscale
                source = image_from_description(request["image"])
            except RuntimeError as err:
                answers.write(json.dumps({"outcome": "unbuildable", "message": str(err)[-500:]}) + "\n")
                answers.flush()
                faulthandler.cancel_dump_traceback_later()
                continue
            answer, output = _outcome_of(lambda: upscale(source, **request["kwargs"]))
            if output is not None:
                described, answer["image"] = _outcome_of(lambda: describe_image(output, True))
                if described["outcome"] != "ok":
                    answer = {**described, "message": f"upscale returned {output!r}: "
                                                      f"{described.get('message')}"}
            changed = _same_description(request["image"], describe_image(source, True))
            if changed:
                answer["input_changed"] = changed
        else:
            if request.get("write") is not None:
                source = image_from_description(request["write"])
                answer["write"], _ = _outcome_of(lambda: write_volume(source, request["path"]))
            if answer.get("write", {"outcome": "ok"})["outcome"] == "ok":
                read, image = _outcome_of(lambda: read_volume(request["path"]))
                answer.update(read)
                if image is not None:
                    small = int(np.prod(image.GetSize())) <= request.get("max_voxels", 10**6)
                    answer["image"] = describe_image(image, request.get("voxels", False) and small)
                    job = request.get("upscale")
                    if job and small:
                        up, output = _outcome_of(lambda: upscale(image, **job))
                        if output is not None:
                            up["image"] = describe_image(output, True)
                        answer["upscale"] = up
            else:
                answer["outcome"] = "not read"
        faulthandler.cancel_dump_traceback_later()
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


class GuardedWorker:
    """A long-lived worker process that runs `upscale`, `read_volume` and `write_volume`.

    `upscale(image, ...)` and `read(path)` return the worker's answer; a worker that dies answers
    {"outcome": "crash", ...} (signal and the end of its stderr), one that does not answer
    within the time limit is killed and answers {"outcome": "hang"}. Either way the next
    request starts a fresh worker.
    """

    STARTUP_SECONDS = 120.0

    def __init__(self, seconds: float = WORKER_SECONDS):
        self.seconds = seconds
        self.process: subprocess.Popen | None = None
        self.stderr_file = None

    def _start(self) -> None:
        self.stderr_file = tempfile.TemporaryFile()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import fuzz_strategies; fuzz_strategies.serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr_file, env=env,
            cwd=str(REPO_ROOT), text=True, bufsize=1)
        answer = self._answer(self.STARTUP_SECONDS)
        if answer.get("outcome") != "ready":
            raise RuntimeError(f"read worker did not start: {answer}")

    def _stderr_tail(self) -> str:
        if self.stderr_file is None:
            return ""
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")[-3000:]

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                with contextlib.suppress(Exception):
                    stream.close()
        if self.stderr_file is not None:
            self.stderr_file.close()
        self.process, self.stderr_file = None, None

    def _answer(self, seconds: float) -> dict[str, Any]:
        assert self.process is not None
        ready, _, _ = select.select([self.process.stdout], [], [], seconds)
        line = self.process.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        if not ready:
            self.process.kill()
            self.process.wait()
            tail = self._stderr_tail()
            self.stop()
            return {"outcome": "hang", "message": f"no answer within {seconds:.0f} s", "stderr": tail}
        self.process.wait()
        code = self.process.returncode
        tail = self._stderr_tail()
        self.stop()
        name = signal.Signals(-code).name if code < 0 else f"exit status {code}"
        return {"outcome": "crash", "message": f"worker died ({name})", "stderr": tail}

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.process is None or self.process.poll() is not None:
            self.stop()
            self._start()
        assert self.process is not None
        try:
            self.process.stdin.write(json.dumps({**request, "seconds": self.seconds}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        return self._answer(self.seconds)

    def upscale(self, image: sitk.Image, **kwargs: Any) -> dict[str, Any]:
        """upscale(image, **kwargs) in the worker: {"outcome": "ok", "image": description} or
        InputError / exception / crash / hang; "input_changed" lists what upscale modified."""
        return self._ask({"op": "upscale", "image": describe_image(image, True), "kwargs": kwargs})

    def read(self, path: str | os.PathLike, voxels: bool = False,
             upscale: dict[str, Any] | None = None, max_voxels: int = 200_000,
             write: sitk.Image | None = None) -> dict[str, Any]:
        """read_volume(path) in the worker; `upscale` (keyword arguments) also runs upscale on
        the volume read (when it has at most `max_voxels` voxels); `write` is an image to
        write there with write_volume first (answer["write"] is that outcome)."""
        return self._ask({"op": "read", "path": str(path), "voxels": voxels, "upscale": upscale,
                          "max_voxels": max_voxels,
                          "write": None if write is None else describe_image(write, True)})


def read_problems(info: dict[str, Any]) -> list[str]:
    """Why a volume read_volume returned is not a usable scalar 3-D volume (empty: it is)."""
    problems = []
    if info["dimension"] != 3:
        problems.append(f"dimension {info['dimension']}, not 3")
    if info["components"] != 1:
        problems.append(f"{info['components']} components per voxel")
    if info["pixel_id"] not in REAL_TYPES:
        problems.append(f"pixel type {info['pixel_type']} is not a real scalar type")
    if info.get("array_shape") is not None and info["array_shape"] != list(info["size"])[::-1]:
        problems.append(f"voxel array shape {info['array_shape']} does not match size {info['size']}")
    spacing = np.asarray(info["spacing"], dtype=np.float64)
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        problems.append(f"spacing {tuple(spacing)} is not positive and finite")
    if not np.all(np.isfinite(info["origin"])):
        problems.append(f"origin {tuple(info['origin'])} is not finite")
    direction = np.asarray(info["direction"], dtype=np.float64)
    if not np.all(np.isfinite(direction)):
        problems.append(f"direction {tuple(direction)} is not finite")
    elif info["dimension"] == 3 and np.linalg.cond(direction.reshape(3, 3)) > 1e12:
        problems.append(f"direction {tuple(direction)} is singular")
    return problems


def assert_read_outcome(answer: dict[str, Any], what: str) -> dict[str, Any] | None:
    """Assert the worker's answer is an InputError or a usable volume; return the volume's
    description (None after an InputError)."""
    outcome = answer["outcome"]
    if outcome == "InputError":
        return None
    details = "\n".join(str(answer.get(k, "")) for k in ("message", "traceback", "stderr") if answer.get(k))
    assert outcome == "ok", f"read_volume({what}) ended in {outcome} {answer.get('type', '')}:\n{details}"
    problems = read_problems(answer["image"])
    assert not problems, f"read_volume({what}) returned an unusable volume: {'; '.join(problems)}"
    return answer["image"]


def assert_faithful(source: sitk.Image, info: dict[str, Any], suffix: str) -> None:
    """The volume read back equals what was written: type, voxels (NaN-aware), size and the
    index-to-physical mapping (NIfTI: float32 precision)."""
    assert info["pixel_id"] == source.GetPixelID(), \
        f"pixel type {info['pixel_type']} read back, {source.GetPixelIDTypeAsString()} written"
    grid, voxels = as_reference_volume(source)
    assert tuple(info["size"]) == tuple(grid.size), f"size {info['size']} read back, {grid.size} written"
    back = np.load(io.BytesIO(base64.b64decode(info["voxels_npy"])), allow_pickle=False)
    same = np.array_equal(back, voxels, equal_nan=np.issubdtype(voxels.dtype, np.inexact))
    if not same:
        differ = ~((back == voxels) | (np.isnan(back) & np.isnan(voxels))
                   if np.issubdtype(voxels.dtype, np.inexact) else back == voxels)
        raise AssertionError(f"{int(differ.sum())} voxel(s) read back differ, e.g. written "
                             f"{voxels[differ][:4]} read {back[differ][:4]}")
    rtol = 2e-6 if suffix.startswith(".nii") else 1e-12
    written = np.asarray(grid.direction).reshape(3, 3) @ np.diag(grid.spacing)
    read = np.asarray(info["direction"]).reshape(3, 3) @ np.diag(info["spacing"])
    scale = float(np.max(np.abs(written)))
    np.testing.assert_allclose(read, written, rtol=rtol, atol=rtol * scale,
                               err_msg="index-to-physical matrix (direction * spacing) changed")
    np.testing.assert_allclose(info["origin"], grid.origin, rtol=rtol,
                               atol=rtol * max(1.0, float(np.max(np.abs(grid.origin)))),
                               err_msg="origin changed")
