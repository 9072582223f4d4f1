"""Detect shows every lesion ROI (one markups ROI each, named with its confidence); the user
keeps, edits or deletes them before Apply, which refines every ROI still in the scene.

The lesion finder's network is replaced by fixed ROIs (`MedSRLib.roi.focus.detect_lesions`, a test
double for the network only): the nodes, the RAS <-> index conversions, the run through
`MedSRLib.upscale` and the report are the module's and the library's real code. The real
network's ROIs are tested in Testing/test_localiser.py.
"""

from harness import MedSR, qapp, scene, widget  # noqa: F401  (fixtures; installs the fakes)

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

import MedSRLib
from MedSRLib.roi import focus as medsr_roi

FOUND = [((2, 2, 1), (8, 7, 3), 0.93), ((15, 11, 2), (21, 17, 5), 0.61)]


@pytest.fixture
def two_lesions(monkeypatch):
    monkeypatch.setattr(medsr_roi, "detect_lesions", lambda image: list(FOUND))


def test_detect_makes_one_named_roi_per_lesion_and_apply_uses_those_kept(scene, MedSR, two_lesions):
    node, ijk_to_ras = MedSR.MedSRTest.makeObliqueAnisotropicVolume("CT chest")
    logic = MedSR.MedSRLogic()
    nodes = logic.detectLesionROIs(node)
    assert [n.GetName() for n in nodes] == ["CT chest_lesion1 (93%)", "CT chest_lesion2 (61%)"]
    assert all(n.IsA("vtkMRMLMarkupsROINode") for n in nodes)
    assert [logic.roiIndexBox(node, n) for n in nodes] == [(*lo, *up) for lo, up, _ in FOUND]
    assert nodes[1].GetAttribute(MedSR.CONFIDENCE_ATTRIBUTE) == "0.6100"

    # Apply with both: the library refines both boxes, the report lists both
    output = logic.process(node, model="lanczos", scale=2, roiNode=nodes, roiModel="linear",
                           show=False)
    boxes = [logic.roiIndexBox(node, n) for n in nodes]
    reference = MedSRLib.upscale(logic.volumeNodeToImage(node), model="lanczos", scale=2,
                                 roi=boxes, roi_model="linear")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output).astype(np.int32),
                                  sitk.GetArrayFromImage(reference))
    assert logic.lastRoiReport["roiIndexesXYZ"] == boxes
    assert "inside 2 ROIs" in MedSR.describeRoiReport(logic.lastRoiReport)

    # the user deletes the second and moves the first: Apply sees only the edited first one
    scene.RemoveNode(nodes[1])
    kept = logic.lesionROINodes(node)
    assert kept == [nodes[0]]
    centre = [0.0, 0.0, 0.0]
    nodes[0].GetCenter(centre)
    step = ijk_to_ras[:3, :3] @ [3.0, 0.0, 0.0]            # three voxels along I
    nodes[0].SetCenter([c + d for c, d in zip(centre, step)])
    assert logic.roiIndexBox(node, nodes[0]) == (5, 2, 1, 11, 7, 3)
    logic.process(node, model="lanczos", scale=2, roiNode=kept, roiModel="linear", show=False)
    assert logic.lastRoiReport["roiIndexesXYZ"] == [(5, 2, 1, 11, 7, 3)]

    # Detect again replaces the earlier proposals for this volume, and only those
    other = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "drawn")
    again = logic.detectLesionROIs(node)
    assert logic.lesionROINodes(node) == again and nodes[0].GetScene() is None
    assert other.GetScene() is scene


def test_widget_detect_proposes_every_roi_and_apply_parameters_follow_deletions(
        widget, scene, MedSR, qapp, two_lesions):
    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume("CT chest")
    qapp.processEvents()
    widget.ui.inputSelector.setCurrentNode(node)
    widget.ui.detectButton.click()
    assert widget.lastError is None, widget.lastError
    proposals = widget.logic.lesionROINodes(node)
    assert len(proposals) == 2 and widget.ui.lesionCheckBox.isChecked()
    assert "2 lesion ROI(s) proposed" in widget.ui.statusLabel.text()
    assert "(93%)" in widget.ui.statusLabel.text()
    assert widget.currentParameters()["roiNode"] == proposals
    scene.RemoveNode(proposals[0])
    qapp.processEvents()
    assert widget.currentParameters()["roiNode"] is proposals[1]


def test_widget_detect_with_nothing_found_says_so(widget, scene, MedSR, qapp, monkeypatch):
    monkeypatch.setattr(medsr_roi, "detect_lesions", lambda image: [])
    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume("CT chest")
    qapp.processEvents()
    widget.ui.inputSelector.setCurrentNode(node)
    widget.ui.detectButton.click()
    assert widget.lastError is None and "No lesion found" in widget.ui.statusLabel.text()
    assert widget.logic.lesionROINodes(node) == []
