"""Reading and writing volumes with SimpleITK (geometry in LPS, mm).

Reads NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), a DICOM series folder
(GDCM: compressed transfer syntaxes such as JPEG 2000 included) and 2-D images (PNG, JPEG, TIFF,
BMP) as one-slice volumes. Writes NIfTI, NRRD, MetaImage and, for one-slice volumes, PNG.
Reading checks the file against its header first (`file_integrity`: complete payload, NaN/Inf
in NIfTI, header spacings) and refuses a volume larger than the memory available before
allocating it. Every write is atomic and verified (`safe_write`): a temporary file beside the
target, checked complete, renamed on success.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from . import file_integrity
from ..transforms import geometry
from ..runtime import memory_budget
from ..errors import InputError
from .file_integrity import first_line as _first_line
from .safe_write import Staged, WriteError, check_writable_folder, write_all

__all__ = ["read_volume", "write_volume", "write_text", "stage_volume", "stage_text", "write_all",
           "check_output_path", "check_output_folder", "check_side_file", "image_array",
           "list_dicom_series", "is_dicom_file", "modality_of", "as_scalar_volume", "WriteError"]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")

#: Metadata key under which the reader stores the modality (DICOM tag 0008|0060) when known.
MODALITY_KEY = "medsr_modality"
#: DICOM SliceThickness (mm) of a series read from a folder, kept for through-plane SR.
SLICE_THICKNESS_KEY = "medsr_dicom_slice_thickness"


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
    from .dicom_checks import check_series_files
    check_series_files(folder, entry.files, entry.uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(entry.files))
    header = file_integrity.read_header_info(entry.files[0])
    memory_budget.check_fits(header.payload_bytes * len(entry.files),
                             f"{folder}: reading DICOM series {entry.uid!r}")
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"{folder}: cannot read DICOM series {entry.uid!r}: {_first_line(err)}") from None
    if entry.modality:
        image.SetMetaData(MODALITY_KEY, entry.modality)
    thickness = _dicom_slice_thickness(entry.files[0])
    if thickness is not None:  # through-plane SR reads it (through_plane/planning.py)
        image.SetMetaData(SLICE_THICKNESS_KEY, repr(thickness))
    return image


def _dicom_slice_thickness(path: str) -> float | None:
    """SliceThickness (0018,0050) of one DICOM file in mm, or None when absent or unusable."""
    header = sitk.ImageFileReader()
    header.SetFileName(path)
    try:
        header.ReadImageInformation()
        value = float(header.GetMetaData("0018|0050").strip()) if header.HasMetaDataKey("0018|0050") else None
    except (RuntimeError, ValueError):
        return None
    return value if value is not None and 0 < value < 1e6 else None


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a scalar volume as a 3-D SimpleITK image (LPS geometry, mm), voxels as stored.

    A folder is read as a DICOM series (`series_uid` picks one of several). A 2-D image becomes
    a one-slice volume of spacing 1 mm along z. InputError for a missing, unreadable, truncated,
    non-regular (FIFO, device) or too-large file, a 4-D, multi-component (RGB) or complex image,
    NaN or infinite voxels, and a zero, negative, NaN or infinite spacing in the header.
    An http(s) DICOMweb series URL is retrieved with WADO-RS into a temporary folder and read
    like a DICOM folder (`MedSRLib.pacs`).
    """
    if isinstance(path, str) and path.lower().startswith(("http://", "https://")):
        from ..pacs.dicomweb import check_series_request, fetched_series
        check_series_request(path, series_uid)
        with fetched_series(path) as folder:
            return read_volume(folder)
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        image = _read_dicom_folder(path, series_uid)
    else:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{path}: not a regular file (a FIFO, device or socket); MedSR reads "
                             "image files and DICOM folders")
        if path.stat().st_size == 0:
            raise InputError(f"{path}: file is empty")
        file_integrity.check_header_spacing(path)
        info = file_integrity.read_header_info(path)
        _check_voxel_kind(info.pixel_type, info.components, str(path))
        memory_budget.check_fits(info.payload_bytes, f"{path}: its {info.size} voxels of "
                                 f"{info.pixel_type}")
        file_integrity.check_payload(path, info)
        if is_dicom_file(path):
            from .dicom_checks import check_dicom_file
            check_dicom_file(path)  # an impossible rescale (slope 0, NaN) is refused
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise InputError(f"{path}: cannot read as an image ({_first_line(err)})") from None
        except MemoryError:
            raise InputError(f"{path}: out of memory while reading it") from None
        if path.name.lower().endswith(".dcm") or image.HasMetaDataKey("0008|0060"):
            if image.HasMetaDataKey("0008|0060"):
                image.SetMetaData(MODALITY_KEY, image.GetMetaData("0008|0060").strip())
    image = as_scalar_volume(image, str(path))
    geometry.check_grid(image, str(path))
    _check_finite_voxels(image, str(path))
    return image


def _check_voxel_kind(pixel_type: str, components: int, name: str) -> None:
    if pixel_type.startswith("complex"):
        raise InputError(f"{name}: has complex voxels ({pixel_type}); MedSR needs real-valued "
                         "intensities (take the magnitude first)")
    if components != 1 and not pixel_type.startswith("complex"):
        raise InputError(f"{name}: has {components} components per voxel (RGB or vector "
                         "image); MedSR needs a scalar (grayscale) volume")


def _check_finite_voxels(image: sitk.Image, name: str) -> None:
    voxels = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(voxels.dtype, np.floating):
        bad = voxels.size - int(np.count_nonzero(np.isfinite(voxels)))
        if bad:
            raise InputError(f"{name}: holds {bad} NaN or infinite voxel(s); clean the input first")


def as_scalar_volume(image: sitk.Image, name: str = "image") -> sitk.Image:
    """`image` as a 3-D scalar volume: 2-D becomes one slice; InputError for 4-D, RGB, complex
    or label-map images."""
    pixel_type = image.GetPixelIDTypeAsString()
    if pixel_type.startswith("label"):
        raise InputError(f"{name}: is a run-length label map ({pixel_type}); MedSR needs a "
                         "scalar volume")
    _check_voxel_kind(pixel_type, image.GetNumberOfComponentsPerPixel(), name)
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


def modality_of(image: sitk.Image) -> str | None:
    """"CT", "MR", "XR" (CR/DX) or None, from the DICOM modality the reader stored."""
    if not image.HasMetaDataKey(MODALITY_KEY):
        return None
    value = image.GetMetaData(MODALITY_KEY).upper()
    return {"CR": "XR", "DX": "XR", "RG": "XR"}.get(value, value)


def check_output_path(input_path: str | os.PathLike | None, output_path: str | os.PathLike,
                      overwrite: bool = False,
                      other_inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """Validate an output path before any work: known format, not the input, not a folder, not
    existing (unless `overwrite`), in a folder where a file can be created.

    InputError naming the path and the problem otherwise.
    """
    output_path = Path(output_path)
    if suffix_of(output_path) not in WRITE_SUFFIXES:
        raise InputError(f"{output_path}: cannot write format {suffix_of(output_path) or '(none)'}; "
                         f"use one of {', '.join(WRITE_SUFFIXES)}")
    if input_path is not None:
        _refuse_same_file(output_path, Path(input_path), "output would overwrite the input")
    for role, other in (other_inputs or {}).items():  # e.g. the ROI mask
        if other is not None:
            _refuse_same_file(output_path, Path(other), f"output would overwrite the {role}")
    if output_path.is_dir():
        raise InputError(f"{output_path}: is a folder; give a file name for the output")
    if output_path.exists() and not overwrite:
        raise InputError(f"{output_path}: output exists; pass --overwrite to replace it")
    check_writable_folder(output_path)
    return output_path


def check_output_folder(input_path: str | os.PathLike | None, output_folder: str | os.PathLike,
                        overwrite: bool = False,
                        other_inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """Validate an output *folder* (a DICOM series) before any work: not a file name, not the
    input (or any of `other_inputs`), not inside one and not holding one, absent or empty
    unless `overwrite` (and then holding one series MedSR wrote, nothing else: no subfolders,
    no other files, no series of a scanner or another program), its parent folder writable.
    InputError naming the folder and the problem otherwise."""
    folder = Path(output_folder)
    if suffix_of(folder) in VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES:
        raise InputError(f"{folder}: a DICOM series is written into a folder; give a folder "
                         f"path, not a {suffix_of(folder)} file name")
    for role, other in {"input": input_path, **(other_inputs or {})}.items():
        if other is None:
            continue
        _refuse_same_file(folder, Path(other), f"output folder would be the {role} or inside it:")
        if folder.resolve() in Path(other).resolve().parents:
            raise InputError(f"{folder}: output folder holds the {role} {other}")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; a DICOM series is written "
                         "into a folder")
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        raise InputError(f"{folder}: output folder is not empty ({len(entries)} entries); pass "
                         "--overwrite to replace it")
    for entry in entries:
        if not (entry.is_file() and not entry.is_symlink() and is_dicom_file(entry)):
            raise InputError(f"{folder}: refusing to replace a folder holding {entry.name!r}, "
                             "which is not a DICOM file; choose another output folder")
    if entries:
        _check_medsr_series(folder, entries)
    check_writable_folder(folder)
    return folder


#: What every file of a series MedSR wrote says of itself (dicom_export sets these).
MEDSR_MANUFACTURER = "MedSR"
MEDSR_DERIVATION_PREFIX = "Super-resolution by MedSR"


def _check_medsr_series(folder: Path, files: list[Path]) -> None:
    """InputError unless `files` are one derived series MedSR wrote: every file says so in
    Manufacturer ("MedSR"), ImageType (DERIVED) and DerivationDescription, all with one
    SeriesInstanceUID. `--overwrite` must never delete a scanner's or another program's series."""
    import pydicom

    series = set()
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            manufacturer = str(header.get("Manufacturer", "") or "").strip()
            derivation = str(header.get("DerivationDescription", "") or "")
            value = header.get("ImageType") or []
            image_type = [str(v).upper() for v in ([value] if isinstance(value, str) else value)]
            series.add(str(header.get("SeriesInstanceUID", "") or ""))
        except Exception as err:  # pydicom raises many types on damaged files
            raise InputError(f"{folder}: --overwrite replaces only a DICOM series MedSR wrote; "
                             f"{path.name} cannot be read ({type(err).__name__}), so refusing "
                             "to delete the folder; choose another output folder") from None
        if (manufacturer != MEDSR_MANUFACTURER or "DERIVED" not in image_type
                or not derivation.startswith(MEDSR_DERIVATION_PREFIX)):
            raise InputError(
                f"{folder}: --overwrite replaces only a DICOM series MedSR wrote; {path.name} is "
                f"not one (Manufacturer {manufacturer or '(none)'!r}, no MedSR "
                "DerivationDescription): refusing to delete another series; choose another "
                "output folder")
    if len(series) > 1:
        raise InputError(f"{folder}: --overwrite replaces one DICOM series MedSR wrote; the folder "
                         f"holds {len(series)} series; choose another output folder")


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when `path` is a file with the DICOM preamble ("DICM" at byte 128)."""
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def check_side_file(path: str | os.PathLike, protected: dict[str, str | os.PathLike | None],
                    overwrite: bool = False, option: str = "side file") -> Path:
    """Validate a side output (e.g. --roi-json) before any work: not any of the `protected` paths
    (role -> path: the input, the output, ...), not a folder, not existing unless `overwrite`,
    in a writable folder. InputError naming `option` and the clash otherwise."""
    path = Path(path)
    for role, other in protected.items():
        if other is not None:
            _refuse_same_file(path, Path(other), f"{option} would overwrite the {role}")
    if path.is_dir():
        raise InputError(f"{path}: {option} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists; pass --overwrite to replace it")
    check_writable_folder(path)
    return path


def _refuse_same_file(path: Path, other: Path, message: str) -> None:
    same = path.resolve() == other.resolve() or (
        path.exists() and other.exists() and os.path.samefile(path, other))
    inside = other.is_dir() and other.resolve() in path.resolve().parents
    if same or inside:
        raise InputError(f"{path}: {message} {other}")


def stage_volume(image: sitk.Image, path: str | os.PathLike, overwrite: bool = False,
                 compress: bool = True) -> Staged:
    """An output volume ready to be written by `write_all` (format from the suffix)."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix not in WRITE_SUFFIXES:
        raise InputError(f"{path}: cannot write format {suffix or '(none)'}; use one of "
                         f"{', '.join(WRITE_SUFFIXES)}")
    geometry.check_grid(image, f"{path}: the volume to write")
    if suffix in (".nii", ".nii.gz") and not geometry.is_orthogonal(image):
        raise InputError(f"{path}: NIfTI cannot store this volume's sheared (non-orthogonal) "
                         "grid (SimpleITK would straighten it and move every voxel); write "
                         ".nrrd or .mha")
    if suffix == ".png":
        image = _as_png_image(image, path)
    expected = (tuple(image.GetSize()), image.GetPixelID())

    def verify(temp_name: str) -> None:
        info = file_integrity.read_header_info(temp_name)
        if suffix != ".png":
            file_integrity.check_payload(temp_name, info)
        elif (info.size, info.pixel_id) != expected:
            raise InputError(f"{temp_name}: PNG reads back as {info.size}, not {expected[0]}")

    return Staged(path, suffix, lambda temp_name: sitk.WriteImage(
        image, temp_name, compress and suffix != ".png"), verify, overwrite)


def stage_text(text: str, path: str | os.PathLike, overwrite: bool = False) -> Staged:
    """A text side output (JSON report, ...) ready to be written by `write_all`."""
    data = text.encode("utf-8")

    def verify(temp_name: str) -> None:
        if Path(temp_name).read_bytes() != data:
            raise InputError(f"{temp_name}: text reads back different from what was written")

    return Staged(Path(path), Path(path).suffix, lambda temp_name: Path(temp_name).write_bytes(data),
                  verify, overwrite)


def write_volume(image: sitk.Image, path: str | os.PathLike, overwrite: bool = False,
                 compress: bool = True) -> Path:
    """Write `image` atomically to `path` (format from the suffix), checked complete on disk.

    A one-slice volume may be written as PNG (uint8/uint16; other types are refused). On any
    failure (WriteError on a full disk) no file is left at `path`, an existing file there is
    untouched, and no temporary file stays behind.
    """
    return write_all([stage_volume(image, path, overwrite, compress)])[0]


def write_text(text: str, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `text` atomically to `path` (refusing an existing file unless `overwrite`)."""
    return write_all([stage_text(text, path, overwrite)])[0]


def _as_png_image(image: sitk.Image, path: Path) -> sitk.Image:
    if image.GetDimension() == 3:
        if image.GetSize()[2] != 1:
            raise InputError(f"{path}: PNG holds one slice; this volume has {image.GetSize()[2]}")
        image = image[:, :, 0]
    if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16):
        raise InputError(f"{path}: PNG needs 8- or 16-bit unsigned voxels, not "
                         f"{image.GetPixelIDTypeAsString()}; write .nrrd/.mha/.nii.gz instead")
    return image


class _ImageBuffer:
    """Keeps a SimpleITK image alive for as long as a numpy view of its buffer exists."""

    def __init__(self, image: sitk.Image, writable: bool = False):
        self.image = image
        interface = dict(sitk.GetArrayViewFromImage(image).__array_interface__)  # after MakeUnique
        if writable:  # SimpleITK offers read-only views only; the buffer itself is the image's own
            interface["data"] = (interface["data"][0], False)
        self.__array_interface__ = interface


def image_array(image: sitk.Image) -> np.ndarray:
    """A read-only view of the voxels, shape (K, J, I) = (z, y, x); the view keeps `image`
    alive, so `image_array(read_volume(p))` is safe."""
    view = np.asarray(_ImageBuffer(image))
    view.flags.writeable = False
    return view


def new_volume(size_xyz: Sequence[int], dtype: np.dtype) -> tuple[sitk.Image, np.ndarray]:
    """A zero-filled scalar image of `size_xyz` voxels and `dtype`, with a writable (K, J, I)
    numpy view of its own buffer: results written there need no second full-size copy
    (`sitk.GetImageFromArray` would hold the array and the image at once). The view keeps the
    image alive; write the voxels before handing the image on."""
    image = sitk.Image([int(n) for n in size_xyz], sitk.GetImageFromArray(np.zeros((1, 1), dtype)).GetPixelID())
    return image, np.asarray(_ImageBuffer(image, writable=True))
