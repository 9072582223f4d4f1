"""The model inside the ROI: geometric self-ensemble in the engine, the measured default table
(`roi.roi_models`) and its use by `api.upscale(roi=...)`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from MedSRLib import api
from MedSRLib.errors import InputError
from MedSRLib.models import registry as zoo
from MedSRLib.roi import focus, roi_models
from MedSRLib.runtime.engine import EngineOptions, SliceUpscaler, ensemble_transforms

SAMPLE = Path(__file__).resolve().parents[1] / "MedSRLib" / "data" / "ct_abdomen_sample.nrrd"
BOX = (8, 10, 0, 24, 26, 3)  # x0, y0, z0, x1, y1, z1 on the sample crop


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def sample_crop() -> sitk.Image:
    """A real CT crop (64 x 56 x 3 voxels) of the bundled sample."""
    return sitk.ReadImage(str(SAMPLE))[96:160, 100:156, 6:9]


def real_slices() -> np.ndarray:
    """Three real CT slices (3, 56, 64) in network units (0.5-99.5 percentiles -> 0..1)."""
    voxels = sitk.GetArrayFromImage(sample_crop()).astype(np.float32)
    low, high = np.percentile(voxels, (0.5, 99.5))
    return (voxels - low) / (high - low)


class PointwiseNearest(nn.Module):
    """A 1x1 convolution then nearest-neighbour upsampling: equivariant under every in-plane flip
    and transpose, so its self-ensemble is itself."""

    def __init__(self, scale: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.scale = scale
        with torch.no_grad():
            self.conv.weight.fill_(1.7)
            self.conv.bias.fill_(-0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.conv(x), scale_factor=self.scale, mode="nearest")


def torch_fp32(**kwargs) -> EngineOptions:
    return EngineOptions(backend="torch", precision="fp32", threads=1, **kwargs)


def shipped_edsr_lite(scale: int = 2) -> nn.Module:
    if zoo.shipped_weights(zoo.get_spec("edsr_lite"), scale) is None:
        pytest.skip("no edsr_lite weights ship")
    from MedSRLib.planning.run_plan import model_loader
    return model_loader("edsr_lite")((scale, scale))[0]


def test_self_ensemble_of_an_equivariant_network_is_its_plain_output():
    model, slices = PointwiseNearest(2), real_slices()
    plain = SliceUpscaler(model, (2, 2), torch_fp32(), learned=True).upscale(slices)
    for members in (2, 4, 8):
        ensemble = SliceUpscaler(model, (2, 2), torch_fp32(self_ensemble=members),
                                 learned=True).upscale(slices)
        np.testing.assert_allclose(ensemble, plain, rtol=0, atol=1e-6)


def test_self_ensemble_changes_a_real_network_slightly_and_is_its_transforms_mean():
    model, slices = shipped_edsr_lite(), real_slices()
    plain = SliceUpscaler(model, (2, 2), torch_fp32()).upscale(slices)
    ensemble = SliceUpscaler(model, (2, 2), torch_fp32(self_ensemble=8)).upscale(slices)
    difference = np.abs(ensemble - plain)
    assert difference.max() > 1e-3            # a trained network is not exactly equivariant
    assert difference.mean() < 0.02           # but nearly (units: 0..1)
    # member by member: transpose + flips of the input, inverse on the output, mean
    total = np.zeros_like(plain)
    for transpose, rows, cols in ensemble_transforms(8, (2, 2)):
        x = slices.transpose(0, 2, 1) if transpose else slices
        x = x[:, ::-1] if rows else x
        x = x[:, :, ::-1] if cols else x
        y = SliceUpscaler(model, (2, 2), torch_fp32()).upscale(np.ascontiguousarray(x))
        y = y[:, :, ::-1] if cols else y
        y = y[:, ::-1] if rows else y
        total += y.transpose(0, 2, 1) if transpose else y
    np.testing.assert_allclose(ensemble, total / 8, rtol=0, atol=1e-5)


def test_tiled_self_ensemble_equals_whole_slices():
    model, slices = shipped_edsr_lite(), real_slices()
    whole = SliceUpscaler(model, (2, 2), torch_fp32(self_ensemble=8, tile=0)).upscale(slices)
    tiled = SliceUpscaler(model, (2, 2), torch_fp32(self_ensemble=8, tile=24)).upscale(slices)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)


def test_ensemble_start_leaves_out_the_first_members():
    model, slices = shipped_edsr_lite(), real_slices()
    plain = SliceUpscaler(model, (2, 2), torch_fp32()).upscale(slices)
    both = SliceUpscaler(model, (2, 2), torch_fp32(self_ensemble=2)).upscale(slices)
    rotated = SliceUpscaler(model, (2, 2), torch_fp32(self_ensemble=2, ensemble_start=1)).upscale(slices)
    np.testing.assert_allclose((plain + rotated) / 2, both, rtol=0, atol=1e-5)


def test_self_ensemble_runs_a_two_and_a_half_d_network_and_unequal_factors_skip_transposes():
    if zoo.shipped_weights(zoo.get_spec("edsr_lite_25d"), 2) is None:
        pytest.skip("no edsr_lite_25d weights ship")
    from MedSRLib.planning.run_plan import model_loader
    model = model_loader("edsr_lite_25d")((2, 2))[0]
    stacks = np.stack([real_slices()] * 2)    # (N=2, k + 1 = 3, h, w)
    plain = SliceUpscaler(model, (2, 2), torch_fp32()).upscale(stacks)
    ensemble = SliceUpscaler(model, (2, 2), torch_fp32(self_ensemble=4)).upscale(stacks)
    assert ensemble.shape == plain.shape == (2, 112, 128)
    assert 0 < np.abs(ensemble - plain).mean() < 0.02
    assert ensemble_transforms(8, (2, 1)) == ensemble_transforms(4, (2, 1))
    assert all(not transpose for transpose, _, _ in ensemble_transforms(8, (2, 1)))


def test_self_ensemble_on_openvino_matches_torch():
    from MedSRLib.runtime import openvino_runtime
    if not openvino_runtime.available():
        pytest.skip("OpenVINO is not installed")
    model, slices = shipped_edsr_lite(), real_slices()
    reference = SliceUpscaler(model, (2, 2), torch_fp32(self_ensemble=8)).upscale(slices)
    upscaler = SliceUpscaler(model, (2, 2), EngineOptions(backend="openvino", precision="fp32",
                                                          threads=1, self_ensemble=8))
    assert upscaler.backend == "openvino" and "self-ensemble x8" in upscaler.description
    np.testing.assert_allclose(upscaler.upscale(slices), reference, rtol=0, atol=1e-3)


@pytest.mark.parametrize("members, start", [(3, 0), (0, 0), (2, 2), (4, -1), (True, 0)])
def test_engine_options_reject_a_bad_ensemble(members, start):
    with pytest.raises(InputError, match="self_ensemble|ensemble_start"):
        EngineOptions(self_ensemble=members, ensemble_start=start)


def test_roi_default_table_names_shipped_models_for_ct_and_mr_at_x2_and_x4():
    for (modality, scale), choice in roi_models.ROI_DEFAULTS.items():
        assert modality in ("CT", "MR") and scale in (2, 4)
        assert choice.self_ensemble in (1, 2, 4, 8)
        assert zoo.shipped_weights(zoo.get_spec(choice.model), scale, modality=modality) is not None
        assert choice.model != roi_models.PERCEPTUAL_ROI_MODEL
        assert focus.choose_roi(None, scale, False, modality, fallback="bicubic") == choice
    assert {key for key in roi_models.ROI_DEFAULTS} == {(m, s) for m in ("CT", "MR") for s in (2, 4)}
    named = focus.choose_roi("lfsr", 2, False, "MR", fallback="edsr_lite")
    assert (named.model, named.self_ensemble) == ("lfsr", 1)
    assert focus.choose_roi(None, 3, False, "MR", fallback="edsr_lite").model in (
        "edsr_lite", roi_models.ROI_DEFAULTS[("MR", 2)].model)


def test_upscale_roi_runs_the_table_default_and_names_it_in_the_metadata():
    image = sample_crop()
    choice = roi_models.ROI_DEFAULTS[("CT", 2)]
    if zoo.shipped_weights(zoo.get_spec(choice.model), 2, modality="CT") is None:
        pytest.skip("the default ROI model does not ship")
    result = api.upscale(image, scale=2, roi=BOX, modality="CT", output_float=True)
    assert result.GetMetaData(focus.ROI_MODEL_KEY) == choice.model
    assert result.GetMetaData(focus.ROI_ENSEMBLE_KEY) == str(choice.self_ensemble)
    report = focus.RoiReport.from_image(result)
    assert (report.roi_model, report.roi_self_ensemble) == (choice.model, choice.self_ensemble)
    plain = sitk.GetArrayFromImage(api.upscale(image, scale=2, modality="CT", output_float=True))
    refined = sitk.GetArrayFromImage(result)
    changed = np.abs(refined - plain) > 1e-3
    lower, upper = report.processed_index_xyz
    inside = np.zeros_like(changed)
    inside[lower[2]:upper[2], 2 * lower[1]:2 * upper[1], 2 * lower[0]:2 * upper[0]] = True
    assert changed[inside].any() != (choice.model == api.choose_model(None, image, "CT", 2)
                                     and choice.self_ensemble == 1)
    assert not changed[~inside].any()        # outside the ROI plus margin: the plain run


def test_reused_identity_member_gives_the_full_ensemble():
    """With the run's own model inside the ROI, the whole-volume pass is the identity member:
    the same voxels as running every member on the crop (another weights file object)."""
    image = sample_crop()
    weights = zoo.shipped_weights(zoo.get_spec("edsr_lite"), 2)
    if weights is None:
        pytest.skip("no edsr_lite weights ship")
    run = dict(scale=2, roi=BOX, model="edsr_lite", modality="CT", output_float=True,
               backend="torch", precision="fp32", roi_model="edsr_lite", roi_self_ensemble=4)
    reused = api.upscale(image, **run)
    every_member = api.upscale(image, **run, roi_weights=str(weights))
    np.testing.assert_allclose(sitk.GetArrayFromImage(reused), sitk.GetArrayFromImage(every_member),
                               rtol=0, atol=0.05)  # HU; float rounding of the crop's borders only
    assert reused.GetMetaData(focus.ROI_ENSEMBLE_KEY) == "4"


def test_lfsr_stays_available_by_name():
    if zoo.shipped_weights(zoo.get_spec("lfsr"), 2) is None:
        pytest.skip("no LFSR ships")
    result = api.upscale(sample_crop(), scale=2, roi=BOX, modality="CT", roi_model="lfsr")
    assert result.GetMetaData(focus.ROI_MODEL_KEY) == "lfsr"
    assert result.GetMetaData(focus.ROI_ENSEMBLE_KEY) == "1"
    with pytest.raises(InputError, match="roi_self_ensemble"):
        api.upscale(sample_crop(), scale=2, roi_self_ensemble=2)
    with pytest.raises(InputError, match="self_ensemble"):
        api.upscale(sample_crop(), scale=2, roi=BOX, roi_self_ensemble=3)


def test_a_precision_in_the_table_runs_the_roi_model_in_it_unless_the_user_names_one(monkeypatch):
    if zoo.shipped_weights(zoo.get_spec("edsr_lite"), 2) is None:
        pytest.skip("no edsr_lite weights ship")
    monkeypatch.setitem(roi_models.ROI_DEFAULTS, ("CT", 2),
                        roi_models.RoiModelChoice("edsr_lite", 1, "fp32"))
    image = sample_crop()
    run = dict(scale=2, modality="CT", model="edsr_lite", backend="torch", output_float=True)
    plain = sitk.GetArrayFromImage(api.upscale(image, precision="bf16", **run))
    focused = api.upscale(image, roi=BOX, precision="auto", **run)
    report = focus.RoiReport.from_image(focused)
    assert (report.roi_model, report.roi_self_ensemble, report.roi_precision) == ("edsr_lite", 1, "fp32")
    fp32 = sitk.GetArrayFromImage(api.upscale(image, precision="fp32", **run))
    lower, upper = report.roi_index_xyz
    roi = (slice(lower[2], upper[2]), slice(2 * lower[1], 2 * upper[1]), slice(2 * lower[0], 2 * upper[0]))
    if not np.array_equal(plain, fp32):      # this CPU's automatic precision is bf16
        np.testing.assert_allclose(sitk.GetArrayFromImage(focused)[roi], fp32[roi], rtol=0, atol=0.05)
    named = api.upscale(image, roi=BOX, precision="fp32", **run)   # the user's precision wins
    assert focus.RoiReport.from_image(named).roi_precision == ""
    np.testing.assert_array_equal(sitk.GetArrayFromImage(named), fp32)
