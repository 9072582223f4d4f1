"""What a test compares to say "the scene is exactly as it was": every node, serialised."""

import hashlib

import numpy as np


def scene_state(scene):
    """(node count, scene XML of every node, hash of every volume's voxels)."""
    import slicer

    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()
    voxel_hashes = {}
    for node in slicer.util.getNodesByClass("vtkMRMLVolumeNode", scene):
        image = node.GetImageData()
        if image is not None:
            voxels = np.ascontiguousarray(slicer.util.arrayFromVolume(node))
            voxel_hashes[node.GetID()] = hashlib.sha1(voxels.tobytes()).hexdigest()
    return scene.GetNumberOfNodes(), xml, voxel_hashes
