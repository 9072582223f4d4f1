"""MedSRLogic on a real MRML scene (slicer-core), compared with the real MedSRLib.upscale."""

from harness import MedSR, qapp, scene  # noqa: F401  (fixtures; installs the fakes)

import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

import MedSRLib
from MedSRLib.roi import focus as medsr_roi
from scene_state import scene_state
from fakes.fake_dicom_database import FakeDICOMDatabase


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
def test_failing_run_leaves_no_node(scene, MedSR, arguments, message, monkeypatch, tmp_path):
    node, _ = oblique_anisotropic_volume(MedSR)
    monkeypatch.setattr(MedSRLib.models.registry, "WEIGHTS_DIR", tmp_path)  # no weights ship at all
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


# -- modality: Auto (the node's DICOM modality) or the panel's choice -> MedSRLib.upscale(modality=...) --


def dicom_loaded_volume(MedSR, monkeypatch, dicom_modality, name="from DICOM"):
    """A volume node as Slicer's DICOM plugin leaves it (DICOM.instanceUIDs), and a DICOM
    database (FAKE, see fakes/fake_dicom_database.py) that knows its instances' Modality."""
    node, _ = oblique_anisotropic_volume(MedSR, name)
    node.SetAttribute("DICOM.instanceUIDs", "1.2.840.99.1 1.2.840.99.2")
    database = FakeDICOMDatabase({"1.2.840.99.1": dicom_modality, "1.2.840.99.2": dicom_modality})
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    return node, database


def spy_on_upscale(monkeypatch):
    """Record the keyword arguments of every MedSRLib.upscale call; the real upscale still runs."""
    calls = []
    real_upscale = MedSRLib.upscale

    def recording_upscale(image, **kwargs):
        calls.append(kwargs)
        return real_upscale(image, **kwargs)

    monkeypatch.setattr(MedSRLib, "upscale", recording_upscale)
    return calls


def test_dicom_modality_maps_to_medsrlib_modality(MedSR):
    modalities = {"1.1": "CT", "1.2": "MR", "1.3": "CR", "1.4": "DX", "1.5": "RG", "1.6": "PT",
                  "1.7": " ct ", "1.8": ""}
    resolve = MedSR.modalityFromDICOMInstances
    assert [resolve(uid, modalities.get) for uid in sorted(modalities)] == [
        "CT", "MR", "XR", "XR", "XR", None, "CT", None]
    assert resolve("1.3 1.1", modalities.get) == "XR"  # the first instance decides
    assert resolve("9.9", modalities.get) is None  # not in the database
    assert resolve(None, modalities.get) is None and resolve("", modalities.get) is None
    asked = []
    resolve("1.1 1.2 1.3", lambda uid: asked.append(uid) or "CT")
    assert asked == ["1.1"]  # one look-up per node, not one per slice


@pytest.mark.parametrize("dicom_modality, expected", [("CT", "CT"), ("CR", "XR"), ("DX", "XR"), ("US", None)])
def test_auto_modality_reads_dicom_database(scene, MedSR, monkeypatch, dicom_modality, expected):
    node, database = dicom_loaded_volume(MedSR, monkeypatch, dicom_modality)
    logic = MedSR.MedSRLogic()
    assert logic.inputModality(node) == expected
    assert database.asked == [("/fake-dicom/1.2.840.99.1.dcm", "0008,0060")]  # Modality of instance 1
    assert logic.resolveModality(node, "auto") == expected
    assert logic.resolveModality(node, None) == expected
    assert logic.resolveModality(node, "MR") == "MR"  # an explicit choice wins over DICOM
    run = logic.startProcessing(node, model="linear", scale=2, show=False)
    command = run.commandLine("in.nrrd", "out.nrrd")
    run.cancel()
    if expected:
        assert command[command.index("--modality") + 1] == expected
    else:
        assert "--modality" not in command


def test_auto_modality_is_unknown_without_dicom_information(scene, MedSR, monkeypatch):
    node, _ = oblique_anisotropic_volume(MedSR)
    logic = MedSR.MedSRLogic()
    assert not hasattr(slicer, "dicomDatabase") or slicer.dicomDatabase is None
    assert logic.inputModality(node) is None  # no DICOM database at all
    monkeypatch.setattr(slicer, "dicomDatabase", FakeDICOMDatabase({"1.2.3": "CT"}), raising=False)
    assert logic.inputModality(node) is None  # a database, but the node is not from DICOM
    node.SetAttribute("DICOM.instanceUIDs", "4.5.6")
    assert logic.inputModality(node) is None  # from DICOM, but not in this database
    with pytest.raises(ValueError, match="modality must be 'auto' or one of CT, MR, XR, got 'PET'"):
        logic.resolveModality(node, "PET")


def test_explicit_modality_reaches_upscale_in_process(scene, MedSR, monkeypatch):
    node, _ = oblique_anisotropic_volume(MedSR)
    calls = spy_on_upscale(monkeypatch)
    logic = MedSR.MedSRLogic()
    logic.process(node, model="linear", scale=2, modality="MR", show=False)
    logic.process(node, model="linear", scale=2, show=False)  # Auto; the node is not from DICOM
    assert [call.get("modality", "(not passed)") for call in calls] == ["MR", "(not passed)"]


def test_auto_modality_from_dicom_reaches_upscale_in_process(scene, MedSR, monkeypatch):
    node, _ = dicom_loaded_volume(MedSR, monkeypatch, "DX")
    calls = spy_on_upscale(monkeypatch)
    MedSR.MedSRLogic().process(node, model="linear", scale=2, show=False)
    assert [call.get("modality") for call in calls] == ["XR"]


def test_background_run_passes_explicit_modality_to_cli(scene, MedSR):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    logic = MedSR.MedSRLogic()
    run = logic.startProcessing(node, model="linear", scale=2, modality="MR", show=False)
    command = run.commandLine("in.nrrd", "out.nrrd")
    assert command[command.index("--modality") + 1] == "MR"
    run_to_end(run)  # the CLI accepts it
    reference = MedSRLib.upscale(logic.volumeNodeToImage(node), model="linear", scale=2, modality="MR")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(run.outputVolume), sitk.GetArrayFromImage(reference))
    auto = logic.startProcessing(node, model="linear", scale=2, show=False)
    assert "--modality" not in auto.commandLine("in.nrrd", "out.nrrd")
    auto.cancel()


def per_modality_weights_dir(tmp_path, stem="srcnn_x2", modalities=("MR", "XR")):
    """A weights folder in which `stem` ships only per-modality copies (<stem>_<mod>.safetensors)
    of the real shipped file, each card listing its one modality."""
    import json
    import shutil

    for modality in modalities:
        target = tmp_path / f"{stem}_{modality.lower()}.safetensors"
        shutil.copyfile(MedSRLib.models.registry.WEIGHTS_DIR / f"{stem}.safetensors", target)
        card = json.loads((MedSRLib.models.registry.WEIGHTS_DIR / f"{stem}.json").read_text(encoding="utf-8"))
        card.update(modality=[modality], weights_file=target.name)
        target.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return tmp_path


def test_per_modality_weights_need_a_known_modality(scene, MedSR, monkeypatch, tmp_path):
    """The library's real per-modality rule, through the module: unknown -> its error, no node;
    the panel's choice (or the DICOM modality) -> that modality's weights."""
    monkeypatch.setattr(MedSRLib.models.registry, "WEIGHTS_DIR", per_modality_weights_dir(tmp_path))
    node, _ = oblique_anisotropic_volume(MedSR)
    logic = MedSR.MedSRLogic()
    before = scene_state(scene)
    with pytest.raises(ValueError, match=r"ships x2 weights per modality \(MR, XR\), none for an unknown modality"):
        logic.process(node, model="srcnn", scale=2, show=False)
    assert scene_state(scene) == before

    output = logic.process(node, model="srcnn", scale=2, modality="MR", show=False)
    reference = MedSRLib.upscale(logic.volumeNodeToImage(node), model="srcnn", scale=2, modality="MR")
    assert reference.GetMetaData("medsr_model") == "srcnn"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output), sitk.GetArrayFromImage(reference))

    node.SetAttribute("DICOM.instanceUIDs", "7.7.7")
    monkeypatch.setattr(slicer, "dicomDatabase", FakeDICOMDatabase({"7.7.7": "MR"}), raising=False)
    from_dicom = logic.process(node, model="srcnn", scale=2, show=False)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(from_dicom), slicer.util.arrayFromVolume(output))


# -- lesion-focused (LFSR): markups ROI -> input voxel index box -> MedSRLib.upscale(roi=...) --


def flipped_oblique_volume(name="flipped oblique"):
    """A left-handed, oblique, anisotropic volume (I runs towards -R after a rotation)."""
    k, j, i = np.mgrid[0:5, 0:18, 0:22].astype(np.float64)
    voxels = (80 * np.sin(i / 3.0) * np.cos(j / 4.0) + 15 * k).astype(np.int16)
    a = np.deg2rad(25.0)
    rotation = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation @ np.diag([-0.7, 1.1, 2.5])
    ijk_to_ras[:3, 3] = [20.0, -8.0, 3.5]
    assert np.linalg.det(ijk_to_ras[:3, :3]) < 0
    return slicer.util.addVolumeFromArray(voxels, ijk_to_ras, name), ijk_to_ras


def ras_to_ijk_of(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def drawn_roi(scene, centre_ras, size_mm, name="lesion"):
    """An ROI as a user draws it: axis-aligned in RAS."""
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetCenter([float(v) for v in centre_ras])
    roi.SetSize([float(v) for v in size_mm])
    return roi


def test_roi_index_box_math_on_flipped_axis_by_hand(MedSR):
    # I runs towards -R at 2 mm from R=10: i = (10 - R) / 2. R in [3, 7.2] -> i in [1.4, 3.5]:
    # voxels 1 (covers 0.5..1.5, partly inside), 2, 3 (its upper face 3.5 is the ROI's face).
    ras_to_ijk = np.linalg.inv(np.array([[-2.0, 0, 0, 10], [0, 1, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]]))
    corners = [(x, y, z) for x in (3.0, 7.2) for y in (0.2, 4.0) for z in (-1.5, 1.5)]
    assert MedSR.roiIndexBoxFromRASCorners(corners, ras_to_ijk, (10, 10, 10)) == (1, 0, 0, 4, 5, 1)
    # clipped to the volume (R = -100 is i = 55; z = 100 mm is k = 33)
    corners = [(x, y, z) for x in (-100.0, 7.2) for y in (-50, 4.0) for z in (-1.5, 100)]
    assert MedSR.roiIndexBoxFromRASCorners(corners, ras_to_ijk, (10, 10, 10)) == (1, 0, 0, 10, 5, 10)
    # beyond the volume's last voxel face (i = 9.5 at R = -9): no voxel
    corners = [(x, y, z) for x in (-30.0, -9.0) for y in (0, 4.0) for z in (0, 1)]
    with pytest.raises(ValueError, match="does not overlap input.*along I"):
        MedSR.roiIndexBoxFromRASCorners(corners, ras_to_ijk, (10, 10, 10))


def test_drawn_roi_index_box_on_flipped_oblique_volume_matches_its_matrices(scene, MedSR):
    node, ijk_to_ras = flipped_oblique_volume()
    centre = (ijk_to_ras @ [9.0, 7.0, 2.0, 1.0])[:3]
    roi = drawn_roi(scene, centre, [5.0, 6.0, 4.0])
    box = MedSR.MedSRLogic().roiIndexBox(node, roi)

    # Independent check: sample the RAS box densely (faces included), map the samples with the
    # node's own RAS-to-IJK matrix, take the voxel each lies in, clipped to the volume.
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    axes = [np.linspace(bounds[2 * a], bounds[2 * a + 1], 9) for a in range(3)]
    samples = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    ijk = (ras_to_ijk_of(node) @ np.c_[samples, np.ones(len(samples))].T).T[:, :3]
    index = np.clip(np.floor(ijk + 0.5), 0, np.array([22, 18, 5]) - 1).astype(int)
    assert box == (*index.min(axis=0), *(index.max(axis=0) + 1))
    assert box[0] > 0 and box[3] < 22 and box[1] > 0 and box[4] < 18  # a real sub-box
    # The RAS box's centre lies in the box's centre voxel region (I, J, K order, not K, J, I).
    assert all(box[a] <= round(c) < box[a + 3] for a, c in enumerate((9.0, 7.0, 2.0)))


def test_detected_box_shown_as_roi_converts_back_exactly(scene, MedSR, monkeypatch):
    """Detect -> markups ROI aligned with the (flipped, oblique) volume -> the same index box.

    The detector has no shipped weights here, so `detect_lesion` is replaced by a fixed box
    (test double for the network only; the conversion both ways is the module's real code).
    """
    node, ijk_to_ras = flipped_oblique_volume()
    monkeypatch.setattr(medsr_roi, "detect_lesion", lambda image: ((4, 3, 1), (12, 9, 4)))
    logic = MedSR.MedSRLogic()
    roi = logic.detectLesionROI(node)
    assert roi.IsA("vtkMRMLMarkupsROINode") and roi.GetName() == "flipped oblique_lesion"
    assert logic.roiIndexBox(node, roi) == (4, 3, 1, 12, 9, 4)
    # the ROI's corners are the box's outer voxel faces, through the node's own IJK-to-RAS
    corners_ijk = [(x, y, z) for x in (3.5, 11.5) for y in (2.5, 8.5) for z in (0.5, 3.5)]
    expected = sorted(map(tuple, np.round((ijk_to_ras @ np.c_[corners_ijk, np.ones(8)].T).T[:, :3], 9)))
    corners = sorted(map(tuple, np.round(logic.roiCornersInVolumeFrame(roi, node), 9)))
    np.testing.assert_allclose(corners, expected, atol=1e-9)


def test_roi_in_world_coordinates_follows_parent_transforms(scene, MedSR):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    logic = MedSR.MedSRLogic()
    centre = (ijk_to_ras @ [6.5, 5.5, 2.5, 1])[:3]
    roi = drawn_roi(scene, centre, [4.0, 4.0, 30.0])
    untransformed = logic.roiIndexBox(node, roi)

    shift = np.array([10.0, -5.0, 2.5])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = shift
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert logic.roiIndexBox(node, roi) != untransformed  # the volume moved under the ROI
    roi.SetCenter((centre + shift).tolist())  # the same anatomy, seen in world coordinates
    assert logic.roiIndexBox(node, roi) == untransformed
    roi.SetCenter(centre.tolist())  # the ROI under the same transform as the volume
    roi.SetAndObserveTransformNodeID(transform.GetID())
    assert logic.roiIndexBox(node, roi) == untransformed


@pytest.mark.parametrize("direction, scale", [("in-plane", 2), ("through-plane", 3)])
def test_lesion_focused_output_is_whole_volume_on_plain_grid(scene, MedSR, direction, scale):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    roi = drawn_roi(scene, (ijk_to_ras @ [12.0, 10.0, 3.0, 1])[:3], [4.0, 4.0, 4.0])
    logic = MedSR.MedSRLogic()
    box = logic.roiIndexBox(node, roi)
    plain = logic.process(node, model="lanczos", scale=scale, direction=direction, show=False)
    lesion = logic.process(node, model="lanczos", scale=scale, direction=direction, roiNode=roi,
                           roiModel="lanczos", show=False)

    assert lesion.GetName() == f"CT chest_LFSRx{scale}"
    np.testing.assert_allclose(ijk_to_ras_of(lesion), ijk_to_ras_of(plain), atol=1e-9)
    assert lesion.GetImageData().GetDimensions() == plain.GetImageData().GetDimensions()
    # the module goes through the public API: same voxels as MedSRLib.upscale(roi=box)
    factors = (scale, scale, 1) if direction == "in-plane" else (1, 1, scale)
    reference = MedSRLib.upscale(logic.volumeNodeToImage(node), model="lanczos",
                                 scale=scale if direction == "in-plane" else factors,
                                 roi=box, roi_model="lanczos")
    lesion_voxels = slicer.util.arrayFromVolume(lesion).astype(np.int32)
    np.testing.assert_array_equal(lesion_voxels, sitk.GetArrayFromImage(reference))
    assert logic.lastRoiReport["roiIndexXYZ"] == box and not logic.lastRoiReport["fallback"]

    # roi_model == model: identical to the plain run outside the ROI plus its margin
    margins = medsr_roi.margin_voxels(medsr_roi.DEFAULT_MARGIN_MM, node.GetSpacing())
    size = (24, 20, 6)
    inside = np.zeros(lesion_voxels.shape, dtype=bool)
    inside[tuple(slice(max(0, box[a] - margins[a]) * factors[a], min(size[a], box[a + 3] + margins[a]) * factors[a])
                 for a in (2, 1, 0))] = True
    assert (~inside).sum() > 0.1 * inside.size
    plain_voxels = slicer.util.arrayFromVolume(plain).astype(np.int32)
    np.testing.assert_array_equal(lesion_voxels[~inside], plain_voxels[~inside])


def test_other_roi_model_changes_only_roi_and_margin(scene, MedSR):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    roi = drawn_roi(scene, (ijk_to_ras @ [12.0, 10.0, 3.0, 1])[:3], [4.0, 4.0, 4.0])
    logic = MedSR.MedSRLogic()
    box = logic.roiIndexBox(node, roi)
    plain = slicer.util.arrayFromVolume(logic.process(node, model="bicubic", scale=2, show=False)).astype(np.int32)
    lesion = slicer.util.arrayFromVolume(logic.process(
        node, model="bicubic", scale=2, roiNode=roi, roiModel="srcnn", allowUntrained=True,
        show=False)).astype(np.int32)
    changed = np.argwhere(lesion != plain)  # (k, j, i) on the x2 grid
    assert len(changed) > 0
    margins = medsr_roi.margin_voxels(medsr_roi.DEFAULT_MARGIN_MM, node.GetSpacing())
    for a, column, factor in ((0, 2, 2), (1, 1, 2)):  # I and J (K: the margin covers all slices)
        assert changed[:, column].min() >= (box[a] - margins[a]) * factor
        assert changed[:, column].max() < (box[a + 3] + margins[a]) * factor
    roi_only = (slice(box[2], box[5]), slice(2 * box[1], 2 * box[4]), slice(2 * box[0], 2 * box[3]))
    assert np.mean(lesion[roi_only] != plain[roi_only]) > 0.5  # the ROI model ran in the ROI
    assert logic.lastRoiReport["roiModel"] == "srcnn"


def test_roi_outside_volume_is_a_clear_error_and_leaves_no_node(scene, MedSR):
    node, _ = oblique_anisotropic_volume(MedSR)
    roi = drawn_roi(scene, [500.0, 500.0, 500.0], [5.0, 5.0, 5.0], name="far away")
    before = scene_state(scene)
    logic = MedSR.MedSRLogic()
    with pytest.raises(ValueError, match="ROI 'far away' does not overlap input 'CT chest'"):
        logic.process(node, model="linear", roiNode=roi, roiModel="linear")
    with pytest.raises(ValueError, match="does not overlap"):
        logic.startProcessing(node, model="linear", roiNode=roi, roiModel="linear")
    assert scene_state(scene) == before


def test_missing_roi_model_weights_is_the_librarys_error_and_leaves_no_node(scene, MedSR, monkeypatch, tmp_path):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    roi = drawn_roi(scene, (ijk_to_ras @ [12.0, 10.0, 3.0, 1])[:3], [4.0, 4.0, 4.0])
    monkeypatch.setattr(MedSRLib.models.registry, "WEIGHTS_DIR", tmp_path)  # nothing ships
    before = scene_state(scene)
    with pytest.raises(ValueError, match="no trained weights"):
        MedSR.MedSRLogic().process(node, model="linear", roiNode=roi, roiModel="srresnet")
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


def test_background_lesion_focused_run_passes_box_and_reports_it(scene, MedSR):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)
    roi = drawn_roi(scene, (ijk_to_ras @ [12.0, 10.0, 3.0, 1])[:3], [4.0, 4.0, 4.0])
    logic = MedSR.MedSRLogic()
    box = logic.roiIndexBox(node, roi)
    run = logic.startProcessing(node, model="linear", scale=2, roiNode=roi, roiModel="lanczos", show=False)
    command = run.commandLine("in.nrrd", "out.nrrd")
    assert command[command.index("--roi") + 1] == ",".join(map(str, box))
    assert command[command.index("--roi-model") + 1] == "lanczos"
    run_to_end(run)
    assert run.outputVolume.GetName() == "CT chest_LFSRx2"
    in_process = logic.process(node, model="linear", scale=2, roiNode=roi, roiModel="lanczos", show=False)
    np.testing.assert_allclose(ijk_to_ras_of(run.outputVolume), ijk_to_ras_of(in_process), atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(run.outputVolume),
                                  slicer.util.arrayFromVolume(in_process))
    assert run.roiReport == logic.lastRoiReport
    assert run.roiReport["roiIndexXYZ"] == box and run.roiReport["roiModel"] == "lanczos"
    assert "lanczos inside ROI voxels" in MedSR.describeRoiReport(run.roiReport)


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


def test_make_slices_thinner_uses_the_through_plane_plan_in_process_and_background(scene, MedSR):
    node, ijk_to_ras = oblique_anisotropic_volume(MedSR)  # 0.8 x 0.9 x 3.0 mm
    logic = MedSR.MedSRLogic()
    assert logic.defaultTargetSpacing(node) == pytest.approx(0.8)
    summary = logic.thinningSummary(node, 1.0, adapt=True)
    assert summary["factor"] == pytest.approx(3.0) and summary["out_slices"] == 18
    assert "x3" in summary["text"] and "CPU minutes" in summary["text"]
    with pytest.raises(ValueError, match="above the limit"):
        logic.thinningSummary(node, 0.1)
    output = logic.process(node, targetSpacing=1.0, show=False)
    assert output.GetName() == "CT chest_1mm"
    np.testing.assert_allclose(ijk_to_ras_of(output), expected_ijk_to_ras(ijk_to_ras, (1, 1, 3)), atol=1e-6)
    reference = MedSRLib.upscale(logic.volumeNodeToImage(node), target_spacing=1.0)
    assert reference.GetMetaData("medsr_model") == "through_plane_net"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output), sitk.GetArrayFromImage(reference))
    run = logic.startProcessing(node, model="linear", targetSpacing=1.0, show=False)
    command = run.commandLine("in.nrrd", "out.nrrd")
    assert command[6:8] == ["--target-spacing", "1.0"] and "--scale" not in command
    assert "--model" not in command and "--adapt" not in command
    run_to_end(run)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(run.outputVolume), slicer.util.arrayFromVolume(output))
