"""MedSRWidget with the module's real MedSR.ui (PySide6 offscreen, fake qMRML/CTK widgets)."""

from harness import MedSR, qapp, scene, widget  # noqa: F401  (fixtures; installs the fakes)

import time

import pytest
import slicer

import MedSRLib
from MedSRLib.roi import focus as medsr_roi
from scene_state import scene_state
from fakes.fake_dicom_database import FakeDICOMDatabase


def wait_until_idle(widget, qapp, timeout_s=120):
    deadline = time.time() + timeout_s
    while widget.run is not None:
        qapp.processEvents()
        assert time.time() < deadline, "run did not finish"
        time.sleep(0.05)
    qapp.processEvents()


def select(combo, data):
    index = combo.findData(data)
    assert index >= 0, f"{data!r} not offered"
    combo.setCurrentIndex(index)


def test_model_list_comes_from_registry(widget):
    offered = [widget.ui.modelComboBox.itemData(i) for i in range(widget.ui.modelComboBox.count())]
    registry = [m["name"] for m in MedSRLib.list_models() if m["kind"] != "detector"]
    assert offered == registry
    assert "lesion_detector" not in offered
    select(widget.ui.modelComboBox, "bicubic")
    description = widget.ui.modelDescriptionLabel.text()
    assert "interpolation baseline" in description and "Modality" in description


def test_roi_model_list_offers_same_as_model_and_registry_models(widget, MedSR):
    combo = widget.ui.roiModelComboBox
    offered = [combo.itemData(i) for i in range(combo.count())]
    registry = [m["name"] for m in MedSRLib.list_models() if m["kind"] != "detector"]
    assert offered == [MedSR.AUTO_ROI_MODEL, MedSR.SAME_AS_MODEL] + registry
    assert widget._comboData(combo) == MedSR.AUTO_ROI_MODEL
    # "Same as model" resolves to the model chosen above; LFSR only with the checkbox on
    select(combo, MedSR.SAME_AS_MODEL)
    select(widget.ui.modelComboBox, "lanczos")
    assert widget.currentParameters()["roiModel"] is None
    widget.ui.lesionCheckBox.setChecked(True)
    assert widget.currentParameters()["roiModel"] == "lanczos"
    select(combo, "srcnn")
    assert widget.currentParameters()["roiModel"] == "srcnn"
    srcnn = next(m for m in MedSRLib.list_models() if m["name"] == "srcnn")
    assert combo.toolTip().endswith(MedSR.describeModelCard(srcnn, 2))  # its card, at x2


def test_default_roi_model_prefers_shipped_lfsr_generator(MedSR):
    preferred = ("lfsr", "srgan", "srresnet")
    models = [{"name": "lfsr", "weights": {}}, {"name": "srgan", "weights": {}},
              {"name": "srresnet", "weights": {"x2": {}}}]
    assert MedSR.defaultRoiModel(models, preferred) == "srresnet"
    models[1]["weights"] = {"x4": {}}
    assert MedSR.defaultRoiModel(models, preferred) == "srgan"
    models[0]["weights"] = {"x2": {}}
    assert MedSR.defaultRoiModel(models, preferred) == "lfsr"
    assert MedSR.defaultRoiModel([{"name": "srgan", "weights": {}}], preferred) == MedSR.SAME_AS_MODEL
    assert MedSR.preferredRoiModels()[0] == MedSR.AUTO_ROI_MODEL  # the library's choice first


def test_default_roi_model_is_one_trained_on_the_inputs_modality(MedSR):
    preferred = ("lfsr", "srresnet")
    models = [{"name": "lfsr", "weights": {"x2": {"modality": ["MR"]}}},
              {"name": "srresnet", "weights": {"x4": {"modality": ["MR", "XR"]}}}]
    assert MedSR.defaultRoiModel(models, preferred, modality="MR", scale=2) == "lfsr"
    assert MedSR.defaultRoiModel(models, preferred, modality=None, scale=2) == "lfsr"
    assert MedSR.defaultRoiModel(models, preferred, modality="CT", scale=2) == MedSR.SAME_AS_MODEL
    assert MedSR.defaultRoiModel(models, preferred, modality="XR", scale=4) == "srresnet"
    assert MedSR.defaultRoiModel(models, preferred, modality="CT") == MedSR.SAME_AS_MODEL


def test_roi_model_follows_the_modality_until_the_user_picks_one(widget, MedSR):
    """"Automatic" stays selected while the modality changes (its tooltip names what runs for
    each); a model the user picks stays picked."""
    combo = widget.ui.roiModelComboBox
    select(widget.ui.scaleComboBox, 2)
    tips = {}
    for modality in ("CT", "MR"):
        select(widget.ui.modalityComboBox, modality)
        assert widget._comboData(combo) == MedSR.AUTO_ROI_MODEL
        tips[modality] = combo.toolTip()
    assert all("Automatic now:" in tip for tip in tips.values())
    select(combo, "srcnn")                         # the user's choice stays
    select(widget.ui.modalityComboBox, "CT")
    assert widget._comboData(combo) == "srcnn"


def select_lesion_focused(widget, scene, qapp, node, roi_name, center_ras, size_mm, roi_model):
    """Draw a markups ROI and set the panel to lesion-focused: linear outside, `roi_model` inside."""
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", roi_name)
    roi.SetCenter([float(v) for v in center_ras])
    roi.SetSize(list(size_mm))
    qapp.processEvents()
    widget.ui.inputSelector.setCurrentNode(node)
    widget.ui.roiSelector.setCurrentNode(roi)
    widget.ui.lesionCheckBox.setChecked(True)
    select(widget.ui.modelComboBox, "linear")
    select(widget.ui.roiModelComboBox, roi_model)
    return roi


def test_lesion_focused_apply_creates_whole_volume_node_and_reports_roi(widget, scene, MedSR, qapp):
    node, ijk_to_ras = MedSR.MedSRTest.makeObliqueAnisotropicVolume("Liver CT")
    roi = select_lesion_focused(widget, scene, qapp, node, "drawn", (ijk_to_ras @ [12.0, 10.0, 3.0, 1.0])[:3],
                                [4.0, 4.0, 4.0], roi_model="lanczos")
    box = widget.logic.roiIndexBox(node, roi)

    widget.ui.applyButton.click()
    assert widget.lastError is None, widget.lastError
    assert widget.ui.applyButton.text() == "Cancel"
    wait_until_idle(widget, qapp)

    assert widget.lastError is None, widget.lastError
    output = slicer.util.getFirstNodeByName("Liver CT_LFSRx2")
    assert output is not None
    assert output.GetImageData().GetDimensions() == (48, 40, 6)  # the whole volume, not the ROI
    status = widget.ui.statusLabel.text()
    assert "Done" in status
    assert (f"lanczos inside ROI voxels x {box[0]}..{box[3] - 1}, y {box[1]}..{box[4] - 1}, "
            f"z {box[2]}..{box[5] - 1}") in status and "linear elsewhere" in status
    assert widget.logic.getParameterNode().GetParameter("ROIModel") == "lanczos"


def test_lesion_focused_roi_off_the_volume_is_shown_and_leaves_no_node(widget, scene, MedSR, qapp):
    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume()
    select_lesion_focused(widget, scene, qapp, node, "elsewhere", [400.0, 0.0, 0.0], [10.0, 10.0, 10.0],
                          roi_model="linear")
    before = scene_state(scene)
    widget.ui.applyButton.click()
    assert isinstance(widget.lastError, ValueError)
    assert "ROI 'elsewhere' does not overlap input 'MedSRTestInput'" in widget.ui.statusLabel.text()
    assert widget.run is None and widget.ui.applyButton.text() == "Apply"
    assert scene_state(scene) == before


def test_model_card_line_reports_scale_support_and_metrics(MedSR):
    card = {"name": "fmen", "title": "FMEN", "kind": "post_upsampled", "scales": [2, 4],
            "modalities": ["CT", "MR"], "description": "Fast and memory-efficient network.",
            "weights": {"x2": {"modality": ["CT"], "metrics": {"psnr_db": 38.123, "ms_per_slice": 12.5}}}}
    assert MedSR.describeModelCard(card, 2) == (
        "Fast and memory-efficient network. Modality: CT. Measured: psnr_db 38.1, ms_per_slice 12.5.")
    assert "does not support x3" in MedSR.describeModelCard(card, 3)
    assert "no trained weights for x4" in MedSR.describeModelCard(card, 4)


def test_model_card_line_with_weights_per_modality(MedSR):
    """`MedSRLib.models.registry.describe` joins several per-modality files with ", " and merges their
    modalities; the metrics are the first file's."""
    card = {"name": "srresnet", "title": "SRResNet", "kind": "post_upsampled", "scales": [2, 4],
            "modalities": ["CT", "MR", "XR"], "description": "SRResNet generator.",
            "weights": {"x4": {"file": "srresnet_x4_mr.safetensors, srresnet_x4_xr.safetensors",
                               "modality": ["MR", "XR"], "metrics": {"psnr_db": 31.25}}}}
    assert MedSR.describeModelCard(card, 4) == (
        "SRResNet generator. Modality: MR, XR. x4 weights per modality (MR, XR): choose the Modality. "
        "Measured (srresnet_x4_mr.safetensors): psnr_db 31.2.")
    card["weights"]["x4"]["file"] = "srresnet_x4.safetensors, srresnet_x4_xr.safetensors"
    assert "x4 weights per modality (XR). Measured (srresnet_x4.safetensors)" in MedSR.describeModelCard(card, 4)
    assert "no trained weights for x2" in MedSR.describeModelCard(card, 2)
    # one file: as before
    card["weights"]["x4"] = {"file": "srresnet_x4.safetensors", "modality": ["CT"], "metrics": {"psnr_db": 30.0}}
    assert MedSR.describeModelCard(card, 4) == "SRResNet generator. Modality: CT. Measured: psnr_db 30."


def test_modality_selector_offers_auto_ct_mr_xr(widget, scene, MedSR):
    combo = widget.ui.modalityComboBox
    assert [combo.itemText(i) for i in range(combo.count())] == ["Auto", "CT", "MR", "XR"]
    assert [combo.itemData(i) for i in range(combo.count())] == ["auto", "CT", "MR", "XR"]
    assert widget._comboData(combo) == "auto"  # the default
    assert widget.currentParameters()["modality"] == "auto"
    select(combo, "XR")
    assert widget.currentParameters()["modality"] == "XR"
    assert widget.logic.getParameterNode().GetParameter("Modality") == "XR"
    select(combo, "auto")  # back to Auto persists too
    assert widget.logic.getParameterNode().GetParameter("Modality") == "auto"


def test_auto_modality_follows_input_dicom_header(widget, scene, MedSR, qapp, monkeypatch):
    monkeypatch.setattr(slicer, "dicomDatabase", FakeDICOMDatabase({"1.2.3.1": "CR"}), raising=False)
    plain, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume("Knee MR")
    radiograph, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume("Chest CR")
    radiograph.SetAttribute("DICOM.instanceUIDs", "1.2.3.1")
    qapp.processEvents()
    combo = widget.ui.modalityComboBox

    widget.ui.inputSelector.setCurrentNode(radiograph)
    assert "Auto now: XR, from the DICOM header of 'Chest CR'" in combo.toolTip()
    calls = []
    real_upscale = MedSRLib.upscale
    monkeypatch.setattr(MedSRLib, "upscale", lambda image, **kwargs: calls.append(kwargs) or real_upscale(image, **kwargs))
    select(widget.ui.modelComboBox, "linear")
    widget.logic.process(**widget.currentParameters(), show=False)  # the panel's choices, in-process
    assert calls[-1]["modality"] == "XR"

    widget.ui.inputSelector.setCurrentNode(plain)
    assert "Auto now: unknown" in combo.toolTip()
    widget.logic.process(**widget.currentParameters(), show=False)
    assert "modality" not in calls[-1]  # unknown: MedSRLib is not told one
    select(combo, "MR")
    assert "Auto now" not in combo.toolTip()
    widget.logic.process(**widget.currentParameters(), show=False)
    assert calls[-1]["modality"] == "MR"


def test_apply_with_chosen_modality_passes_it_to_background_cli(widget, scene, MedSR, qapp):
    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume("Knee MR")
    qapp.processEvents()
    widget.ui.inputSelector.setCurrentNode(node)
    select(widget.ui.modelComboBox, "linear")
    widget.ui.applyButton.click()  # Auto, the node not from DICOM: no --modality
    assert widget.lastError is None, widget.lastError
    assert "--modality" not in widget.run.commandLine("in.nrrd", "out.nrrd")
    widget.ui.applyButton.click()  # Cancel

    select(widget.ui.modalityComboBox, "MR")
    widget.ui.applyButton.click()
    assert widget.lastError is None, widget.lastError
    command = widget.run.commandLine("in.nrrd", "out.nrrd")
    assert command[command.index("--modality"):command.index("--modality") + 2] == ["--modality", "MR"]
    wait_until_idle(widget, qapp)
    assert widget.lastError is None, widget.lastError
    assert slicer.util.getFirstNodeByName("Knee MR_SRx2") is not None


def test_per_modality_weights_error_points_to_the_selector(widget, MedSR):
    library_message = ("model 'srresnet' ships x4 weights per modality (MR, XR), none for an unknown "
                       "modality: choose one with --modality")
    widget._showFailure(MedSRLib.InputError(library_message))
    assert widget.ui.statusLabel.text() == (
        "Error: model 'srresnet' ships x4 weights per modality (MR, XR), none for an unknown "
        "modality: choose one in the Modality selector")


def test_apply_creates_output_node(widget, scene, MedSR, qapp):
    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume("Knee MR")
    qapp.processEvents()
    widget.ui.inputSelector.setCurrentNode(node)
    assert widget.ui.applyButton.isEnabled()
    select(widget.ui.scaleComboBox, 3)
    select(widget.ui.modelComboBox, "linear")
    nodes_before = scene.GetNumberOfNodes()

    widget.ui.applyButton.click()
    assert widget.lastError is None
    assert widget.ui.applyButton.text() == "Cancel"  # Apply turns into Cancel while running
    assert widget.ui.progressBar.isVisible()
    wait_until_idle(widget, qapp)

    assert widget.lastError is None, widget.lastError
    assert widget.ui.applyButton.text() == "Apply"
    output = slicer.util.getFirstNodeByName("Knee MR_SRx3")
    assert output is not None and scene.GetNumberOfNodes() > nodes_before
    assert output.GetImageData().GetDimensions() == (72, 60, 6)
    assert "Done" in widget.ui.statusLabel.text()


def test_cancel_button_leaves_scene_unchanged(widget, scene, MedSR, qapp):
    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume()
    qapp.processEvents()
    widget.ui.inputSelector.setCurrentNode(node)
    select(widget.ui.modelComboBox, "linear")
    before = scene_state(scene)

    widget.ui.applyButton.click()
    assert widget.run is not None
    process = widget.run.process
    widget.ui.applyButton.click()  # the Cancel button

    assert widget.run is None and process.poll() is not None
    assert widget.ui.applyButton.text() == "Apply"
    assert "Cancelled" in widget.ui.statusLabel.text()
    qapp.processEvents()
    assert scene_state(scene) == before


def test_error_is_shown_and_leaves_no_node(widget, scene, MedSR, qapp):
    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume()
    qapp.processEvents()
    widget.ui.inputSelector.setCurrentNode(node)
    widget.ui.lesionCheckBox.setChecked(True)  # lesion-focused without an ROI
    before = scene_state(scene)
    widget.ui.applyButton.click()
    assert isinstance(widget.lastError, ValueError)
    assert "ROI" in widget.ui.statusLabel.text()
    assert widget.run is None
    assert scene_state(scene) == before


def test_model_scale_mismatch_from_background_run_is_shown(widget, scene, MedSR, qapp):
    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume()
    qapp.processEvents()
    widget.ui.inputSelector.setCurrentNode(node)
    select(widget.ui.modelComboBox, "hybrid")
    select(widget.ui.scaleComboBox, 3)
    assert "does not support x3" in widget.ui.modelDescriptionLabel.text()
    before = scene_state(scene)
    widget.ui.applyButton.click()
    wait_until_idle(widget, qapp)
    assert isinstance(widget.lastError, ValueError)
    assert "does not support scale x3" in widget.ui.statusLabel.text()
    assert widget.ui.applyButton.text() == "Apply"
    assert scene_state(scene) == before


def test_panel_screenshot_renders(tmp_path, qapp):
    import render_panel_screenshot

    out = render_panel_screenshot.render(tmp_path / "panel.png")
    assert out.stat().st_size > 5000


def test_choices_persist_in_parameter_node(widget, scene, MedSR, qapp):
    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume()
    qapp.processEvents()
    widget.ui.inputSelector.setCurrentNode(node)
    select(widget.ui.modelComboBox, "lanczos")
    select(widget.ui.scaleComboBox, 4)
    select(widget.ui.directionComboBox, "through-plane")
    select(widget.ui.roiModelComboBox, "fmen")
    select(widget.ui.modalityComboBox, "CT")
    parameters = widget.logic.getParameterNode()
    assert (parameters.GetParameter("Model"), parameters.GetParameter("Scale")) == ("lanczos", "4")
    assert parameters.GetNodeReference("InputVolume") is node

    fresh = MedSR.MedSRWidget()  # e.g. after a module reload: the panel reads the scene
    fresh.setup()
    assert fresh._comboData(fresh.ui.modelComboBox) == "lanczos"
    assert fresh._comboData(fresh.ui.scaleComboBox) == 4
    assert fresh._comboData(fresh.ui.directionComboBox) == "through-plane"
    assert fresh._comboData(fresh.ui.roiModelComboBox) == "fmen"
    assert fresh._comboData(fresh.ui.modalityComboBox) == "CT"
    assert fresh.ui.inputSelector.currentNode() is node
    fresh.cleanup()


def test_detect_without_input_or_detector_is_a_clear_error(widget, scene, MedSR, qapp):
    before = scene_state(scene)
    widget.ui.detectButton.click()
    assert "Select an input volume" in str(widget.lastError)
    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume()
    qapp.processEvents()
    widget.ui.inputSelector.setCurrentNode(node)
    before = scene_state(scene)
    widget.ui.detectButton.click()
    from MedSRLib.models import registry as zoo

    if not any(zoo.shipped_weights(zoo.get_spec(name), 1) for name in medsr_roi.AUTO_FINDERS):
        assert "no trained lesion detector" in str(widget.lastError)
        assert scene_state(scene) == before
    else:  # a lesion finder ships: each ROI it finds becomes a markups ROI node, or it says none
        assert widget.lastError is None, widget.lastError
        proposals = widget.logic.lesionROINodes(node)
        if proposals:
            assert widget.ui.roiSelector.currentNode() is proposals[0]
            assert all(roi.IsA("vtkMRMLMarkupsROINode") for roi in proposals)
            assert widget.ui.lesionCheckBox.isChecked()
        else:
            assert "No lesion found" in widget.ui.statusLabel.text()


def test_apply_is_disabled_without_input(widget):
    assert widget.ui.inputSelector.currentNode() is None
    assert not widget.ui.applyButton.isEnabled()


def test_module_self_test_runs_under_pytest(scene, MedSR):
    """MedSRTest is the test Slicer runs with "Reload and Test"; here on slicer-core."""
    import unittest

    result = unittest.TextTestRunner(verbosity=0).run(MedSR.MedSRTest())
    assert result.wasSuccessful(), result.failures + result.errors
    assert slicer.util.getFirstNodeByName("MedSRTestInput_SRx2") is not None
    assert slicer.util.getFirstNodeByName("MedSRTestInput_LFSRx2") is not None


def test_make_slices_thinner_shows_its_factor_and_applies(widget, scene, MedSR, qapp):
    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume("Thick CT")  # 0.8 x 0.9 x 3.0 mm
    qapp.processEvents()
    widget.ui.inputSelector.setCurrentNode(node)
    assert not widget.ui.targetSpacingSpinBox.isEnabled()
    widget.ui.thinSlicesCheckBox.setChecked(True)
    assert widget.ui.targetSpacingSpinBox.value() == pytest.approx(0.8)  # the in-plane pixel
    assert "factor x3.83 (6 -> 23 slices)" in widget.ui.thinFactorLabel.text()  # 3 / 0.8 = 3.75
    widget.ui.targetSpacingSpinBox.setValue(1.0)
    assert "x3 (6 -> 18 slices)" in widget.ui.thinFactorLabel.text()
    widget.ui.adaptCheckBox.setChecked(True)
    assert "3.0 CPU minutes" in widget.ui.thinFactorLabel.text()
    widget.ui.adaptCheckBox.setChecked(False)
    widget.ui.applyButton.click()
    wait_until_idle(widget, qapp)
    assert widget.lastError is None, widget.lastError
    output = slicer.util.getFirstNodeByName("Thick CT_1mm")
    assert output is not None and output.GetImageData().GetDimensions() == (24, 20, 18)
