"""int8 inference: the shipped int8 model keeps the image, is used only with the weights it was
made from, the automatic choice respects the accuracy contract, and the quantisation recipe
keeps the layers it promises in float."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSRLib.runtime import engine, int8_models, model_cache, openvino_runtime
from MedSRLib.transforms import intensity
from MedSRLib.models import registry as zoo
from MedSRLib.evaluation.demo import SAMPLE_PATH
from MedSRLib.runtime.engine import EngineOptions, SliceUpscaler
from MedSRLib.metrics import psnr
from MedSRLib.transforms.degrade import bicubic_downsample

pytestmark = pytest.mark.skipif(not openvino_runtime.available(), reason="openvino not installed")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDSR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "medsr-cache"))


def shipped_int8_cases() -> list[tuple[str, int, str | None]]:
    cases = []
    for name, scale, modality in zoo.shipped_sr_weights():
        weights = zoo.shipped_weights(zoo.get_spec(name), scale, None, modality)
        if int8_models.ir_path(weights, scale).is_file():
            cases.append((name, scale, modality))
    return cases


@pytest.fixture(scope="module")
def real_hr_slices() -> np.ndarray:
    """Three 192 x 192 slices of the bundled CT (real anatomy), in network units."""
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_PATH)))[4:13:4, 160:352, 160:352]
    return intensity.fit_mapping(volume).to_unit(volume)


def test_the_default_model_ships_an_int8_model():
    assert ("edsr_lite", 2, None) in shipped_int8_cases()


@pytest.mark.parametrize("name, scale, modality", shipped_int8_cases())
def test_shipped_int8_model_keeps_the_image(name, scale, modality, real_hr_slices):
    hr = torch.from_numpy(real_hr_slices)[:, None]
    lr = bicubic_downsample(hr, scale)[:, 0].numpy()
    model = model_cache.load_model(name, (scale, scale), modality=modality)
    reference = SliceUpscaler(model, (scale, scale), EngineOptions(
        backend="torch", precision="fp32", tile=0)).upscale(lr)
    quantized = SliceUpscaler(model, (scale, scale), EngineOptions(precision="int8"))
    assert quantized.int8 and quantized.description.startswith("openvino int8")
    output = quantized.upscale(lr)
    cost = (psnr(torch.from_numpy(reference)[:, None], hr, crop_border=scale)
            - psnr(torch.from_numpy(output)[:, None], hr, crop_border=scale))
    assert cost <= 0.1, f"int8 costs {cost:.3f} dB on the bundled CT"
    # no artefact: the largest deviation stays a small part of the image's range
    assert np.abs(output - reference).max() < 0.05
    entry = int8_models.card_entry(model.card, scale)
    assert entry["weights_sha256"] == int8_models.file_sha256(model.weights_path)
    training = set(model.card["training_data"])
    assert set(entry["calibration"]["training_files"]) <= training
    assert set(entry["float_layer_selection"]["training_files"]) <= training


def _copy_weights(tmp_path, name="edsr_lite", scale=2):
    spec = zoo.get_spec(name)
    weights = zoo.shipped_weights(spec, scale)
    for source in (weights, weights.with_suffix(".json"), int8_models.ir_path(weights, scale),
                   int8_models.ir_path(weights, scale).with_suffix(".bin")):
        shutil.copy(source, tmp_path / source.name)
    return tmp_path / weights.name


def test_an_int8_model_made_from_other_weights_is_never_used(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    copied = _copy_weights(tmp_path)
    assert zoo.load_model("edsr_lite", (2, 2), weights_path=copied).weights_path == copied
    state = load_file(str(copied))
    first = next(iter(state))
    state[first] = state[first] + 0.01  # a retrained file next to the old int8 model
    save_file(state, str(copied))
    model = zoo.load_model("edsr_lite", (2, 2), weights_path=copied)
    assert int8_models.find(copied, model.card, 2) is None
    upscaler = SliceUpscaler(model, (2, 2), EngineOptions(precision="int8"))
    assert not upscaler.int8 and upscaler.backend == "openvino"
    assert "no int8 model made from these weights" in capsys.readouterr().err


def test_quantising_a_candidate_folder_quantises_that_candidate(tmp_path, shared_data):
    """`quantize_int8 --weights-dir DIR` makes the int8 model of DIR's weights (not the shipped
    ones) and records it in DIR's card only."""
    from safetensors.torch import load_file, save_file
    from MedSRLib.evaluation import quantize_int8
    import openvino as ov
    shipped = zoo.shipped_weights(zoo.get_spec("srcnn"), 2)
    copied = tmp_path / shipped.name
    shutil.copy(shipped, copied)
    shutil.copy(shipped.with_suffix(".json"), copied.with_suffix(".json"))
    state = load_file(str(copied))
    last = sorted(k for k in state if k.endswith("weight"))[-1]
    state[last] = state[last] * 0.5  # a candidate whose output differs from the shipped one
    save_file(state, str(copied))
    shipped_card = shipped.with_suffix(".json").read_text()
    assert quantize_int8.main(["--model", "srcnn", "--scale", "2", "--weights-dir", str(tmp_path),
                               "--data-root", str(shared_data), "--per-file", "1"]) == 0
    card = json.loads(copied.with_suffix(".json").read_text())
    assert card["int8"]["x2"]["weights_sha256"] == int8_models.file_sha256(copied)
    assert shipped.with_suffix(".json").read_text() == shipped_card
    assert not int8_models.ir_path(shipped, 2).exists()
    x = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    core = ov.Core()
    int8_out = core.compile_model(str(int8_models.ir_path(copied, 2)), "CPU")(x)[0]
    outputs = {}
    for label, path in (("candidate", copied), ("shipped", shipped)):
        body, _ = openvino_runtime.converted_body(zoo.load_model("srcnn", (2, 2), weights_path=path), (2, 2))
        outputs[label] = core.compile_model(body, "CPU")(x)[0]
    assert np.abs(int8_out - outputs["candidate"]).mean() < np.abs(int8_out - outputs["shipped"]).mean()


def test_auto_takes_int8_only_within_the_accuracy_contract(tmp_path):
    copied = _copy_weights(tmp_path)
    model = zoo.load_model("edsr_lite", (2, 2), weights_path=copied)
    float_dtype = engine.resolve_precision("auto", torch.device("cpu"), True)
    rest = "bf16" if float_dtype == torch.bfloat16 else "fp32"
    entry = int8_models.card_entry(model.card, 2)
    assert int8_models.held_out_cost(entry, rest) <= int8_models.MAX_COST_DB
    assert engine.choose_int8(model, (2, 2), "auto", float_dtype) == int8_models.ir_path(copied, 2)
    assert engine.choose_int8(model, (2, 2), "fp32", None) is None
    card = json.loads(copied.with_suffix(".json").read_text(encoding="utf-8"))
    card["int8"]["x2"]["held_out"]["cost_db"][rest] = 0.2  # a model that breaks the contract
    copied.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    costly = zoo.load_model("edsr_lite", (2, 2), weights_path=copied)
    assert engine.choose_int8(costly, (2, 2), "auto", float_dtype) is None
    assert SliceUpscaler(costly, (2, 2), EngineOptions()).int8 is False
    assert engine.choose_int8(costly, (2, 2), "int8", float_dtype) is not None  # asked for


def test_int8_on_the_torch_backend_says_it_runs_float(capsys):
    model = model_cache.load_model("edsr_lite", (2, 2))
    upscaler = SliceUpscaler(model, (2, 2), EngineOptions(backend="torch", precision="int8"))
    assert upscaler.backend == "torch" and not upscaler.int8
    assert "int8 runs on the OpenVINO backend" in capsys.readouterr().err


def test_quantisation_keeps_first_last_and_shuffle_convolutions_float():
    pytest.importorskip("nncf")
    torch.manual_seed(0)
    model = zoo.load_model("edsr_lite", (2, 2), allow_untrained=True)
    model.card = {}  # converted like a trained one
    converted, adds_bicubic = openvino_runtime.converted_body(model, (2, 2))
    assert adds_bicubic
    generator = np.random.default_rng(0)
    calibration = [generator.random((1, 1, 24, 24), dtype=np.float32) for _ in range(4)]
    quantized = int8_models.quantize(converted, calibration, (24, 24))
    kept = set(int8_models.float_layers(quantized))
    convolutions = [op.get_friendly_name() for op in quantized.get_ops()
                    if op.get_type_name() == "Convolution"]
    assert kept == {n for n in convolutions if ".head." in n or ".tail." in n}
    assert len(convolutions) - len(kept) == 17  # the trunk: 8 blocks x 2 + its last conv
    additions_quantized = [op for op in quantized.get_ops() if op.get_type_name() == "Add"
                           and any(i.get_node().get_type_name() == "FakeQuantize"
                                   for i in op.input_values())]
    assert additions_quantized == []


def test_quantisation_aware_fine_tuning_keeps_the_same_layers_float_and_learns():
    pytest.importorskip("nncf")
    from MedSRLib.evaluation import qat_int8
    torch.manual_seed(0)
    model = zoo.load_model("edsr_lite", (2, 2), allow_untrained=True)
    body = openvino_runtime.residual_body(model)
    assert qat_int8.float_kept_names(body) == [
        "model/network/head/conv/conv2d/0", "model/network/tail/0/0/conv_block/conv2d/0",
        "model/network/tail/1/conv/conv2d/0"]
    generator = np.random.default_rng(0)
    smooth = [np.kron(generator.random((12, 12)), np.ones((4, 4))).astype(np.float32) for _ in range(4)]
    calibration = [bicubic_downsample(torch.from_numpy(s)[None, None], 2).numpy() for s in smooth]
    quantised = qat_int8.quantise(body, calibration)
    before = [p.detach().clone() for p in quantised.parameters()]
    report = qat_int8.fine_tune(quantised, smooth, 2, steps=3, batch_size=2, patch=32, lr=1e-3)
    assert report["steps"] == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, quantised.parameters()))
    converted = qat_int8.to_openvino(quantised)
    convolutions = [op.get_friendly_name() for op in converted.get_ops()
                    if op.get_type_name() == "Convolution"]
    kept = int8_models.float_layers(converted)
    assert len(convolutions) == 20 and len(kept) == 3  # the trunk's 17 convolutions in int8
    assert not any(op.get_type_name() == "Add" and any(
        i.get_node().get_type_name() == "FakeQuantize" for i in op.input_values())
        for op in converted.get_ops())
