"""Inference backends: OpenVINO agrees with torch fp32 on real slices for every shipped model,
and a missing or failing OpenVINO falls back to torch with a one-line notice, never a crash."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import MedSRLib
from MedSRLib import cli
from MedSRLib.runtime import engine, model_cache, notices, openvino_runtime
from MedSRLib.transforms import intensity
from MedSRLib.models import registry as zoo
from MedSRLib.evaluation.demo import SAMPLE_PATH
from MedSRLib.runtime.engine import EngineOptions, SliceUpscaler, slice_stacks
from MedSRLib.metrics import psnr
from MedSRLib.transforms.degrade import bicubic_downsample

from conftest import make_volume

pytestmark = pytest.mark.skipif(not openvino_runtime.available(), reason="openvino not installed")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Converted models go to a folder of this test session, not the user's cache."""
    monkeypatch.setenv("MEDSR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "medsr-cache"))


def shipped_cases() -> list[tuple[str, int, str | None]]:
    """Each shipped network once, at its smallest shipped scale (the test suite's time budget);
    `benchmarks/bench_runtime.py --precision-all` measures every file on held-out patients."""
    first: dict[str, tuple[str, int, str | None]] = {}
    for name, scale, modality in zoo.shipped_sr_weights():
        first.setdefault(name, (name, scale, modality))
    return list(first.values())


@pytest.fixture(scope="module")
def real_hr_slices() -> np.ndarray:
    """Two 96 x 96 slices of the bundled CT (real anatomy), in network units."""
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_PATH)))[7:9, 80:176, 150:246]
    return intensity.fit_mapping(volume).to_unit(volume)


@pytest.mark.parametrize("name, scale, modality", shipped_cases())
def test_openvino_agrees_with_torch_fp32_on_real_slices(name, scale, modality, real_hr_slices):
    hr = torch.from_numpy(real_hr_slices)[:, None]
    lr = bicubic_downsample(hr, scale)[:, 0].numpy()
    model = model_cache.load_model(name, (scale, scale), modality=modality)
    lr = slice_stacks(lr, 0, 0, len(lr), model.context_slices)  # a 2.5-D model: with neighbours
    runs = {}
    for label, options in (("torch fp32", EngineOptions(backend="torch", precision="fp32", tile=0,
                                                        channels_last=False)),
                           ("openvino fp32", EngineOptions(backend="openvino", precision="fp32")),
                           ("openvino bf16", EngineOptions(backend="openvino", precision="bf16"))):
        upscaler = SliceUpscaler(model, (scale, scale), options)
        assert upscaler.backend == label.split()[0], upscaler.description
        runs[label] = upscaler.upscale(lr)
    reference = runs["torch fp32"]
    assert np.abs(runs["openvino fp32"] - reference).max() < 1e-3
    scores = {k: psnr(torch.from_numpy(v)[:, None], hr) for k, v in runs.items()}
    if not engine.bf16_keeps_the_image(model.card, scale):
        # measured too costly in bf16 on a held-out volume (its card): auto runs it in fp32
        assert "fp32" in SliceUpscaler(model, (scale, scale), EngineOptions()).description
        return
    # The accuracy contract on real slices: bf16 costs at most 0.05 dB against the truth.
    assert scores["openvino bf16"] >= scores["torch fp32"] - 0.05, scores


def test_auto_backend_is_openvino_for_learned_cpu_models_and_torch_otherwise():
    cpu = torch.device("cpu")
    assert engine.resolve_backend("auto", cpu, True, (2, 2)) == "openvino"
    assert engine.resolve_backend("auto", cpu, False, (2, 2)) == "torch"       # interpolation
    assert engine.resolve_backend("auto", cpu, True, (3, 1)) == "torch"        # anisotropic
    assert engine.resolve_backend("auto", torch.device("cuda"), True, (2, 2)) == "torch"
    assert engine.resolve_backend("torch", cpu, True, (2, 2)) == "torch"


def test_missing_openvino_falls_back_to_torch_with_one_notice(monkeypatch, capsys):
    monkeypatch.setattr(openvino_runtime, "available", lambda: False)
    monkeypatch.setattr(notices, "_NOTICES", set())
    image = make_volume(shape_kji=(2, 24, 28))
    fallback = MedSRLib.upscale(image, model="srcnn", backend="openvino", precision="fp32")
    err = capsys.readouterr().err
    assert err.count("OpenVINO is not installed") == 1 and "using torch" in err
    torch_run = MedSRLib.upscale(image, model="srcnn", backend="torch", precision="fp32")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fallback), sitk.GetArrayFromImage(torch_run))


def test_conversion_failure_falls_back_to_torch_not_a_crash(monkeypatch, capsys, tmp_path):
    import openvino
    monkeypatch.setenv("MEDSR_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(notices, "_NOTICES", set())

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation aten::imaginary")

    monkeypatch.setattr(openvino, "convert_model", broken)
    model = zoo.load_model("srcnn", 2)  # a fresh object: nothing converted in memory
    upscaler = SliceUpscaler(model, (2, 2), EngineOptions(backend="auto", precision="fp32"))
    assert upscaler.backend == "torch"
    assert "could not convert" in capsys.readouterr().err
    assert upscaler.upscale(np.zeros((1, 20, 20), np.float32)).shape == (1, 40, 40)


def test_converted_model_is_cached_on_disk_and_reused(monkeypatch, tmp_path):
    import openvino
    monkeypatch.setenv("MEDSR_CACHE_DIR", str(tmp_path / "cache"))
    model = zoo.load_model("srcnn", 2)
    first = SliceUpscaler(model, (2, 2), EngineOptions(backend="openvino", precision="fp32"))
    cached = list((tmp_path / "cache" / "openvino").glob("*.xml"))
    assert len(cached) == 1 and cached[0].with_suffix(".bin").is_file()
    monkeypatch.setattr(openvino, "convert_model", lambda *a, **k: pytest.fail("converted again"))
    again = zoo.load_model("srcnn", 2)  # another process would start like this
    second = SliceUpscaler(again, (2, 2), EngineOptions(backend="openvino", precision="fp32"))
    assert second.backend == "openvino"
    x = np.random.default_rng(0).random((1, 30, 30)).astype(np.float32)
    np.testing.assert_allclose(first.upscale(x), second.upscale(x), atol=1e-6)


def test_backend_option_in_cli_and_api(tmp_path, capsys):
    source = tmp_path / "in.nrrd"
    sitk.WriteImage(make_volume(shape_kji=(2, 20, 24)), str(source))
    for backend in ("torch", "openvino"):
        out = tmp_path / f"{backend}.nrrd"
        assert cli.main([ "upscale", str(source), str(out), "--model", "srcnn", "--backend",
                          backend, "--precision", "fp32", "--quiet"]) == 0
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{k}.nrrd"))).astype(int)
            for k in ("torch", "openvino"))
    assert np.abs(a - b).max() <= 1  # int16 HU: rounding of float differences only
    with pytest.raises(MedSRLib.InputError, match=r"backend \(--backend\) must be one of"):
        MedSRLib.upscale(make_volume(), model="bicubic", backend="tensorrt")


def test_auto_keeps_fp32_for_a_model_whose_card_records_a_costly_bf16():
    if engine.resolve_precision("auto", torch.device("cpu"), True) != torch.bfloat16:
        pytest.skip("this CPU has no fast bf16: auto is fp32 anyway")
    model = model_cache.load_model("edsr_lite", (2, 2), modality="CT")
    assert "bf16" in SliceUpscaler(model, (2, 2), EngineOptions(precision="bf16")).description
    card = dict(model.card)
    try:
        model.card = {**card, "bf16": {"x2": {"held_out_cost_db": 0.02, "automatic": True}}}
        assert SliceUpscaler(model, (2, 2), EngineOptions()).autocast_dtype == torch.bfloat16
        model.card = {**card, "bf16": {"x2": {"held_out_cost_db": 0.09, "automatic": False}}}
        assert SliceUpscaler(model, (2, 2), EngineOptions()).autocast_dtype is None
        # asked for explicitly, bf16 is still what runs
        assert SliceUpscaler(model, (2, 2), EngineOptions(precision="bf16")).autocast_dtype == torch.bfloat16
    finally:
        model.card = card
