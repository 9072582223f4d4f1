"""Hostile runtime conditions, one test each: damaged model files, NaN weights, memory and disk
limits, bad API arguments and telemetry. Each ends in a correct result or a clean refusal (exit 2
naming the file and the problem), never a wrong or partial output."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from MedSRLib import api, cli
from MedSRLib.runtime import (int8_models, memory_budget, model_cache, model_integrity,
                              openvino_runtime)
from MedSRLib.models import registry as zoo
from MedSRLib.errors import InputError, WeightsError

from conftest import SHARED_DATA, make_volume

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
needs_openvino = pytest.mark.skipif(not openvino_runtime.available(), reason="OpenVINO is not installed")


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def flip_bytes(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of `path` (size kept)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - count // 2)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def ct_volume(tmp_path) -> Path:
    """A 64 x 64 x 3 crop of a real CT (HU, int16) as NRRD."""
    source = SHARED_DATA / "ct" / "totalseg-example-ct.nii.gz"
    if not source.is_file():
        pytest.skip(f"real data {source} is not present")
    path = tmp_path / "ct.nrrd"
    image = sitk.Cast(sitk.ReadImage(str(source))[30:94, 20:84, 50:53], sitk.sitkInt16)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """An empty OpenVINO cache folder for this test, and no model kept from earlier tests."""
    monkeypatch.setenv("MEDSR_CACHE_DIR", str(tmp_path / "cache"))
    model_cache.clear()
    yield tmp_path / "cache" / "openvino"
    model_cache.clear()


def _openvino_srcnn(image: sitk.Image) -> np.ndarray:
    """srcnn x2 through OpenVINO fp32, from freshly loaded weights (nothing kept in memory)."""
    model_cache.clear()
    result = api.upscale(image, model="srcnn", scale=2, backend="openvino", precision="fp32",
                         output_float=True, threads=1)
    return sitk.GetArrayFromImage(result)


# ---------------------------------------------------------------------------------------------
# Model files verified


def test_shipped_int8_files_match_the_hashes_in_their_cards():
    cards = [p for p in sorted(zoo.WEIGHTS_DIR.glob("*.json"))
             if (json.loads(p.read_text(encoding="utf-8")).get("int8") or {})]
    assert cards, "no shipped int8 model"
    for card_path in cards:
        for scale, entry in json.loads(card_path.read_text(encoding="utf-8"))["int8"].items():
            xml_path = card_path.with_name(entry["file"])
            assert entry["xml_sha256"] == model_integrity.file_sha256(xml_path), xml_path
            assert entry["bin_sha256"] == model_integrity.file_sha256(xml_path.with_suffix(".bin")), xml_path


@needs_openvino
def test_a_damaged_cached_ir_is_converted_again_with_a_notice(own_cache, capsys):
    image = make_volume(shape_kji=(2, 24, 24))
    first = _openvino_srcnn(image)
    bins = list(own_cache.glob("*.bin"))
    assert len(bins) == 1 and model_integrity.record_path(bins[0].with_suffix(".xml")).is_file()
    flip_bytes(bins[0])
    capsys.readouterr()
    second = _openvino_srcnn(image)
    assert "cached OpenVINO model" in capsys.readouterr().err
    np.testing.assert_allclose(second, first, atol=1e-3)  # a damaged .bin gives +-32767 voxels
    xml = bins[0].with_suffix(".xml")
    assert model_integrity.matches_record(xml, [xml, bins[0]])  # the entry was made again


@needs_openvino
def test_a_damaged_compiled_blob_is_compiled_again_with_a_notice(own_cache, capsys):
    image = make_volume(shape_kji=(2, 24, 24))
    first = _openvino_srcnn(image)
    blobs = sorted((own_cache / "compiled").glob("*.blob"))
    assert blobs and all(model_integrity.matches_record(b, [b]) for b in blobs)
    for blob in blobs:
        flip_bytes(blob)
    capsys.readouterr()
    second = _openvino_srcnn(image)
    assert "compiled OpenVINO model" in capsys.readouterr().err
    np.testing.assert_allclose(second, first, atol=1e-3)
    blobs = sorted((own_cache / "compiled").glob("*.blob"))
    assert blobs and all(model_integrity.matches_record(b, [b]) for b in blobs)


LOCK_PROBE = """
import fcntl, sys
with open(sys.argv[1], "a+b") as handle:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("held")
    else:
        print("free")
"""


def _lock_state(folder: Path) -> str:
    """What another process finds when it tries to take the compiled cache's lock now."""
    return subprocess.run([PYTHON, "-c", LOCK_PROBE, str(folder / openvino_runtime.LOCK_NAME)],
                          capture_output=True, text=True, check=True).stdout.strip()


@needs_openvino
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
def test_other_processes_wait_while_a_blob_is_compiled_and_recorded(own_cache, monkeypatch):
    """Another worker sharing the cache cannot check (and delete as unrecorded) a blob between
    OpenVINO writing it and MedSR recording its hash: the lock is held across both."""
    seen = []
    record = openvino_runtime.record_new_blobs

    def recording(folder, before):
        seen.append(_lock_state(folder))  # the blob is written, not yet recorded
        record(folder, before)

    monkeypatch.setattr(openvino_runtime, "record_new_blobs", recording)
    _openvino_srcnn(make_volume(shape_kji=(2, 24, 24)))
    assert seen and set(seen) == {"held"}
    assert _lock_state(own_cache / "compiled") == "free"  # released after the compile


@pytest.fixture
def user_int8_weights(tmp_path) -> Path:
    """A user's copy of the shipped edsr_lite x2 weights with its card and int8 IR."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for path in zoo.WEIGHTS_DIR.glob("edsr_lite_x2.*"):
        shutil.copy(path, folder / path.name)
    return folder / "edsr_lite_x2.safetensors"


@needs_openvino
@pytest.mark.parametrize("suffix", [".bin", ".xml"])
def test_a_damaged_int8_ir_beside_the_weights_is_refused(user_int8_weights, ct_volume, tmp_path,
                                                         own_cache, capsys, suffix):
    damaged = user_int8_weights.with_name(f"edsr_lite_x2.int8-x2{suffix}")
    flip_bytes(damaged, 64 if suffix == ".bin" else 8)
    out = tmp_path / "out.nrrd"
    code, _, err = run_cli(["upscale", ct_volume, out, "--model", "edsr_lite", "--weights",
                            user_int8_weights, "--precision", "int8", "--quiet"], capsys)
    assert code == 2 and str(damaged) in err and "SHA-256" in err, err
    assert not out.exists()
    with pytest.raises(WeightsError, match="damaged or was changed"):  # precision auto too
        api.upscale(sitk.ReadImage(str(ct_volume)), model="edsr_lite", weights=str(user_int8_weights),
                    backend="openvino")


@needs_openvino
def test_an_int8_entry_without_hashes_is_not_used(user_int8_weights, capsys):
    card_path = user_int8_weights.with_suffix(".json")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    for key in ("xml_sha256", "bin_sha256"):
        del card["int8"]["x2"][key]
    card_path.write_text(json.dumps(card), encoding="utf-8")
    model = zoo.load_model("edsr_lite", 2, weights_path=user_int8_weights)
    assert int8_models.find(user_int8_weights, model.card, 2) is None
    assert "cannot be verified and is not used" in capsys.readouterr().err
    assert int8_models.record_card_hashes(card_path) == ["edsr_lite_x2.int8-x2.xml"]
    assert int8_models.find(user_int8_weights, json.loads(card_path.read_text(encoding="utf-8")), 2) is not None


# ---------------------------------------------------------------------------------------------
# Network outputs checked for NaN/Inf


@pytest.fixture
def nan_weights(tmp_path) -> Path:
    """srcnn x2 weights (its real card beside them) with one NaN bias."""
    folder = tmp_path / "nan"
    folder.mkdir()
    for path in zoo.WEIGHTS_DIR.glob("srcnn_x2.*"):
        shutil.copy(path, folder / path.name)
    weights = folder / "srcnn_x2.safetensors"
    tensors = load_file(str(weights))
    tensors["nonlinear_mapping.conv.bias"][3] = float("nan")
    save_file(tensors, str(weights))
    return weights


@pytest.mark.parametrize("backend", ["torch", pytest.param("openvino", marks=needs_openvino)])
@pytest.mark.parametrize("output_float", [False, True])
def test_nan_weights_are_refused_and_nothing_is_written(nan_weights, ct_volume, tmp_path, own_cache,
                                                        capsys, backend, output_float):
    out = tmp_path / "out.nrrd"
    code, _, err = run_cli(["upscale", ct_volume, out, "--model", "srcnn", "--weights", nan_weights,
                            "--backend", backend, "--quiet", *(["--float"] if output_float else [])],
                           capsys)
    assert code == 2, err
    assert "model srcnn produced NaN/Inf values" in err and str(nan_weights) in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["ct.nrrd"]


def test_an_infinite_network_output_is_refused(ct_volume, own_cache):
    """Finite weights whose output overflows float32 (a scaled-up last layer)."""
    model = zoo.load_model("srcnn", 2)
    with torch.no_grad():
        model.network.reconstruction.conv.weight.mul_(1e38)
    image = sitk.ReadImage(str(ct_volume))
    with pytest.raises(WeightsError, match="model srcnn produced NaN/Inf values"):
        api.super_resolve_volume(
            sitk.GetArrayFromImage(image).astype(np.float32), (1, 2, 2), 0, lambda f: (model, True),
            to_unit=lambda v: v, from_unit=lambda u: u, out_dtype=np.dtype(np.float32),
            options=api.EngineOptions(backend="torch"))


# ---------------------------------------------------------------------------------------------
# Memory: cgroup v1 and v2, RLIMIT_AS, allocation failures


def _cgroup_file(root: Path, relative: str, name: str, value: str) -> None:
    folder = root / relative
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(value + "\n", encoding="utf-8")


def test_cgroup_v1_and_v2_memory_limits_are_both_read(tmp_path):
    v1 = tmp_path / "v1"
    _cgroup_file(v1, "memory", "memory.limit_in_bytes", str(9223372036854771712))  # no limit
    _cgroup_file(v1, "memory/job", "memory.limit_in_bytes", str(4 << 30))
    _cgroup_file(v1, "memory/job", "memory.usage_in_bytes", str(1 << 30))
    _cgroup_file(v1, "memory/job/step", "memory.limit_in_bytes", str(9223372036854771712))
    membership_v1 = "4:memory:/job/step\n3:cpuset:/\n0::/\n"
    headroom, source = memory_budget.cgroup_headroom(v1, membership_v1)
    assert headroom == 3 << 30 and "cgroup v1" in source and "4.0 GB" in source

    v2 = tmp_path / "v2"
    _cgroup_file(v2, "", "memory.max", "max")
    _cgroup_file(v2, "user.slice", "memory.max", str(2 << 30))
    _cgroup_file(v2, "user.slice", "memory.current", str(512 << 20))
    _cgroup_file(v2, "user.slice/app", "memory.max", "max")
    headroom, source = memory_budget.cgroup_headroom(v2, "0::/user.slice/app\n")
    assert headroom == (2 << 30) - (512 << 20) and "cgroup v2" in source
    assert memory_budget.cgroup_headroom(v2, "0::/\n") is None  # no limit anywhere


def _medsr(args, limit_as: int | None = None, **kwargs) -> subprocess.CompletedProcess:
    prefix = ["prlimit", f"--as={limit_as}", "--"] if limit_as else []
    return subprocess.run([*prefix, PYTHON, "-m", "MedSRLib.cli", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture
def large_ct(tmp_path) -> Path:
    """512 x 512 x 128 int16 (64 MB): x4 in-plane needs 2 GB, x4,4,3 8 GB."""
    voxels = np.full((128, 512, 512), -1000, np.int16)
    voxels[:, 100:400, 120:380] = 40
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((0.7, 0.7, 2.5))
    path = tmp_path / "large.mha"
    sitk.WriteImage(image, str(path))
    return path


#: Address space for a run under RLIMIT_AS: python, torch and SimpleITK take about 1 GB.
LIMIT_AS = 2_500_000_000


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")
@pytest.mark.parametrize("scale", ["4", "4,4,3"])
def test_an_output_beyond_rlimit_as_is_refused_before_the_work(large_ct, tmp_path, scale):
    out = tmp_path / "out.nrrd"
    run = _medsr(["upscale", large_ct, out, "--scale", scale, "--model", "bicubic", "--quiet"],
                 limit_as=LIMIT_AS)
    assert run.returncode == 2, run.stderr
    assert "RLIMIT_AS" in run.stderr and "needs" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def test_an_allocation_failure_is_exit_2_with_the_sizes_and_no_traceback(large_ct, tmp_path):
    """A limit the up-front check cannot see (its reading blinded here) fails the allocation
    itself: exit 2, one line with the estimate and the limit, nothing written."""
    out = tmp_path / "out.nrrd"
    script = ("import resource, sys\n"
              "from MedSRLib import cli\nfrom MedSRLib.runtime import memory_budget\n"
              "memory_budget.available_bytes = lambda: None\n"
              f"resource.setrlimit(resource.RLIMIT_AS, ({LIMIT_AS}, resource.RLIM_INFINITY))\n"
              f"sys.exit(cli.main(['upscale', {str(large_ct)!r}, {str(out)!r}, '--scale', '4', "
              "'--model', 'bicubic', '--quiet']))\n")
    run = subprocess.run([PYTHON, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("medsr: error")]
    assert len(lines) == 1 and "out of memory: needs about 2.0 GB" in lines[0], run.stderr
    assert "RLIMIT_AS" in lines[0] and "Traceback" not in run.stderr and "itk::" not in run.stderr
    assert not out.exists()


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("Exception thrown in SimpleITK "
                                   "Image_Allocate: Failed to allocate memory for image."),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] . "
                                                "DefaultCPUAllocator: can't allocate memory"),
                                   RuntimeError("std::bad_alloc")])
def test_allocation_failures_of_every_library_are_recognised(error):
    assert memory_budget.is_out_of_memory(error)
    assert not memory_budget.is_out_of_memory(RuntimeError("shape mismatch"))


# ---------------------------------------------------------------------------------------------
# Free disk space


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs folder (needs root and a kernel that lets this process mount)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("suffix", [".nii", ".nrrd"])
def test_a_disk_too_small_for_the_output_is_refused_before_computing(tiny_disk, large_ct, capsys,
                                                                      monkeypatch, suffix):
    """x2 of 512 x 512 x 128 int16: 256 MB raw (.nii), 26 MB at the least compressed (.nrrd)."""
    calls = []
    monkeypatch.setattr(api, "super_resolve_volume", lambda *a, **k: calls.append(1))
    out = tiny_disk / f"out{suffix}"
    code, _, err = run_cli(["upscale", large_ct, out, "--model", "bicubic", "--scale", "2",
                            "--quiet"], capsys)
    assert code == 2 and f"{tiny_disk}: no space left for the output" in err, err
    assert not calls and list(tiny_disk.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# API arguments, messages, telemetry


@pytest.mark.parametrize("seconds", [math.inf, math.nan, -5.0, 0, "60", True])
def test_adapt_seconds_must_be_a_finite_positive_number(seconds):
    image = make_volume(shape_kji=(4, 16, 16))
    with pytest.raises(ValueError, match="adapt_seconds must be a finite positive number"):
        api.upscale(image, scale=(1, 1, 2.5), adapt=True, adapt_seconds=seconds)


def test_roi_auto_without_a_lesion_says_so_in_plain_words(tmp_path):
    image = make_volume(shape_kji=(6, 32, 32))
    arr = sitk.GetArrayFromImage(image)
    arr[:] = 40  # uniform soft tissue: nothing lesion-like
    flat = sitk.GetImageFromArray(arr)
    flat.CopyInformation(image)
    try:
        result = api.upscale(flat, model="bicubic", roi="auto", roi_model="lanczos")
    except InputError as err:
        pytest.skip(f"no lesion finder ships: {err}")
    from MedSRLib.roi import focus as roi
    report = roi.RoiReport.from_image(result)
    assert report.fallback
    message = report.message
    assert message.startswith("no lesion found (the most lesion-like region scored ")
    assert "below the detection threshold" in message and "whole volume was super-resolved" in message
    assert "<" not in message


def test_telemetry_of_openvino_nncf_and_ray_is_off_without_writing_home(tmp_path):
    """In a fresh process (not pytest, which NNCF detects): the usage-reporting package cannot
    load, OpenVINO's converter and NNCF use their no-op stubs, Ray's usage stats are off, and a
    model conversion writes no consent file or client id into the home folder."""
    home = tmp_path / "home"
    home.mkdir()
    script = """
import importlib.util, os, sys
assert importlib.util.find_spec("openvino_telemetry") is not None  # installed: it would report
import MedSRLib.api
import openvino as ov, torch
from openvino.tools.ovc import convert_impl, telemetry_stub
converted = ov.convert_model(torch.nn.Conv2d(1, 1, 3).eval(), example_input=torch.rand(1, 1, 8, 8))
import nncf.telemetry.wrapper as nncf_telemetry
print(sys.modules["openvino_telemetry"] is None, convert_impl.tm is telemetry_stub,
      type(nncf_telemetry.telemetry).__name__, os.environ["RAY_USAGE_STATS_ENABLED"])
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_USAGE_STATS_ENABLED", "CI")}
    env["HOME"] = str(home)
    run = subprocess.run([PYTHON, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    if run.returncode != 0 and "No module named 'nncf'" in run.stderr:
        pytest.skip("NNCF is not installed")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "True", "MagicMock", "0"], run.stdout
    written = [p.relative_to(home) for p in home.rglob("*")]
    assert not [p for p in written if "intel" in str(p).lower()], written  # no consent file, no client id
