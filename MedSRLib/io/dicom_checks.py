"""Checks that a DICOM series' files describe one evenly sampled volume (issue 14).

SimpleITK/GDCM builds a volume from whatever files it could parse and only warns about bad
geometry: a truncated file is dropped (a gap in the volume), a file without
ImagePositionPatient or a duplicated slice position gives a wrong spacing or a flipped axis,
and files of another orientation or with short pixel data are read as if nothing were wrong;
an impossible rescale (RescaleSlope 0 is read as 1; NaN or infinite slope or intercept) gives
voxels that mean nothing. `check_series_files` finds these defects in the files' headers
(pydicom) before the read; `check_dicom_file` checks one file's rescale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ImplicitVRLittleEndian, MediaStorageDirectoryStorage

from ..errors import InputError

#: Slice gaps that differ from the median gap by more than this relative part (plus
#: `GAP_TOLERANCE_MM`) are uneven; smaller differences are float jitter of real series.
GAP_TOLERANCE_RELATIVE = 1e-2
GAP_TOLERANCE_MM = 1e-3
#: Largest difference of an ImageOrientationPatient direction cosine that counts as the same
#: orientation (about 0.06 degrees).
ORIENTATION_TOLERANCE = 1e-3

_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, Float-, DoubleFloatPixelData
_DEFER_BYTES = 1024  # larger values (pixel data, private blobs) are skipped, not read
_MAX_PROBLEMS, _MAX_NAMES = 5, 3


def check_series_files(folder: str | os.PathLike, files: Sequence[str], series_uid: str) -> None:
    """InputError when the files of one DICOM series would not make a correctly sampled volume.

    `files` is GDCM's sorted file list for `series_uid` in `folder`
    (`sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid)`). Returns None when
    every check passes; otherwise raises one InputError whose message names `folder`, the
    offending file name(s) and each problem found (at most five):

    - a file whose RescaleSlope is 0, NaN, infinite or not a number, or whose
      RescaleIntercept is NaN, infinite or not a number (`rescale_problem`);
    - a listed file pydicom cannot parse, or one whose pixel data is shorter than
      Rows x Columns x SamplesPerPixel x BitsAllocated/8 x NumberOfFrames bytes (checked for
      uncompressed transfer syntaxes only);
    - a file directly in `folder` (non-hidden, not recursive) that starts like DICOM ("DICM"
      at byte 128) and carries `series_uid` but is not in `files`, i.e. the reader dropped it;
    - for a series of two or more single-frame files: a file without ImagePositionPatient or
      ImageOrientationPatient, files of different orientations, two files at the same slice
      position, slice positions (projected on the slice normal) not evenly spaced within
      1e-2 of the median gap + 1e-3 mm, and a file order that is not the slice order.

    A single-file series and a series with a multi-frame (enhanced) file skip the geometry
    checks. Only headers are parsed (uncompressed pixel data is not read): about 2 ms per file.
    """
    folder = Path(folder)
    headers: dict[str, Dataset] = {}
    problems: list[str] = []
    for path in files:
        header, problem = _read_header(path, force=True)  # GDCM also reads files without preamble
        if problem:
            problems.append(f"{Path(path).name} {problem}")
        if header is not None:
            headers[path] = header
            problem = rescale_problem(header)
            if problem:
                problems.append(f"{Path(path).name} {problem}")
    problems += _files_left_out(folder, files, series_uid)
    frames = [_int(h.get("NumberOfFrames"), 1) for h in headers.values()]
    if len(files) >= 2 and max(frames, default=1) == 1:
        problems += _geometry_problems([p for p in files if p in headers], headers)
    if problems:
        shown = problems[:_MAX_PROBLEMS]
        more = len(problems) - len(shown)
        raise InputError(f"{folder}: " + "; ".join(shown)
                         + (f"; and {more} more problem{'s' * (more > 1)}" if more else ""))


def check_dicom_file(path: str | os.PathLike) -> None:
    """InputError naming `path` when its rescale is impossible (`rescale_problem`) or its
    header cannot be parsed; None otherwise. Only the header is parsed."""
    header, problem = _read_header(str(path), force=True)
    problem = problem if header is None else rescale_problem(header)
    if problem:
        raise InputError(f"{path}: {problem}")


def rescale_problem(header: Dataset) -> str | None:
    """What makes the file's Modality LUT rescale impossible, or None.

    RescaleSlope must be a finite number other than 0 (GDCM reads 0 as 1, so every voxel would
    be off), RescaleIntercept a finite number; absent values (slope 1, intercept 0) are fine.
    """
    for keyword, zero_allowed in (("RescaleSlope", False), ("RescaleIntercept", True)):
        if keyword not in header:
            continue
        try:
            raw = header.get(keyword)
            if raw in (None, ""):
                continue
            value = float(raw)
        except Exception:  # pydicom raises several types on a malformed decimal string
            element = header.data_element(keyword)
            shown = element.value if element is not None else "?"
            return f"has a {keyword} that is not a number ({shown!r}): its voxels cannot be read"
        if not np.isfinite(value):
            return f"has {keyword} {value}: its voxels cannot be read as numbers"
        if value == 0 and not zero_allowed:
            return ("has RescaleSlope 0: every voxel would be the intercept (the DICOM reader "
                    "would silently use 1); the file's rescale is impossible")
    return None


def _read_header(path: str, force: bool) -> tuple[Dataset | None, str | None]:
    """The header of `path` (large values left unread) and what is wrong with its pixel data."""
    try:
        with open(path, "rb") as handle:
            size_bytes = os.fstat(handle.fileno()).st_size
            header = pydicom.dcmread(handle, defer_size=_DEFER_BYTES, force=force)
    except Exception as err:  # pydicom raises many types on damaged files; all mean "unreadable"
        return None, f"is truncated or unreadable: {type(err).__name__}: {err}"
    return header, _pixel_data_problem(header, size_bytes)


def _pixel_data_problem(header: Dataset, size_bytes: int) -> str | None:
    """Pixel data shorter than the image size needs; None if complete or compressed."""
    meta = getattr(header, "file_meta", None) or {}
    syntax = UID(str(meta.get("TransferSyntaxUID") or ImplicitVRLittleEndian))  # DICOM default
    if syntax.is_encapsulated or syntax.is_deflated:
        return None  # compressed: the stored length says nothing about the image size
    rows, columns = _int(header.get("Rows"), 0), _int(header.get("Columns"), 0)
    bits = _int(header.get("BitsAllocated"), 0)
    if not (rows and columns and bits):
        return "is truncated or not an image: Rows, Columns or BitsAllocated missing"
    samples = _int(header.get("SamplesPerPixel"), 1)
    frames = _int(header.get("NumberOfFrames"), 1)
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if str(header.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        expected = expected * 2 // 3  # chroma subsampled: 2 samples per pixel stored, not 3
    element = next((header.get_item(tag, keep_deferred=True)
                    for tag in _PIXEL_DATA_TAGS if tag in header), None)
    if element is None:
        held = 0
    elif element.value is not None:
        held = len(element.value)
    elif element.length == 0xFFFFFFFF:
        return None  # undefined length in a native syntax: malformed, left to the reader
    else:
        # A deferred value was not read: the file end bounds what it really holds.
        held = max(0, min(element.length, size_bytes - element.value_tell))
    if held < expected:
        return f"is truncated or unreadable: pixel data holds {held} of {expected} bytes"
    return None


def _files_left_out(folder: Path, files: Sequence[str], series_uid: str) -> list[str]:
    """DICOM files directly in `folder` that carry `series_uid` but are not in `files`."""
    listed = {os.path.normcase(os.path.abspath(p)) for p in files}
    problems = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if os.path.normcase(os.path.abspath(entry.path)) in listed:
            continue
        try:
            with open(entry.path, "rb") as handle:
                if handle.read(132)[128:] != b"DICM":
                    continue
        except OSError:
            continue
        header, problem = _read_header(entry.path, force=False)
        if header is None or str(header.get("SeriesInstanceUID", "")).strip() != series_uid:
            continue  # another series, a DICOMDIR, or too damaged to tell its series
        if header.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
            continue  # a DICOMDIR index, not an image
        problems.append(f"{entry.name} " + (problem or "carries this series' SeriesInstanceUID")
                        + " and the DICOM reader left it out of the series")
    return problems


def _geometry_problems(paths: list[str], headers: dict[str, Dataset]) -> list[str]:
    """Missing or inconsistent orientation/position, duplicated, uneven or unordered slices."""
    if len(paths) < 2:
        return []
    names = {p: Path(p).name for p in paths}
    no_position = [p for p in paths if _vector(headers[p].get("ImagePositionPatient"), 3) is None]
    orientations = {p: _orientation(headers[p].get("ImageOrientationPatient")) for p in paths}
    no_orientation = [p for p in paths if orientations[p] is None]
    problems = []
    if no_position:
        problems.append(f"{_names(names[p] for p in no_position)} "
                        f"{_has(no_position)} no ImagePositionPatient: slice geometry unknown")
    if no_orientation:
        problems.append(f"{_names(names[p] for p in no_orientation)} {_has(no_orientation)} "
                        "no valid ImageOrientationPatient: slice orientation unknown")
    if problems:
        return problems

    # Group by orientation; the largest group is the series' own, the others are the odd files.
    groups: list[list[str]] = []
    for p in paths:
        group = next((g for g in groups if np.max(np.abs(orientations[g[0]] - orientations[p]))
                      <= ORIENTATION_TOLERANCE), None)
        if group is None:
            groups.append([p])
        else:
            group.append(p)
    groups.sort(key=len, reverse=True)
    if len(groups) > 1:
        odd = [p for g in groups[1:] for p in g]
        return [f"{_names(names[p] for p in odd)} {_has(odd)} ImageOrientationPatient "
                f"{_cosines(orientations[odd[0]])} unlike the other {len(groups[0])} files "
                f"{_cosines(orientations[groups[0][0]])}: slices of different orientations "
                "in one series"]

    row, column = orientations[paths[0]][:3], orientations[paths[0]][3:]
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)  # positions in mm even if the cosines are not unit length
    positions = np.array([_vector(headers[p].get("ImagePositionPatient"), 3) @ normal
                          for p in paths])
    order = np.argsort(positions, kind="stable")
    gaps = np.diff(positions[order])
    median = float(np.median(gaps))
    tolerance = GAP_TOLERANCE_RELATIVE * median + GAP_TOLERANCE_MM
    pairs = [(paths[order[i]], paths[order[i + 1]]) for i in range(len(gaps))]

    duplicated = [i for i, gap in enumerate(gaps) if gap <= tolerance]
    if duplicated:
        a, b = pairs[duplicated[0]]
        more = len(duplicated) - 1
        return [f"{names[a]} and {names[b]} are at the same slice position (duplicated slice)"
                + (f"; so are {more} more pair{'s' * (more > 1)} of files" if more else "")]
    uneven = [i for i, gap in enumerate(gaps) if abs(gap - median) > tolerance]
    if uneven:
        first = uneven[0]
        a, b = pairs[first]
        more = len(uneven) - 1
        return [f"slice positions are not evenly spaced: {_mm(gaps[first])} mm between "
                f"{names[a]} and {names[b]}"
                + (f" and {more} more uneven gap{'s' * (more > 1)}" if more else "")
                + f", {_mm(median)} mm elsewhere"
                + (" (a slice is missing?)" if gaps[first] > 1.5 * median else "")]
    # ITK stacks the files in list order: any order but the slice order scrambles the volume.
    steps = np.diff(positions)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        i = int(np.flatnonzero(np.sign(steps) != np.sign(steps[0]))[0])
        return [f"the reader's file order is not the slice order: {names[paths[i + 1]]} follows "
                f"{names[paths[i]]} but is not the next slice"]
    return []


def _orientation(value) -> np.ndarray | None:
    """Row and column direction cosines (6 values), or None when absent or degenerate."""
    cosines = _vector(value, 6)
    # Non-unit or parallel directions have no usable slice normal.
    if cosines is None or np.linalg.norm(np.cross(cosines[:3], cosines[3:])) < 0.5:
        return None
    return cosines


def _vector(value, length: int) -> np.ndarray | None:
    """`value` (a DICOM multi-value) as `length` finite floats, or None."""
    try:
        vector = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return vector if vector.shape == (length,) and np.all(np.isfinite(vector)) else None


def _int(value, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _names(names: Iterable[str]) -> str:
    names = list(names)
    if len(names) <= _MAX_NAMES:
        return ", ".join(names)
    return ", ".join(names[:_MAX_NAMES]) + f" and {len(names) - _MAX_NAMES} more files"


def _has(paths: Sequence[str]) -> str:
    return "has" if len(paths) == 1 else "have"


def _cosines(cosines: np.ndarray) -> str:
    return "(" + ", ".join(f"{c:.4g}" for c in cosines) + ")"


def _mm(value: float) -> str:
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text
