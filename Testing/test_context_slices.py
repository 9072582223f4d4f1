"""2.5-D in-plane networks (`context_slices`): the slice and its neighbours along the slice axis
as input channels, streamed by the engine through batches, tiles, backends and ROI crops."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSRLib import api
from MedSRLib.runtime import openvino_runtime
from MedSRLib.models import registry as zoo
from MedSRLib.runtime.engine import (EngineOptions, SliceUpscaler, neighbour_indices, slice_stacks,
                                     super_resolve_volume)
from MedSRLib.training import data as tdata
from MedSRLib.training.config import CONFIG_DIR, load_config
from MedSRLib.training.trainer import Trainer, load_matching_weights

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("MEDSR_DATA_ROOT", REPO.parent / "shared" / "data")).resolve()
SHIPPED_2D_X2 = zoo.WEIGHTS_DIR / "edsr_lite_x2.safetensors"
TORCH_FP32 = dict(backend="torch", precision="fp32")


def _smooth_volume(slices: int, height: int = 40, width: int = 36, seed: int = 0) -> np.ndarray:
    """(slices, height, width) float32 in [0, 1]: smooth blobs that change from slice to slice."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(slices), np.arange(height), np.arange(width), indexing="ij")
    volume = np.zeros((slices, height, width))
    for _ in range(6):
        cz, cy, cx = rng.uniform(0, slices), rng.uniform(0, height), rng.uniform(0, width)
        volume += np.exp(-((z - cz) ** 2 / 4 + (y - cy) ** 2 / 60 + (x - cx) ** 2 / 40))
    return (volume / volume.max()).astype(np.float32)


def _trained_like(tmp_path: Path, scale: int = 2, **card_fields) -> Path:
    """A 2.5-D weights file with a card: the shipped 2-D weights widened, plus random neighbour
    kernels (so the neighbours change the output)."""
    network = zoo.build_network("edsr_lite_25d", scale=scale)
    load_matching_weights(network, zoo.WEIGHTS_DIR / f"edsr_lite_x{scale}.safetensors")
    with torch.no_grad():
        head = network.head.conv.weight
        head[:, 0] = 0.3 * head[:, 1]
        head[:, 2] = -0.2 * head[:, 1]
    card = {"model": "edsr_lite_25d", "scales": [scale], "modality": ["CT", "MR"],
            "config": zoo.get_spec("edsr_lite_25d").default_config, **card_fields}
    path = tmp_path / f"edsr_lite_25d_x{scale}.safetensors"
    zoo.save_weights(network, path, card)
    return path


@pytest.fixture(scope="module")
def model_25d(tmp_path_factory, single_thread):
    return zoo.load_model("edsr_lite_25d", 2, weights_path=_trained_like(tmp_path_factory.mktemp("w")))


def _run(volume: np.ndarray, model, **options) -> np.ndarray:
    return super_resolve_volume(volume, (1, 2, 2), 0, lambda factors: (model, True), lambda v: v,
                                lambda u: u.astype(np.float32), np.float32,
                                EngineOptions(**{**TORCH_FP32, **options}))


def _direct(model, stack: np.ndarray) -> np.ndarray:
    """The network on one (k + 1, h, w) stack, no engine."""
    with torch.inference_mode():
        return model(torch.from_numpy(np.ascontiguousarray(stack))[None])[0, 0].numpy()


def test_edge_slices_are_replicated_in_order():
    assert neighbour_indices(0, 5, 2).tolist() == [0, 0, 1]
    assert neighbour_indices(4, 5, 2).tolist() == [3, 4, 4]
    assert neighbour_indices(2, 5, 4).tolist() == [0, 1, 2, 3, 4]
    assert neighbour_indices(0, 1, 4).tolist() == [0, 0, 0, 0, 0]
    volume = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    stacks = slice_stacks(volume, 1, 0, 3, 2)  # slices along axis 1: planes (4, 2)
    assert stacks.shape == (3, 3, 4, 2)
    for i in range(3):
        expected = [volume[:, j] for j in neighbour_indices(i, 3, 2)]
        np.testing.assert_array_equal(stacks[i], np.stack(expected))
    with pytest.raises(ValueError, match="even"):
        neighbour_indices(0, 5, 3)


def test_tiled_and_untiled_outputs_agree_for_a_25d_model(model_25d):
    volume = _smooth_volume(5)
    whole = _run(volume, model_25d, tile=0, batch_size=2)
    tiled = _run(volume, model_25d, tile=16, batch_size=3)
    assert whole.shape == (5, 80, 72)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_each_output_slice_is_the_network_on_its_own_neighbours(model_25d):
    volume = _smooth_volume(5)
    output = _run(volume, model_25d, tile=0)
    for z in (0, 2, 4):
        np.testing.assert_allclose(output[z], _direct(model_25d, volume[neighbour_indices(z, 5, 2)]),
                                   atol=1e-5)
    changed = volume.copy()
    changed[3] = changed[3][::-1]
    after = _run(changed, model_25d, tile=0)
    assert np.abs(after[2] - output[2]).max() > 1e-3  # slice 3 is a neighbour of slice 2
    np.testing.assert_allclose(after[0], output[0], atol=1e-6)  # ... not of slice 0
    np.testing.assert_allclose(after[1], output[1], atol=1e-6)


@pytest.mark.parametrize("slices", [1, 2, 3])
def test_volumes_of_one_two_and_three_slices_run_with_replicated_edges(model_25d, slices):
    volume = _smooth_volume(slices, seed=slices)
    output = _run(volume, model_25d, tile=16)
    assert output.shape == (slices, 80, 72)
    for z in range(slices):
        np.testing.assert_allclose(output[z], _direct(model_25d, volume[neighbour_indices(z, slices, 2)]),
                                   atol=1e-5)


def test_neighbour_kernels_start_at_zero_so_the_25d_model_starts_as_the_2d_one(single_thread):
    network = zoo.build_network("edsr_lite_25d", scale=2).eval()
    copied, total = load_matching_weights(network, SHIPPED_2D_X2)
    assert copied == total
    assert torch.count_nonzero(network.head.conv.weight[:, [0, 2]]) == 0
    two_d = zoo.load_model("edsr_lite", 2).network
    stacks = torch.from_numpy(np.stack([_smooth_volume(3, seed=s) for s in range(2)]))
    with torch.inference_mode():
        torch.testing.assert_close(network(stacks), two_d(stacks[:, 1:2]), rtol=0, atol=1e-6)


@pytest.mark.skipif(not (DATA_ROOT / "MANIFEST.md").is_file(), reason=f"real data not found at {DATA_ROOT}")
def test_training_starts_where_the_2d_default_stands(tmp_path, single_thread):
    """Step 0 of the 2.5-D recipe (3-slice patches, centre target) validates exactly as the
    shipped 2-D model does on the same held-out slices."""
    def trainer(recipe: str, *overrides: str) -> Trainer:
        config = load_config(CONFIG_DIR / "ci" / f"{recipe}.yaml",
                             [f"data.root={DATA_ROOT}", f"init_from={SHIPPED_2D_X2}", *overrides])
        return Trainer(config, tmp_path / recipe, progress=False)
    flat = trainer("edsr_lite")
    stacked = trainer("edsr_lite_25d", "optimizer.lr=1.0e-5", 'optimizer.lr_by_prefix={"head.": 1.0e-4}',
                      'optimizer.trainable=["head.", "trunk.conv."]')
    groups = stacked.optimizer.param_groups  # the widened first layer learns faster, the rest is frozen
    assert [g["lr"] for g in groups] == [1e-4, 1e-5]
    assert groups[0]["params"][0] is stacked.network.head.conv.weight
    assert groups[1]["params"][0] is stacked.network.trunk.conv.conv.weight
    assert not any(p.requires_grad for p in stacked.network.tail.parameters())
    assert stacked.validation[0].image.shape[1] == 3 and flat.validation[0].image.shape[1] == 1
    np.testing.assert_array_equal(stacked.validation[0].image[:, 1:2].numpy(), flat.validation[0].image.numpy())
    batch = next(iter(stacked.loader))
    assert batch["image"].shape[1:] == (3, 48, 48)
    inputs, target = stacked.make_input(batch["image"].float(), 2, None)
    assert inputs.shape[1] == 3 and target.shape[1] == 1
    torch.testing.assert_close(target, batch["image"][:, 1:2].float())
    scores_25d, scores_2d = stacked.validate()["x2"]["model"], flat.validate()["x2"]["model"]
    assert scores_25d["psnr"] == pytest.approx(scores_2d["psnr"], abs=1e-4)


def test_training_patches_hold_the_slice_and_its_neighbours():
    volume = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], (6, 20, 20)).copy()
    sampler = tdata.RandSlicePatchd(patch_size=8, axes=(0,), num_samples=20, context_slices=2)
    sampler.set_random_state(seed=0)
    for item in sampler({"image": volume[None]}):
        values = item["image"][:, 0, 0].tolist()
        centre = int(values[1])
        assert values == [float(i) for i in neighbour_indices(centre, 6, 2)]


@pytest.mark.skipif(not openvino_runtime.available(), reason="OpenVINO is not installed")
def test_openvino_backend_runs_the_stacks_as_torch_does(model_25d):
    volume = _smooth_volume(3, height=32, width=32)
    stacks = slice_stacks(volume, 0, 0, 3, 2)
    openvino = SliceUpscaler(model_25d, (2, 2), EngineOptions(backend="openvino", precision="fp32"))
    assert openvino.backend == "openvino"
    torch_fp32 = SliceUpscaler(model_25d, (2, 2), EngineOptions(**TORCH_FP32, tile=0))
    np.testing.assert_allclose(openvino.upscale(stacks), torch_fp32.upscale(stacks), atol=1e-4)


def test_upscaler_refuses_single_slices_for_a_25d_model(model_25d):
    with pytest.raises(ValueError, match=r"\(N, 3, h, w\)"):
        SliceUpscaler(model_25d, (2, 2), EngineOptions(**TORCH_FP32)).upscale(_smooth_volume(2))


def _image(volume: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray((volume * 1000 - 200).astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.5))
    return image


def test_default_is_25d_for_volumes_and_2d_for_single_slices(tmp_path, monkeypatch, single_thread):
    """The API (called by the Slicer module, `medsr upscale` and `medsr batch` alike) picks the
    2.5-D default for a volume and the 2-D model for a one-slice image, with no new option."""
    import shutil
    for suffix in (".safetensors", ".json"):
        shutil.copy(SHIPPED_2D_X2.with_suffix(suffix), tmp_path / f"edsr_lite_x2{suffix}")
    _trained_like(tmp_path)
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(zoo, "DEFAULT_PREFERENCE", ("edsr_lite_25d", *zoo.DEFAULT_PREFERENCE))
    assert zoo.default_model("CT", 2) == "edsr_lite_25d"
    assert zoo.default_model("CT", 2, slices=1) == "edsr_lite"
    volume = _smooth_volume(3, height=24, width=20)
    out = api.upscale(_image(volume), modality="CT", backend="torch", precision="fp32")
    assert out.GetMetaData(api.MODEL_KEY) == "edsr_lite_25d"
    assert out.GetSize() == (40, 48, 3)
    flat = sitk.GetImageFromArray((volume[1] * 1000 - 200).astype(np.int16))
    out_2d = api.upscale(flat, modality="CT", backend="torch", precision="fp32")
    assert out_2d.GetMetaData(api.MODEL_KEY) == "edsr_lite"
    one_slice = api.upscale(_image(volume[1:2]), modality="CT", backend="torch", precision="fp32")
    assert one_slice.GetMetaData(api.MODEL_KEY) == "edsr_lite"


def test_roi_crops_reach_the_25d_model_neighbours_and_match_a_whole_volume_run(tmp_path, single_thread):
    """An ROI crop is grown along the slice axis by the neighbours a 2.5-D ROI model sees, and
    inside the ROI the result is the whole-volume run's."""
    from MedSRLib.roi import focus as lesion_roi
    weights = _trained_like(tmp_path)
    model_25d = zoo.load_model("edsr_lite_25d", 2, weights_path=weights)
    model_2d = zoo.load_model("edsr_lite", 2)
    context_25d = lesion_roi._context_voxels_kji(lambda f: (model_25d, True), (1, 2, 2), 0, (12, 32, 32))
    context_2d = lesion_roi._context_voxels_kji(lambda f: (model_2d, True), (1, 2, 2), 0, (12, 32, 32))
    assert context_25d[0] == 1 and context_2d[0] == 0 and context_25d[1:] == context_2d[1:]
    image = _image(_smooth_volume(12, height=32, width=32))
    whole = sitk.GetArrayFromImage(api.upscale(image, model="edsr_lite_25d", weights=str(weights),
                                               backend="torch", precision="fp32", output_float=True))
    box = (12, 12, 5, 20, 20, 7)  # x0, y0, z0, x1, y1, z1
    refined = sitk.GetArrayFromImage(api.upscale(
        image, model="bicubic", roi=box, roi_model="edsr_lite_25d", roi_weights=str(weights),
        roi_margin_mm=5.0, backend="torch", precision="fp32", output_float=True))
    inside = (slice(5, 7), slice(26, 38), slice(26, 38))
    np.testing.assert_allclose(refined[inside], whole[inside], atol=0.05)
    assert np.abs(refined - whole).max() > 1.0  # bicubic outside: the ROI model did run only inside


def test_card_default_for_limits_the_modalities_a_model_is_the_default_for(tmp_path, monkeypatch):
    import shutil
    for suffix in (".safetensors", ".json"):
        shutil.copy(SHIPPED_2D_X2.with_suffix(suffix), tmp_path / f"edsr_lite_x2{suffix}")
    _trained_like(tmp_path, default_for=["MR"])  # measured best on the MR test patients only
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(zoo, "DEFAULT_PREFERENCE", ("edsr_lite_25d", "edsr_lite"))
    assert zoo.default_model("MR", 2) == "edsr_lite_25d"
    assert zoo.default_model("CT", 2) == "edsr_lite"
    assert zoo.default_model(None, 2) == "edsr_lite"  # not the default for every modality it knows
