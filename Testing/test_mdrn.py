"""MDRN (paper 004's multi-scale EDSR): the function-preserving start from the shipped 8x48
multi-scale network, the shipped weights through the CLI at x2/x3/x4, and a card that matches
the architecture and keeps training, validation and test patients apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from MedSRLib.evaluation import benchmark
from MedSRLib import cli
from MedSRLib.models import registry as zoo
from MedSRLib.evaluation.demo import SAMPLE_PATH
from MedSRLib.training.config import load_config
from MedSRLib.training.expand_multiscale import check_compatible, expand_network, load_source

SHIPPED_MULTISCALE = zoo.WEIGHTS_DIR / "edsr_multiscale.safetensors"
MDRN_WEIGHTS = zoo.WEIGHTS_DIR / "mdrn.safetensors"
RECIPE = "mdrn_from_multiscale"


@pytest.fixture(scope="module")
def sample_slices() -> torch.Tensor:
    """Three real CT slices of the bundled sample, 0.5/99.5th percentiles -> 0/1, (3, 1, 40, 48)."""
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_PATH))).astype(np.float32)
    crop = values[6:9, 100:140, 90:138]
    low, high = np.percentile(values, [0.5, 99.5])
    return torch.from_numpy(((crop - low) / (high - low)).astype(np.float32))[:, None]


@pytest.fixture(scope="module")
def source():
    torch.set_num_threads(1)
    return load_source(SHIPPED_MULTISCALE)


def test_expansion_to_the_recipe_size_computes_the_shipped_network(source, sample_slices):
    network, config = source
    recipe = load_config(RECIPE)["model_config"]
    expanded = expand_network(network, config, num_features=recipe["num_features"],
                              num_blocks=recipe["num_blocks"],
                              preprocess_blocks=recipe["preprocess_blocks"]).eval()
    assert len(expanded.trunk.blocks) == 80 and expanded.head.conv.out_channels == 64
    with torch.no_grad():
        for scale in (2, 3, 4):
            reference = network(sample_slices, scale)
            assert reference.shape[-2:] == (40 * scale, 48 * scale)
            assert torch.allclose(expanded(sample_slices, scale), reference, atol=1e-5, rtol=0)


def test_expanded_network_trains_its_new_channels_and_blocks(source, sample_slices):
    """Zero on both sides of a channel would never train: after one step the added stream
    channels and the added blocks' zeroed convs have moved."""
    network, config = source
    expanded = expand_network(network, config, num_features=56, num_blocks=10, preprocess_blocks=2)
    optimiser = torch.optim.Adam(expanded.parameters(), lr=1e-3)
    hr = sample_slices[..., :36, :48]
    lr = F.interpolate(hr, scale_factor=0.5, mode="bicubic", antialias=True)
    for _ in range(2):
        optimiser.zero_grad()
        (expanded(lr, 2) - hr).abs().mean().backward()
        optimiser.step()
    head = expanded.head.conv.weight.detach()
    assert head[48:].abs().sum() > 0, "the added stream channels stayed zero"
    last_conv = expanded.trunk.blocks[9].body[1].conv.weight.detach()
    assert last_conv.abs().sum() > 0, "an added block stayed the identity"


def test_expansion_refuses_a_smaller_or_different_network(source):
    network, config = source
    with pytest.raises(ValueError, match="num_features can only grow"):
        expand_network(network, config, num_features=32, num_blocks=80, preprocess_blocks=2)
    with pytest.raises(ValueError, match="num_blocks can only grow"):
        expand_network(network, config, num_features=64, num_blocks=4, preprocess_blocks=2)
    with pytest.raises(ValueError, match="bicubic_residual must stay True"):
        check_compatible(config, {**config, "bicubic_residual": False}, (2, 3, 4), (2, 3, 4))
    with pytest.raises(ValueError, match="scales must stay"):
        check_compatible(config, config, (2, 3, 4), (2, 4))


@pytest.fixture(scope="module")
def mdrn_card() -> dict:
    if not MDRN_WEIGHTS.is_file():
        pytest.fail(f"{MDRN_WEIGHTS} does not ship")
    return zoo.read_card(MDRN_WEIGHTS)


def test_mdrn_weights_resolve_through_the_registry_at_every_scale(mdrn_card):
    spec = zoo.get_spec("mdrn")
    for scale in (2, 3, 4):
        assert zoo.shipped_weights(spec, scale) == MDRN_WEIGHTS
        assert zoo.shipped_weights(spec, scale, modality="CT") == MDRN_WEIGHTS
        assert zoo.shipped_weights(spec, scale, modality="MR") == MDRN_WEIGHTS


def test_mdrn_card_matches_the_architecture_and_the_recipe(mdrn_card):
    recipe = load_config(RECIPE)
    spec = zoo.get_spec("mdrn")
    config = zoo.config_from_card(spec, MDRN_WEIGHTS)
    assert {k: config[k] for k in recipe["model_config"]} == recipe["model_config"]
    assert mdrn_card["model"] == "mdrn" and mdrn_card["scales"] == [2, 3, 4]
    assert mdrn_card["recipe"] == RECIPE
    network = zoo.build_network("mdrn", **config)
    assert mdrn_card["parameter_count"] == zoo.parameter_count(network)
    assert mdrn_card["config"]["num_blocks"] == len(network.trunk.blocks)
    for scale in (2, 3, 4):
        metrics = mdrn_card["metrics"][f"x{scale}"]
        assert metrics["model"]["psnr"] > metrics["bicubic"]["psnr"]
        assert f"x{scale}" in mdrn_card.get("bf16", {}), "bf16 cost not measured: the automatic rule needs it"


def test_mdrn_card_keeps_training_validation_and_test_patients_apart(mdrn_card):
    test_files = {entry for modality in ("CT", "MR") for entry in benchmark.HELD_OUT[modality]}
    test_patients = {Path(entry).parts[1] if entry.startswith(("sarcoma/", "brats/"))
                     else Path(entry).name.split(".")[0] for entry in test_files}
    assert {"STS_012", "STS_014", "totalseg-example-ct", "brats_2013_pat0006_1"} <= test_patients
    training, validation = mdrn_card["training_data"], mdrn_card["validation_data"]
    assert training and validation and not set(training) & set(validation)
    for path in training + validation:
        assert not any(patient in path for patient in test_patients), f"{path} is a test patient"


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_medsr_upscale_runs_mdrn_on_a_real_crop(tmp_path, scale, capsys):
    """`medsr upscale --model mdrn --scale S` on a 3-slice crop of the bundled CT (40 x 40 LR
    pixels): the output grid is S times finer in-plane, and away from the crop's edges (8 LR
    pixels, where zero padding dominates a crop this small) its slices are closer to the real HR
    slices than bicubic."""
    if not MDRN_WEIGHTS.is_file():
        pytest.fail(f"{MDRN_WEIGHTS} does not ship")
    image = sitk.ReadImage(str(SAMPLE_PATH))
    hr = image[64:64 + 40 * scale, 80:80 + 40 * scale, 6:9]
    hr_values = sitk.GetArrayFromImage(hr).astype(np.float32)
    lr_values = F.interpolate(torch.from_numpy(hr_values)[:, None], scale_factor=1 / scale,
                              mode="bicubic", antialias=True)[:, 0].numpy()
    lr = sitk.GetImageFromArray(lr_values)
    lr.SetSpacing((hr.GetSpacing()[0] * scale, hr.GetSpacing()[1] * scale, hr.GetSpacing()[2]))
    lr.SetOrigin(hr.GetOrigin())
    source, output = tmp_path / "lr.nrrd", tmp_path / "sr.nrrd"
    sitk.WriteImage(lr, str(source))
    code = cli.main(["upscale", str(source), str(output), "--model", "mdrn", "--scale", str(scale),
                     "--quiet"])
    assert code == 0, capsys.readouterr().err
    result = sitk.ReadImage(str(output))
    assert result.GetSize() == (40 * scale, 40 * scale, 3)
    np.testing.assert_allclose(result.GetSpacing()[:2], np.array(lr.GetSpacing()[:2]) / scale)
    sr_values = sitk.GetArrayFromImage(result).astype(np.float32)
    bicubic = F.interpolate(torch.from_numpy(lr_values)[:, None], scale_factor=scale, mode="bicubic",
                            align_corners=False)[:, 0].numpy()
    inner = (slice(None), slice(scale * 8, -scale * 8), slice(scale * 8, -scale * 8))
    error_sr = np.mean((sr_values[inner] - hr_values[inner]) ** 2)
    error_bicubic = np.mean((bicubic[inner] - hr_values[inner]) ** 2)
    assert error_sr < error_bicubic
