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
SLICE_AXES = (("auto", "Auto (largest spacing)"), ("x", "I (x)"), ("y", "J (y)"), ("z", "K (z)"))
DEVICES = (("auto", "Auto"), ("cpu", "CPU"), ("cuda", "GPU (CUDA)"))
PRECISIONS = (("auto", "Auto"), ("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"))

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
Optionally only a region of interest (drawn, or proposed by the lesion detector) is
super-resolved. The work runs in a background process; Apply becomes Cancel while it runs.
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
        self.run = None
        self.lastError = None
        self._updatingGUI = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSR.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.uiWidget = uiWidget
        for selector in (self.ui.inputSelector, self.ui.outputSelector, self.ui.roiSelector):
            selector.setMRMLScene(slicer.mrmlScene)

        self.logic = MedSRLogic()
        self._fillCombo(self.ui.scaleComboBox, [(s, f"x{s}") for s in SCALES])
        self._fillCombo(self.ui.directionComboBox, DIRECTIONS)
        self._fillCombo(self.ui.sliceAxisComboBox, SLICE_AXES)
        self._fillCombo(self.ui.deviceComboBox, DEVICES)
        self._fillCombo(self.ui.precisionComboBox, PRECISIONS)
        self.populateModels()

        self.ui.inputSelector.currentNodeChanged.connect(self.onInputChanged)
        for combo in (self.ui.modelComboBox, self.ui.scaleComboBox):
            combo.currentIndexChanged.connect(self.updateModelDescription)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.detectButton.clicked.connect(self.onDetectButton)
        self.ui.progressBar.setVisible(False)
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self.pollTimer.timeout.connect(self.onPollTimer)
        self.restoreParametersFromNode()
        for combo in self._parameterCombos().values():
            combo.currentIndexChanged.connect(self.saveParametersToNode)
        self.ui.lesionCheckBox.toggled.connect(self.saveParametersToNode)
        for selector in (self.ui.inputSelector, self.ui.roiSelector):
            selector.currentNodeChanged.connect(self.saveParametersToNode)
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
        self.updateModelDescription()

    def updateModelDescription(self, *args):
        name = self._comboData(self.ui.modelComboBox)
        model = next((m for m in self.models if m["name"] == name), None)
        if model is None:
            return
        scale = self._comboData(self.ui.scaleComboBox) or 2
        self.ui.modelDescriptionLabel.setText(describeModelCard(model, scale))

    # -- parameter node (choices persist in the scene) -----------------------------------------

    def _parameterCombos(self):
        return {"Model": self.ui.modelComboBox, "Scale": self.ui.scaleComboBox,
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
        self.updateApplyButton()

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
            scale=int(self._comboData(self.ui.scaleComboBox)),
            direction=self._comboData(self.ui.directionComboBox),
            sliceAxis=self._comboData(self.ui.sliceAxisComboBox),
            device=self._comboData(self.ui.deviceComboBox),
            precision=self._comboData(self.ui.precisionComboBox),
            roiNode=self.ui.roiSelector.currentNode() if lesion else None,
        )

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
            self.ui.statusLabel.setText(
                f"Done in {run.elapsedSeconds():.1f} s: {run.outputVolume.GetName()}")
            self.ui.outputSelector.setCurrentNode(None)
            self.updateApplyButton()

    def onDetectButton(self):
        self.lastError = None
        try:
            with slicer.util.tryWithErrorDisplay("Lesion detection failed.", waitCursor=True):
                inputVolume = self.ui.inputSelector.currentNode()
                if inputVolume is None:
                    raise ValueError("Select an input volume first.")
                roiNode = self.logic.detectLesionROI(inputVolume, self.ui.roiSelector.currentNode())
                self.ui.roiSelector.setCurrentNode(roiNode)
                self.ui.lesionCheckBox.setChecked(True)
                self.ui.statusLabel.setText("Lesion ROI proposed: move or resize it, then Apply.")
        except Exception as error:
            self._showFailure(error)

    def _showFailure(self, error):
        self.lastError = error
        self.ui.statusLabel.setText(f"Error: {error}")
        logging.error("MedSR: %s", error)


def describeModelCard(model, scale):
    """One line from a registry entry: description, modality, measured quality and speed."""
    parts = [model.get("description") or model["title"]]
    card = (model.get("weights") or {}).get(f"x{scale}")
    modalities = (card or {}).get("modality") or model.get("modalities") or []
    if isinstance(modalities, str):
        modalities = [modalities]
    parts.append("Modality: " + (", ".join(modalities) or "any"))
    if scale not in model.get("scales", []):
        parts.append(f"does not support x{scale} (supports "
                     + ", ".join(f"x{s}" for s in model.get("scales", [])) + ")")
    elif model.get("kind") != "interpolation" and card is None:
        parts.append(f"no trained weights for x{scale}")
    metrics = (card or {}).get("metrics") or {}
    if metrics:
        parts.append("Measured: " + ", ".join(f"{k} {_formatMetric(v)}" for k, v in metrics.items()))
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
        path.write_text("\n".join(lines) + "\n")
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
    def outputName(inputVolume, scale):
        return f"{inputVolume.GetName()}_SRx{scale}"

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

    # -- what to run ----------------------------------------------------------------------------

    def scaleAndAxis(self, image, scale, direction, sliceAxis):
        """(scale, axis) arguments of MedSRLib.upscale for the panel's choices.

        In-plane: the integer `scale` with the slice axis. Through-plane: a per-axis (x, y, z)
        tuple with `scale` on the slice axis; "auto" asks MedSRLib which axis it would slice.
        """
        if direction == "in-plane":
            return int(scale), sliceAxis
        if direction != "through-plane":
            raise ValueError(f"direction must be 'in-plane' or 'through-plane', got {direction!r}")
        from MedSRLib import api

        plan = api.plan_scale(2, sliceAxis, image.GetSpacing(), image.GetSize())
        factors = [1, 1, 1]
        factors[plan.slice_axis_xyz] = int(scale)
        return tuple(factors), plan.slice_axis_xyz

    def cropToROI(self, image, inputVolume, roiNode):
        """The part of `image` inside the markups ROI (voxel-aligned box, SimpleITK slicing)."""
        bounds = [0.0] * 6
        roiNode.GetRASBounds(bounds)  # world RAS
        cornersWorld = [(x, y, z) for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]]
        transformNode = inputVolume.GetParentTransformNode()
        if transformNode is not None:  # world -> the volume's own (local) RAS frame
            worldToLocal = vtk.vtkGeneralTransform()
            transformNode.GetTransformFromWorld(worldToLocal)
            cornersWorld = [worldToLocal.TransformPoint(p) for p in cornersWorld]
        corners = np.array([[x, y, z, 1.0] for x, y, z in cornersWorld])
        rasToIJK = vtk.vtkMatrix4x4()
        inputVolume.GetRASToIJKMatrix(rasToIJK)
        ijk = (slicer.util.arrayFromVTKMatrix(rasToIJK) @ corners.T).T[:, :3]
        size = np.array(image.GetSize())
        lower = np.clip(np.floor(ijk.min(axis=0) + 0.5).astype(int), 0, size)
        upper = np.clip(np.ceil(ijk.max(axis=0) + 0.5).astype(int), 0, size)
        if np.any(upper - lower < 1):
            raise ValueError(f"ROI {roiNode.GetName()!r} does not overlap input {inputVolume.GetName()!r}.")
        return image[int(lower[0]):int(upper[0]), int(lower[1]):int(upper[1]), int(lower[2]):int(upper[2])]

    def prepareImage(self, inputVolume, scale, direction, sliceAxis, roiNode):
        image = self.volumeNodeToImage(inputVolume)
        if roiNode is not None:
            image = self.cropToROI(image, inputVolume, roiNode)
        scaleArgument, axisArgument = self.scaleAndAxis(image, scale, direction, sliceAxis)
        return image, scaleArgument, axisArgument

    # -- running --------------------------------------------------------------------------------

    def process(self, inputVolume, outputVolume=None, model=None, scale=2, direction="in-plane",
                sliceAxis="auto", device="auto", precision="auto", roiNode=None,
                allowUntrained=False, progress=None, cancel=None, show=True):
        """Super-resolve `inputVolume` in this process (blocking); return the output node.

        `progress(fraction, message)` and `cancel` (a MedSRLib.CancelToken) go to
        MedSRLib.upscale. On failure or cancel the scene is left unchanged.
        """
        MedSRLib = _medsrlib()
        image, scaleArgument, axisArgument = self.prepareImage(inputVolume, scale, direction, sliceAxis, roiNode)
        startTime = time.time()
        try:
            result = MedSRLib.upscale(image, model=model, scale=scaleArgument, axis=axisArgument,
                                      device=device, precision=precision,
                                      allow_untrained=allowUntrained, progress=progress, cancel=cancel)
        except (MemoryError, RuntimeError) as error:
            if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
                raise MemoryError(outOfMemoryMessage(str(error))) from error
            raise
        node = self.addOutputVolume(inputVolume, result, outputVolume,
                                    self.outputName(inputVolume, scale), show=show)
        logging.info(f"MedSR finished in {time.time() - startTime:.1f} s")
        return node

    def startProcessing(self, inputVolume, outputVolume=None, model=None, scale=2,
                        direction="in-plane", sliceAxis="auto", device="auto", precision="auto",
                        roiNode=None, allowUntrained=False, show=True):
        """Start super-resolution in a background process; return the MedSRBackgroundRun.

        Call `run.poll()` from a QTimer until it returns True (the output node is then in
        `run.outputVolume`), or `run.cancel()`. The scene is only touched on success.
        """
        image, scaleArgument, axisArgument = self.prepareImage(inputVolume, scale, direction, sliceAxis, roiNode)
        arguments = dict(model=model, scale=scaleArgument, axis=axisArgument, device=device,
                         precision=precision, allowUntrained=allowUntrained)
        run = MedSRBackgroundRun(self, inputVolume, image, arguments, outputVolume,
                                 self.outputName(inputVolume, scale), show)
        run.start()
        return run

    # -- lesion ROI -----------------------------------------------------------------------------

    def detectLesionROI(self, inputVolume, roiNode=None):
        """Run MedSRLib's lesion detector and show its box as a markups ROI node.

        The user may move or resize the ROI, or draw one instead of detecting.
        """
        _medsrlib()
        try:
            from MedSRLib import roi
        except ImportError as error:
            raise ValueError("This MedSRLib has no lesion detector (MedSRLib.roi); draw an ROI instead.") from error
        image = self.volumeNodeToImage(inputVolume)
        box = roi.detect_lesion(image)  # lower/upper corner indices (x, y, z) of the box
        lowerIndex, upperIndex = np.asarray(box[0], float), np.asarray(box[1], float)
        ijkToRAS = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRAS)
        matrix = slicer.util.arrayFromVTKMatrix(ijkToRAS)
        corners = np.array([[x, y, z, 1.0] for x in (lowerIndex[0] - 0.5, upperIndex[0] - 0.5)
                            for y in (lowerIndex[1] - 0.5, upperIndex[1] - 0.5)
                            for z in (lowerIndex[2] - 0.5, upperIndex[2] - 0.5)])
        ras = (matrix @ corners.T).T[:, :3]
        if roiNode is None:
            roiNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{inputVolume.GetName()}_lesion")
        roiNode.SetCenter(((ras.min(axis=0) + ras.max(axis=0)) / 2).tolist())
        roiNode.SetSize((ras.max(axis=0) - ras.min(axis=0)).tolist())
        roiNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        return roiNode


def outOfMemoryMessage(detail):
    return ("Out of memory while super-resolving. Try the CPU instead of the GPU, a smaller "
            f"scale, or a lesion ROI to process less of the volume. ({detail.strip()[:300]})")


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
        command = [self.pythonExecutable(), "-m", "MedSRLib.cli", "upscale", str(inputPath), str(outputPath),
                   "--scale", scaleText, "--axis", str(a["axis"]), "--device", a["device"],
                   "--precision", a["precision"], "--progress", "json"]
        if a["model"]:
            command += ["--model", a["model"]]
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
