"""The benchmark's result types and their means (shared by the runner and the report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Unit-intensity threshold of foreground pixels (the training default `foreground_threshold`).
FOREGROUND_THRESHOLD = 0.1

#: Column-name suffix of a model run with the baseline weights (`--baseline-weights-dir`).
BASELINE_SUFFIX = " (baseline)"


@dataclass
class BenchmarkSlice:
    """One evaluated 2-D HR image in unit intensities."""

    label: str                 # row name: "<volume label> z=<index>" (or the label for 2-D)
    volume: str                # input path
    hr_unit: np.ndarray        # (H, W) float32
    neighbours_unit: np.ndarray | None = None  # (MAX_CONTEXT_SLICES + 1, H, W), hr_unit in the middle


@dataclass
class ScaleResult:
    scale: int
    factors: tuple[int, int]
    methods: list[str]                                  # column names, bicubic first
    scores: dict[str, dict[str, dict[str, float]]]      # image -> method -> "psnr_whole" -> value
    seconds_per_slice: dict[str, float]
    notes: list[str] = field(default_factory=list)
    figure: dict[str, Any] | None = None                # image label, HR and SR slices
    figure_path: Path | None = None                     # set by the report writer
    figure_info: dict[str, Any] | None = None


def mean_scores(result: ScaleResult) -> dict[str, dict[str, float]]:
    """method -> metric -> mean over the images that have it (NaN if none)."""
    means: dict[str, dict[str, float]] = {}
    for method in result.methods:
        keys = sorted({k for image in result.scores.values() for k in image[method]})
        means[method] = {k: float(np.mean([image[method][k] for image in result.scores.values()
                                           if k in image[method]])) for k in keys}
    return means


def image_label(volume: str, z: int | None) -> str:
    """The row name of an image: "<volume label> z=<index>", or the volume label alone for a
    2-D image (z None)."""
    return volume if z is None else f"{volume} z={z}"


def volume_of(image: str) -> str:
    """The volume label of an image row (the inverse of `image_label`'s volume part)."""
    return image.rsplit(" z=", 1)[0]


def steps_over_baseline(result: ScaleResult, region: str = "whole") -> dict[str, dict[str, Any]]:
    """method -> {"mean": mean PSNR step (dB) over the same model with the baseline weights,
    "per_volume": {volume label: mean step over its images}}, for every method that has a
    "<method> (baseline)" column; a volume's step is the mean of its images' steps."""
    key = f"psnr_{region}"
    steps: dict[str, dict[str, Any]] = {}
    for method in result.methods:
        baseline = method + BASELINE_SUFFIX
        if baseline not in result.methods:
            continue
        by_volume: dict[str, list[float]] = {}
        for image, by_method in result.scores.items():
            if key in by_method[method] and key in by_method[baseline]:
                by_volume.setdefault(volume_of(image), []).append(
                    by_method[method][key] - by_method[baseline][key])
        if by_volume:
            every = [d for ds in by_volume.values() for d in ds]
            steps[method] = {"mean": float(np.mean(every)),
                             "per_volume": {v: float(np.mean(ds)) for v, ds in by_volume.items()}}
    return steps
