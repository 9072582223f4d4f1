"""The lesion localiser's fast paths: the shipped ensemble through OpenVINO (f32, bf16) gives the
torch reference's probability map within tolerance on a real CT, constant stacks run once, and a
minimum slice gap (all axes or per axis) runs fewer slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSRLib.errors import InputError
from MedSRLib.models import registry as zoo
from MedSRLib.roi import localiser as loc
from MedSRLib.runtime import localiser_runtime

pytest.importorskip("openvino")

SAMPLE = Path(__file__).resolve().parents[1] / "MedSRLib/data/ct_abdomen_sample.nrrd"


@pytest.fixture(scope="module")
def ct_crop() -> sitk.Image:
    """A 64 x 64 x 8 crop of the bundled abdominal CT (real anatomy, 0.8 x 0.8 x 5 mm)."""
    return sitk.ReadImage(str(SAMPLE))[96:160, 88:152, 4:12]


@pytest.fixture(scope="module")
def reference(ct_crop):
    """(ensemble, units, torch fp32 map) of the crop."""
    torch.set_num_threads(1)
    ensemble = loc.load_ensemble()
    units = loc.units_of(sitk.GetArrayFromImage(ct_crop))
    return ensemble, units, ensemble.probability(units, ct_crop.GetSpacing(), runtime="torch")


def test_openvino_f32_map_matches_the_torch_reference_on_a_real_ct(ct_crop, reference):
    ensemble, units, expected = reference
    got = ensemble.probability(units, ct_crop.GetSpacing(), runtime="openvino-f32")
    assert got.shape == expected.shape and got.dtype == np.float32
    assert float(expected.max()) > 0.01                  # the map is not trivially empty
    assert np.abs(got - expected).max() < 1e-3


def test_openvino_bf16_map_stays_within_a_few_hundredths_of_the_reference(ct_crop, reference):
    if not localiser_runtime.cpu_has_bf16():
        pytest.skip("this CPU has no native bf16")
    ensemble, units, expected = reference
    got = ensemble.probability(units, ct_crop.GetSpacing(), runtime="openvino-bf16")
    difference = np.abs(got - expected)
    assert difference.max() < 0.05 and difference.mean() < 2e-3
    assert difference.max() > 0                          # bf16 really ran (it rounds)


def test_find_regions_runs_the_fast_path_by_default_and_rejects_unknown_runtimes(ct_crop, reference):
    ensemble, _, expected = reference
    assert loc.resolved_runtime("auto") in ("openvino-bf16", "openvino-f32")
    exact = loc.find_regions(ct_crop, localiser=ensemble, runtime="openvino-f32", slice_gap_mm=None)
    assert exact.peak_probability == pytest.approx(float(expected.max()), abs=1e-3)
    fast = loc.find_regions(ct_crop, localiser=ensemble)   # bf16, x/y slices >= 4 mm apart
    assert fast.peak_probability == pytest.approx(float(expected.max()), abs=0.25)
    with pytest.raises(InputError, match="runtime"):
        loc.find_regions(ct_crop, localiser=ensemble, runtime="gpu")


def test_a_padded_batch_gives_each_stack_its_own_logits():
    torch.manual_seed(0)
    network = zoo.build_network("lesion_segmenter", features=[4, 4, 8, 8, 16, 4]).eval()
    runner = localiser_runtime.SegmenterRunner(network, "f32", threads=1)
    stacks = torch.rand(3, 3, 32, 48)                   # compiled for 4: one zero stack added
    with torch.inference_mode():
        expected = network(stacks)
    got = runner(stacks)
    assert got.shape == (3, 2, 32, 48)
    assert torch.allclose(got, expected, atol=1e-4)
    assert localiser_runtime.padded_batch(3, 16) == 4 and localiser_runtime.padded_batch(20, 16) == 20


def test_constant_stacks_run_once_and_give_the_same_map(monkeypatch):
    torch.manual_seed(0)
    network = zoo.build_network("lesion_segmenter", features=[4, 4, 8, 8, 16, 4]).eval()
    units = np.zeros((10, 40, 36), dtype=np.float32)     # an MR's zero background ...
    units[3:7, 10:30, 8:28] = np.random.default_rng(1).random((4, 20, 20), dtype=np.float32)
    keep, inverse = loc.distinct_stacks(torch.from_numpy(np.stack([units[:3], units[3:6], units[7:10]])))
    assert keep.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0]
    calls = []
    counted = lambda planes: calls.append(planes.shape[0]) or network(planes)  # noqa: E731
    slicing = loc.Slicing(3, None, 32)
    deduplicated = loc.probability_map(units, counted, (1.0, 1.0, 1.0), slicing)
    run = sum(calls)
    monkeypatch.setattr(loc, "distinct_stacks",
                        lambda planes: (torch.arange(len(planes)), torch.arange(len(planes))))
    calls.clear()
    every = loc.probability_map(units, counted, (1.0, 1.0, 1.0), slicing)
    assert run < sum(calls) == 10 + 40 + 36
    assert np.allclose(deduplicated, every, atol=1e-6)


def test_a_minimum_slice_gap_runs_fewer_slices_and_interpolates_the_rest():
    torch.manual_seed(0)
    network = zoo.build_network("lesion_segmenter", features=[4, 4, 8, 8, 16, 4]).eval()
    units = np.random.default_rng(2).random((9, 40, 36), dtype=np.float32)
    calls = []
    counted = lambda planes: calls.append(planes.shape[0]) or network(planes)  # noqa: E731
    slicing = loc.Slicing(3, 2.0, window=96)
    full = loc.probability_map(units, counted, (2.0, 2.0, 2.0), slicing, axes_xyz=(2,))
    assert sum(calls) == 9                               # 2 mm slices, 2 mm pixels: every one
    calls.clear()
    coarse = loc.probability_map(units, counted, (2.0, 2.0, 2.0), slicing, axes_xyz=(2,),
                                 slice_gap_mm=4.0)
    assert sum(calls) == 5                               # slices 0, 2, 4, 6, 8
    assert np.allclose(coarse[::2], full[::2], atol=1e-6)
    assert np.allclose(coarse[1], (full[0] + full[2]) / 2, atol=1e-6)
    assert not np.allclose(coarse, full, atol=1e-6)
    calls.clear()                                        # a gap per axis (x, y, z)
    assert np.array_equal(coarse, loc.probability_map(units, counted, (2.0, 2.0, 2.0), slicing,
                                                      axes_xyz=(2,), slice_gap_mm=(0, 0, 4.0)))
    in_plane_only = loc.probability_map(units, counted, (2.0, 2.0, 2.0), slicing, axes_xyz=(2,),
                                        slice_gap_mm=(4.0, 4.0, 0))
    assert sum(calls) == 5 + 9 and np.array_equal(in_plane_only, full)
