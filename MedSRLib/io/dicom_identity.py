"""Whether a DICOM template may lend its identity (patient, study, frame of reference, modality)
to a derived series.

A template series gives a DICOM output its patient, study and frame of reference when the
voxels did not come from a DICOM series of their own (a NIfTI input), or come from another
series of the same patient. It must describe the same patient and place: a template of another
patient would file one patient's pixels under another's name. The rule:

- PatientID equal (an absent PatientID on either side is a mismatch);
- StudyInstanceUID or FrameOfReferenceUID equal (at least one of them, present on both sides);
- Modality equal (CR, DX and RG count as one radiography modality, "XR").

Against a DICOM input series all three are checked; against a non-DICOM input (no identity of
its own: the template supplies it, by design) only the modality, and only when it is known
(given by the user, or recorded in the file by MedSR).
`accept` turns a refusal into a warning that names both patients.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pydicom
from pydicom.dataset import Dataset

from ..errors import InputError

if TYPE_CHECKING:
    from .dicom_export import DicomSource

__all__ = ["template_mismatches", "check_template_identity", "series_header",
           "recorded_modality", "ACCEPT_OPTION"]

log = logging.getLogger(__name__)

#: The CLI option that accepts a mismatching template (named in the refusal).
ACCEPT_OPTION = "--accept-template-mismatch"

_RADIOGRAPHY = {"CR": "XR", "DX": "XR", "RG": "XR"}


def series_header(series: "str | os.PathLike | Sequence[str | os.PathLike] | DicomSource | Dataset",
                  series_uid: str | None = None) -> Dataset:
    """The header (no pixel data) of the first file of a DICOM series: a folder (`series_uid`
    picks one of several; without it the folder must hold one series), a DICOM file, a list of
    files, a `DicomSource` or a header itself. InputError naming the path otherwise."""
    if isinstance(series, Dataset):
        return series
    if hasattr(series, "headers"):  # a DicomSource
        return series.first
    if isinstance(series, (str, os.PathLike)) and Path(series).is_dir():
        from . import volumes as io

        found = [s for s in io.list_dicom_series(series)
                 if series_uid is None or s.uid == series_uid]
        if len(found) != 1:
            raise InputError(f"{series}: holds {len(found)} DICOM series"
                             + (f" with UID {series_uid!r}" if series_uid else
                                " (choose one with --series)"))
        first = found[0].files[0]
    elif isinstance(series, (str, os.PathLike)):
        first = series
    else:
        files = list(series)
        if not files:
            raise InputError("DICOM series: no files given")
        first = files[0]
    try:
        return pydicom.dcmread(first, stop_before_pixels=True)
    except Exception as err:  # pydicom raises many types on damaged files
        raise InputError(f"{first}: cannot read as DICOM ({type(err).__name__}: {err})") from None


def recorded_modality(path: str | os.PathLike) -> str | None:
    """The modality a non-DICOM volume file records of itself (MedSR's "medsr_modality"
    metadata, kept by NRRD and MetaImage), from its header only; None when it records none or
    cannot be read (the read itself reports that)."""
    import SimpleITK as sitk

    from . import volumes as io

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    for key in (io.MODALITY_KEY, "0008|0060"):
        if reader.HasMetaDataKey(key) and reader.GetMetaData(key).strip():
            return reader.GetMetaData(key).strip()
    return None


def _header(source: "DicomSource | Dataset") -> Dataset:
    return source if isinstance(source, Dataset) else source.first


def _tag(source: "DicomSource | Dataset", keyword: str) -> str:
    return str(_header(source).get(keyword, "") or "").strip()


def _modality(value: str | None) -> str:
    value = (value or "").strip().upper()
    return _RADIOGRAPHY.get(value, value)


def describe(source: "DicomSource | Dataset") -> str:
    """'patient NAME (ID), series UID' of a DICOM series, for messages."""
    name = _tag(source, "PatientName") or "(no name)"
    patient = _tag(source, "PatientID") or "no PatientID"
    return f"patient {name} ({patient}), series {_tag(source, 'SeriesInstanceUID') or '(no UID)'}"


def template_mismatches(template: "DicomSource",
                        input_series: "DicomSource | Dataset | None" = None,
                        modality: str | None = None) -> list[str]:
    """The identity tags in which `template` differs from the input, each as a short text
    ("PatientID 'A' vs 'B'"); empty when the template may be used.

    `input_series` is the DICOM series the voxels were read from, or the header of its first
    file (`series_header`); None for a non-DICOM input. `modality` is the input's modality when
    known otherwise ("CT", "MR", "XR", or a DICOM Modality such as "DX"); with `input_series`
    its Modality tag is used instead.
    """
    problems = []
    if input_series is not None:
        mine, theirs = _tag(input_series, "PatientID"), _tag(template, "PatientID")
        if not mine or not theirs or mine != theirs:
            problems.append(f"PatientID {mine or '(none)'!r} vs {theirs or '(none)'!r}")
        same_place = [keyword for keyword in ("StudyInstanceUID", "FrameOfReferenceUID")
                      if _tag(input_series, keyword)
                      and _tag(input_series, keyword) == _tag(template, keyword)]
        if not same_place:
            problems.append("StudyInstanceUID and FrameOfReferenceUID both differ (input "
                            f"study {_tag(input_series, 'StudyInstanceUID') or '(none)'}, "
                            f"template study {_tag(template, 'StudyInstanceUID') or '(none)'})")
        modality = _tag(input_series, "Modality") or modality
    if modality and _modality(modality) != _modality(_tag(template, "Modality")):
        problems.append(f"Modality {modality.upper()} vs {_tag(template, 'Modality') or '(none)'}")
    return problems


def check_template_identity(template: "DicomSource",
                            input_series: "DicomSource | Dataset | None" = None,
                            modality: str | None = None, *, accept: bool = False,
                            input_name: str = "the input",
                            accept_option: str = ACCEPT_OPTION, warn: bool = True) -> None:
    """InputError when `template` may not lend its identity to the input (see the module
    docstring); with `accept`, a logged warning naming both patients instead (none if not
    `warn`: a caller that checks before the work and lets the writer warn).

    The message names the template folder, the input (`input_name`), both patients and series,
    and each mismatching tag.
    """
    problems = template_mismatches(template, input_series, modality)
    if not problems:
        return
    template_name = _folder_of(template)
    mine = describe(input_series) if input_series is not None else (
        f"a non-DICOM volume of modality {modality.upper()}" if modality else "a non-DICOM volume")
    text = (f"DICOM template {template_name} ({describe(template)}) does not match "
            f"{input_name} ({mine}): " + "; ".join(problems))
    if not accept:
        raise InputError(f"{text}. The output would file these pixels under the template's "
                         f"patient and study; give a template of the same patient and study "
                         f"(or pass {accept_option} if this is really meant)")
    if warn:
        log.warning("%s; accepted as asked: the output carries the template's patient and "
                    "study", text)


def _folder_of(source: "DicomSource") -> str:
    parents = {str(f.parent) for f in source.files}
    return parents.pop() if len(parents) == 1 else str(source.files[0])
