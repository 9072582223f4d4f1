"""The panel's ROI model: "Automatic" (MedSRLib's measured default per modality and scale) first,
LFSR still offered by name (PySide6 offscreen, fake qMRML/CTK widgets)."""

from harness import MedSR, qapp, scene, widget  # noqa: F401  (fixtures; installs the fakes)

import pytest
import SimpleITK as sitk

import MedSRLib
from MedSRLib.roi import roi_models


def select(combo, data):
    index = combo.findData(data)
    assert index >= 0, f"{data!r} not offered"
    combo.setCurrentIndex(index)


def test_roi_model_defaults_to_automatic_which_leaves_the_choice_to_medsrlib(widget, MedSR):
    combo = widget.ui.roiModelComboBox
    offered = [combo.itemData(i) for i in range(combo.count())]
    registry = [m["name"] for m in MedSRLib.list_models() if m["kind"] != "detector"]
    assert offered == [MedSR.AUTO_ROI_MODEL, MedSR.SAME_AS_MODEL] + registry
    assert widget._comboData(combo) == MedSR.AUTO_ROI_MODEL
    widget.ui.lesionCheckBox.setChecked(True)
    assert widget.currentParameters()["roiModel"] is None       # MedSRLib's table decides
    select(widget.ui.scaleComboBox, 2)
    select(widget.ui.modalityComboBox, "MR")
    choice = roi_models.default_roi_choice("MR", 2)
    assert f"Automatic now: {choice.label}" in combo.toolTip()
    select(combo, "lfsr")                                        # the perceptual choice stays
    assert widget.currentParameters()["roiModel"] == "lfsr"
    assert "LFSR" in combo.toolTip()


def test_roi_report_names_the_self_ensemble(MedSR):
    image = sitk.Image(4, 4, 2, sitk.sitkFloat32)
    image.SetMetaData("medsr_roi_model", "edsr_lite")
    image.SetMetaData("medsr_roi_self_ensemble", "2")
    image.SetMetaData("medsr_model", "edsr_lite")
    image.SetMetaData("medsr_roi_index_xyz", "0 0 0 2 2 1")
    report = MedSR.roiReportFromImage(image)
    assert report["roiModel"] == "edsr_lite, self-ensemble x2"
    assert "edsr_lite, self-ensemble x2 inside ROI" in MedSR.describeRoiReport(report)
    image.SetMetaData("medsr_roi_self_ensemble", "1")
    assert MedSR.roiReportFromImage(image)["roiModel"] == "edsr_lite"
