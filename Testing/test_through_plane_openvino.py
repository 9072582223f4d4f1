"""The through-plane network on the OpenVINO backend: the same restoration as torch (fp32 to
float rounding, bf16 within its rounding), padded last batches, both orientations of a
non-square volume, the cache rule for adapted networks, and torch when OpenVINO is missing."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import MedSRLib
from MedSRLib.models.networks.through_plane import ThroughPlaneEDSR, run_planes
from MedSRLib.runtime import notices, openvino_runtime
from MedSRLib.runtime.engine import EngineOptions
from MedSRLib.runtime.openvino_through_plane import OpenVinoPlaneRunner, plane_runner
from MedSRLib.through_plane import apply

pytestmark = pytest.mark.skipif(not openvino_runtime.available(), reason="OpenVINO is not installed")


def random_network(seed: int) -> ThroughPlaneEDSR:
    """A small network whose every weight is random (an untrained one is exactly cubic)."""
    torch.manual_seed(seed)
    net = ThroughPlaneEDSR(num_features=16, num_blocks=2, tail_features=8, refine_blocks=1)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.1)
    return net.eval()


def thick_planes(n: int, rows: int, width: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 1, rows, width)).astype(np.float32))


def test_fp32_runner_matches_torch_and_pads_the_last_batch():
    net = random_network(0)
    thick = thick_planes(5, 9, 20, 1)  # 5 planes, batch 4: the second call is padded
    positions = torch.from_numpy(apply.resample_positions(9, 25))
    runner = OpenVinoPlaneRunner(net, bf16=False, threads=1, batch=4)
    with torch.inference_mode():
        expected = run_planes(net, thick, positions, 25 / 9, 0.8)
    got = runner(thick, positions, 25 / 9, 0.8)
    assert got.shape == (5, 1, 25, 20)
    cubic = apply.cubic_resample(thick.numpy(), 2, 25)
    assert np.abs(expected.numpy() - cubic).max() > 0.05  # the network adds a residual
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4)


def test_restore_on_openvino_equals_torch_on_a_non_square_volume():
    net = random_network(3)
    units = np.random.default_rng(4).random((6, 13, 11)).astype(np.float32)
    torch_out = apply.restore(units, 0, 17, 1.0, net)
    runner, what = plane_runner(net, EngineOptions(precision="fp32", threads=1))
    assert what == "openvino fp32 on the CPU"
    ov_out = apply.restore(units, 0, 17, 1.0, net, runner=runner)
    assert ov_out.shape == (17, 13, 11)
    np.testing.assert_allclose(ov_out, torch_out, atol=1e-4)
    cubic = apply.restore(units, 0, 17, 1.0, None)
    assert np.abs(ov_out - cubic).max() > 0.05


def test_bf16_runner_stays_within_bf16_rounding_of_fp32():
    net = random_network(5)
    thick = thick_planes(3, 8, 24, 6)
    positions = torch.from_numpy(apply.resample_positions(8, 24))
    with torch.inference_mode():
        expected = run_planes(net, thick, positions, 3.0, 1.0)
    got = OpenVinoPlaneRunner(net, bf16=True, threads=1)(thick, positions, 3.0, 1.0)
    error = float((got - expected).abs().max())
    assert 0 < error < 0.02 * float(expected.abs().max())


def test_adapted_networks_stay_out_of_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSR_CACHE_DIR", str(tmp_path))
    thick = thick_planes(2, 6, 10, 7)
    positions = torch.from_numpy(apply.resample_positions(6, 12))
    adapted = random_network(8)
    adapted.adapted_steps = 3
    OpenVinoPlaneRunner(adapted, bf16=False, threads=1)(thick, positions, 2.0, 1.0)
    assert not list(tmp_path.rglob("*.xml")) and not list(tmp_path.rglob("*.blob"))
    OpenVinoPlaneRunner(random_network(9), bf16=False, threads=1)(thick, positions, 2.0, 1.0)
    assert len(list((tmp_path / "openvino").glob("*tp.xml"))) == 1


def test_without_openvino_the_network_runs_in_torch_with_a_notice(monkeypatch, capsys):
    monkeypatch.setattr(notices, "_NOTICES", set())
    monkeypatch.setattr(openvino_runtime, "available", lambda: False)
    net = random_network(10)
    _, what = plane_runner(net, EngineOptions(precision="fp32"))
    assert what == "torch fp32 on the CPU"
    _, what = plane_runner(net, EngineOptions(precision="fp32", backend="openvino"))
    assert what == "torch fp32 on the CPU"
    assert "OpenVINO is not installed" in capsys.readouterr().err


def test_upscale_through_plane_agrees_between_backends():
    rng = np.random.default_rng(11)
    volume = sitk.GetImageFromArray(rng.normal(100.0, 30.0, (6, 40, 36)).astype(np.float32))
    volume.SetSpacing((0.8, 0.8, 4.0))
    outputs = {}
    for backend in ("torch", "openvino"):
        out = MedSRLib.upscale(volume, target_spacing=(0.8, 0.8, 1.0), backend=backend, precision="fp32",
                               threads=1, output_float=True)
        outputs[backend] = sitk.GetArrayFromImage(out)
    assert outputs["torch"].shape == (24, 40, 36)
    np.testing.assert_allclose(outputs["openvino"], outputs["torch"], atol=1e-3)


def test_fp16_on_the_cpu_is_refused_before_any_voxel_work(monkeypatch):
    from MedSRLib.errors import InputError
    from MedSRLib.through_plane import run

    monkeypatch.setattr(run, "load_network", lambda *a: pytest.fail("the network was loaded"))
    volume = sitk.GetImageFromArray(np.zeros((4, 16, 16), np.float32))
    volume.SetSpacing((1.0, 1.0, 4.0))
    with pytest.raises(InputError, match="fp16 is for CUDA"):
        MedSRLib.upscale(volume, target_spacing=(1.0, 1.0, 1.0), device="cpu", precision="fp16")


def test_defaults_line_names_the_backend_the_runner_picks(monkeypatch):
    """The thick-slice defaults line and the runner agree: OpenVINO on the CPU, torch when
    OpenVINO is missing or on CUDA; fp16 on the CPU is refused by both."""
    from MedSRLib.api import describe_choices
    from MedSRLib.errors import InputError
    from MedSRLib.runtime import openvino_through_plane

    volume = sitk.GetImageFromArray(np.zeros((4, 16, 16), np.float32))
    volume.SetSpacing((1.0, 1.0, 4.0))

    def line(**options) -> str:
        request = dict(model=None, scale=None, axis="auto", device="cpu", backend="auto",
                       precision="auto", modality="CT", target_spacing=1.0)
        return describe_choices(volume, **{**request, **options})

    assert line().endswith("backend openvino")
    with pytest.raises(InputError, match="fp16 is for CUDA"):
        line(precision="fp16")
    monkeypatch.setattr(openvino_runtime, "available", lambda: False)
    assert line().endswith("backend torch")
    _, what = plane_runner(random_network(12), EngineOptions(device="cpu"))
    assert what.startswith("torch ")
    monkeypatch.setattr(openvino_through_plane, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(openvino_runtime, "available", lambda: True)
    assert openvino_through_plane.planned_backend(EngineOptions(device="cuda")) == "torch"
