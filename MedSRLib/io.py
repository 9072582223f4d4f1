"""Reading and writing volumes with SimpleITK (geometry in LPS, mm).

Reads NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), a DICOM series folder
(GDCM: compressed transfer syntaxes such as JPEG 2000 included) and 2-D images (PNG, JPEG, TIFF,
BMP) as one-slice volumes. Writes NIfTI, NRRD, MetaImage and, for one-slice volumes, PNG.
Every write is atomic: a temporary file beside the target, renamed on success.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import InputError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")

#: Metadata key under which the reader stores the modality (DICOM tag 0008|0060) when known.
MODALITY_KEY = "medsr_modality"


def suffix_of(path: str | os.PathLike) -> str:
    """The format suffix of `path`, lower case, with `.nii.gz` kept whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series in a folder."""

    uid: str
    description: str
    modality: str
    files: tuple[str, ...]


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series in `folder` (not recursive), each with its files in slice order."""
    folder = str(folder)
    reader = sitk.ImageSeriesReader()
    series = []
    for uid in reader.GetGDCMSeriesIDs(folder):
        files = tuple(reader.GetGDCMSeriesFileNames(folder, uid))
        description, modality = "", ""
        header = sitk.ImageFileReader()
        header.SetFileName(files[0])
        try:
            header.ReadImageInformation()
            if header.HasMetaDataKey("0008|103e"):
                description = header.GetMetaData("0008|103e").strip()
            if header.HasMetaDataKey("0008|0060"):
                modality = header.GetMetaData("0008|0060").strip()
        except RuntimeError:
            pass
        series.append(DicomSeries(uid, description, modality, files))
    return series


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    series = list_dicom_series(folder)
    if not series:
        raise InputError(f"{folder}: folder holds no readable DICOM series")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise InputError(f"{folder}: no series with UID {series_uid!r}; series here: "
                             + "; ".join(f"{s.uid} ({s.modality} {s.description}, {len(s.files)} files)"
                                         for s in series))
        entry = chosen[0]
    elif len(series) > 1:
        raise InputError(f"{folder}: folder holds {len(series)} DICOM series; choose one with "
                         "--series UID: " + "; ".join(
                             f"{s.uid} ({s.modality} {s.description}, {len(s.files)} files)"
                             for s in series))
    else:
        entry = series[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(entry.files))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"{folder}: cannot read DICOM series {entry.uid!r}: {_first_line(err)}") from None
    if entry.modality:
        image.SetMetaData(MODALITY_KEY, entry.modality)
    return image


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # ITK messages put the useful sentence last.
    return lines[-1] if lines else type(err).__name__


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a scalar volume as a 3-D SimpleITK image (LPS geometry, mm).

    A folder is read as a DICOM series (`series_uid` picks one of several). A 2-D image becomes
    a one-slice volume of spacing 1 mm along z. InputError for a missing, unreadable, 4-D or
    multi-component (RGB) file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        image = _read_dicom_folder(path, series_uid)
    else:
        check_header_spacing(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            if "spacing" in str(err).lower():
                raise InputError(f"{path}: zero or negative voxel spacing in the header") from None
            raise InputError(f"{path}: cannot read as an image ({_first_line(err)})") from None
        if path.name.lower().endswith(".dcm") or image.HasMetaDataKey("0008|0060"):
            if image.HasMetaDataKey("0008|0060"):
                image.SetMetaData(MODALITY_KEY, image.GetMetaData("0008|0060").strip())
    return as_scalar_volume(image, str(path))


def as_scalar_volume(image: sitk.Image, name: str = "image") -> sitk.Image:
    """`image` as a 3-D scalar volume: 2-D becomes one slice; InputError for 4-D or RGB."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: has {image.GetNumberOfComponentsPerPixel()} components per "
                         "voxel (RGB or vector image); MedSR needs a scalar (grayscale) volume")
    dimension = image.GetDimension()
    if dimension == 2:
        meta = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
        image = sitk.JoinSeries(image)
        for k, v in meta.items():
            image.SetMetaData(k, v)
    elif dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    elif dimension != 3:
        raise InputError(f"{name}: is a {dimension}-D image of size {image.GetSize()}; "
                         "MedSR needs a 2-D image or a 3-D volume")
    return image


def check_header_spacing(path: Path) -> None:
    """InputError when a MetaImage or NIfTI header states a zero or negative voxel spacing.

    Hand-parsed because ITK silently replaces such spacings (NIfTI pixdim from the sform,
    MetaImage by its absolute value), which would hide a broken file.
    """
    suffix = suffix_of(path)
    spacing: list[float] = []
    try:
        if suffix in (".mha", ".mhd"):
            with open(path, "rb") as handle:
                for raw in handle.read(4096).split(b"\n"):
                    key, _, value = raw.decode("latin-1").partition("=")
                    if key.strip() in ("ElementSpacing", "ElementSize"):
                        spacing = [float(v) for v in value.split()]
                        break
        elif suffix in (".nii", ".nii.gz"):
            opener = gzip.open if suffix == ".nii.gz" else open
            with opener(path, "rb") as handle:
                header = handle.read(348)
            if len(header) == 348:
                endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
                ndim = struct.unpack(endian + "h", header[40:42])[0]
                pixdim = struct.unpack(endian + "8f", header[76:108])
                spacing = list(pixdim[1:1 + max(0, min(ndim, 3))])
    except (OSError, ValueError, struct.error, EOFError):
        return  # unreadable headers are reported by the reader itself
    if any(not s > 0 for s in spacing):
        raise InputError(f"{path}: zero or negative voxel spacing {tuple(spacing)} in the header")


def modality_of(image: sitk.Image) -> str | None:
    """"CT", "MR", "XR" (CR/DX) or None, from the DICOM modality the reader stored."""
    if not image.HasMetaDataKey(MODALITY_KEY):
        return None
    value = image.GetMetaData(MODALITY_KEY).upper()
    return {"CR": "XR", "DX": "XR", "RG": "XR"}.get(value, value)


def check_output_path(input_path: str | os.PathLike | None, output_path: str | os.PathLike,
                      overwrite: bool = False) -> Path:
    """Validate an output path before any work: known format, not the input, not existing.

    InputError when the suffix is not writable, the path is the input, or it exists and
    `overwrite` is False.
    """
    output_path = Path(output_path)
    if suffix_of(output_path) not in WRITE_SUFFIXES:
        raise InputError(f"{output_path}: cannot write format {suffix_of(output_path) or '(none)'}; "
                         f"use one of {', '.join(WRITE_SUFFIXES)}")
    if input_path is not None:
        source = Path(input_path)
        same = output_path.resolve() == source.resolve() or (
            output_path.exists() and source.exists() and os.path.samefile(output_path, source))
        inside = source.is_dir() and source.resolve() in output_path.resolve().parents
        if same or inside:
            raise InputError(f"{output_path}: output would overwrite the input {source}")
    if output_path.exists() and not overwrite:
        raise InputError(f"{output_path}: output exists; pass --overwrite to replace it")
    if not output_path.parent.exists():
        raise InputError(f"{output_path}: folder {output_path.parent} does not exist")
    return output_path


def write_volume(image: sitk.Image, path: str | os.PathLike, overwrite: bool = False,
                 compress: bool = True) -> Path:
    """Write `image` atomically to `path` (format from the suffix).

    A one-slice volume may be written as PNG (uint8/uint16; other types are refused). On any
    failure no file is left at `path` and no temporary file stays behind.
    """
    path = Path(path)
    suffix = suffix_of(path)
    if suffix not in WRITE_SUFFIXES:
        raise InputError(f"{path}: cannot write format {suffix or '(none)'}; use one of "
                         f"{', '.join(WRITE_SUFFIXES)}")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: output exists; pass --overwrite to replace it")
    if suffix == ".png":
        image = _as_png_image(image, path)
    return _write_atomically(path, lambda temp_name: sitk.WriteImage(
        image, temp_name, compress and suffix != ".png"))


def write_text(text: str, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `text` atomically to `path` (refusing an existing file unless `overwrite`)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists; pass --overwrite to replace it")
    return _write_atomically(path, lambda temp_name: Path(temp_name).write_text(text))


def _write_atomically(path: Path, write: Callable[[str], object]) -> Path:
    """Run `write(temporary name)` on a temporary file beside `path`, then rename it to `path`;
    on any failure (or cancel) the temporary file is removed and `path` is untouched."""
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.",
                                             suffix=f".part{suffix_of(path)}", dir=path.parent)
    os.close(descriptor)
    try:
        write(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def _as_png_image(image: sitk.Image, path: Path) -> sitk.Image:
    if image.GetDimension() == 3:
        if image.GetSize()[2] != 1:
            raise InputError(f"{path}: PNG holds one slice; this volume has {image.GetSize()[2]}")
        image = image[:, :, 0]
    if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16):
        raise InputError(f"{path}: PNG needs 8- or 16-bit unsigned voxels, not "
                         f"{image.GetPixelIDTypeAsString()}; write .nrrd/.mha/.nii.gz instead")
    return image


def image_array(image: sitk.Image) -> np.ndarray:
    """A read-only view of the voxels, shape (K, J, I) = (z, y, x)."""
    return sitk.GetArrayViewFromImage(image)
