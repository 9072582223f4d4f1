"""MedSR: deep-learning super-resolution of scalar volumes in 3D Slicer.

This file is Slicer glue only. Everything that does not need Slicer lives in `MedSRLib`
(the one door is `MedSRLib.upscale`); here we convert MRML volume nodes to SimpleITK images
(RAS <-> LPS, KJI arrays), run the library in a background process or in-process, and put
the result back into the scene with the geometry SimpleITK returned.
"""

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import qt
import SimpleITK as sitk
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent

#: RAS from LPS (and LPS from RAS: the matrix is its own inverse).
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

SCALES = (2, 3, 4)
DIRECTIONS = (("in-plane", "In-plane"), ("through-plane", "Through-plane"))
SLICE_AXES = (("auto", "Auto (in-plane: stored slices; through: largest spacing)"), ("x", "I (x)"), ("y", "J (y)"), ("z", "K (z)"))
DEVICES = (("auto", "Auto"), ("cpu", "CPU"), ("cuda", "GPU (CUDA)"))
PRECISIONS = (("auto", "Auto"), ("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"))
#: Modality choices; "auto" = the input node's DICOM modality when Slicer knows it (else none).
MODALITIES = (("auto", "Auto"), ("CT", "CT"), ("MR", "MR"), ("XR", "XR"))

#: Node attribute that Slicer's DICOM plugins set on a volume loaded from DICOM (UIDs, spaces).
DICOM_INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
#: DICOM Modality tag (group,element) as `slicer.dicomDatabase.fileValue` takes it.
DICOM_MODALITY_TAG = "0008,0060"
#: Node attributes recording what made an output node (read by `exportDICOMSeries`).
MODEL_ATTRIBUTE = "MedSR.model"
SCALE_FACTORS_ATTRIBUTE = "MedSR.scaleFactorsXYZ"
#: DICOM Modality value -> MedSRLib modality: radiographs (CR, DX, RG) are "XR", as in
#: `MedSRLib.io.volumes.modality_of`; any other value (PT, US, MG, ...) has no MedSRLib modality.
MEDSR_MODALITY_FROM_DICOM = {"CT": "CT", "MR": "MR", "CR": "XR", "DX": "XR", "RG": "XR"}
#: Attributes of a markups ROI that Detect proposed: the input volume's node ID, and the lesion
#: finder's confidence. Apply uses every proposal of the input still in the scene.
DETECTED_FOR_ATTRIBUTE = "MedSR.detectedFor"
CONFIDENCE_ATTRIBUTE = "MedSR.confidence"

#: ROI-model choice meaning "the same model as outside the ROI" (not a registry name).
SAME_AS_MODEL = "(same)"
#: ROI-model choice meaning "MedSRLib's default for the modality and scale": the model measured
#: most accurate inside validation lesions within the time budget (`MedSRLib.roi.roi_models`).
AUTO_ROI_MODEL = "(auto)"
#: Models preferred inside the ROI when their weights ship and MedSRLib has no default table.
PREFERRED_ROI_MODELS = ("srgan", "srresnet")
#: Tooltip of the ROI model selector (the current choice's description follows it).
ROI_MODEL_TOOLTIP = (
    "Model inside the ROI (plus a margin, feathered); the model above runs elsewhere. "
    "Automatic: the model measured most accurate (PSNR/SSIM) inside validation lesions for the "
    "modality and scale, within 1.5x the plain run's time. LFSR generator (lfsr): a lesion-"
    "focused GAN with sharper texture but lower PSNR inside lesions than the default.")

#: Packages that belong to Slicer itself and must never be replaced by our requirements.
SLICER_OWNED_PACKAGES = ("numpy", "SimpleITK", "vtk")


def _ensureMedSRLibOnPath():
    """Make `MedSRLib` importable: installed beside this file, or the source tree's root.

    An installed extension has `MedSRLib/` next to `MedSR.py`; a developer checkout added
    through "Add module path" has it two levels up (repository root).
    """
    for candidate in (MODULE_DIR, MODULE_DIR.parent.parent):
        if (candidate / "MedSRLib" / "__init__.py").is_file():
            if str(candidate) not in sys.path:
                sys.path.insert(0, str(candidate))
            return candidate
    return None


MEDSRLIB_PARENT_DIR = _ensureMedSRLibOnPath()


def _medsrlib():
    """Import MedSRLib lazily: Slicer loads this module before torch may be installed."""
    import MedSRLib

    return MedSRLib


def _widgetProperty(widget, name):
    """A Qt property's value, read the same way under PythonQt (Slicer) and PySide6 (tests)."""
    return widget.property(name)


#: Index-space tolerance (voxels) of the ROI -> index box conversion: an ROI face within this
#: distance of a voxel boundary is on it, so a box made from whole voxels converts back exactly
#: (markups store the ROI centre in single precision: ~1e-6 voxel off at typical origins).
ROI_INDEX_TOLERANCE = 1e-3


def roiIndexBoxFromRASCorners(cornersRAS, rasToIJK, sizeIJK, roiName="ROI", volumeName="input volume"):
    """Input-voxel index box (x0, y0, z0, x1, y1, z1) of the voxels an ROI touches.

    Pure numpy (no Slicer): `cornersRAS` are the ROI's corner points (N x 3) in the volume's
    own RAS frame (parent transform already undone), `rasToIJK` is the volume's 4x4 RAS-to-IJK
    matrix and `sizeIJK` its voxel counts (I, J, K). Voxel i covers continuous index
    [i - 0.5, i + 0.5], so the box is floor(min + 0.5) inclusive .. ceil(max + 0.5) exclusive
    along each of I, J, K = SimpleITK's x, y, z, clipped to the volume. This is the `roi` box
    of `MedSRLib.upscale` (lower inclusive, upper exclusive). ValueError when the ROI covers
    no voxel of the volume.
    """
    corners = np.asarray(cornersRAS, dtype=np.float64).reshape(-1, 3)
    matrix = np.asarray(rasToIJK, dtype=np.float64)
    size = np.asarray(sizeIJK, dtype=np.int64)
    if matrix.shape != (4, 4) or size.shape != (3,):
        raise ValueError(f"rasToIJK must be 4x4 and sizeIJK 3 numbers, got {matrix.shape} and {tuple(size)}")
    if corners.shape[0] == 0 or not np.all(np.isfinite(corners)) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"{roiName!r} has no finite corner points in {volumeName!r}'s frame.")
    ijk = (matrix @ np.c_[corners, np.ones(len(corners))].T).T[:, :3]
    lower = np.floor(ijk.min(axis=0) + 0.5 + ROI_INDEX_TOLERANCE).astype(np.int64)
    upper = np.ceil(ijk.max(axis=0) + 0.5 - ROI_INDEX_TOLERANCE).astype(np.int64)
    upper = np.maximum(upper, lower + 1)  # a flat ROI still touches one layer of voxels
    lower, upper = np.clip(lower, 0, size), np.clip(upper, 0, size)
    if np.any(upper <= lower):
        a = int(np.argmax(upper <= lower))
        raise ValueError(
            f"ROI {roiName!r} does not overlap input {volumeName!r}: along {'IJK'[a]} it spans "
            f"voxel index {ijk[:, a].min():.1f}..{ijk[:, a].max():.1f}, the volume 0..{size[a] - 1}. "
            "Move or redraw the ROI on the volume.")
    return tuple(int(v) for v in (*lower, *upper))


def roiObjectToNodeFromIndexBox(ijkToRAS, box):
    """(objectToNode 4x4, size in mm) of a markups ROI that covers exactly the voxels of `box`.

    Pure numpy: `box` is (x0, y0, z0, x1, y1, z1) input voxel indices (lower inclusive, upper
    exclusive) and `ijkToRAS` the volume's 4x4 IJK-to-RAS matrix. The ROI's axes follow the
    volume's I, J, K directions (one axis negated when the volume's frame is left-handed: a
    box is symmetric, the ROI's frame must be a rotation), so an oblique box is not enlarged
    and `roiIndexBoxFromRASCorners` gives `box` back.
    """
    matrix = np.asarray(ijkToRAS, dtype=np.float64)
    lower, upper = np.asarray(box[:3], dtype=np.float64), np.asarray(box[3:], dtype=np.float64)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    axes = matrix[:3, :3] / spacing
    if np.linalg.det(axes) < 0:
        axes = axes * np.array([1.0, 1.0, -1.0])
    objectToNode = np.eye(4)
    objectToNode[:3, :3] = axes
    objectToNode[:3, 3] = (matrix @ np.r_[(lower + upper - 1.0) / 2.0, 1.0])[:3]
    return objectToNode, (upper - lower) * spacing


def modalityFromDICOMInstances(instanceUIDs, dicomModalityOfInstance):
    """MedSRLib modality ("CT", "MR" or "XR") of a volume loaded from DICOM, or None.

    Pure (no Slicer): `instanceUIDs` is the node's "DICOM.instanceUIDs" attribute (SOP instance
    UIDs separated by spaces; None or "" for a volume not loaded from DICOM) and
    `dicomModalityOfInstance(uid)` returns the DICOM Modality (0008,0060) of one instance
    ("" or None when unknown). The first instance decides (a series has one modality); CR, DX
    and RG radiographs are "XR"; other modalities and unknown ones give None.
    """
    uids = (instanceUIDs or "").split()
    if not uids:
        return None
    value = (dicomModalityOfInstance(uids[0]) or "").strip().upper()
    return MEDSR_MODALITY_FROM_DICOM.get(value)


def roiReportFromImage(image):
    """What a lesion-focused `MedSRLib.upscale` did, read from its "medsr_roi_*" metadata.

    None for a whole-volume run. Keys: roiIndexXYZ (6 ints or None: the first ROI),
    roiIndexesXYZ (every ROI, 6 ints each), roiModel, model, fallback (bool), score (float or
    None).
    """
    keys = set(image.GetMetaDataKeys())
    if "medsr_roi_model" not in keys:
        return None

    def value(key):
        return image.GetMetaData(key) if key in keys else None

    index = value("medsr_roi_index_xyz")
    score = value("medsr_roi_score")
    regions = value("medsr_roi_regions_index_xyz")
    return dict(
        roiIndexXYZ=tuple(int(v) for v in index.split()) if index and index != "none" else None,
        roiIndexesXYZ=[tuple(int(v) for v in part.split()) for part in regions.split(";")]
        if regions and regions != "none" else [],
        roiModel=value("medsr_roi_model") + (
            f", self-ensemble x{value('medsr_roi_self_ensemble')}"
            if value("medsr_roi_self_ensemble") not in (None, "1") else ""),
        model=value("medsr_model"),
        fallback=value("medsr_roi_fallback") == "1",
        score=float(score) if score and score != "none" else None)


def describeRoiReport(report):
    """One status-line sentence for `roiReportFromImage`'s report ("" for a whole-volume run)."""
    if not report:
        return ""
    if report["fallback"] or report["roiIndexXYZ"] is None:
        return (f"Lesion-focused: no ROI used, {report['model']} ran everywhere"
                + (f" (detector score {report['score']:.3f})." if report["score"] is not None else "."))
    boxes = report.get("roiIndexesXYZ") or []
    if len(boxes) > 1:
        return (f"Lesion-focused: {report['roiModel']} inside {len(boxes)} ROIs (plus margin, "
                f"feathered), {report['model']} elsewhere.")
    box = report["roiIndexXYZ"]
    return (f"Lesion-focused: {report['roiModel']} inside ROI voxels x {box[0]}..{box[3] - 1}, "
            f"y {box[1]}..{box[4] - 1}, z {box[2]}..{box[5] - 1} (plus margin, feathered), "
            f"{report['model']} elsewhere.")


#
# MedSR
#


class MedSR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSR"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSR developers"]
        self.parent.helpText = """
Super-resolves a scalar volume with a deep-learning model (or an interpolation baseline):
in-plane (finer pixels within each slice) or through-plane (thinner slices), x2, x3 or x4.
The output covers exactly the input's physical extent with the same directions.
Lesion-focused (LFSR): regions of interest (drawn, or proposed by Detect, one per lesion found,
named with its confidence, then kept, adjusted or deleted) get the ROI model, the rest of the volume the faster model, blended smoothly; the
output is still the whole volume. The ROI model offered first is one trained on the input's
modality (LFSR is trained on MR lesions; for CT, "Same as model"). The work runs in a background process; Apply becomes Cancel
while it runs.
See the <a href="https://github.com/medsr/MedSR">project page</a> and the model cards.
"""
        self.parent.acknowledgementText = """
Networks follow: Dong et al., "Image Super-Resolution Using Deep Convolutional Networks"
(SRCNN, 2014); Kim et al., "Accurate Image Super-Resolution Using Very Deep Convolutional
Networks" (VDSR, 2016); Lim et al., "Enhanced Deep Residual Networks for Single Image
Super-Resolution" (EDSR, 2017); Ledig et al., "Photo-Realistic Single Image Super-Resolution
Using a Generative Adversarial Network" (SRResNet, 2017); Du et al., "Fast and Memory-Efficient
Network Towards Efficient Image Super-Resolution" (FMEN, 2022). Built on PyTorch, MONAI and
SimpleITK; module structure after Slicer's scripted-module template and SlicerMONAIAuto3DSeg.
"""


#
# MedSRWidget
#


class MedSRWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: choices -> parameter node -> MedSRLogic.startProcessing; Apply <-> Cancel."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self.models = []
        self._autoRoiModel = None  # the ROI model chosen automatically last
        self.run = None
        self.lastError = None
        self._updatingGUI = False
        self._thinTargetFor = None  # input whose default target spacing the spin box holds

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSR.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.uiWidget = uiWidget
        for selector in (self.ui.inputSelector, self.ui.outputSelector, self.ui.roiSelector):
            selector.setMRMLScene(slicer.mrmlScene)

        self.logic = MedSRLogic()
        self._fillCombo(self.ui.modalityComboBox, MODALITIES)
        self.modalityToolTip = _widgetProperty(self.ui.modalityComboBox, "toolTip")
        self._fillCombo(self.ui.scaleComboBox, [(s, f"x{s}") for s in SCALES])
        self._fillCombo(self.ui.directionComboBox, DIRECTIONS)
        self._fillCombo(self.ui.sliceAxisComboBox, SLICE_AXES)
        self._fillCombo(self.ui.deviceComboBox, DEVICES)
        self._fillCombo(self.ui.precisionComboBox, PRECISIONS)
        self.populateModels()

        self.ui.inputSelector.currentNodeChanged.connect(self.onInputChanged)
        self.ui.thinSlicesCheckBox.toggled.connect(self.updateThinning)
        self.ui.adaptCheckBox.toggled.connect(self.updateThinning)
        self.ui.targetSpacingSpinBox.valueChanged.connect(self.updateThinning)
        for combo in (self.ui.modelComboBox, self.ui.scaleComboBox, self.ui.roiModelComboBox):
            combo.currentIndexChanged.connect(self.updateModelDescription)
        self.ui.modalityComboBox.currentIndexChanged.connect(self.updateModalityToolTip)
        self.ui.modalityComboBox.currentIndexChanged.connect(self.updateDefaultRoiModel)
        self.ui.scaleComboBox.currentIndexChanged.connect(self.updateDefaultRoiModel)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.detectButton.clicked.connect(self.onDetectButton)
        self.ui.progressBar.setVisible(False)
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self.pollTimer.timeout.connect(self.onPollTimer)
        self.restoreParametersFromNode()
        self.updateModalityToolTip()
        for combo in self._parameterCombos().values():
            combo.currentIndexChanged.connect(self.saveParametersToNode)
        self.ui.lesionCheckBox.toggled.connect(self.saveParametersToNode)
        for selector in (self.ui.inputSelector, self.ui.roiSelector):
            selector.currentNodeChanged.connect(self.saveParametersToNode)
        self.updateThinning()
        self.updateApplyButton()

    def cleanup(self):
        if self.run is not None:
            self.run.cancel()
            self.run = None
        self.removeObservers()

    @staticmethod
    def _fillCombo(combo, items):
        combo.clear()
        for data, text in items:
            combo.addItem(text, data)

    @staticmethod
    def _comboData(combo):
        return combo.itemData(_widgetProperty(combo, "currentIndex"))

    @staticmethod
    def _selectComboData(combo, data):
        index = combo.findData(data)
        if index >= 0:
            combo.setCurrentIndex(index)

    # -- model list -----------------------------------------------------------------------------

    def populateModels(self):
        """Fill the model list from MedSRLib's registry (empty until dependencies exist)."""
        self.ui.modelComboBox.clear()
        self.ui.roiModelComboBox.clear()
        try:
            self.models = self.logic.availableModels()
        except ImportError as error:
            self.models = []
            self.ui.modelComboBox.addItem("(dependencies missing: Apply installs them)", "")
            self.ui.modelDescriptionLabel.setText(f"MedSRLib cannot be imported yet: {error}")
            return
        for model in self.models:
            self.ui.modelComboBox.addItem(model["title"], model["name"])
        self._selectComboData(self.ui.modelComboBox, "bicubic")
        # Inside the ROI: MedSRLib's measured default, the outside model, or any SR model.
        self.ui.roiModelComboBox.addItem("Automatic (most accurate inside lesions)", AUTO_ROI_MODEL)
        self.ui.roiModelComboBox.addItem("Same as model", SAME_AS_MODEL)
        for model in self.models:
            self.ui.roiModelComboBox.addItem(model["title"], model["name"])
        self._autoRoiModel = None
        self.updateDefaultRoiModel()
        self.updateModelDescription()

    def effectiveModality(self):
        """The modality the run will use: the selector's, or with Auto the input's DICOM one
        (None when unknown)."""
        choice = self.modalityChoice()
        if choice != "auto":
            return choice
        return self.logic.inputModality(self.ui.inputSelector.currentNode())

    def updateDefaultRoiModel(self, *args):
        """Select the default ROI model for the current modality and scale, unless the user
        chose another one since the last automatic choice."""
        combo = self.ui.roiModelComboBox
        if not self.models:
            return
        current = self._comboData(combo)
        if self._autoRoiModel is not None and current != self._autoRoiModel:
            return
        scale = self._comboData(self.ui.scaleComboBox)
        choice = defaultRoiModel(self.models, modality=self.effectiveModality(),
                                 scale=int(scale) if scale else None)
        self._selectComboData(combo, choice)
        self._autoRoiModel = choice

    def updateModelDescription(self, *args):
        name = self._comboData(self.ui.modelComboBox)
        model = next((m for m in self.models if m["name"] == name), None)
        if model is None:
            return
        scale = self._comboData(self.ui.scaleComboBox) or 2
        self.ui.modelDescriptionLabel.setText(describeModelCard(model, scale))
        if self._comboData(self.ui.roiModelComboBox) == AUTO_ROI_MODEL:
            self.ui.roiModelComboBox.setToolTip(
                ROI_MODEL_TOOLTIP + " " + describeRoiDefault(self.effectiveModality(), int(scale)))
            return
        roiName = self.roiModelName()
        roiModel = next((m for m in self.models if m["name"] == roiName), None)
        if roiModel is not None:
            self.ui.roiModelComboBox.setToolTip(
                ROI_MODEL_TOOLTIP + " " + describeModelCard(roiModel, scale))

    def modalityChoice(self):
        """The Modality selector's choice: "auto", "CT", "MR" or "XR"."""
        return self._comboData(self.ui.modalityComboBox) or "auto"

    def updateModalityToolTip(self, *args):
        """Say in the selector's tooltip what Auto means for the current input."""
        if self.modalityChoice() != "auto":
            self.ui.modalityComboBox.setToolTip(self.modalityToolTip)
            return
        inputVolume = self.ui.inputSelector.currentNode()
        modality = self.logic.inputModality(inputVolume)
        if modality:
            now = f"{modality}, from the DICOM header of {inputVolume.GetName()!r}."
        else:
            now = ("unknown (the input was not loaded from DICOM, or its modality is not CT, MR or "
                   "X-ray): models that ship weights per modality need a choice here.")
        self.ui.modalityComboBox.setToolTip(f"{self.modalityToolTip} Auto now: {now}")

    def roiModelName(self):
        """Registry name of the model chosen for inside the ROI ("Same as model" resolved);
        None for "Automatic" (MedSRLib chooses)."""
        data = self._comboData(self.ui.roiModelComboBox)
        if data == AUTO_ROI_MODEL:
            return None
        if not data or data == SAME_AS_MODEL:
            return self._comboData(self.ui.modelComboBox) or None
        return data

    # -- parameter node (choices persist in the scene) -----------------------------------------

    def _parameterCombos(self):
        return {"Modality": self.ui.modalityComboBox,
                "Model": self.ui.modelComboBox, "ROIModel": self.ui.roiModelComboBox,
                "Scale": self.ui.scaleComboBox,
                "Direction": self.ui.directionComboBox, "SliceAxis": self.ui.sliceAxisComboBox,
                "Device": self.ui.deviceComboBox, "Precision": self.ui.precisionComboBox}

    def saveParametersToNode(self, *args):
        if self._updatingGUI:
            return
        parameterNode = self.logic.getParameterNode()
        wasModifying = parameterNode.StartModify()
        for name, combo in self._parameterCombos().items():
            data = self._comboData(combo)
            if data is not None and data != "":
                parameterNode.SetParameter(name, str(data))
        parameterNode.SetParameter("LesionFocused", "true" if _widgetProperty(self.ui.lesionCheckBox, "checked") else "false")
        for role, selector in (("InputVolume", self.ui.inputSelector), ("ROI", self.ui.roiSelector)):
            node = selector.currentNode()
            parameterNode.SetNodeReferenceID(role, node.GetID() if node is not None else None)
        parameterNode.EndModify(wasModifying)

    def restoreParametersFromNode(self):
        parameterNode = self.logic.getParameterNode()
        self._updatingGUI = True
        try:
            for name, combo in self._parameterCombos().items():
                value = parameterNode.GetParameter(name)
                for index in range(combo.count()):
                    if value and str(combo.itemData(index)) == value:
                        combo.setCurrentIndex(index)
            self.ui.lesionCheckBox.setChecked(parameterNode.GetParameter("LesionFocused") == "true")
            for role, selector in (("InputVolume", self.ui.inputSelector), ("ROI", self.ui.roiSelector)):
                node = parameterNode.GetNodeReference(role)
                if node is not None:
                    selector.setCurrentNode(node)
        finally:
            self._updatingGUI = False
        self.updateModelDescription()

    # -- GUI state ------------------------------------------------------------------------------

    def onInputChanged(self, *args):
        self.updateModalityToolTip()
        self.updateDefaultRoiModel()
        self.updateThinning()
        self.updateApplyButton()

    def updateThinning(self, *args):
        """Show the factor "Make slices thinner" will use (and the adaptation's time budget)."""
        thin = bool(_widgetProperty(self.ui.thinSlicesCheckBox, "checked"))
        for widget in (self.ui.targetSpacingSpinBox, self.ui.adaptCheckBox):
            widget.setEnabled(thin)
        inputVolume = self.ui.inputSelector.currentNode()
        if not thin or inputVolume is None or inputVolume.GetImageData() is None:
            self.ui.thinFactorLabel.setText("-" if not thin else "Select an input volume.")
            return
        if self._thinTargetFor != inputVolume.GetID():  # a new input: its in-plane pixel size
            self._thinTargetFor = inputVolume.GetID()
            self.ui.targetSpacingSpinBox.setValue(self.logic.defaultTargetSpacing(inputVolume))
            return  # setValue called updateThinning again
        try:
            summary = self.logic.thinningSummary(
                inputVolume, float(_widgetProperty(self.ui.targetSpacingSpinBox, "value")),
                bool(_widgetProperty(self.ui.adaptCheckBox, "checked")))
            self.ui.thinFactorLabel.setText(summary["text"])
        except (ValueError, ImportError) as error:
            self.ui.thinFactorLabel.setText(str(error))

    def updateApplyButton(self):
        if self.run is not None:
            self.ui.applyButton.setText("Cancel")
            self.ui.applyButton.setToolTip("Stop the running super-resolution; the scene is left as it was.")
            self.ui.applyButton.setEnabled(True)
            return
        self.ui.applyButton.setText("Apply")
        hasInput = self.ui.inputSelector.currentNode() is not None
        self.ui.applyButton.setToolTip("Run super-resolution" if hasInput else "Select an input volume")
        self.ui.applyButton.setEnabled(hasInput)

    def currentParameters(self):
        """The panel's choices as keyword arguments of MedSRLogic.startProcessing/process."""
        lesion = bool(_widgetProperty(self.ui.lesionCheckBox, "checked"))
        return dict(
            inputVolume=self.ui.inputSelector.currentNode(),
            outputVolume=self.ui.outputSelector.currentNode(),
            model=self._comboData(self.ui.modelComboBox) or None,
            modality=self.modalityChoice(),
            scale=int(self._comboData(self.ui.scaleComboBox)),
            direction=self._comboData(self.ui.directionComboBox),
            sliceAxis=self._comboData(self.ui.sliceAxisComboBox),
            device=self._comboData(self.ui.deviceComboBox),
            precision=self._comboData(self.ui.precisionComboBox),
            roiNode=self.lesionROIs() if lesion else None,
            roiModel=self.roiModelName() if lesion else None,
            **self.thinningParameters(),
        )

    def thinningParameters(self):
        """{} or the "Make slices thinner" keyword arguments of MedSRLogic.process."""
        if not _widgetProperty(self.ui.thinSlicesCheckBox, "checked"):
            return {}
        return dict(targetSpacing=float(_widgetProperty(self.ui.targetSpacingSpinBox, "value")),
                    adapt=bool(_widgetProperty(self.ui.adaptCheckBox, "checked")))

    def lesionROIs(self):
        """ROI nodes of a lesion-focused run: Detect's proposals for the input still in the scene,
        plus the selected ROI when it is not one of them; None when there is none, the node
        itself when there is one."""
        nodes = self.logic.lesionROINodes(self.ui.inputSelector.currentNode())
        selected = self.ui.roiSelector.currentNode()
        if selected is not None and selected not in nodes:
            nodes.append(selected)
        return None if not nodes else nodes[0] if len(nodes) == 1 else nodes

    # -- actions --------------------------------------------------------------------------------

    def onApplyButton(self):
        if self.run is not None:
            self.onCancel()
            return
        self.lastError = None
        try:
            with slicer.util.tryWithErrorDisplay("Failed to start super-resolution.", waitCursor=True):
                if not self.models:
                    self.logic.ensureDependencies()
                    self.populateModels()
                parameters = self.currentParameters()
                if _widgetProperty(self.ui.lesionCheckBox, "checked") and parameters["roiNode"] is None:
                    raise ValueError("Lesion-focused mode needs an ROI: draw one or click Detect.")
                self.run = self.logic.startProcessing(**parameters)
        except Exception as error:
            self._showFailure(error)
            return
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.setText("Starting...")
        self.updateApplyButton()
        self.pollTimer.start()

    def onCancel(self):
        if self.run is None:
            return
        self.pollTimer.stop()
        self.run.cancel()
        self.run = None
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.setText("Cancelled; the scene is unchanged.")
        self.updateApplyButton()

    def onPollTimer(self):
        run = self.run
        if run is None:
            self.pollTimer.stop()
            return
        try:
            finished = run.poll()
        except Exception as error:
            finished = True
            self.run = None
            self.pollTimer.stop()
            self.ui.progressBar.setVisible(False)
            try:
                with slicer.util.tryWithErrorDisplay("Super-resolution failed.", waitCursor=False):
                    raise error
            except Exception:
                pass
            self._showFailure(error)
            self.updateApplyButton()
            return
        self.ui.progressBar.setValue(int(round(100 * run.fraction)))
        self.ui.statusLabel.setText(f"{run.message} ({run.elapsedSeconds():.0f} s)")
        if finished:
            self.pollTimer.stop()
            self.run = None
            self.ui.progressBar.setVisible(False)
            self.ui.statusLabel.setText(" ".join(filter(None, (
                f"Done in {run.elapsedSeconds():.1f} s: {run.outputVolume.GetName()}.",
                describeRoiReport(run.roiReport)))))
            self.ui.outputSelector.setCurrentNode(None)
            self.updateApplyButton()

    def onDetectButton(self):
        self.lastError = None
        try:
            with slicer.util.tryWithErrorDisplay("Lesion detection failed.", waitCursor=True):
                inputVolume = self.ui.inputSelector.currentNode()
                if inputVolume is None:
                    raise ValueError("Select an input volume first.")
                nodes = self.logic.detectLesionROIs(inputVolume)
                if not nodes:
                    self.ui.statusLabel.setText("No lesion found: draw an ROI instead.")
                    return
                self.ui.roiSelector.setCurrentNode(nodes[0])
                self.ui.lesionCheckBox.setChecked(True)
                self.ui.statusLabel.setText(
                    f"{len(nodes)} lesion ROI(s) proposed ("
                    + ", ".join(node.GetName() for node in nodes)
                    + "): keep, move, resize or delete them, then Apply.")
        except Exception as error:
            self._showFailure(error)

    def _showFailure(self, error):
        self.lastError = error
        self.ui.statusLabel.setText(f"Error: {panelMessage(str(error))}")
        logging.error("MedSR: %s", error)


def panelMessage(message):
    """A MedSRLib error message worded for the panel (the CLI's --modality is its selector)."""
    return message.replace("with --modality", "in the Modality selector")


def preferredRoiModels():
    """AUTO_ROI_MODEL when MedSRLib has its table of measured ROI defaults, then
    PREFERRED_ROI_MODELS."""
    try:
        from MedSRLib.roi import roi_models  # noqa: F401
        libraryDefault = (AUTO_ROI_MODEL,)
    except ImportError:
        libraryDefault = ()
    return libraryDefault + PREFERRED_ROI_MODELS


def describeRoiDefault(modality, scale):
    """One sentence: what "Automatic" runs inside the ROI for `modality` and `scale`, with the
    figures that chose it."""
    try:
        from MedSRLib.roi import roi_models
    except ImportError:
        return ""
    choice = roi_models.default_roi_choice(modality, scale)
    if choice is None:
        return f"Automatic now: the model above (no measured default for x{scale})."
    text = f"Automatic now: {choice.label}"
    if choice.psnr_over_default_db is not None:
        text += (f", {choice.psnr_over_default_db:+.2f} dB PSNR inside validation lesions over the "
                 f"plain default, ROI work {choice.roi_work_over_plain:.2f}x the plain run")
    return text + "."


def defaultRoiModel(models, preferred=None, modality=None, scale=None):
    """The ROI model offered first: the first of `preferred` (default `preferredRoiModels()`:
    "Automatic", MedSRLib's measured default, when it has one) that is AUTO_ROI_MODEL or ships
    weights (at `scale`, when given) trained on `modality` (when known: "CT", "MR", "XR"),
    else "Same as model"."""
    for name in preferredRoiModels() if preferred is None else preferred:
        if name == AUTO_ROI_MODEL:
            return name
        model = next((m for m in models if m["name"] == name), None)
        weights = (model or {}).get("weights") or {}
        if scale is not None:
            weights = {key: card for key, card in weights.items() if key == f"x{scale}"}
        if not weights:
            continue
        trainedOn = {str(m).upper() for card in weights.values() for m in (card or {}).get("modality") or []}
        if modality and trainedOn and modality.upper() not in trainedOn:
            continue
        return name
    return SAME_AS_MODEL


def describeModelCard(model, scale):
    """One line from a registry entry: description, modality, measured quality and speed."""
    parts = [model.get("description") or model["title"]]
    card = (model.get("weights") or {}).get(f"x{scale}")
    modalities = (card or {}).get("modality") or model.get("modalities") or []
    if isinstance(modalities, str):
        modalities = [modalities]
    parts.append("Modality: " + (", ".join(modalities) or "any"))
    files = [name.strip() for name in str((card or {}).get("file") or "").split(",") if name.strip()]
    if scale not in model.get("scales", []):
        parts.append(f"does not support x{scale} (supports "
                     + ", ".join(f"x{s}" for s in model.get("scales", [])) + ")")
    elif model.get("kind") != "interpolation" and card is None:
        parts.append(f"no trained weights for x{scale}")
    else:
        perModality = [m for _, m in MODALITIES[1:]
                       if any(name.lower().endswith(f"_{m.lower()}.safetensors") for name in files)]
        if perModality:
            general = len(files) > len(perModality)
            parts.append(f"x{scale} weights per modality ({', '.join(perModality)})"
                         + ("" if general else ": choose the Modality"))
    metrics = (card or {}).get("metrics") or {}
    if metrics:
        # MedSRLib lists several files' merged modalities but the first file's metrics.
        measuredOn = f" ({files[0]})" if len(files) > 1 else ""
        parts.append(f"Measured{measuredOn}: " + ", ".join(f"{k} {_formatMetric(v)}" for k, v in metrics.items()))
    return ". ".join(part.rstrip(". ") for part in parts) + "."


def _formatMetric(value):
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_formatMetric(v)}" for k, v in value.items()) + ")"
    return str(value)


#
# MedSRLogic
#


class MedSRLogic(ScriptedLoadableModuleLogic):
    """Converts nodes <-> SimpleITK images and runs MedSRLib; usable without the widget.

    From Slicer's Python console:
        logic = slicer.util.getModuleLogic("MedSR")  # or MedSR.MedSRLogic()
        srNode = logic.process(getNode("MRHead"), model="bicubic", scale=2)
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    # -- dependencies ---------------------------------------------------------------------------

    @staticmethod
    def requirementsPath():
        return MODULE_DIR / "Resources" / "requirements.txt"

    @staticmethod
    def missingDependencies():
        import importlib.util

        return [name for name in ("torch", "monai", "safetensors") if importlib.util.find_spec(name) is None]

    def ensureDependencies(self, askConfirmation=True):
        """Install torch (through the PyTorch extension when present) and MonAI if missing.

        Slicer's own numpy, SimpleITK and VTK are pinned by a constraints file so that pip
        never replaces them.
        """
        missing = self.missingDependencies()
        if not missing:
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                "MedSR needs " + ", ".join(missing) + " (several hundred MB). Install now?",
                "MedSR dependencies"):
            raise ImportError("MedSR needs " + ", ".join(missing) + "; installation was declined.")
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if not torchLogic.torchInstalled():
                    if torchLogic.installTorch(askConfirmation=False) is None:
                        raise ImportError("PyTorch could not be installed by the PyTorch extension.")
        slicer.util.pip_install(["-r", str(self.requirementsPath()), "-c", str(self._writeConstraints())])
        import importlib

        importlib.invalidate_caches()
        still = self.missingDependencies()
        if still:
            raise ImportError("still missing after installation: " + ", ".join(still))

    @staticmethod
    def _writeConstraints():
        """A pip constraints file pinning the installed versions of Slicer's own packages."""
        from importlib import metadata

        lines = []
        for name in SLICER_OWNED_PACKAGES:
            try:
                lines.append(f"{name}=={metadata.version(name)}")
            except metadata.PackageNotFoundError:
                pass
        path = Path(tempfile.mkdtemp(prefix="MedSR-")) / "constraints.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def availableModels(self):
        """Super-resolution models of the registry (detectors left out), as described there."""
        return [m for m in _medsrlib().list_models() if m.get("kind") != "detector"]

    # -- node <-> image -------------------------------------------------------------------------

    @staticmethod
    def volumeNodeToImage(volumeNode):
        """SimpleITK image (LPS) with the node's voxels and its IJK-to-RAS geometry.

        The node's parent transform is not applied: the result lives in the node's own frame
        and the output node gets the same parent transform.
        """
        if volumeNode is None:
            raise ValueError("No input volume selected.")
        if volumeNode.GetClassName() != "vtkMRMLScalarVolumeNode":
            raise ValueError(f"Input {volumeNode.GetName()!r} is a {volumeNode.GetClassName()}; "
                             "MedSR super-resolves scalar volumes only.")
        if volumeNode.GetImageData() is None:
            raise ValueError(f"Input volume {volumeNode.GetName()!r} has no voxels.")
        voxels_kji = slicer.util.arrayFromVolume(volumeNode)
        image = sitk.GetImageFromArray(voxels_kji)  # copies; KJI array -> (x=I, y=J, z=K) image
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        ijkToLPS = RAS_FROM_LPS @ slicer.util.arrayFromVTKMatrix(ijkToRAS)
        spacing = np.array(volumeNode.GetSpacing(), dtype=np.float64)
        image.SetSpacing(spacing.tolist())
        image.SetOrigin(ijkToLPS[:3, 3].tolist())
        image.SetDirection((ijkToLPS[:3, :3] / spacing).reshape(-1).tolist())
        return image

    @staticmethod
    def ijkToRASFromImage(image):
        """IJK-to-RAS 4x4 of a SimpleITK image: diag(-1,-1,1,1) @ [[D diag(s), o], [0 0 0 1]]."""
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        ijkToLPS = np.eye(4)
        ijkToLPS[:3, :3] = direction @ np.diag(image.GetSpacing())
        ijkToLPS[:3, 3] = image.GetOrigin()
        return RAS_FROM_LPS @ ijkToLPS

    @staticmethod
    def outputName(inputVolume, scale, lesionFocused=False):
        return f"{inputVolume.GetName()}_{'LFSR' if lesionFocused else 'SR'}x{scale}"

    def addOutputVolume(self, inputVolume, image, outputVolume=None, name=None, show=True):
        """Put `image` into the scene beside `inputVolume`; return the (new or given) node.

        Geometry comes from `image` only; the node gets the input's parent transform,
        subject-hierarchy folder and window/level. A new node is removed again if anything
        fails, so nothing half-made stays in the scene.
        """
        voxels = sitk.GetArrayFromImage(image)
        if voxels.ndim != 3:
            raise ValueError(f"Super-resolved image must be 3-D, got shape {voxels.shape}.")
        if voxels.dtype in (np.int64, np.uint64):  # VTK volumes refuse 64-bit integers
            voxels = voxels.astype(np.float64)
        ijkToRAS = self.ijkToRASFromImage(image)
        scene = slicer.mrmlScene
        created = outputVolume is None
        if created:
            outputVolume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or "")
        try:
            outputVolume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRAS))
            slicer.util.updateVolumeFromArray(outputVolume, voxels)
            outputVolume.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
            for key, attribute in (("medsr_model", MODEL_ATTRIBUTE),
                                   ("medsr_scale_factors_xyz", SCALE_FACTORS_ATTRIBUTE)):
                if image.HasMetaDataKey(key):
                    outputVolume.SetAttribute(attribute, image.GetMetaData(key))
            outputVolume.CreateDefaultDisplayNodes()
            self._copyDisplay(inputVolume, outputVolume)
            self._placeInSameFolder(inputVolume, outputVolume)
        except Exception:
            if created:
                scene.RemoveNode(outputVolume)
            raise
        if show:
            slicer.util.setSliceViewerLayers(background=outputVolume, fit=True)
        return outputVolume

    @staticmethod
    def _copyDisplay(inputVolume, outputVolume):
        inputDisplay = inputVolume.GetDisplayNode()
        outputDisplay = outputVolume.GetDisplayNode()
        if inputDisplay is None or outputDisplay is None:
            return
        if inputDisplay.GetColorNodeID():
            outputDisplay.SetAndObserveColorNodeID(inputDisplay.GetColorNodeID())
        if inputDisplay.GetAutoWindowLevel():
            outputDisplay.AutoWindowLevelOn()
        else:
            outputDisplay.AutoWindowLevelOff()
            outputDisplay.SetWindowLevel(inputDisplay.GetWindow(), inputDisplay.GetLevel())

    @staticmethod
    def _placeInSameFolder(inputVolume, outputVolume):
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        if shNode is None:
            return
        inputItem = shNode.GetItemByDataNode(inputVolume)
        if not inputItem:
            return
        parentItem = shNode.GetItemParent(inputItem)
        outputItem = shNode.GetItemByDataNode(outputVolume)
        if outputItem:
            shNode.SetItemParent(outputItem, parentItem)
        else:
            shNode.CreateItem(parentItem, outputVolume)

    # -- back to the PACS -----------------------------------------------------------------------

    def exportDICOMSeries(self, outputVolume, inputVolume, folder, overwrite=False):
        """Write `outputVolume` (a MedSR output) as a derived DICOM series of the DICOM series
        `inputVolume` was loaded from: `MedSRLib.write_dicom_series` with the input's files from
        Slicer's DICOM database, and the model and factors recorded on the output node.

        Slicer's own "Export to DICOM" also writes the output into the input's study (it sits in
        the same subject-hierarchy study); this call adds the derived-series tags (DERIVED,
        references to the source images, the model, the source's stored representation).
        """
        uids = (inputVolume.GetAttribute(DICOM_INSTANCE_UIDS_ATTRIBUTE) or "").split()
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            raise ValueError(f"{inputVolume.GetName()!r} was not loaded from DICOM; a derived "
                             "series needs its source series")
        files = [database.fileForInstance(uid) for uid in uids]
        if not all(files):
            raise ValueError(f"the DICOM database lacks files of {inputVolume.GetName()!r}")
        model = outputVolume.GetAttribute(MODEL_ATTRIBUTE)
        factors = (outputVolume.GetAttribute(SCALE_FACTORS_ATTRIBUTE) or "").split()
        if not model or len(factors) != 3:
            raise ValueError(f"{outputVolume.GetName()!r} is not a MedSR output (no model/scale)")
        return _medsrlib().write_dicom_series(
            self.volumeNodeToImage(outputVolume), files, folder, overwrite=overwrite,
            model=model, scale_factors=[float(f) for f in factors])

    # -- what to run ----------------------------------------------------------------------------

    @staticmethod
    def inputModality(volumeNode):
        """MedSRLib modality ("CT", "MR", "XR") of `volumeNode` from Slicer's DICOM database.

        None when the node was not loaded from DICOM (no "DICOM.instanceUIDs" attribute), no
        DICOM database is open, or the DICOM modality is none of CT, MR and radiography.
        """
        database = getattr(slicer, "dicomDatabase", None)
        if volumeNode is None or database is None:
            return None

        def dicomModalityOfInstance(uid):
            return database.fileValue(database.fileForInstance(uid), DICOM_MODALITY_TAG)

        return modalityFromDICOMInstances(volumeNode.GetAttribute(DICOM_INSTANCE_UIDS_ATTRIBUTE),
                                          dicomModalityOfInstance)

    def resolveModality(self, inputVolume, modality="auto"):
        """The `modality` argument of MedSRLib.upscale: "CT", "MR", "XR" or None (unknown).

        `modality` "CT", "MR" or "XR" is used as given; "auto" or None reads the input's DICOM
        modality (`inputModality`).
        """
        if modality is None or str(modality).lower() == "auto":
            return self.inputModality(inputVolume)
        known = [m for _, m in MODALITIES[1:]]
        if str(modality).upper() not in known:
            raise ValueError(f"modality must be 'auto' or one of {', '.join(known)}, got {modality!r}")
        return str(modality).upper()

    def scaleAndAxis(self, image, scale, direction, sliceAxis):
        """(scale, axis) arguments of MedSRLib.upscale for the panel's choices.

        In-plane: the integer `scale` with the slice axis. Through-plane: a per-axis (x, y, z)
        tuple with `scale` on the slice axis; "auto" asks MedSRLib which axis it would take
        (the largest spacing).
        """
        if direction == "in-plane":
            return int(scale), sliceAxis
        if direction != "through-plane":
            raise ValueError(f"direction must be 'in-plane' or 'through-plane', got {direction!r}")
        _medsrlib()
        from MedSRLib.through_plane import planning

        axis = planning.through_axis((1.0, 1.0, 1.0), image.GetSpacing(), sliceAxis)
        factors = [1, 1, 1]
        factors[axis] = int(scale)
        return tuple(factors), axis

    @staticmethod
    def _spacingAndSize(inputVolume):
        return tuple(inputVolume.GetSpacing()), tuple(inputVolume.GetImageData().GetDimensions())

    def defaultTargetSpacing(self, inputVolume):
        """The default "Make slices thinner" target: the input's in-plane pixel size (mm)."""
        _medsrlib()
        from MedSRLib.through_plane import planning

        return planning.default_target_spacing(self._spacingAndSize(inputVolume)[0])

    def thinningSummary(self, inputVolume, targetSpacing, adapt=False):
        """MedSRLib's plan for "Make slices thinner" to `targetSpacing` mm: {"axis", "factor",
        "in_slices", "out_slices", "text"}; ValueError (MedSRLib's InputError) when it cannot."""
        _medsrlib()
        from MedSRLib.through_plane import planning, run

        spacing, size = self._spacingAndSize(inputVolume)
        return planning.thinning_summary(spacing, size, targetSpacing,
                                         run.DEFAULT_ADAPT_SECONDS if adapt else None)

    @staticmethod
    def roiCornersInVolumeFrame(roiNode, inputVolume):
        """The ROI's 8 corners (8 x 3) in the input volume's own RAS frame.

        Corners of the (possibly rotated) ROI box, through the ROI's parent transform to world
        and from world through the inverse of the volume's parent transform, so an ROI drawn
        in world coordinates selects the anatomy it is drawn on.
        """
        bounds = [0.0] * 6
        roiNode.GetObjectBounds(bounds)  # the box in the ROI's object frame
        objectToNode = slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToNodeMatrix())
        cornersObject = np.array([[x, y, z, 1.0] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])
        corners = [tuple(p) for p in (objectToNode @ cornersObject.T).T[:, :3]]
        roiTransformNode = roiNode.GetParentTransformNode()
        if roiTransformNode is not None:  # ROI node frame -> world
            roiToWorld = vtk.vtkGeneralTransform()
            roiTransformNode.GetTransformToWorld(roiToWorld)
            corners = [roiToWorld.TransformPoint(p) for p in corners]
        volumeTransformNode = inputVolume.GetParentTransformNode()
        if volumeTransformNode is not None:  # world -> the volume's own (local) RAS frame
            worldToVolume = vtk.vtkGeneralTransform()
            volumeTransformNode.GetTransformFromWorld(worldToVolume)
            corners = [worldToVolume.TransformPoint(p) for p in corners]
        return np.array(corners, dtype=np.float64)

    def roiIndexBox(self, inputVolume, roiNode):
        """The markups ROI as MedSRLib's `roi` box: input voxel indices (x0, y0, z0, x1, y1, z1),
        SimpleITK (x, y, z) = (I, J, K) order, lower inclusive, upper exclusive, clipped to the
        volume. ValueError when the ROI does not overlap the volume."""
        if roiNode is None:
            raise ValueError("Lesion-focused mode needs an ROI: draw one or click Detect.")
        if not roiNode.IsA("vtkMRMLMarkupsROINode"):
            raise ValueError(f"{roiNode.GetName()!r} is a {roiNode.GetClassName()}, not a markups ROI.")
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("No input volume selected.")
        rasToIJK = vtk.vtkMatrix4x4()
        inputVolume.GetRASToIJKMatrix(rasToIJK)
        return roiIndexBoxFromRASCorners(
            self.roiCornersInVolumeFrame(roiNode, inputVolume), slicer.util.arrayFromVTKMatrix(rasToIJK),
            inputVolume.GetImageData().GetDimensions(), roiNode.GetName(), inputVolume.GetName())

    def prepareImage(self, inputVolume, scale, direction, sliceAxis, roiNode, targetSpacing=None):
        """(image, scale argument, axis argument, roi or None) for MedSRLib.upscale: `roiNode`
        a markups ROI (one index box) or a list of them (a list of boxes; one: that box); with
        `targetSpacing` ("Make slices thinner") the scale is None and the axis "auto"."""
        image = self.volumeNodeToImage(inputVolume)
        roiBox = None
        if isinstance(roiNode, (list, tuple)):
            if not roiNode:
                raise ValueError("Lesion-focused mode needs an ROI: draw one or click Detect.")
            boxes = [self.roiIndexBox(inputVolume, node) for node in roiNode]
            roiBox = boxes[0] if len(boxes) == 1 else boxes
        elif roiNode is not None:
            roiBox = self.roiIndexBox(inputVolume, roiNode)
        if targetSpacing is not None:
            if roiBox is not None:
                raise ValueError("Make slices thinner and lesion-focused mode cannot be combined.")
            return image, None, "auto", None
        scaleArgument, axisArgument = self.scaleAndAxis(image, scale, direction, sliceAxis)
        return image, scaleArgument, axisArgument, roiBox

    @staticmethod
    def thinOutputName(inputVolume, targetSpacing):
        return f"{inputVolume.GetName()}_{targetSpacing:g}mm"

    # -- running --------------------------------------------------------------------------------

    def process(self, inputVolume, outputVolume=None, model=None, scale=2, direction="in-plane",
                sliceAxis="auto", device="auto", precision="auto", roiNode=None, roiModel=None,
                allowUntrained=False, progress=None, cancel=None, show=True, modality="auto",
                targetSpacing=None, adapt=False):
        """Super-resolve `inputVolume` in this process (blocking); return the output node.

        `targetSpacing` (mm) is "Make slices thinner": MedSRLib.upscale(target_spacing=...)
        with the through-plane network (any factor; `model`, `scale` and `direction` are not
        used), `adapt` fine-tunes a copy of it on this volume first.

        `modality` ("auto", "CT", "MR" or "XR"; see `resolveModality`) picks the default model
        and a model's per-modality weights; MedSRLib.upscale gets it only when it is known.

        With `roiNode` (a markups ROI) the run is lesion-focused (LFSR): MedSRLib.upscale gets
        the ROI as an input voxel index box and runs `roiModel` inside it (plus a margin,
        feathered) and `model` elsewhere; the output is still the whole volume. `roiModel`
        None lets MedSRLib choose (srgan when its weights ship, else an error).
        `progress(fraction, message)` and `cancel` (a MedSRLib.CancelToken) go to
        MedSRLib.upscale. On failure or cancel the scene is left unchanged. What the
        lesion-focused run did is in `self.lastRoiReport` (see `roiReportFromImage`).
        """
        MedSRLib = _medsrlib()
        image, scaleArgument, axisArgument, roiBox = self.prepareImage(
            inputVolume, scale, direction, sliceAxis, roiNode, targetSpacing)
        roiArguments = dict(roi=roiBox, roi_model=roiModel or None) if roiBox is not None else {}
        if targetSpacing is not None:
            model = None
            roiArguments = dict(target_spacing=float(targetSpacing), adapt=bool(adapt))
        modality = self.resolveModality(inputVolume, modality)
        modalityArguments = dict(modality=modality) if modality else {}
        startTime = time.time()
        self.lastRoiReport = None
        try:
            result = MedSRLib.upscale(image, model=model, scale=scaleArgument, axis=axisArgument,
                                      device=device, precision=precision,
                                      allow_untrained=allowUntrained, progress=progress, cancel=cancel,
                                      **modalityArguments, **roiArguments)
        except (MemoryError, RuntimeError) as error:
            if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
                raise MemoryError(outOfMemoryMessage(str(error))) from error
            raise
        name = (self.thinOutputName(inputVolume, targetSpacing) if targetSpacing is not None
                else self.outputName(inputVolume, scale, roiBox is not None))
        node = self.addOutputVolume(inputVolume, result, outputVolume, name, show=show)
        self.lastRoiReport = roiReportFromImage(result)
        logging.info(f"MedSR finished in {time.time() - startTime:.1f} s")
        return node

    def startProcessing(self, inputVolume, outputVolume=None, model=None, scale=2,
                        direction="in-plane", sliceAxis="auto", device="auto", precision="auto",
                        roiNode=None, roiModel=None, allowUntrained=False, show=True, modality="auto",
                        targetSpacing=None, adapt=False):
        """Start super-resolution in a background process; return the MedSRBackgroundRun.

        Arguments as `process`. Call `run.poll()` from a QTimer until it returns True (the
        output node is then in `run.outputVolume`, a lesion-focused run's report in
        `run.roiReport`), or `run.cancel()`. The scene is only touched on success.
        """
        image, scaleArgument, axisArgument, roiBox = self.prepareImage(
            inputVolume, scale, direction, sliceAxis, roiNode, targetSpacing)
        arguments = dict(model=model if targetSpacing is None else None, scale=scaleArgument,
                         axis=axisArgument, device=device,
                         precision=precision, allowUntrained=allowUntrained, roi=roiBox,
                         modality=self.resolveModality(inputVolume, modality),
                         roiModel=(roiModel or None) if roiBox is not None else None,
                         targetSpacing=targetSpacing, adapt=bool(adapt) and targetSpacing is not None)
        name = (self.thinOutputName(inputVolume, targetSpacing) if targetSpacing is not None
                else self.outputName(inputVolume, scale, roiBox is not None))
        run = MedSRBackgroundRun(self, inputVolume, image, arguments, outputVolume, name, show)
        run.start()
        return run

    # -- lesion ROI -----------------------------------------------------------------------------

    def detectLesionROI(self, inputVolume, roiNode=None):
        """Run MedSRLib's lesion detector and show its box as a markups ROI node.

        The user may move or resize the ROI, or draw one instead of detecting.
        """
        _medsrlib()
        try:
            from MedSRLib.roi import focus as roi
        except ImportError as error:
            raise ValueError("This MedSRLib has no lesion detector (MedSRLib.roi.focus); draw an ROI instead.") from error
        image = self.volumeNodeToImage(inputVolume)
        lower, upper = roi.detect_lesion(image)  # voxel indices (x, y, z), upper exclusive
        return self.setROIFromIndexBox(roiNode, inputVolume, (*lower, *upper))

    def detectLesionROIs(self, inputVolume):
        """Run MedSRLib's lesion finder and show every ROI it finds as its own markups ROI node,
        named with its confidence ("<volume>_lesion1 (93%)", most confident first) and tagged
        as a proposal for `inputVolume`; earlier proposals for that volume are removed first.

        The user keeps, moves, resizes or deletes them; Apply uses those still in the scene
        (`lesionROINodes`). Returns the new nodes (an empty list when no lesion is found).
        """
        _medsrlib()
        from MedSRLib.roi import focus as roi

        image = self.volumeNodeToImage(inputVolume)
        found = roi.detect_lesions(image)  # [(lower xyz, upper xyz exclusive, confidence)]
        for node in self.lesionROINodes(inputVolume):
            slicer.mrmlScene.RemoveNode(node)
        nodes = []
        for number, (lower, upper, confidence) in enumerate(found, start=1):
            node = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLMarkupsROINode",
                f"{inputVolume.GetName()}_lesion{number} ({confidence:.0%})")
            node.SetAttribute(DETECTED_FOR_ATTRIBUTE, inputVolume.GetID())
            node.SetAttribute(CONFIDENCE_ATTRIBUTE, f"{confidence:.4f}")
            nodes.append(self.setROIFromIndexBox(node, inputVolume, (*lower, *upper)))
        return nodes

    @staticmethod
    def lesionROINodes(inputVolume):
        """The ROI nodes Detect proposed for `inputVolume` that are still in the scene (the
        user may have deleted some), in the order Detect made them."""
        if inputVolume is None:
            return []
        nodes = slicer.mrmlScene.GetNodesByClass("vtkMRMLMarkupsROINode")
        found = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
        return [node for node in found
                if node.GetAttribute(DETECTED_FOR_ATTRIBUTE) == inputVolume.GetID()]

    def setROIFromIndexBox(self, roiNode, inputVolume, box):
        """Show input voxel index box `box` (x0, y0, z0, x1, y1, z1; upper exclusive) as a
        markups ROI aligned with the volume's axes (a new node when `roiNode` is None), under
        the volume's parent transform. `roiIndexBox` gives the same box back."""
        ijkToRAS = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRAS)
        objectToNode, sizeMM = roiObjectToNodeFromIndexBox(slicer.util.arrayFromVTKMatrix(ijkToRAS), box)
        if roiNode is None:
            roiNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{inputVolume.GetName()}_lesion")
        wasModifying = roiNode.StartModify()
        roiNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        roiNode.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(objectToNode))
        roiNode.SetSize([float(v) for v in sizeMM])
        roiNode.EndModify(wasModifying)
        return roiNode


def outOfMemoryMessage(detail):
    return ("Out of memory while super-resolving. Try the CPU instead of the GPU, a smaller "
            f"scale, or a faster model. ({detail.strip()[:300]})")


class MedSRBackgroundRun:
    """One `python -m MedSRLib.cli upscale` process, polled from the GUI thread.

    The input goes to a temporary .nrrd file (double-precision geometry), the process writes
    JSON progress lines to stderr, and its output .nrrd is read back on success. Nothing in
    the scene changes before that, so cancelling leaves the scene exactly as it was.
    """

    def __init__(self, logic, inputVolume, image, arguments, outputVolume, outputName, show):
        self.logic = logic
        self.inputVolume = inputVolume
        self.image = image
        self.arguments = arguments
        self.requestedOutputVolume = outputVolume
        self.outputName = outputName
        self.show = show
        self.outputVolume = None
        self.roiReport = None
        self.fraction = 0.0
        self.message = "Starting"
        self.progressUpdates = 0
        self.process = None
        self.cancelled = False
        self._lines = queue.Queue()
        self._errorLines = []
        self._startTime = None

    @staticmethod
    def pythonExecutable():
        return shutil.which("PythonSlicer") or sys.executable

    def commandLine(self, inputPath, outputPath):
        a = self.arguments
        scale = a["scale"]
        scaleText = ",".join(str(s) for s in scale) if isinstance(scale, tuple) else str(scale)
        size = (["--target-spacing", repr(float(a["targetSpacing"]))] if a.get("targetSpacing") is not None
                else ["--scale", scaleText])
        command = [self.pythonExecutable(), "-m", "MedSRLib.cli", "upscale", str(inputPath), str(outputPath),
                   *size, "--axis", str(a["axis"]), "--device", a["device"],
                   "--precision", a["precision"], "--progress", "json"]
        if a.get("adapt"):
            command.append("--adapt")
        if a["model"]:
            command += ["--model", a["model"]]
        if a.get("modality"):  # known only: else MedSRLib reads DICOM tags (an .nrrd has none)
            command += ["--modality", a["modality"]]
        if a.get("roi") is not None:  # lesion-focused: the same box(es) MedSRLib.upscale(roi=...) gets
            boxes = a["roi"] if isinstance(a["roi"], list) else [a["roi"]]
            command += ["--roi", ";".join(",".join(str(int(v)) for v in box) for box in boxes)]
            if a.get("roiModel"):
                command += ["--roi-model", a["roiModel"]]
        if a["allowUntrained"]:
            command.append("--allow-untrained")
        return command

    def start(self):
        self.tempDir = Path(tempfile.mkdtemp(prefix="MedSR-"))
        self.inputPath = self.tempDir / "input.nrrd"
        self.outputPath = self.tempDir / "output.nrrd"
        sitk.WriteImage(self.image, str(self.inputPath))
        self.image = None
        environment = os.environ.copy()
        if MEDSRLIB_PARENT_DIR is not None:
            environment["PYTHONPATH"] = os.pathsep.join(
                [str(MEDSRLIB_PARENT_DIR)] + [p for p in [environment.get("PYTHONPATH")] if p])
        self._startTime = time.time()
        self.process = subprocess.Popen(
            self.commandLine(self.inputPath, self.outputPath), env=environment,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, start_new_session=(os.name != "nt"))
        self._reader = threading.Thread(target=self._readStderr, args=(self.process.stderr,), daemon=True)
        self._reader.start()

    def _readStderr(self, stream):
        for line in stream:
            self._lines.put(line)
        stream.close()

    def elapsedSeconds(self):
        return 0.0 if self._startTime is None else time.time() - self._startTime

    def _drainLines(self):
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            try:
                update = json.loads(line)
                self.fraction = float(update.get("fraction", self.fraction))
                self.message = str(update.get("message", self.message))
                self.progressUpdates += 1
            except (ValueError, AttributeError):
                if line.strip():
                    self._errorLines.append(line.rstrip())

    def poll(self):
        """Update progress; True once finished (output node created). Raises on failure."""
        if self.process is None or self.cancelled:
            return True
        returnCode = self.process.poll()
        if returnCode is None:
            self._drainLines()
            return False
        self._reader.join(timeout=5)
        self._drainLines()
        try:
            if returnCode != 0:
                detail = "\n".join(self._errorLines[-20:]) or f"exit status {returnCode}"
                if "out of memory" in detail.lower() or "MemoryError" in detail:
                    raise MemoryError(outOfMemoryMessage(detail))
                if returnCode == 2:
                    raise ValueError(detail.splitlines()[-1])
                raise RuntimeError(f"MedSR background process failed ({returnCode}):\n{detail}")
            result = sitk.ReadImage(str(self.outputPath))
            self.outputVolume = self.logic.addOutputVolume(
                self.inputVolume, result, self.requestedOutputVolume, self.outputName, show=self.show)
            self.roiReport = roiReportFromImage(result)  # the "medsr_roi_*" keys survive NRRD
            self.fraction, self.message = 1.0, "Done"
        finally:
            self._cleanup()
        return True

    def cancel(self):
        """Stop the process (and its children) and delete the temporary files."""
        self.cancelled = True
        if self.process is not None and self.process.poll() is None:
            try:
                if os.name == "nt":
                    subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                                   capture_output=True, check=False)
                else:
                    os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait(timeout=10)
        self._cleanup()

    def _cleanup(self):
        if getattr(self, "tempDir", None) is not None:
            shutil.rmtree(self.tempDir, ignore_errors=True)
            self.tempDir = None


#
# MedSRTest
#


class MedSRTest(ScriptedLoadableModuleTest):
    """Runs in a real Slicer (Reload and Test) and under pytest in CI (Testing/slicer_module)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SuperResolvedNodeHasExpectedGeometryAndVoxels()
        self.setUp()
        self.test_ModalityFromDICOMAndExplicitChoice()
        self.setUp()
        self.test_LesionFocusedRunCoversWholeVolumeAndChangesOnlyTheROI()

    @staticmethod
    def makeObliqueAnisotropicVolume(name="MedSRTestInput"):
        """A small oblique volume (rotated about two axes), 0.8 x 0.9 x 3.0 mm, smooth voxels."""
        k, j, i = np.mgrid[0:6, 0:20, 0:24].astype(np.float64)
        voxels = (100 * np.sin(i / 4.0) * np.cos(j / 5.0) + 20 * k).astype(np.int16)
        a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
        rotationZ = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rotationX = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        ijkToRAS = np.eye(4)
        ijkToRAS[:3, :3] = rotationZ @ rotationX @ np.diag([0.8, 0.9, 3.0])
        ijkToRAS[:3, 3] = [-12.5, 30.25, -7.0]
        node = slicer.util.addVolumeFromArray(voxels, ijkToRAS, name)
        return node, ijkToRAS

    def test_SuperResolvedNodeHasExpectedGeometryAndVoxels(self):
        self.delayDisplay("Super-resolving a synthetic oblique, anisotropic volume")
        import MedSRLib

        inputVolume, inputIJKToRAS = self.makeObliqueAnisotropicVolume()
        logic = MedSRLogic()
        outputVolume = logic.process(inputVolume, model="linear", scale=2, direction="in-plane",
                                     sliceAxis="auto", show=False)
        self.assertEqual(outputVolume.GetName(), "MedSRTestInput_SRx2")

        # In-plane x2 along I and J (K has the largest spacing): spacing halves, the first voxel
        # centre moves by (new - old spacing) / 2 along each scaled axis, directions stay.
        scaleIJK = np.array([2.0, 2.0, 1.0])
        expected = np.eye(4)
        expected[:3, :3] = inputIJKToRAS[:3, :3] / scaleIJK
        expected[:3, 3] = inputIJKToRAS[:3, 3] + expected[:3, :3] @ ((1 - scaleIJK) / 2)
        outputIJKToRAS = vtk.vtkMatrix4x4()
        outputVolume.GetIJKToRASMatrix(outputIJKToRAS)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(outputIJKToRAS), expected, atol=1e-6)

        inputVoxels = slicer.util.arrayFromVolume(inputVolume)
        outputVoxels = slicer.util.arrayFromVolume(outputVolume)
        self.assertEqual(outputVoxels.shape, (6, 40, 48))
        reference = MedSRLib.upscale(logic.volumeNodeToImage(inputVolume), model="linear", scale=2)
        np.testing.assert_array_equal(outputVoxels, sitk.GetArrayFromImage(reference))
        self.assertAlmostEqual(float(outputVoxels.mean()), float(inputVoxels.mean()), delta=5.0)
        self.delayDisplay("Test passed")

    def test_ModalityFromDICOMAndExplicitChoice(self):
        self.delayDisplay("Modality: DICOM header mapping and explicit choice")
        modalities = {"1.2.1": "CT", "1.2.2": "CR", "1.2.3": "DX", "1.2.4": "MR", "1.2.5": "US"}
        self.assertEqual(modalityFromDICOMInstances("1.2.1 1.2.9", modalities.get), "CT")
        self.assertEqual(modalityFromDICOMInstances("1.2.2", modalities.get), "XR")
        self.assertEqual(modalityFromDICOMInstances("1.2.3", modalities.get), "XR")
        self.assertIsNone(modalityFromDICOMInstances("1.2.5", modalities.get))
        self.assertIsNone(modalityFromDICOMInstances(None, modalities.get))

        inputVolume, _ = self.makeObliqueAnisotropicVolume()
        logic = MedSRLogic()
        self.assertIsNone(logic.resolveModality(inputVolume, "auto"))  # not loaded from DICOM
        self.assertEqual(logic.resolveModality(inputVolume, "MR"), "MR")
        with self.assertRaises(ValueError):
            logic.resolveModality(inputVolume, "PET")
        outputVolume = logic.process(inputVolume, model="linear", scale=2, modality="MR", show=False)
        self.assertEqual(outputVolume.GetName(), "MedSRTestInput_SRx2")
        self.delayDisplay("Test passed")

    def test_LesionFocusedRunCoversWholeVolumeAndChangesOnlyTheROI(self):
        self.delayDisplay("Lesion-focused super-resolution with a drawn ROI")
        from MedSRLib.roi import focus as medsrRoi

        inputVolume, inputIJKToRAS = self.makeObliqueAnisotropicVolume()
        roiNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "MedSRTestROI")
        roiNode.SetCenter((inputIJKToRAS @ [11.0, 9.0, 3.0, 1.0])[:3].tolist())  # drawn in RAS
        roiNode.SetSize([4.0, 4.0, 4.0])
        logic = MedSRLogic()
        box = logic.roiIndexBox(inputVolume, roiNode)
        self.assertTrue(all(0 <= box[a] < box[a + 3] <= n for a, n in enumerate((24, 20, 6))))
        self.assertLess((box[3] - box[0]) * (box[4] - box[1]), 24 * 20 // 4)

        # Interpolation models: no weights needed, runs in seconds in any Slicer.
        plain = logic.process(inputVolume, model="linear", scale=2, show=False)
        lesion = logic.process(inputVolume, model="linear", scale=2, roiNode=roiNode,
                               roiModel="bicubic", allowUntrained=True, show=False)
        self.assertEqual(lesion.GetName(), "MedSRTestInput_LFSRx2")
        self.assertEqual(logic.lastRoiReport["roiIndexXYZ"], box)
        self.assertEqual(logic.lastRoiReport["roiModel"], "bicubic")

        # The whole input extent on the same grid as the plain run, not the ROI's crop.
        plainIJKToRAS, lesionIJKToRAS = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        plain.GetIJKToRASMatrix(plainIJKToRAS)
        lesion.GetIJKToRASMatrix(lesionIJKToRAS)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(lesionIJKToRAS),
                                   slicer.util.arrayFromVTKMatrix(plainIJKToRAS), atol=1e-9)
        plainVoxels = slicer.util.arrayFromVolume(plain).astype(np.int32)
        lesionVoxels = slicer.util.arrayFromVolume(lesion).astype(np.int32)
        self.assertEqual(lesionVoxels.shape, (6, 40, 48))

        # Voxels differ only inside the ROI plus its margin (on the x2 output grid).
        margins = medsrRoi.margin_voxels(medsrRoi.DEFAULT_MARGIN_MM, inputVolume.GetSpacing())
        factors = (2, 2, 1)
        inside = np.zeros(lesionVoxels.shape, dtype=bool)
        inside[tuple(slice(max(0, box[a] - margins[a]) * factors[a],
                           min(n, box[a + 3] + margins[a]) * factors[a])
                     for a, n in reversed(list(enumerate((24, 20, 6)))))] = True
        self.assertTrue((~inside).any())
        np.testing.assert_array_equal(lesionVoxels[~inside], plainVoxels[~inside])
        roiOnly = tuple(slice(box[a] * factors[a], box[a + 3] * factors[a]) for a in (2, 1, 0))
        self.assertTrue(np.any(lesionVoxels[roiOnly] != plainVoxels[roiOnly]))
        self.delayDisplay("Test passed")
