"""Intensity normalisation to the networks' unit range, its exact inverse, and dtype casting.

Every modality is handled the same way, so training and inference agree: a linear map sends the
volume's 0.5th and 99.5th percentiles to 0 and 1. Values outside stay outside (no clipping), so
the inverse is exact: CT in HU, MR in arbitrary units, 8/16-bit X-ray and already-normalised
floats with negatives all round-trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

#: Largest |intensity| accepted: a float32 network unit must hold the value's offset from the
#: volume's percentiles, and (value - offset) / scale must not overflow float32 on the way.
MAX_ABS_INTENSITY = 1e30
#: At most this many voxels are looked at to estimate the percentiles (evenly strided sample).
PERCENTILE_SAMPLE = 2_000_000


@dataclass(frozen=True)
class IntensityMapping:
    """unit = (value - offset) / scale; value = unit * scale + offset."""

    offset: float
    scale: float

    def to_unit(self, values: np.ndarray) -> np.ndarray:
        """Values in the volume's units -> float32 network units."""
        return ((np.asarray(values, dtype=np.float64) - self.offset) / self.scale).astype(np.float32)

    def from_unit(self, units: np.ndarray) -> np.ndarray:
        """Network units -> float64 values in the volume's units (the exact inverse of to_unit)."""
        return np.asarray(units, dtype=np.float64) * self.scale + self.offset


def check_finite(volume: np.ndarray, what: str = "volume") -> None:
    """InputError if `volume` holds NaN or infinite voxels (counted in the message)."""
    if np.issubdtype(volume.dtype, np.floating):
        bad = np.count_nonzero(~np.isfinite(volume))
        if bad:
            raise InputError(f"{what} holds {bad} NaN or infinite voxel(s); clean the input first")


def fit_mapping(volume: np.ndarray, low_percentile: float = 0.5,
                high_percentile: float = 99.5) -> IntensityMapping:
    """The mapping that sends the volume's low/high percentiles to 0 and 1.

    A constant volume maps its value to 0 with scale 1.
    """
    check_finite(volume)
    flat = np.asarray(volume).reshape(-1)
    if flat.size == 0:
        raise InputError("volume is empty")
    lowest, highest = float(flat.min()), float(flat.max())
    if not np.isfinite(highest - lowest) or max(abs(lowest), abs(highest)) > MAX_ABS_INTENSITY:
        raise InputError(f"intensities span {lowest:g} to {highest:g}: beyond "
                         f"+-{MAX_ABS_INTENSITY:g}, they cannot be normalised without overflow")
    step = max(1, flat.size // PERCENTILE_SAMPLE)
    low, high = np.percentile(flat[::step].astype(np.float64), [low_percentile, high_percentile])
    if not high > low:
        low, high = float(flat.min()), float(flat.max())
    scale = float(high - low) if high > low else 1.0
    return IntensityMapping(offset=float(low), scale=scale)


def cast_to_dtype(values: np.ndarray, dtype: np.dtype, in_place: bool = False) -> np.ndarray:
    """Cast float `values` to `dtype`: integers are rounded and clipped to the dtype's range,
    floats clipped to the dtype's finite range. `in_place` lets it round and clip in `values`
    itself (a float array the caller no longer needs), saving two temporaries of its size."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        # float64 cannot hold 2**64 - 1 or 2**63 - 1: clip to the largest float below them,
        # or the cast wraps around to 0 / the minimum.
        high = float(info.max)
        if int(high) <= info.max:
            if in_place and values.dtype.kind == "f":
                np.rint(values, out=values)
                np.clip(values, float(info.min), high, out=values)
                return values.astype(dtype)
            return np.clip(np.rint(values), float(info.min), high).astype(dtype)
        rounded = np.rint(values)
        cast = np.clip(rounded, float(info.min), float(np.nextafter(high, -np.inf))).astype(dtype)
        cast[rounded >= high] = info.max  # saturate at the type's maximum, as below it
        return cast
    if np.issubdtype(dtype, np.floating):  # overshoot near the type's limit must not become inf
        info = np.finfo(dtype)
        return np.clip(values, info.min, info.max).astype(dtype)
    return np.asarray(values).astype(dtype)
