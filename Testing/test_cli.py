"""The `medsr` command line: exit statuses, messages that name the problem, no partial output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedSRLib import cli
from MedSRLib.models import registry as zoo
from MedSRLib.evaluation.demo import SAMPLE_PATH

from conftest import make_volume


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def input_volume(tmp_path) -> Path:
    path = tmp_path / "input.mha"
    sitk.WriteImage(make_volume(), str(path))
    return path


def test_upscale_writes_output_with_finer_grid(tmp_path, input_volume, capsys):
    out = tmp_path / "out.nrrd"
    code, _, err = run_cli(["upscale", input_volume, out, "--model", "bicubic", "--scale", "2",
                            "--quiet"], capsys)
    assert code == 0, err
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == (48, 40, 6)
    assert result.GetPixelID() == sitk.sitkInt16


def _nan_volume(path: Path) -> None:
    values = sitk.GetArrayFromImage(make_volume(dtype=np.float32))
    values[2, 3, 4] = np.nan
    image = sitk.GetImageFromArray(values)
    sitk.WriteImage(image, str(path))  # .mha keeps NaN (NIfTI through SimpleITK would not)


def _four_d(path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False), str(path))


def _rgb(path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9, 3), np.uint8), isVector=True), str(path))


def _zero_spacing(path: Path) -> None:
    sitk.WriteImage(make_volume(spacing=(1.0, 1.0, 1.0)), str(path), False)
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 0 1 1"))


def _negative_spacing(path: Path) -> None:
    sitk.WriteImage(make_volume(spacing=(1.0, 1.0, 1.0)), str(path), False)
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 1 -2"))


BAD_INPUTS = {
    "missing_file": (None, "input.mha", [], "no such file"),
    "corrupt_file": (lambda p: p.write_bytes(b"\x00garbage" * 50), "input.nii.gz", [], "cannot read"),
    "four_d_volume": (_four_d, "input.nrrd", [], "4-D"),
    "rgb_image": (_rgb, "input.png", [], "RGB"),
    "nan_voxels": (_nan_volume, "input.mha", [], "NaN"),
    "zero_spacing": (_zero_spacing, "input.mha", [], "zero, negative or non-finite voxel spacing"),
    "negative_spacing": (_negative_spacing, "input.mha", [], "zero, negative or non-finite voxel spacing"),
    "unknown_model": (lambda p: sitk.WriteImage(make_volume(), str(p)), "input.mha",
                      ["--model", "no_such_net"], "unknown model 'no_such_net'"),
    "unsupported_scale": (lambda p: sitk.WriteImage(make_volume(), str(p)), "input.mha",
                          ["--scale", "5,5,1"], "takes integer factors 1-4"),
    "untrained_network": (lambda p: sitk.WriteImage(make_volume(), str(p)), "input.mha",
                          ["--model", "srcnn", "--weights", "missing.safetensors"], "missing"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(tmp_path, capsys, case):
    make, name, extra, message = BAD_INPUTS[case]
    source = tmp_path / name
    if make is not None:
        make(source)
    out = tmp_path / "out.nrrd"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(["upscale", source, out, "--model", "bicubic", *extra, "--quiet"], capsys)
    assert code == 2
    assert message in err
    assert str(source.name) in err or case in ("unknown_model", "unsupported_scale",
                                               "nan_voxels", "untrained_network")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary


def test_output_equal_to_input_is_refused_and_input_untouched(input_volume, capsys):
    before = input_volume.read_bytes()
    code, _, err = run_cli(["upscale", input_volume, input_volume, "--model", "bicubic",
                            "--overwrite"], capsys)
    assert code == 2 and "overwrite the input" in err
    assert input_volume.read_bytes() == before


def test_existing_output_needs_overwrite(tmp_path, input_volume, capsys):
    out = tmp_path / "out.nrrd"
    out.write_bytes(b"keep me")
    code, _, err = run_cli(["upscale", input_volume, out, "--model", "bicubic"], capsys)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == b"keep me"
    code, _, err = run_cli(["upscale", input_volume, out, "--model", "bicubic", "--overwrite",
                            "--quiet"], capsys)
    assert code == 0 and sitk.ReadImage(str(out)).GetSize() == (48, 40, 6)


def test_learned_network_without_weights_needs_allow_untrained(tmp_path, input_volume, capsys,
                                                               monkeypatch):
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "no_weights")
    out = tmp_path / "out.nrrd"
    code, _, err = run_cli(["upscale", input_volume, out, "--model", "vdsr", "--quiet"], capsys)
    assert code == 2 and "--allow-untrained" in err and not out.exists()
    code, _, err = run_cli(["upscale", input_volume, out, "--model", "vdsr", "--allow-untrained",
                            "--quiet"], capsys)
    assert code == 0, err


def test_models_table_and_json_list_the_registry(capsys):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0 and "bicubic" in out and "srcnn" in out
    code, out, _ = run_cli(["models", "--json"], capsys)
    rows = json.loads(out)
    names = {r["name"] for r in rows}
    assert {"nearest", "linear", "bicubic", "lanczos", "srcnn"} <= names
    srcnn = next(r for r in rows if r["name"] == "srcnn")
    assert srcnn["pre_upsampled"] is True and srcnn["parameters"] > 50_000
    # the table shows the shipped network's size, not the registry default's (edsr_multiscale
    # ships a smaller 8x48 config than its default)
    multiscale = next(r for r in rows if r["name"] == "edsr_multiscale")
    shipped = multiscale["weights"]["x2"]["parameters"]
    assert shipped and shipped[0] < multiscale["parameters"]
    table_row = next(line for line in run_cli(["models"], capsys)[1].splitlines()
                     if line.lstrip("* ").startswith("edsr_multiscale "))
    assert f"{shipped[0]:,}" in table_row and f"{multiscale['parameters']:,}" not in table_row


def test_info_reports_geometry_and_range(input_volume, capsys):
    code, out, _ = run_cli(["info", input_volume], capsys)
    assert code == 0
    assert "spacing_mm_xyz" in out and "[0.8, 0.9, 3.0]" in out and "16-bit signed" in out


def test_json_progress_lines_for_background_callers(tmp_path, input_volume, capsys):
    out = tmp_path / "out.mha"
    code, _, err = run_cli(["upscale", input_volume, out, "--model", "bicubic", "--progress",
                            "json", "--batch", "2"], capsys)
    assert code == 0
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(lines) == len(err.splitlines()) - 1  # JSON, then the closing summary
    assert err.splitlines()[-1].startswith(f"wrote {out}")
    assert lines[0] == {"fraction": 0.0,
                        "message": "defaults: modality unknown (--modality CT, MR or XR to pick "
                                   "its model), axis z, backend torch"}
    fractions = [line["fraction"] for line in lines[1:]]
    assert len(fractions) == 3 and fractions[-1] == pytest.approx(1.0)


def test_ctrl_c_cancels_and_leaves_no_file(tmp_path):
    out = tmp_path / "out.nrrd"
    command = [sys.executable, "-m", "MedSRLib.cli", "upscale", str(SAMPLE_PATH), str(out),
               "--model", "srcnn", "--allow-untrained", "--progress", "json", "--batch", "1",
               "--precision", "fp32", "--tile", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = process.stderr.readline()  # first progress line: work has started
    assert first.startswith("{"), first
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 130, rest
    assert "cancelled" in rest
    assert list(tmp_path.iterdir()) == []


SR_NETWORKS = [n for n in zoo.model_names()
               if zoo.get_spec(n).kind not in ("interpolation", "detector", "through_plane")]


@pytest.fixture(scope="module")
def sample_crop(tmp_path_factory) -> Path:
    """A 20 x 18 x 2 crop of the bundled sample CT (real HU, real geometry)."""
    path = tmp_path_factory.mktemp("crop") / "sample_crop.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE_PATH))[118:138, 120:138, 7:9], str(path))
    return path


@pytest.mark.parametrize("name", SR_NETWORKS)
def test_every_network_runs_through_the_cli_when_untrained_is_allowed(tmp_path, capsys, name,
                                                                      sample_crop):
    scale = 4 if 4 in zoo.get_spec(name).scales else zoo.get_spec(name).scales[0]
    out = tmp_path / "out.nrrd"
    code, _, err = run_cli(["upscale", sample_crop, out, "--model", name, "--scale", scale,
                            "--allow-untrained", "--tile", "0", "--quiet"], capsys)
    assert code == 0, err
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == (20 * scale, 18 * scale, 2)
    assert result.GetPixelID() == sitk.sitkInt16
    assert result.GetMetaData("medsr_model") == name
