"""Hostile-user findings: a mistake the user can fix exits 2 with "<path>: <problem>", never 1.

Every case goes through `MedSRLib.cli.main` and stops before any real work (no training, no
inference), so the file runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk

from MedSRLib import cli
from MedSRLib.cli import EXIT_INPUT

from conftest import make_volume


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_config(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# ----- medsr train: the config file -------------------------------------------------------------


def test_train_missing_config_names_the_path_and_how_to_list_recipes(tmp_path, capsys):
    missing = tmp_path / "no_such_recipe.yaml"
    code, _, err = run_cli(["train", missing], capsys)
    assert code == EXIT_INPUT, err
    assert f"medsr: error: {missing}: no such config file or shipped recipe" in err
    assert "medsr train --list" in err
    assert "internal error" not in err


def test_train_config_that_is_a_folder_says_so(tmp_path, capsys):
    code, _, err = run_cli(["train", tmp_path], capsys)
    assert code == EXIT_INPUT, err
    assert f"{tmp_path}: is a folder, not a config file" in err


def test_train_binary_config_names_the_file_and_the_problem(tmp_path, capsys):
    path = tmp_path / "scan.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x80\x81")
    code, _, err = run_cli(["train", path], capsys)
    assert code == EXIT_INPUT, err
    assert f"{path}: not a text file" in err


@pytest.mark.parametrize("text, kind", [("- srcnn\n- vdsr\n", "a list"), ("srcnn\n", "a string"),
                                        ("", "an empty document")],
                         ids=["list", "string", "empty"])
def test_train_config_that_is_not_a_mapping_names_what_it_is(tmp_path, capsys, text, kind):
    path = write_config(tmp_path, text)
    code, _, err = run_cli(["train", path], capsys)
    assert code == EXIT_INPUT, err
    assert f"{path}: a config is a mapping" in err and f"not {kind}" in err


def test_train_config_with_broken_yaml_names_the_line(tmp_path, capsys):
    path = write_config(tmp_path, "model: srcnn\ntrain: {steps: 5\n")
    code, _, err = run_cli(["train", path], capsys)
    assert code == EXIT_INPUT, err
    assert f"{path}: not valid YAML" in err and "line 3" in err


def test_train_json_config_with_broken_json_names_the_file(tmp_path, capsys):
    path = write_config(tmp_path, '{"model": "srcnn",', name="recipe.json")
    code, _, err = run_cli(["train", path], capsys)
    assert code == EXIT_INPUT, err
    assert f"{path}: not valid JSON" in err


@pytest.mark.parametrize("text, problem", [
    ("scale: 2\n", "no 'model' key"),
    ("model: nosuchnet\n", "unknown model 'nosuchnet'; known models: "),
    ("model: srcnn\ntrian: {steps: 5}\n", "unknown key 'trian'; did you mean 'train'?"),
    ("model: srcnn\ntrain: {steps: 0}\n", "train.steps must be a positive integer, got 0"),
    ("model: srcnn\ntrain: {precision: fp64}\n", "train.precision must be one of fp32, bf16, fp16"),
    ("model: srcnn\noptimizer: {type: lbfgs}\n", "optimizer.type must be one of adam, sgd"),
    ("model: srcnn\nscale: two\n", "scale must be a positive integer, got 'two'"),
    ("model: srcnn\ntrain: 5\n", "train must be a mapping of keys, not a number"),
    ("model: srcnn\ndata: {sources: {glob: '*.nii.gz'}}\n", "data.sources must be a list of mappings"),
], ids=["no-model", "unknown-model", "unknown-key", "zero-steps", "bad-precision", "bad-optimizer",
        "bad-scale", "section-not-mapping", "sources-not-list"])
def test_train_config_with_invalid_value_names_the_file_and_the_key(tmp_path, capsys, text, problem):
    path = write_config(tmp_path, text)
    code, _, err = run_cli(["train", path, "--print-config"], capsys)
    assert code == EXIT_INPUT, err
    assert f"medsr: error: {path}: {problem}" in err


def test_train_config_extending_a_missing_recipe_names_both(tmp_path, capsys):
    path = write_config(tmp_path, "extends: no_such_parent\nmodel: srcnn\n")
    code, _, err = run_cli(["train", path], capsys)
    assert code == EXIT_INPUT, err
    assert f"{path}: extends 'no_such_parent', which is no config file or shipped recipe" in err


# ----- medsr train: --set and flags -------------------------------------------------------------


@pytest.mark.parametrize("override, problem", [
    ("train.steps", "an override looks like KEY.PATH=VALUE"),
    ("=5", "an override looks like KEY.PATH=VALUE"),
    ("train..steps=5", "an override looks like KEY.PATH=VALUE"),
    ("train.steps.x=1", "train.steps is 12, not a mapping of keys"),
    ("train.steps=[1", "value is not valid YAML"),
], ids=["no-equals", "no-key", "empty-part", "through-a-number", "bad-yaml"])
def test_train_malformed_override_names_the_override(capsys, override, problem):
    code, _, err = run_cli(["train", "ci/srcnn", "--set", override, "--print-config"], capsys)
    assert code == EXIT_INPUT, err
    assert f"medsr: error: --set {override!r}: {problem}" in err


def test_train_override_with_invalid_value_is_a_usage_error(capsys):
    code, _, err = run_cli(["train", "ci/srcnn", "--steps", "-3", "--print-config"], capsys)
    assert code == EXIT_INPUT, err
    assert "ci/srcnn.yaml: train.steps must be a positive integer, got -3" in err


def test_train_data_root_that_looks_like_yaml_stays_a_folder_name(capsys):
    code, out, err = run_cli(["train", "ci/srcnn", "--data-root", "2024: scans", "--print-config"], capsys)
    assert code == 0, err
    assert json.loads(out)["data"]["root"] == "2024: scans"


# ----- medsr train: the data folder (checked before training starts) --------------------------


def test_train_missing_data_root_flag_names_the_folder(tmp_path, capsys):
    missing, out = tmp_path / "no_data_here", tmp_path / "run"
    code, _, err = run_cli(["train", "ci/srcnn", "--data-root", missing, "--out", out,
                            "--no-progress"], capsys)
    assert code == EXIT_INPUT, err
    assert f"medsr: error: {missing}: data folder not found (given by --data-root" in err
    assert not out.exists()


def test_train_missing_data_root_in_config_names_the_folder_and_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDSR_DATA_ROOT", raising=False)
    missing, out = tmp_path / "no_data_here", tmp_path / "run"
    path = write_config(tmp_path, f"model: srcnn\ndata:\n  root: {missing}\n"
                                  "  sources: [{glob: '*.nii.gz', modality: CT}]\n")
    code, _, err = run_cli(["train", path, "--out", out, "--no-progress"], capsys)
    assert code == EXIT_INPUT, err
    assert f"{missing}: data folder not found (data.root of recipe)" in err and "--data-root" in err
    assert not out.exists()


# ----- medsr upscale --weights -------------------------------------------------------------------


@pytest.fixture
def input_volume(tmp_path) -> Path:
    path = tmp_path / "input.nii.gz"
    sitk.WriteImage(make_volume(), str(path))
    return path


def upscale_with_weights(tmp_path, input_volume, weights, capsys):
    out = tmp_path / "out.nii.gz"
    result = run_cli(["upscale", input_volume, out, "--model", "srcnn", "--weights", weights,
                      "--quiet"], capsys)
    assert not out.exists()
    return result


def test_missing_weights_file_is_reported_before_its_card(tmp_path, input_volume, capsys):
    missing = tmp_path / "missing.safetensors"
    code, _, err = upscale_with_weights(tmp_path, input_volume, missing, capsys)
    assert code == EXIT_INPUT, err
    assert f"medsr: error: {missing}: weights file not found" in err
    assert "model card" not in err


def test_weights_path_that_is_a_folder_says_so(tmp_path, input_volume, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    code, _, err = upscale_with_weights(tmp_path, input_volume, folder, capsys)
    assert code == EXIT_INPUT, err
    assert f"{folder}: is a folder, not a weights file" in err


def test_weights_file_without_card_still_reports_the_missing_card(tmp_path, input_volume, capsys):
    weights = tmp_path / "mine.safetensors"
    weights.write_bytes(b"not read before the card")
    code, _, err = upscale_with_weights(tmp_path, input_volume, weights, capsys)
    assert code == EXIT_INPUT, err
    assert f"{weights}: model card mine.json is missing" in err
