"""A super-resolved volume as a derived DICOM series of the source's study (back to the PACS).

`write_dicom_series(image, source, folder)` writes one file per output slice: classic
single-frame images of the source's storage class (CT Image Storage, MR Image Storage),
uncompressed Explicit VR Little Endian, so that every PACS and viewer takes them.

Identity: patient, study and frame of reference are the source's; every public attribute of the
source slice nearest to an output slice is copied (acquisition attributes such as KVP or echo
time stay true of the data), its private tags are not, and what a derived series requires is
set: new SeriesInstanceUID and SOPInstanceUIDs (`UID_ROOT`; derived from the source series,
model, weights, scale and MedSR version: a repeated run gives the same UIDs), SeriesNumber
(source + 1000), SeriesDescription "<source description> MedSR x<factors x,y,z> <model>", ImageType
DERIVED\\SECONDARY, DerivationDescription and DerivationCodeSequence (model, weights file,
scale), SourceImageSequence (the source slices each output slice lies on or between) and
ReferencedSeriesSequence (the whole source series), Series/Content/InstanceCreation date and
time of the run, and General Equipment saying MedSR and its version.

Geometry comes from the image (LPS, like DICOM patient coordinates): ImagePositionPatient of
every slice, ImageOrientationPatient, PixelSpacing, SpacingBetweenSlices, SliceThickness (the
source's divided by the through-plane factor; a template's: the slice spacing), SliceLocation
(on the source's scale). Voxels
(in the source's units, e.g. HU) go back to the source's stored representation:
stored = round((value - RescaleIntercept) / RescaleSlope), clipped to BitsStored and
PixelRepresentation; window centre/width are carried over. Fractional through-plane factors
(e.g. x1,1,2.5) are written too: a DICOM series only needs the new slice spacing.

Grey scale: the series is always written MONOCHROME2. The reader (`io.read_volume`, GDCM) gives
a MONOCHROME1 source's voxels as their MONOCHROME2 equivalents (stored value inverted within the
range BitsStored allows, then rescaled), so the values written are those, and the source's
window centre is inverted the same way (`_window_as_monochrome2`): the derived series displays
with the source's grey values in every viewer.

The files are written into a hidden temporary folder beside the target, each read back with
pydicom, and the folder is then renamed onto the target; an existing target is replaced (only
with `overwrite`) after the new series is complete. A failure or cancel leaves no partial series.
"""

from __future__ import annotations

import copy
import datetime
import errno
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (PYDICOM_ROOT_UID, CTImageStorage, ExplicitVRLittleEndian,
                         MRImageStorage, generate_uid)
from pydicom.valuerep import format_number_as_ds

from . import volumes as io
from ..errors import InputError
from .safe_write import (TEMP_MARK, WriteError, current_umask, describe_write_failure,
                         fsync_folder, pid_alive, signals_deferred)

__all__ = ["write_dicom_series", "load_source", "DicomSource", "UID_ROOT",
           "SERIES_NUMBER_OFFSET", "STORAGE_CLASSES"]

log = logging.getLogger(__name__)

#: Root of the UIDs MedSR creates: pydicom's registered root, which pydicom offers to the
#: applications built on it. Pass `uid_root` (your organisation's root ending in ".") to use
#: your own, or None for UUID-derived "2.25." UIDs, which need no registration.
UID_ROOT = PYDICOM_ROOT_UID
#: The derived series' SeriesNumber is the source's plus this (1000 without one).
SERIES_NUMBER_OFFSET = 1000
#: Storage classes written (the source's class is kept): classic single-frame CT and MR.
STORAGE_CLASSES = {CTImageStorage: "CT Image Storage", MRImageStorage: "MR Image Storage"}
_STORAGE_OF_MODALITY = {"CT": CTImageStorage, "MR": MRImageStorage}

#: DCM codes: derivation "Spatial resampling" (CID 7203), purpose of reference "Source image
#: for image processing operation" (CID 7202).
_DERIVATION_CODE = ("113085", "DCM", "Spatial resampling")
_PURPOSE_CODE = ("121322", "DCM", "Source image for image processing operation")

# Attributes of the source slice that are not true of a derived slice (or are set anew).
_DROPPED = (
    0x00080014,  # Instance Creator UID (the source's creator)
    0x00081010, 0x00181000, 0x00181002, 0x00181008, 0x00181050,  # station, device serial/UID,
    0x00181200, 0x00181201,  # gantry ID, spatial resolution, last calibration date/time
    0x00082112, 0x00082111, 0x00089215, 0x00420013,  # source images, derivation, source instances
    0x00081115,  # Referenced Series Sequence (the source's own references)
    0x00201002, 0x00209057,  # Images in Acquisition, In-Stack Position Number
    0x00280006, 0x00280034,  # Planar Configuration, Pixel Aspect Ratio
    0x00280106, 0x00280107, 0x00280108, 0x00280109,  # smallest/largest pixel values
    0x00287FE0, 0x00880200,  # Pixel Data Provider URL, Icon Image Sequence
    0x00281052, 0x00281053,  # rescale (set again below)
    0x7FE00001, 0x7FE00002, 0x7FE00008, 0x7FE00009, 0x7FE00010,  # offset tables, pixel data
)
_DROPPED_GROUPS = (0x5000, 0x6000)  # curves and overlays (repeating groups 50xx, 60xx)

_TEMP_FOLDER = re.compile(r"^\..+\.medsr-(\d+)-[^.]+\.(part|old)dicom$")


@dataclass(frozen=True)
class DicomSource:
    """The DICOM series a derived series takes its identity and stored representation from.

    `headers` (pydicom datasets without pixel data) and `files` are sorted along the slice
    normal of the first slice's orientation; `positions_mm` are the slices' positions on it.
    """

    files: tuple[Path, ...]
    headers: tuple[Dataset, ...]
    storage_class: str
    normal: np.ndarray
    positions_mm: np.ndarray

    @property
    def first(self) -> Dataset:
        return self.headers[0]

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", "") or "")

    @property
    def series_uid(self) -> str:
        return str(self.first.get("SeriesInstanceUID", "") or "")

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "").strip()

    @property
    def slice_spacing_mm(self) -> float | None:
        steps = np.diff(self.positions_mm)
        return float(np.median(np.abs(steps))) if steps.size else None


def load_source(source: "str | os.PathLike | Sequence[str | os.PathLike] | DicomSource",
                series_uid: str | None = None, *, role: str = "DICOM source",
                series_option: str = "series_uid") -> DicomSource:
    """The DICOM series in folder `source` (one series, or `series_uid`), or made of the files
    `source`; InputError when it holds none, several (without `series_uid`), or a storage class
    other than classic CT/MR images, or when a slice lacks position or orientation.

    `role` ("DICOM source", "DICOM template") and `series_option` (the option or argument that
    picks a series, e.g. "--dicom-template-series") name the folder and the remedy in messages.
    """
    if isinstance(source, DicomSource):
        return source
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise InputError(f"{folder}: {role} must be a folder holding a DICOM series")
        series = io.list_dicom_series(folder)
        if series_uid is not None:
            series = [s for s in series if s.uid == series_uid]
        if not series:
            raise InputError(f"{folder}: {role} holds no DICOM series"
                             + (f" with UID {series_uid!r}" if series_uid is not None else ""))
        if len(series) > 1:
            raise InputError(f"{folder}: {role} holds {len(series)} DICOM series; choose the "
                             f"{role}'s series with {series_option} UID: " + "; ".join(
                                 f"{s.uid} ({s.modality} {s.description}, {len(s.files)} files)"
                                 for s in series))
        files = [Path(f) for f in series[0].files]
    else:
        files = [Path(f) for f in source]
        if not files:
            raise InputError("DICOM source: no files given")
    headers = []
    for path in files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as err:
            raise InputError(f"{path}: {role}: cannot read as DICOM ({err})") from None
    series_uids = {str(h.get("SeriesInstanceUID", "") or "") for h in headers}
    if len(series_uids) > 1:
        raise InputError(f"{role}: the files belong to {len(series_uids)} series; give "
                         "the files of one series")
    storage = _storage_class(headers[0], files[0])
    orientation = headers[0].get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        raise InputError(f"{files[0]}: no ImageOrientationPatient; cannot place derived slices")
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    normal /= np.linalg.norm(normal)
    positions = []
    for path, header in zip(files, headers):
        position = header.get("ImagePositionPatient")
        if position is None or len(position) != 3:
            raise InputError(f"{path}: no ImagePositionPatient; cannot place derived slices")
        positions.append(float(np.dot(np.asarray(position, float), normal)))
    order = np.argsort(positions, kind="stable")
    return DicomSource(tuple(files[i] for i in order), tuple(headers[i] for i in order),
                       storage, normal, np.asarray(positions, float)[order])


def _storage_class(header: Dataset, path: Path) -> str:
    meta = getattr(header, "file_meta", None)
    storage = str(header.get("SOPClassUID", "") or "") or (
        str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else "")
    storage = storage or _STORAGE_OF_MODALITY.get(str(header.get("Modality", "")), "")
    if storage not in STORAGE_CLASSES:
        name = pydicom.uid.UID(storage).name if storage else "unknown"
        raise InputError(f"{path}: storage class {name} ({storage or 'none'}) is not supported "
                         "for a derived series; MedSR writes "
                         + " and ".join(STORAGE_CLASSES.values()) + " series")
    return storage


@dataclass(frozen=True)
class _StoredRepresentation:
    bits_allocated: int
    bits_stored: int
    signed: bool
    slope: float
    intercept: float
    has_rescale: bool

    @property
    def dtype(self) -> np.dtype:
        kind = "i" if self.signed else "u"
        return np.dtype(f"<{kind}{self.bits_allocated // 8}")

    @property
    def limits(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1

    def inverted(self, value: float) -> float:
        """The MONOCHROME2 equivalent of a MONOCHROME1 value (source units): the value of the
        stored value inverted within the range BitsStored allows (low + high - stored)."""
        low, high = self.limits
        return self.slope * (low + high) + 2.0 * self.intercept - float(value)

    def to_stored(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """Stored values of `values` (source units) and how many had to be clipped."""
        stored = np.rint((values.astype(np.float64) - self.intercept) / self.slope)
        low, high = self.limits
        clipped = int(np.count_nonzero((stored < low) | (stored > high)))
        return np.clip(stored, low, high).astype(self.dtype), clipped


def _stored_representation(source: DicomSource) -> _StoredRepresentation:
    first = source.first
    bits_allocated = int(first.get("BitsAllocated", 16))
    bits_stored = int(first.get("BitsStored", bits_allocated))
    if bits_allocated not in (8, 16, 32) or not 1 <= bits_stored <= bits_allocated:
        raise InputError(f"{source.files[0]}: BitsAllocated {bits_allocated} / BitsStored "
                         f"{bits_stored} is not a grayscale representation MedSR can write")
    if int(first.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{source.files[0]}: not a grayscale image (SamplesPerPixel "
                         f"{first.SamplesPerPixel})")
    if "ModalityLUTSequence" in first:
        raise InputError(f"{source.files[0]}: has a Modality LUT Sequence; MedSR writes rescale "
                         "slope/intercept only")
    from .dicom_checks import rescale_problem

    for path, header in zip(source.files, source.headers):
        problem = rescale_problem(header)
        if problem:
            raise InputError(f"{path}: {problem}")
    rescales = {(float(h.get("RescaleSlope", 1) or 1), float(h.get("RescaleIntercept", 0) or 0))
                for h in source.headers}
    if len(rescales) > 1:
        raise InputError(f"{source.files[0]}: the source slices have {len(rescales)} different "
                         "rescale slopes/intercepts; MedSR keeps one stored representation")
    slope, intercept = rescales.pop()
    signed = int(first.get("PixelRepresentation", 0)) == 1
    has_rescale = "RescaleSlope" in first or "RescaleIntercept" in first
    return _StoredRepresentation(bits_allocated, bits_stored, signed, slope, intercept, has_rescale)


def write_dicom_series(image: sitk.Image,
                       source: "str | os.PathLike | Sequence[str | os.PathLike] | DicomSource",
                       folder: str | os.PathLike, *, overwrite: bool = False,
                       model: str | None = None, scale_factors: Sequence[float] | None = None,
                       weights: str | os.PathLike | None = None, modality: str | None = None,
                       series_uid: str | None = None,
                       derived_from_source: bool = True, series_description: str | None = None,
                       series_number: int | None = None, uid_root: str | None = UID_ROOT,
                       now: datetime.datetime | None = None,
                       input_series: (str | os.PathLike | Sequence[str | os.PathLike]
                                      | DicomSource | Dataset | None) = None,
                       accept_template_mismatch: bool = False) -> Path:
    """Write the super-resolved `image` as a new derived DICOM series into folder `folder`.

    Args:
        image: the SR volume (LPS geometry, voxels in the source's units: `upscale`'s output).
        source: the DICOM series it was made from (a folder, its files, or a `DicomSource`);
            patient, study, frame of reference and stored representation come from it.
        folder: the output folder; it must not exist or be empty unless `overwrite` (then it
            may hold DICOM files only, and is replaced once the new series is complete).
        model, scale_factors: the model name and (x, y, z) factors (through-plane factors may
            be fractional, e.g. 2.5); default: the image's "medsr_model" and
            "medsr_scale_factors_xyz" metadata (set by `upscale`).
        weights: the weights file the run used (`--weights`); default: the shipped file for
            the model, scale and `modality` (none for interpolation models).
        modality: the modality the run chose weights for ("CT", "MR", "XR"; `upscale`'s
            `modality`); default: the image's DICOM modality, else the source's.
        series_uid: picks the series when the `source` folder holds several.
        derived_from_source: False when `source` is only a template for the identity (the
            voxels came from another file): no SourceImageSequence/ReferencedSeriesSequence.
            The template must then match the input (`dicom_identity`): PatientID, and
            StudyInstanceUID or FrameOfReferenceUID, of `input_series` when given, and Modality
            (`input_series`', else `modality` or the image's DICOM modality when known).
        series_description, series_number: instead of the defaults (see module docstring).
        uid_root: root of the new UIDs (`UID_ROOT`); None for "2.25." UUID-derived UIDs.
        now: date and time of the run (default: now).
        input_series: the DICOM series the image was read from, when `source` is a template
            (a folder, its files or a `DicomSource`); its identity is checked against the
            template's. None for a non-DICOM input: then only the modality is checked.
        accept_template_mismatch: write with a mismatching template anyway (a warning naming
            both patients is logged) instead of refusing.

    Returns the folder. InputError (WriteError for a full disk) naming the problem; on any
    failure nothing is left at `folder` and an existing folder there is untouched.
    """
    source = load_source(source, series_uid,
                         role="DICOM source" if derived_from_source else "DICOM template")
    folder = Path(folder)
    image = io.as_scalar_volume(image, "image")
    if not derived_from_source:
        from .dicom_identity import check_template_identity, series_header

        check_template_identity(
            source, None if input_series is None else series_header(input_series),
            modality or io.modality_of(image), accept=accept_template_mismatch,
            input_name="the image", accept_option="accept_template_mismatch=True")
    elif io.modality_of(image) and source.modality and (
            io.modality_of(image) != {"CR": "XR", "DX": "XR", "RG": "XR"}.get(
                source.modality.upper(), source.modality.upper())):
        raise InputError(f"{_source_folder(source) or source.files[0]}: the DICOM source is "
                         f"{source.modality}, but the image was read from a "
                         f"{io.modality_of(image)} series; give the series the image came from")
    io.check_output_folder(None, folder, overwrite, {"DICOM source": _source_folder(source)})
    model = model or _metadata(image, "medsr_model")
    if not model:
        raise InputError("model: not given and the image has no 'medsr_model' metadata (pass "
                         "the model name the volume was made with)")
    factors = _scale_factors(image, scale_factors)
    representation = _stored_representation(source)
    now = now or datetime.datetime.now()
    modality = modality or io.modality_of(image) or source.modality
    weights_name = _weights_name(model, factors, weights, modality)
    series = _SeriesIdentity.make(source, image, model, factors, weights_name, modality,
                                  derived_from_source, series_description, series_number,
                                  uid_root, now)
    voxels = sitk.GetArrayFromImage(image)
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        raise InputError("image: holds NaN or infinite voxels, which DICOM cannot store")
    return _write_folder(folder, overwrite, voxels.shape[0], lambda temp: _write_slices(
        temp, image, voxels, source, representation, series, factors, derived_from_source))


def _stable_uid(uid_root: str | None, sources: Sequence[str]) -> str:
    """A UID that depends only on `sources`: under `uid_root`, or (None) the "2.25." form of a
    name-based UUID (pydicom ignores the entropy sources without a root)."""
    if uid_root is None:
        return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, chr(0).join(sources)).int}"
    return generate_uid(uid_root, entropy_srcs=list(sources))


def _source_folder(source: DicomSource) -> Path | None:
    parents = {f.resolve().parent for f in source.files}
    return parents.pop() if len(parents) == 1 else None


def _metadata(image: sitk.Image, key: str) -> str:
    return image.GetMetaData(key).strip() if image.HasMetaDataKey(key) else ""


def _scale_factors(image: sitk.Image,
                   scale_factors: Sequence[float] | None) -> tuple[float, float, float]:
    """The (x, y, z) factors: whole numbers as int, a fractional through-plane factor as float."""
    if scale_factors is None:
        text = _metadata(image, "medsr_scale_factors_xyz")
        if not text:
            raise InputError("scale_factors: not given and the image has no "
                             "'medsr_scale_factors_xyz' metadata (pass the (x, y, z) factors)")
        scale_factors = text.split()
    try:
        values = [float(f) for f in scale_factors]
    except (TypeError, ValueError):
        raise InputError(f"scale_factors must be 3 numbers (x, y, z), got "
                         f"{scale_factors!r}") from None
    if len(values) != 3 or not all(np.isfinite(values)) or min(values) < 1:
        raise InputError(f"scale_factors must be 3 numbers >= 1 (x, y, z), got {scale_factors!r}")
    factors = tuple(int(f) if float(f).is_integer() else f for f in values)
    return factors  # type: ignore[return-value]


def _weights_name(model: str, factors: tuple[float, float, float],
                  weights: str | os.PathLike | None, modality: str | None) -> str:
    """The weights file named in DerivationDescription: `weights`, else the shipped one(s).

    A through-plane run's model is "[in-plane model + ]through_plane_net[ + adapted]": each
    part is named (the through-plane network has one weights file for every factor)."""
    if weights is not None:
        return Path(weights).name
    from ..models import registry as zoo
    from ..models import through_plane_io as model_io

    if " + " in model or model == model_io.MODEL_NAME:
        in_plane = tuple(f if i < 2 else 1 for i, f in enumerate(factors))
        names = []
        for part in model.split(" + "):
            if part == model_io.MODEL_NAME:
                names.append(model_io.WEIGHTS_FILE.name)
            elif part == "adapted":
                names.append("adapted to this volume")
            else:
                names.append(_weights_name(part, in_plane, None, modality))
        return ", ".join(names)
    try:
        spec = zoo.get_spec(model)
    except InputError:
        return "unknown"
    if not spec.needs_weights:
        return "none (interpolation)"
    modality = {"CR": "XR", "DX": "XR", "RG": "XR"}.get(modality or "", modality) or None
    names = []
    for scale in sorted({f for f in factors if f > 1}):
        path = zoo.shipped_weights(spec, scale, modality=modality) if scale in spec.scales else None
        names.append(path.name if path is not None else f"x{scale}: untrained")
    return ", ".join(names) or "none"


def _factors_text(factors: tuple[float, float, float]) -> str:
    return ",".join(f"{f:g}" for f in factors)


@dataclass(frozen=True)
class _SeriesIdentity:
    """What every slice of the new series shares."""

    series_uid: str
    study_uid: str
    series_number: int
    description: str
    derivation: str
    date: str
    time: str
    uid_root: str | None

    @classmethod
    def make(cls, source: DicomSource, image: sitk.Image, model: str,
             factors: tuple[float, float, float], weights_name: str, modality: str | None,
             derived_from_source: bool,
             description: str | None, number: int | None, uid_root: str | None,
             now: datetime.datetime) -> "_SeriesIdentity":
        from .. import __version__

        study_uid = str(source.first.get("StudyInstanceUID", "") or "")
        if not study_uid:
            # Type 1: a series needs a study. The source's is empty (over-anonymised): a UID
            # derived from the source's frame of reference and series, so every export of this
            # source lands in one study.
            study_uid = generate_uid(uid_root, entropy_srcs=[
                "medsr-study", str(source.first.get("FrameOfReferenceUID", "")),
                source.series_uid, str(source.first.get("StudyDate", "")),
                str(source.first.get("StudyTime", ""))])
            log.warning("%s: the source has no StudyInstanceUID; the derived series gets %s",
                        source.files[0], study_uid)
        if number is None:
            base = source.first.get("SeriesNumber")
            number = SERIES_NUMBER_OFFSET + (int(base) if base not in (None, "") else 0)
        label = f"MedSR x{_factors_text(factors)} {model}"
        if description is None:
            room = 64 - len(label) - 1
            description = f"{source.description[:room].strip()} {label}".strip()
        roi, roi_model = "", _metadata(image, "medsr_roi_model")
        if roi_model and _metadata(image, "medsr_roi_fallback") == "0":
            roi = (f"; lesion-focused: model {roi_model}, weights "
                   f"{_weights_name(roi_model, factors, None, modality)}, inside the ROI")
        origin = (f"source series {source.series_uid or '(no UID)'}" if derived_from_source else
                  f"identity from template series {source.series_uid or '(no UID)'}")
        derivation = (f"{io.MEDSR_DERIVATION_PREFIX} {__version__}: model {model}, weights "
                      f"{weights_name}, scale x{_factors_text(factors)} (x,y,z){roi}; {origin}")
        # The same source (its very instances), model, weights, scale and MedSR version give
        # the same UIDs: a repeated export or send replaces (or is ignored by the PACS), never
        # duplicates; a source missing an instance gives another series.
        instances = sorted(str(h.get("SOPInstanceUID", "") or "") for h in source.headers)
        series_uid = (_stable_uid(uid_root, ["medsr-derived-series", derivation, *instances])
                      if derived_from_source and source.series_uid else generate_uid(uid_root))
        return cls(series_uid, study_uid, int(number), description,
                   derivation[:1024], now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f"), uid_root)


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters, as precise as that allows ("5", not "5.0")."""
    value = float(value) + 0.0  # + 0.0: no "-0"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format_number_as_ds(value)


def _write_slices(temp: Path, image: sitk.Image, voxels: np.ndarray, source: DicomSource,
                  representation: _StoredRepresentation, series: _SeriesIdentity,
                  factors: tuple[float, float, float], derived_from_source: bool) -> list[Path]:
    from .. import __version__

    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), float)
    origin = np.asarray(image.GetOrigin(), float)
    orientation = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    through_factor = factors[2]
    thickness = source.first.get("SliceThickness")  # a template's says nothing of the voxels
    source_thickness = (float(thickness) if derived_from_source and thickness not in (None, "")
                        else None)
    location_offset = None
    if "SliceLocation" in source.first and source.first.SliceLocation not in (None, ""):
        location_offset = float(source.first.SliceLocation) - float(source.positions_mm[0])
    referenced_series = _referenced_series(source) if derived_from_source else None
    if _is_monochrome1(source.first) and "VOILUTSequence" in source.first:
        log.warning("%s: the source's VOI LUT Sequence describes MONOCHROME1 values; the derived "
                    "MONOCHROME2 series keeps its window centre/width only", source.files[0])
    written, clipped = [], 0
    for k in range(voxels.shape[0]):
        position = origin + k * spacing[2] * direction[:, 2]
        along = float(np.dot(position, source.normal))
        distance = np.abs(source.positions_mm - along)
        nearest = int(np.argmin(distance))
        ds = _derived_header(source.headers[nearest])
        ds.SOPClassUID = source.storage_class
        ds.SOPInstanceUID = _stable_uid(series.uid_root, [series.series_uid, str(k + 1)])
        ds.StudyInstanceUID = series.study_uid
        ds.SeriesInstanceUID = series.series_uid
        ds.SeriesNumber = series.series_number
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = series.description
        ds.ImageType = ["DERIVED", "SECONDARY", *list(_image_type(ds))[2:3]]
        ds.DerivationDescription = series.derivation
        ds.DerivationCodeSequence = DicomSequence([_code_item(_DERIVATION_CODE)])
        for prefix in ("Series", "Content", "InstanceCreation"):
            setattr(ds, f"{prefix}Date", series.date)
            setattr(ds, f"{prefix}Time", series.time)
        ds.Manufacturer = io.MEDSR_MANUFACTURER  # io.check_output_folder relies on these two
        ds.ManufacturerModelName = "MedSRLib"
        ds.SoftwareVersions = f"MedSRLib {__version__}"
        # image plane
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (y), column spacing (x)
        ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.SliceThickness = _ds(source_thickness / through_factor if source_thickness
                                else spacing[2])
        if location_offset is not None:
            ds.SliceLocation = _ds(along + location_offset)
        # pixels
        stored, count = representation.to_stored(voxels[k])
        clipped += count
        ds.SamplesPerPixel = 1
        if _is_monochrome1(ds):
            _window_as_monochrome2(ds, representation)
        ds.PhotometricInterpretation = "MONOCHROME2"  # the image's values are MONOCHROME2's
        ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
        ds.BitsAllocated = representation.bits_allocated
        ds.BitsStored = representation.bits_stored
        ds.HighBit = representation.bits_stored - 1
        ds.PixelRepresentation = int(representation.signed)
        if representation.has_rescale or source.storage_class == CTImageStorage:
            ds.RescaleIntercept = _ds(representation.intercept)
            ds.RescaleSlope = _ds(representation.slope)
        ds.add_new(0x7FE00010, "OB" if representation.bits_allocated == 8 else "OW",
                   np.ascontiguousarray(stored).tobytes())  # Pixel Data
        # references
        if derived_from_source:
            sources = _source_items(source, distance)
            if sources:
                ds.SourceImageSequence = DicomSequence(sources)
            if referenced_series is not None:
                ds.ReferencedSeriesSequence = DicomSequence([copy.deepcopy(referenced_series)])
        path = temp / f"IM{k + 1:06d}.dcm"
        _save(ds, path)
        written.append(path)
    if clipped:
        low, high = representation.limits
        log.warning("%d voxel(s) outside the source's stored range [%d, %d] were clipped",
                    clipped, low, high)
    return written


def _is_monochrome1(ds: Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper() == "MONOCHROME1"


def _window_as_monochrome2(ds: Dataset, representation: _StoredRepresentation) -> None:
    """Turn a MONOCHROME1 slice's display attributes into its MONOCHROME2 equivalent's.

    The voxels were read as MONOCHROME2 equivalents (stored value inverted within the range
    BitsStored allows: `_StoredRepresentation.inverted`), so a window centre c becomes
    `inverted(c) + 1` (same width): the default LINEAR window function (PS3.3 C.11.2.1.2.1)
    centres on c - 0.5, and inverting moves that half unit to the other side; LINEAR_EXACT and
    SIGMOID are symmetric, there it is `inverted(c)`. Every value then displays as exactly the
    same grey as in the source. A VOI LUT Sequence (a table over the MONOCHROME1 values) is
    dropped (the caller warns); an inverse Presentation LUT Shape becomes IDENTITY.
    """
    if "WindowCenter" in ds and ds.WindowCenter not in (None, ""):
        centres = ds.WindowCenter
        many = isinstance(centres, (list, pydicom.multival.MultiValue))
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
        shift = 0.0 if function in ("LINEAR_EXACT", "SIGMOID") else 1.0
        values = [_ds(representation.inverted(float(c)) + shift)
                  for c in (centres if many else [centres])]
        ds.WindowCenter = values if many else values[0]
    if "VOILUTSequence" in ds:
        del ds.VOILUTSequence
    if "PresentationLUTShape" in ds:
        ds.PresentationLUTShape = "IDENTITY"


def _image_type(ds: Dataset) -> list[str]:
    value = ds.get("ImageType")
    if value is None:
        return []
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _derived_header(header: Dataset) -> Dataset:
    """A copy of the source slice's public attributes, minus what a derived slice must not keep."""
    ds = copy.deepcopy(header)
    ds.remove_private_tags()
    for tag in list(ds.keys()):
        if int(tag) in _DROPPED or (tag.group & 0xFF00) in _DROPPED_GROUPS:
            del ds[tag]
    ds.file_meta = FileMetaDataset()
    return ds


def _source_items(source: DicomSource, distance: np.ndarray) -> list[Dataset]:
    """SourceImageSequence items: the source slices the output slice lies on or between."""
    spacing = source.slice_spacing_mm
    tolerance = 1e-3 * (spacing or 1.0)
    if spacing:
        chosen = [i for i in np.argsort(distance) if distance[i] < spacing - tolerance][:2]
    else:
        chosen = []
    chosen = chosen or [int(np.argmin(distance))]
    items = []
    for index in sorted(chosen):
        uid = str(source.headers[index].get("SOPInstanceUID", "") or "")
        if not uid:
            continue
        item = Dataset()
        item.ReferencedSOPClassUID = source.storage_class
        item.ReferencedSOPInstanceUID = uid
        item.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(_PURPOSE_CODE)])
        items.append(item)
    return items


def _referenced_series(source: DicomSource) -> Dataset | None:
    """The ReferencedSeriesSequence item (Common Instance Reference): the whole source series."""
    if not source.series_uid:
        return None
    instances = []
    for header in source.headers:
        uid = str(header.get("SOPInstanceUID", "") or "")
        if uid:
            item = Dataset()
            item.ReferencedSOPClassUID = source.storage_class
            item.ReferencedSOPInstanceUID = uid
            instances.append(item)
    if not instances:
        return None
    series = Dataset()
    series.SeriesInstanceUID = source.series_uid
    series.ReferencedInstanceSequence = DicomSequence(instances)
    return series


def _save(ds: Dataset, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "MEDSR"
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _verify(files: list[Path], expected: int, series_uid: str) -> None:
    """Every file reads back with pydicom, whole pixel data, one series, `expected` slices."""
    if len(files) != expected:
        raise InputError(f"wrote {len(files)} files for {expected} slices")
    for path in files:
        ds = pydicom.dcmread(path)
        if str(ds.SeriesInstanceUID) != series_uid:
            raise InputError(f"{path.name}: reads back with another series UID")
        size = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
        if len(ds.PixelData) != size:
            raise InputError(f"{path.name}: pixel data reads back with {len(ds.PixelData)} of "
                             f"{size} bytes")


def _write_folder(folder: Path, overwrite: bool, slices: int, fill) -> Path:
    """Fill a hidden temporary folder beside `folder`, verify it, rename it onto `folder`."""
    parent = folder.parent
    _remove_stale_folders(parent)
    temp: Path | None = None
    try:
        with signals_deferred():  # a cancel between creating and naming it would leak it
            try:
                temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{TEMP_MARK}{os.getpid()}-",
                                             suffix=".partdicom", dir=parent))
            except OSError as err:
                raise WriteError(describe_write_failure(folder, err)) from None
        try:
            files = fill(temp)
            series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            _verify(sorted(temp.iterdir()), slices, series_uid)
        except OSError as err:
            raise WriteError(describe_write_failure(folder, err)) from None
        except InputError as err:
            if isinstance(err, WriteError):
                raise
            raise WriteError(describe_write_failure(
                folder, f"the written series is incomplete: {err}")) from None
        mode = 0o777 & ~current_umask()
        os.chmod(temp, mode)
        for path in files:
            os.chmod(path, 0o666 & ~current_umask())
        _commit(temp, folder, overwrite)
    except BaseException:
        if temp is not None:
            with signals_deferred():
                shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


def _commit(temp: Path, folder: Path, overwrite: bool) -> None:
    with signals_deferred():
        old = None
        if folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise InputError(f"{folder}: output folder appeared while this run was writing "
                                 "(another run?); pass --overwrite to replace it")
            io.check_output_folder(None, folder, overwrite=True)  # still DICOM files only
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}{TEMP_MARK}{os.getpid()}-",
                                        suffix=".olddicom", dir=folder.parent))
            os.rename(folder, old / "series")
        try:
            os.rename(temp, folder)  # onto an absent or empty folder: atomic
        except OSError as err:
            if old is not None:
                os.rename(old / "series", folder)
                shutil.rmtree(old, ignore_errors=True)
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise InputError(f"{folder}: output folder appeared while this run was writing "
                                 "(another run?); pass --overwrite to replace it") from None
            raise WriteError(describe_write_failure(folder, err)) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fsync_folder(folder.parent)


def _remove_stale_folders(parent: Path) -> None:
    """Remove temporary series folders of earlier runs whose process no longer exists."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        match = _TEMP_FOLDER.match(entry.name)
        if match and entry.is_dir(follow_symlinks=False) and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)

