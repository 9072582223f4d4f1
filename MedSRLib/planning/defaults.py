"""The modality a run assumes when the user names none: the one that picks the default model.

`api.describe_choices` names every choice made for the user in one line, from this rule and the
same planning functions `api.upscale` runs.
"""

from __future__ import annotations

import SimpleITK as sitk

from ..io import volumes as io

#: Modality assumed for a 2-D image (one slice) whose file names none: PNG and JPEG pictures
#: are most often radiographs, and the CT/MR networks were not trained on them.
TWO_D_MODALITY = "XR"


def modality_for(image: sitk.Image, modality: str | None) -> str | None:
    """The modality that picks the default model: `modality` when given, else the DICOM
    modality the reader stored, else `TWO_D_MODALITY` for a one-slice image, else None."""
    if modality:
        return modality
    stored = io.modality_of(image)
    if stored:
        return stored
    return TWO_D_MODALITY if image.GetDimension() == 2 or image.GetSize()[2] == 1 else None
