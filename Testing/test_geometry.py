"""The output grid covers the input's physical extent exactly and keeps the direction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

import MedSRLib
from MedSRLib.transforms import geometry
from MedSRLib.errors import InputError

from conftest import make_volume, oblique_direction


def sitk_boundary_corners(image: sitk.Image) -> np.ndarray:
    """Voxel-boundary corners from SimpleITK's own continuous-index-to-point mapping."""
    size = image.GetSize()
    corners = []
    for cz, cy, cx in itertools.product((0, 1), repeat=3):
        index = [cx * size[0] - 0.5, cy * size[1] - 0.5, cz * size[2] - 0.5]
        corners.append(image.TransformContinuousIndexToPhysicalPoint(index))
    return np.array(corners)


CASES = {
    "axial_in_plane": dict(scale=2, axis="z", factors=(2, 2, 1)),
    "through_plane": dict(scale=(1, 1, 3), axis="auto", factors=(1, 1, 3)),
    "isotropic_two_passes": dict(scale=(2, 2, 2), axis="auto", factors=(2, 2, 2)),
    "sagittal_slices_x4": dict(scale=4, axis="x", factors=(1, 4, 4)),
}


@pytest.mark.parametrize("direction", [None, "oblique", "flipped"])
@pytest.mark.parametrize("case", list(CASES))
def test_output_covers_same_physical_extent(tmp_path, case, direction):
    matrix = {None: None, "oblique": oblique_direction(),
              "flipped": np.diag([-1.0, -1.0, 1.0])}[direction]
    image = make_volume(shape_kji=(5, 9, 11), spacing=(0.7, 0.85, 2.5),
                        origin=(-123.25, 45.5, -300.125), direction=matrix)
    path = MedSRLib.write_volume(image, tmp_path / "input.mha")
    image = MedSRLib.read_volume(path)
    params = CASES[case]
    out = MedSRLib.upscale(image, model="linear", scale=params["scale"], axis=params["axis"])
    out = MedSRLib.read_volume(MedSRLib.write_volume(out, tmp_path / "out.nrrd"))
    assert out.GetSize() == tuple(n * f for n, f in zip(image.GetSize(), params["factors"]))
    np.testing.assert_allclose(sitk_boundary_corners(out), sitk_boundary_corners(image), atol=1e-6)
    np.testing.assert_allclose(out.GetDirection(), image.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(np.array(out.GetSpacing()) * params["factors"], image.GetSpacing(),
                               atol=1e-12)


def test_corner_points_match_sitk_mapping():
    image = make_volume(direction=oblique_direction(40, 20))
    np.testing.assert_allclose(geometry.corner_points(geometry.Grid.of(image)),
                               sitk_boundary_corners(image), atol=1e-9)


@pytest.mark.parametrize("factors", [(1, 1, 1), (5, 1, 1), (2, 2), (0, 2, 2), (2.5, 2, 1)])
def test_bad_scale_factors_are_refused(factors):
    with pytest.raises(InputError, match="scale factor"):
        geometry.check_scale_factors(factors)


def test_auto_axis_inplane_is_the_stored_slices_and_through_plane_the_largest_spacing():
    from MedSRLib.api import plan_scale

    assert plan_scale(2, "auto", (0.8, 0.8, 5.0), (64, 64, 10)).factors_xyz == (2, 2, 1)
    # in-plane means the stored slices' plane even when its pixels are the coarser (issue 16)
    assert plan_scale(2, "auto", (3.0, 0.8, 0.8), (10, 64, 64)).factors_xyz == (2, 2, 1)
    assert plan_scale(2, "x", (3.0, 0.8, 0.8), (10, 64, 64)).factors_xyz == (1, 2, 2)
    assert plan_scale(2, "auto", (1.0, 1.0, 1.0), (64, 64, 1)).factors_xyz == (2, 2, 1)
    plan = plan_scale((1, 1, 3), "auto", (0.8, 0.8, 5.0), (64, 64, 10))
    assert plan.factors_xyz == (1, 1, 3) and plan.slice_axis_xyz in (0, 1)
    with pytest.raises(InputError, match="one voxel|1 voxel"):
        plan_scale((2, 2, 2), "auto", (1.0, 1.0, 1.0), (64, 64, 1))


@pytest.mark.parametrize("direction, words", [
    ([0.001, 0, 0, 0, 0.001, 0, 0, 0, 0.001], "singular or nearly so (determinant 1e-09)"),
    ([0.001, 0, 0, 0, 1, 0, 0, 0, 0.0001], "singular or nearly so (determinant 1e-07)"),
])
def test_a_degenerate_direction_matrix_is_named_as_such(direction, words):
    image = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
    image.SetDirection(direction)
    with pytest.raises(InputError, match="direction matrix") as caught:
        MedSRLib.upscale(image, model="nearest", scale=2)
    assert words in str(caught.value)
