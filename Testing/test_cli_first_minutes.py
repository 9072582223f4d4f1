"""What a new user meets first: one way to name the output, `--version`, help with examples,
the X-ray default for a 2-D image, one line naming the defaults, `medsr models` as a table read
from the cards, and messages without library noise."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from MedSRLib import __version__, cli
from MedSRLib.models import table as model_table, registry as zoo
from MedSRLib.evaluation.demo import SAMPLE_PATH

from conftest import REPO_ROOT, make_volume


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli_exit(args, capsys):
    """`cli.main` for arguments argparse itself answers (--version, usage errors)."""
    with pytest.raises(SystemExit) as stop:
        cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


@pytest.fixture
def input_volume(tmp_path) -> Path:
    path = tmp_path / "input.mha"
    sitk.WriteImage(make_volume(), str(path))
    return path


@pytest.fixture
def grey_png(tmp_path) -> Path:
    """A 2-D greyscale picture without any modality (as a PNG always is)."""
    rng = np.random.default_rng(7)
    pixels = np.clip(np.add.outer(np.arange(40), np.arange(36)) * 3.0
                     + rng.normal(0, 5, (40, 36)), 0, 255).astype(np.uint8)
    path = tmp_path / "chest.png"
    Image.fromarray(pixels).save(path)
    return path


# ---- one way to name the output ---------------------------------------------------------------

@pytest.mark.parametrize("form", ["positional", "-o", "--out", "both, equal"])
def test_upscale_output_by_option_or_position(tmp_path, input_volume, capsys, form):
    out = tmp_path / "out.nrrd"
    naming = {"positional": [out], "-o": ["-o", out], "--out": ["--out", out],
              "both, equal": [out, "-o", out]}[form]
    code, _, err = run_cli(["upscale", input_volume, *naming, "--model", "bicubic", "--quiet"],
                           capsys)
    assert code == 0, err
    assert sitk.ReadImage(str(out)).GetSize() == (48, 40, 6)


def test_two_different_outputs_are_refused_and_nothing_written(tmp_path, input_volume, capsys):
    first, second = tmp_path / "a.nrrd", tmp_path / "b.nrrd"
    code, _, err = run_cli(["upscale", input_volume, first, "-o", second, "--model", "bicubic"],
                           capsys)
    assert code == 2
    assert str(first) in err and str(second) in err and "once" in err
    assert not first.exists() and not second.exists()


def test_batch_takes_dash_o_like_upscale():
    batch = _subcommands()["batch"]
    option = next(a for a in batch._actions if "--out" in a.option_strings)
    assert "-o" in option.option_strings


# ---- --version, help text and examples --------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["upscale"], ["batch"], ["models"], ["info"], ["demo"],
                                     ["train"], ["benchmark"]])
def test_version_at_top_level_and_per_command(capsys, command):
    if command in (["train"], ["benchmark"]):  # these parse their own arguments
        code, out, _ = run_cli([*command, "--version"], capsys)
    else:
        code, out, _ = run_cli_exit([*command, "--version"], capsys)
    assert code == 0
    assert out.strip() == f"medsr {__version__}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub for name, sub in action.choices.items() if sub.add_help}


def test_every_option_of_every_command_has_help_text():
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, sub in _subcommands().items() for action in sub._actions
               if not action.help or action.help == argparse.SUPPRESS]
    assert missing == []


def test_benchmark_options_have_help_and_its_help_names_the_through_plane_form(capsys):
    from MedSRLib.evaluation import benchmark
    missing = [a.dest for a in benchmark.build_parser()._actions if not a.help]
    assert missing == []
    code, out, _ = run_cli_exit(["benchmark", "--help"], capsys)
    assert code == 0 and "medsr benchmark --through-plane" in out


def test_every_command_help_ends_with_examples(capsys):
    for name in _subcommands():
        code, out, _ = run_cli_exit([name, "--help"], capsys)
        assert code == 0
        examples = out.split("examples:")[-1]
        assert "examples:" in out and f"medsr {name}" in examples, name


@pytest.mark.parametrize("scale", ["5", "2.5", "0"])
def test_a_rejected_scale_points_to_the_through_plane_form(capsys, input_volume, tmp_path, scale):
    code, _, err = run_cli_exit(["upscale", input_volume, tmp_path / "o.nrrd", "--scale", scale],
                                capsys)
    assert code == 2
    assert "integers 2-4" in err and "--scale 1,1,2.5" in err and "up to 8" in err
    assert not (tmp_path / "o.nrrd").exists()


def test_a_folder_without_dicom_gives_medsr_message_without_itk_warning(tmp_path):
    folder = tmp_path / "not_dicom"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "MedSRLib.cli", "info", str(folder)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("medsr: error:"), result.stderr
    assert "no readable DICOM series" in result.stderr
    assert "WARNING" not in result.stderr and ".cxx" not in result.stderr


# ---- the right model without asking -----------------------------------------------------------

def _defaults_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("medsr: defaults:")]


def test_a_png_without_modality_gets_the_xray_default_and_one_notice(tmp_path, grey_png, capsys):
    out = tmp_path / "chest_x2.png"
    code, _, err = run_cli(["upscale", grey_png, "-o", out, "--progress", "none"], capsys)
    assert code == 0, err
    expected = zoo.default_model("XR", 2)
    lines = _defaults_lines(err)
    assert len(lines) == 1, err
    assert "modality XR" in lines[0] and "--modality" in lines[0]
    assert f"model {expected}" in lines[0] and "axis z" in lines[0] and "backend" in lines[0]
    assert f"model {expected}," in err.split("wrote", 1)[1]  # the summary names the same model
    assert Image.open(out).size == (72, 80)


def test_modality_given_for_a_png_picks_that_modality_and_is_not_reported(tmp_path, grey_png,
                                                                          capsys):
    out = tmp_path / "chest_x2.png"
    code, _, err = run_cli(["upscale", grey_png, out, "--modality", "CT", "--progress", "none"],
                           capsys)
    assert code == 0, err
    line = _defaults_lines(err)[0]
    assert "modality" not in line and f"model {zoo.default_model('CT', 2)}" in line


def test_quiet_prints_no_defaults_line(tmp_path, grey_png, capsys):
    code, _, err = run_cli(["upscale", grey_png, tmp_path / "o.png", "--quiet"], capsys)
    assert code == 0 and err == ""


def test_every_choice_given_prints_no_defaults_line(tmp_path, input_volume, capsys):
    code, _, err = run_cli(["upscale", input_volume, tmp_path / "o.nrrd", "--model", "bicubic",
                            "--modality", "CT", "--axis", "z", "--backend", "torch",
                            "--progress", "none"], capsys)
    assert code == 0, err
    assert _defaults_lines(err) == []


def test_the_bundled_ct_reports_its_dicom_modality(tmp_path, capsys):
    code, _, err = run_cli(["upscale", SAMPLE_PATH, "-o", tmp_path / "o.nrrd", "--model",
                            "bicubic", "--progress", "none"], capsys)
    assert code == 0, err
    assert _defaults_lines(err) == ["medsr: defaults: modality CT (from DICOM), axis z, "
                                    "backend torch"]


def test_thick_slices_made_thin_report_the_network_and_its_backend(tmp_path, capsys):
    thick = make_volume(shape_kji=(5, 32, 30), spacing=(0.8, 0.8, 4.0))
    sitk.WriteImage(thick, str(tmp_path / "thick.nrrd"))
    code, _, err = run_cli(["upscale", tmp_path / "thick.nrrd", "-o", tmp_path / "thin.nrrd",
                            "--target-spacing", "1", "--modality", "CT", "--progress", "none"], capsys)
    assert code == 0, err
    assert _defaults_lines(err) == ["medsr: defaults: model through_plane_net, axis z (thick slices), "
                                    "backend openvino"]
    assert sitk.ReadImage(str(tmp_path / "thin.nrrd")).GetSize() == (30, 32, 20)


# ---- medsr models ------------------------------------------------------------------------------

def test_models_table_marks_each_default_and_reads_the_cards(capsys):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    assert "['" not in out and "{" not in out  # no Python reprs
    rows = [line.split() for line in out.splitlines() if line.startswith("* ")]
    for modality in ("CT", "MR", "XR"):
        for scale in (2, 3, 4):
            name = zoo.default_model(modality, scale)
            assert any(r[1] == name and r[2] == f"x{scale}" and modality in " ".join(r[3:])
                       for r in rows), (modality, scale, name)
    card = zoo.read_card(zoo.WEIGHTS_DIR / "edsr_lite_x2.safetensors")["metrics"]["x2"]
    gain = card["model"]["psnr"] - card["bicubic"]["psnr"]
    assert f"{gain:+.2f} dB" in out


def test_models_table_defaults_follow_the_registry_rule():
    defaults = model_table.default_models(model_table.read_cards())
    for modality in (*model_table.MODALITIES, None):
        for scale in model_table.SCALES:
            assert defaults[(modality, scale)] == zoo.default_model(modality, scale)
    assert model_table.INTERPOLATION_BASELINES == tuple(
        n for n in zoo.model_names() if zoo.get_spec(n).kind == "interpolation")


def test_models_table_honours_a_cards_default_for(tmp_path):
    """A card that limits the modalities it is the default for moves the table's default the
    way it moves the registry's (one rule for both)."""
    shipped = json.loads((zoo.WEIGHTS_DIR / "edsr_lite_x2.json").read_text(encoding="utf-8"))
    (tmp_path / "edsr_lite_x2.safetensors").write_bytes(b"")
    (tmp_path / "edsr_lite_x2.json").write_text(json.dumps({**shipped, "default_for": ["MR"]}), encoding="utf-8")
    defaults = model_table.default_models(model_table.read_cards(tmp_path))
    assert defaults[("MR", 2)] == "edsr_lite"
    assert defaults[("CT", 2)] == "bicubic"
    assert defaults[(None, 2)] == "bicubic"  # trained on more than it is the default for


def test_packaged_speed_table_is_the_committed_frontier_measurement():
    committed = REPO_ROOT / "benchmarks" / "results" / "frontier" / "frontier.json"
    if not committed.is_file():
        pytest.skip("benchmarks/results is not in this checkout")
    assert json.loads(model_table.SPEED_PATH.read_text(encoding="utf-8")) == json.loads(committed.read_text(encoding="utf-8"))


def test_models_lists_without_importing_torch():
    code = ("import sys; from MedSRLib import cli; cli.main(['models']); "
            "print('heavy:', sorted(m for m in ('torch', 'monai', 'openvino') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("heavy: []")


def test_models_json_is_the_registry_description(capsys):
    code, out, _ = run_cli(["models", "--json"], capsys)
    assert code == 0
    assert json.loads(out) == json.loads(json.dumps(zoo.describe_all()))


def test_models_all_names_the_registered_models_without_weights(capsys):
    code, out, _ = run_cli(["models", "--all"], capsys)
    assert code == 0
    untrained = [n for n in zoo.model_names() if zoo.get_spec(n).needs_weights
                 and not any(zoo.weights_files(zoo.get_spec(n), s) for s in zoo.get_spec(n).scales)]
    line = next(li for li in out.splitlines() if li.startswith("Registered without shipped"))
    assert untrained and all(name in line for name in untrained)


# ---- the test suite says what it skips ---------------------------------------------------------

def test_suite_without_real_data_says_once_how_many_skip_and_where_it_comes_from(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), suite / "conftest.py")
    (suite / "test_needs_data.py").write_text(
        "def test_one(shared_data):\n    pass\n\n\ndef test_two(shared_data):\n    pass\n\n\n"
        "def test_without_data():\n    pass\n", encoding="utf-8")
    env = {**os.environ, "MEDSR_SHARED_DATA": str(tmp_path / "absent")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "."],
                            capture_output=True, text=True, timeout=600, cwd=suite, env=env)
    assert result.returncode == 0, result.stdout[-2000:]
    notes = [line for line in result.stdout.splitlines() if "for want of the real images" in line]
    assert len(notes) == 1, result.stdout[-2000:]
    assert notes[0].startswith("2 tests skipped") and str(tmp_path / "absent") in notes[0]
    assert "MANIFEST.md" in notes[0] and "MEDSR_SHARED_DATA" in notes[0]
    assert "1 passed, 2 skipped" in result.stdout
