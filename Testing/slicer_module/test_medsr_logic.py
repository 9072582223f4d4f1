"""MedSRLogic on a real MRML scene (slicer-core), compared with the real MedSRLib.upscale."""

from harness import MedSR, qapp, scene  # noqa: F401  (fixtures; installs the fakes)

import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

import MedSRLib
from scene_state import scene_state


def oblique_anisotropic_volume(MedSR, name="CT chest"):
    node, ijk_to_ras = MedSR.MedSRTest.makeObliqueAnisotropicVolume(name)
    return node, ijk_to_ras


def ijk_to_ras_of(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def expected_ijk_to_ras(input_ijk_to_ras, factors_ijk):
    """Spacing / scale, first voxel centre moved half a new voxel inwards, same directions."""
    factors = np.asarray(factors_ijk, dtype=float)
    expected = np.eye(4)
    expected[:3, :3] = input_ijk_to_ras[:3, :3] / factors
    expected[:3, 3] = input_ijk_to_ras[:3, 3] + expected[:3, :3] @ ((1.0 - factors) / 2.0)
    return expected


def run_to_end(run, timeout_s=120):
    from PySide6.QtWidgets import QApplication

    deadline = time.time() + timeout_s
    while not run.poll():
        QApplication.processEvents()
        assert time.time() < deadline, "background run did not finish"
        time.sleep(0.05)


def test_node_to_image_converts_ras_to_lps_with_kji_voxels(scene, MedSR):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    image = MedSR.MedSRLogic.volumeNodeToImage(node)
    assert image.GetSize() == (24, 20, 6)  # (I, J, K) = reversed KJI array shape
    lps_from_ras = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(image.GetOrigin(), lps_from_ras @ ijk_to_ras[:3, 3], atol=1e-9)
    np.testing.assert_allclose(image.GetSpacing(), [0.8, 0.9, 3.0], atol=1e-9)
    # physical point of voxel (i, j, k) agrees with the node's IJK-to-RAS (after LPS->RAS)
    point_lps = image.TransformIndexToPhysicalPoint((5, 7, 3))
    point_ras = (ijk_to_ras @ [5, 7, 3, 1])[:3]
    np.testing.assert_allclose(lps_from_ras @ point_lps, point_ras, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(node))
    np.testing.assert_allclose(MedSR.MedSRLogic.ijkToRASFromImage(image), ijk_to_ras, atol=1e-12)


@pytest.mark.parametrize("direction, scale, factors_ijk", [
    ("in-plane", 2, (2, 2, 1)),
    ("through-plane", 3, (1, 1, 3)),
])
def test_sr_node_geometry_and_voxels_match_medsrlib(scene, MedSR, direction, scale, factors_ijk):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    logic = MedSR.MedSRLogic()
    output = logic.process(node, model="linear", scale=scale, direction=direction, show=False)

    np.testing.assert_allclose(ijk_to_ras_of(output), expected_ijk_to_ras(ijk_to_ras, factors_ijk), atol=1e-6)
    image = logic.volumeNodeToImage(node)
    upscale_scale = scale if direction == "in-plane" else tuple(factors_ijk)
    reference = MedSRLib.upscale(image, model="linear", scale=upscale_scale)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output), sitk.GetArrayFromImage(reference))
    assert output.GetImageData().GetDimensions() == tuple(n * f for n, f in zip((24, 20, 6), factors_ijk))


def test_output_is_named_placed_and_displayed_like_input(scene, MedSR):
    node, _ = oblique_anisotropic_volume(MedSR, name="MRHead")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    node.GetDisplayNode().AutoWindowLevelOff()
    node.GetDisplayNode().SetWindowLevel(300.0, 40.0)
    sh = scene.GetSubjectHierarchyNode()
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "Patient 1")
    sh.CreateItem(folder, node)
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")

    output = MedSR.MedSRLogic().process(node, model="nearest", scale=2)

    assert output.GetName() == "MRHead_SRx2"
    assert output.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert output.GetTransformNodeID() == transform.GetID()
    assert sh.GetItemParent(sh.GetItemByDataNode(output)) == folder
    display = output.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == (300.0, 40.0)
    assert composite.GetBackgroundVolumeID() == output.GetID()  # shown in the slice views
    assert slicer.util.arrayFromVolume(output).dtype == np.int16


def test_cancel_through_token_leaves_scene_unchanged(scene, MedSR):
    node, _ = oblique_anisotropic_volume(MedSR)
    before = scene_state(scene)
    token = MedSRLib.CancelToken()
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        token.cancel()

    with pytest.raises(MedSRLib.CancelledError):
        MedSR.MedSRLogic().process(node, model="linear", scale=2, progress=progress, cancel=token)
    assert seen, "progress was never reported"
    assert scene_state(scene) == before


@pytest.mark.parametrize("arguments, message", [
    (dict(model="no_such_model"), "unknown model"),
    (dict(model="lesion_detector"), "not a super-resolution model"),
    (dict(model="srcnn"), "no trained weights"),
    (dict(model="hybrid", scale=3), "does not support scale x3"),
])
def test_failing_run_leaves_no_node(scene, MedSR, arguments, message, monkeypatch):
    node, _ = oblique_anisotropic_volume(MedSR)
    monkeypatch.setattr(MedSRLib.zoo, "shipped_weights", lambda *args, **kwargs: None)
    before = scene_state(scene)
    with pytest.raises(ValueError, match=message):
        MedSR.MedSRLogic().process(node, **{"scale": 2, **arguments})
    assert scene_state(scene) == before


def test_failure_while_filling_new_node_removes_it(scene, MedSR, monkeypatch):
    node, _ = oblique_anisotropic_volume(MedSR)
    before = scene_state(scene)

    def broken_update(volume_node, array):
        raise RuntimeError("disk full")

    monkeypatch.setattr(slicer.util, "updateVolumeFromArray", broken_update)
    with pytest.raises(RuntimeError, match="disk full"):
        MedSR.MedSRLogic().process(node, model="nearest", scale=2)
    assert scene_state(scene) == before


def test_missing_input_is_a_clear_error(scene, MedSR):
    with pytest.raises(ValueError, match="No input volume"):
        MedSR.MedSRLogic().process(None, model="nearest")


def test_lesion_roi_crops_before_super_resolution(scene, MedSR):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "lesion")
    # an axis-aligned RAS box around voxels i 4..9, j 3..8 of every slice (oblique input:
    # the voxel-aligned box is the bounding box of the RAS box in IJK)
    centre = (ijk_to_ras @ [6.5, 5.5, 2.5, 1])[:3]
    roi.SetCenter(centre.tolist())
    roi.SetSize([4.0, 4.0, 30.0])
    logic = MedSR.MedSRLogic()
    output = logic.process(node, model="linear", scale=2, roiNode=roi, show=False)
    cropped = logic.cropToROI(logic.volumeNodeToImage(node), node, roi)
    assert cropped.GetSize()[0] < 24 and cropped.GetSize()[1] < 20
    reference = MedSRLib.upscale(cropped, model="linear", scale=2)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output), sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(ijk_to_ras_of(output), MedSR.MedSRLogic.ijkToRASFromImage(reference), atol=1e-9)


def test_lesion_roi_in_world_coordinates_follows_parent_transform(scene, MedSR):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    logic = MedSR.MedSRLogic()
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "lesion")
    centre = (ijk_to_ras @ [6.5, 5.5, 2.5, 1])[:3]
    roi.SetCenter(centre.tolist())
    roi.SetSize([4.0, 4.0, 30.0])
    untransformed = logic.cropToROI(logic.volumeNodeToImage(node), node, roi)

    shift = np.array([10.0, -5.0, 2.5])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = shift
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    node.SetAndObserveTransformNodeID(transform.GetID())
    roi.SetCenter((centre + shift).tolist())  # the same anatomy, seen in world coordinates
    transformed = logic.cropToROI(logic.volumeNodeToImage(node), node, roi)
    assert transformed.GetSize() == untransformed.GetSize()
    assert transformed.GetOrigin() == pytest.approx(untransformed.GetOrigin(), abs=1e-9)


def test_roi_outside_volume_is_a_clear_error(scene, MedSR):
    node, _ = oblique_anisotropic_volume(MedSR)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far away")
    roi.SetCenter([500.0, 500.0, 500.0])
    roi.SetSize([5.0, 5.0, 5.0])
    before = scene_state(scene)
    with pytest.raises(ValueError, match="does not overlap"):
        MedSR.MedSRLogic().process(node, model="linear", roiNode=roi)
    assert scene_state(scene) == before


# -- background process ----------------------------------------------------------------------


def test_background_run_creates_same_node_as_in_process(scene, MedSR):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    logic = MedSR.MedSRLogic()
    run = logic.startProcessing(node, model="linear", scale=2, show=False)
    run_to_end(run)
    output = run.outputVolume
    assert output.GetName() == "CT chest_SRx2"
    np.testing.assert_allclose(ijk_to_ras_of(output), expected_ijk_to_ras(ijk_to_ras, (2, 2, 1)), atol=1e-6)
    reference = MedSRLib.upscale(logic.volumeNodeToImage(node), model="linear", scale=2)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output), sitk.GetArrayFromImage(reference))
    assert run.fraction == 1.0
    assert run.progressUpdates >= 1  # JSON progress lines from the CLI were read
    assert run.tempDir is None  # temporary files removed


def test_background_through_plane_run_passes_per_axis_factors(scene, MedSR):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    logic = MedSR.MedSRLogic()
    run = logic.startProcessing(node, model="linear", scale=3, direction="through-plane", show=False)
    assert run.commandLine("in.nrrd", "out.nrrd")[6:10] == ["--scale", "1,1,3", "--axis", "2"]
    run_to_end(run)
    assert run.outputVolume.GetName() == "CT chest_SRx3"
    np.testing.assert_allclose(ijk_to_ras_of(run.outputVolume), expected_ijk_to_ras(ijk_to_ras, (1, 1, 3)), atol=1e-6)
    reference = MedSRLib.upscale(logic.volumeNodeToImage(node), model="linear", scale=(1, 1, 3))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(run.outputVolume), sitk.GetArrayFromImage(reference))


def test_background_cancel_kills_process_and_leaves_scene_unchanged(scene, MedSR):
    node, _ = oblique_anisotropic_volume(MedSR)
    before = scene_state(scene)
    run = MedSR.MedSRLogic().startProcessing(node, model="linear", scale=2)
    temp_dir = run.tempDir
    assert run.poll() is False
    run.cancel()
    assert run.process.poll() is not None
    assert not temp_dir.exists()
    assert run.poll() is True and run.outputVolume is None
    assert scene_state(scene) == before


def test_background_failure_reports_message_and_leaves_no_node(scene, MedSR):
    node, _ = oblique_anisotropic_volume(MedSR)
    before = scene_state(scene)
    run = MedSR.MedSRLogic().startProcessing(node, model="no_such_model", scale=2)
    with pytest.raises(ValueError, match="unknown model"):
        run_to_end(run)
    assert scene_state(scene) == before


def test_out_of_memory_becomes_a_clear_message(scene, MedSR, monkeypatch):
    """Error path only: MedSRLib.upscale is replaced by one that runs out of memory."""
    node, _ = oblique_anisotropic_volume(MedSR)
    before = scene_state(scene)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MedSRLib, "upscale", out_of_memory)
    with pytest.raises(MemoryError, match="Out of memory while super-resolving.*CPU"):
        MedSR.MedSRLogic().process(node, model="edsr_baseline", scale=2)
    assert scene_state(scene) == before
