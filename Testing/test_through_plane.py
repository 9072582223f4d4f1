"""Through-plane SR (issue 16): slice-profile matrices, planning (any factor, exact grid,
target spacing, slice thickness from DICOM), the shipped network against cubic interpolation
on real data, per-volume adaptation (budget, cancel, shipped weights untouched), CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

import MedSRLib
from MedSRLib import cli
from MedSRLib.transforms import geometry
from MedSRLib.io import volumes as io
from MedSRLib.models import registry as zoo
from MedSRLib.evaluation.demo import SAMPLE_PATH
from MedSRLib.errors import CancelledError, InputError
from MedSRLib.through_plane import apply, data, planning
from MedSRLib.models import through_plane_io as model_io
from MedSRLib.transforms import slice_profile as profile
from MedSRLib.models.networks.through_plane import ThroughPlaneEDSR

from conftest import make_volume, oblique_direction

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- slice profiles --------------------------------------------------------------------------

def test_box_profile_is_the_mean_of_consecutive_thin_slices():
    thin = np.random.default_rng(0).normal(size=(15, 4))
    thick = profile.degradation_matrix(15, 3.0) @ thin
    np.testing.assert_allclose(thick, thin.reshape(5, 3, 4).mean(axis=1), atol=1e-12)


def test_box_profile_with_a_gap_and_a_real_factor():
    gap = profile.degradation_matrix(20, 5.0, 0.6)  # 3 mm slices every 5 mm on 1 mm samples
    np.testing.assert_allclose(gap[0], [0, 1 / 3, 1 / 3, 1 / 3] + [0] * 16, atol=1e-12)
    real = profile.degradation_matrix(20, 2.5)
    np.testing.assert_allclose(real.sum(axis=1), 1.0)
    np.testing.assert_allclose(real[0, :3], [0.4, 0.4, 0.2])  # box [-0.5, 2.0)
    gaussian = profile.degradation_matrix(40, 4.0, 1.0, "gaussian")
    np.testing.assert_allclose(gaussian.sum(axis=1), 1.0)
    row = gaussian[3]  # centre 3 * 4 + 1.5 = 13.5: symmetric about it
    np.testing.assert_allclose(row[13 - 5:14], row[14:19 + 1][::-1], atol=1e-9)


def test_cubic_matrix_reproduces_quadratics_and_covers_the_extent():
    positions = profile.sample_positions(25, 10 / 25)
    matrix = profile.cubic_matrix(10, positions)
    x = np.arange(10.0)
    inner = (positions >= 1) & (positions <= 8)
    np.testing.assert_allclose((matrix @ (0.5 * x ** 2 - x))[inner],
                               (0.5 * positions ** 2 - positions)[inner], atol=1e-9)
    assert positions[0] == pytest.approx(-0.3) and positions[-1] == pytest.approx(9.3)


# ---- planning: any factor, exact grid -----------------------------------------------------------

@pytest.fixture(scope="module")
def oblique_5mm_ct(tmp_path_factory) -> Path:
    """A 96 x 80 x 6 crop of the bundled 0.8 x 0.8 x 5 mm CT, made oblique, as a NRRD file."""
    image = sitk.ReadImage(str(SAMPLE_PATH))[80:176, 90:170, 5:11]
    image.SetDirection(tuple(oblique_direction().reshape(-1)))
    path = tmp_path_factory.mktemp("tp") / "oblique_5mm.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def _corner_error(a: sitk.Image, b: sitk.Image) -> float:
    return float(np.abs(geometry.corner_points(geometry.Grid.of(a))
                        - geometry.corner_points(geometry.Grid.of(b))).max())


def test_target_spacing_1_on_a_5mm_oblique_ct_gives_1mm_slices_over_the_same_extent(oblique_5mm_ct, tmp_path):
    image = io.read_volume(oblique_5mm_ct)
    out = MedSRLib.upscale(image, target_spacing=1)
    written = tmp_path / "thin.nrrd"
    io.write_volume(out, written)
    thin = io.read_volume(written)
    assert thin.GetSize() == (96, 80, 30)
    np.testing.assert_allclose(thin.GetSpacing(), (image.GetSpacing()[0], image.GetSpacing()[1], 1.0), atol=1e-9)
    assert _corner_error(image, thin) < 1e-4
    np.testing.assert_allclose(thin.GetDirection(), image.GetDirection(), atol=1e-12)
    assert out.GetMetaData("medsr_model") == "through_plane_net"
    assert "box, thickness 5.000 mm, spacing 5.000 mm" in out.GetMetaData("medsr_slice_profile")
    assert sitk.GetArrayViewFromImage(thin).dtype == np.int16


def test_a_real_factor_keeps_the_extent_exact_and_says_what_it_did(oblique_5mm_ct):
    image = io.read_volume(oblique_5mm_ct)
    out = MedSRLib.upscale(image, scale=(1, 1, 2.5), slice_thickness=3.0, slice_profile="gaussian")
    assert out.GetSize() == (96, 80, 15)
    assert out.GetSpacing()[2] == pytest.approx(2.0)
    assert _corner_error(image, out) < 1e-4
    assert "gaussian, thickness 3.000 mm, spacing 5.000 mm, gap 2.000 mm (--slice-thickness)" in \
        out.GetMetaData("medsr_slice_profile")
    odd = MedSRLib.upscale(image[:, :, :5], scale=(1, 1, 2.5), model="through_plane_net")
    assert odd.GetSize()[2] == 13 and _corner_error(image[:, :, :5], odd) < 1e-4  # 12.5 half up
    assert "effective factor 2.6" in odd.GetMetaData("medsr_through_plane")


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": (1, 1, 0.5)}, "must be >= 1"),
    ({"scale": (1, 1, 9)}, "above the limit 8"),
    ({"target_spacing": (1, 1, 1)}, "coarser than the input"),
    ({"target_spacing": 6}, "not finer"),
    ({"target_spacing": 1, "scale": 2}, "not both"),
    ({"scale": (1, 1, 2.5), "model": "edsr_lite"}, "integer factors"),
    ({"scale": 2, "slice_thickness": 3.0}, "for through-plane SR"),
    ({"scale": (1, 1, 3), "slice_thickness": -1.0}, "positive"),
    ({"scale": (1, 1, 3), "adapt": True, "adapt_seconds": 0}, "positive"),
])
def test_bad_through_plane_requests_are_input_errors(kwargs, message):
    image = make_volume(spacing=(0.8, 0.8, 5.0))
    with pytest.raises(InputError, match=message):
        MedSRLib.upscale(image, **kwargs)


def test_cli_takes_real_factors_and_refuses_out_of_range_ones(oblique_5mm_ct, tmp_path, capsys):
    out = tmp_path / "out.nrrd"
    assert cli.main(["upscale", str(oblique_5mm_ct), str(out), "--scale", "1,1,2.5", "--quiet"]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == (96, 80, 15)
    assert cli.main(["upscale", str(oblique_5mm_ct), str(tmp_path / "bad.nrrd"), "--scale", "1,1,9"]) == 2
    assert "above the limit" in capsys.readouterr().err
    assert cli.main(["upscale", str(oblique_5mm_ct), str(tmp_path / "bad.nrrd"), "--target-spacing", "1,1,1"]) == 2
    assert not (tmp_path / "bad.nrrd").exists()


def test_integer_inplane_scale_scales_the_stored_slices_even_with_coarser_pixels():
    image = make_volume(shape_kji=(8, 12, 10), spacing=(1.5, 1.5, 1.0))
    out = MedSRLib.upscale(image, model="bicubic", scale=2)
    assert out.GetSize() == (20, 24, 8)
    assert out.GetSpacing() == pytest.approx((0.75, 0.75, 1.0))


def test_dicom_slice_thickness_sets_the_profile_and_the_gap(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    volume = make_volume(shape_kji=(5, 24, 20), spacing=(0.7, 0.7, 4.0))
    uid = "1.2.826.0.1.3680043.8.498.1616"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(5):
        plane = volume[:, :, k]
        for tag, value in (("0008|0060", "CT"), ("0020|000e", uid), ("0020|000d", uid + ".1"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", "2.5"),
                           ("0020|0032", "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0013", str(k + 1)), ("0008|0018", f"{uid}.2.{k}")):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k}.dcm"))
        writer.Execute(plane)
    image = io.read_volume(folder)
    assert float(image.GetMetaData(io.SLICE_THICKNESS_KEY)) == 2.5
    thin = planning.plan(image, None, "auto", target_spacing=1.0)
    assert thin.profile.thickness_mm == 2.5 and thin.profile.gap_mm == pytest.approx(1.5)
    assert "DICOM SliceThickness" in thin.profile.describe()
    assert thin.out_slices == 20


# ---- the network ---------------------------------------------------------------------------------

def test_an_untrained_network_is_exactly_cubic_interpolation():
    units = np.random.default_rng(1).random((7, 20, 22)).astype(np.float32)
    cubic = apply.restore(units, 0, 18, 1.0, None)
    np.testing.assert_allclose(apply.restore(units, 0, 18, 1.0, ThroughPlaneEDSR()), cubic, atol=1e-6)


def test_refine_blocks_grow_a_network_from_its_smaller_self_and_load_from_their_card(tmp_path):
    rng = np.random.default_rng(2)
    small = ThroughPlaneEDSR(16, 2)
    with torch.no_grad():
        for tensor in small.parameters():
            tensor.copy_(torch.from_numpy(rng.normal(0, 0.1, tensor.shape).astype(np.float32)))
    small_path = tmp_path / "small.safetensors"
    zoo.save_weights(small, small_path, {"model": model_io.MODEL_NAME, "architecture": "ThroughPlaneEDSR",
                                         "config": {"num_features": 16, "num_blocks": 2}})
    grown = ThroughPlaneEDSR(16, 2, refine_blocks=2)
    grown.load_grown(str(small_path))
    thick = torch.from_numpy(rng.random((2, 1, 9, 20)).astype(np.float32))
    positions = torch.linspace(-0.4, 8.4, 27)
    with torch.no_grad():
        before = small(thick, positions, 3.0, 1.0)
        np.testing.assert_allclose(grown(thick, positions, 3.0, 1.0), before, atol=1e-6)
        for tensor in grown.refine.parameters():      # the blocks act once they are trained
            tensor.add_(0.05)
        assert float((grown(thick, positions, 3.0, 1.0) - before).abs().max()) > 1e-3
    grown_path = tmp_path / "grown.safetensors"
    zoo.save_weights(grown, grown_path, {"model": model_io.MODEL_NAME, "architecture": "ThroughPlaneEDSR",
                                         "config": {"num_features": 16, "num_blocks": 2, "refine_blocks": 2}})
    loaded = model_io.load(grown_path)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(thick, positions, 3.0, 1.0), grown(thick, positions, 3.0, 1.0),
                                   atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        ThroughPlaneEDSR(16, 3).load_grown(str(small_path))


def test_the_benchmark_report_gives_each_modality_and_the_step_over_a_baseline():
    from MedSRLib.evaluation import through_plane as bench
    rows = []
    for case, modality, role, base, new in (("ct.nii", "CT", "test", 2.0, 2.5), ("t1.nii", "MR", "test", 1.0, 1.75),
                                           ("val.nii", "CT", "validation", 9.0, 9.0),
                                           ("/x/LIDC_R_1/image.nii.gz", "CT", bench.UNSEEN, 1.0, 1.25)):
        for factor in (3.0, 5.0):
            for method, gain in (("cubic-z", 0.0), (bench.BASELINE, base), ("MedSR through-plane", new)):
                rows.append({"case": case, "role": role, "modality": modality, "factor": factor,
                             "thickness_ratio": 1.0, "method": method, "psnr": 30.0 + gain, "ssim": 0.9})
    gains = bench.mean_gains(rows)
    assert gains[("MedSR through-plane", 3.0, "CT")] == pytest.approx(2.5)   # validation rows left out
    assert gains[(bench.BASELINE, 5.0, "MR")] == pytest.approx(1.0)
    text = bench.report(rows, "medsr benchmark --through-plane")
    assert "| step of MedSR through-plane over the baseline | +0.50 | +0.75 | +0.50 | +0.75 |" in text
    unseen = text[text.index("Unseen CT"):]                             # apart from the test volumes
    assert "| LIDC_R_1 (unseen CT) | x3 |" in text
    assert "| step of MedSR through-plane over the baseline | +0.25 | +0.25 |" in unseen


def test_the_benchmark_report_gives_the_precision_cost_of_the_automatic_path():
    from MedSRLib.evaluation import through_plane as bench
    rows = []
    for case, automatic, fp32 in (("ct.nii", 32.00, 32.01), ("t1.nii", 28.00, 28.04), ("gap.nii", 27.0, None)):
        for method, psnr in (("cubic-z", 25.0), ("MedSR through-plane", automatic), (bench.FP32_REFERENCE, fp32)):
            rows.append({"case": case, "role": "test", "modality": "CT", "factor": 3.0, "thickness_ratio": 1.0,
                         "method": method, "psnr": psnr, "ssim": 0.9})
    assert bench.precision_cost(rows[:2]) == []                         # no reference run: no line
    line = bench.report(rows, "medsr benchmark --through-plane --fp32-reference")
    assert "over 2 rows: mean -0.025 dB, worst -0.040 dB, best -0.010 dB." in line


def test_unseen_ct_rows_are_thin_long_ct_crops_of_test_patients_only(tmp_path):
    from MedSRLib.evaluation import through_plane as bench
    assert bench.unseen_ct_cases(tmp_path / "absent") == []
    for case, slices, spacing in (("LIDC-IDRI-0001_R_1", 50, 1.0), ("LIDC-IDRI-0003_R_2", 50, 2.5),
                                  ("LIDC-IDRI-0023_R_1", 20, 1.0), ("LIDC-IDRI-0044_R_3", 50, 1.0)):
        folder = tmp_path / "lidc-voi" / case
        folder.mkdir(parents=True)
        image = sitk.GetImageFromArray(np.zeros((slices, 8, 8), np.int16))
        image.SetSpacing((0.7, 0.7, spacing))
        sitk.WriteImage(image, str(folder / "image.nii.gz"))
        sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt8), str(folder / "mask.nii.gz"))
    # 0003: thick slices; 0023: too short; 0044: a calibration patient of the lesion finder
    assert [Path(path).parent.name for _, path, _ in bench.unseen_ct_cases(tmp_path)] == ["LIDC-IDRI-0001_R_1"]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_the_shipped_network_beats_cubic_on_a_held_out_mr_made_thick(shared_data):
    units, _ = data.load_units(shared_data / data.TEST_SOURCES[1][1])  # BraTS pat0006 T1c, never trained on
    thin = units[40:100, 90:150, 90:150]
    thick = profile.degradation_matrix(60, 4.0).astype(np.float32) @ thin.reshape(60, -1)
    thick = thick.reshape(15, 60, 60)
    net = model_io.load()
    cubic = apply.restore(thick, 0, 60, 1.0, None)
    restored = apply.restore(thick, 0, 60, 1.0, net)
    inner = slice(4, 56)
    assert _psnr(restored[inner], thin[inner]) > _psnr(cubic[inner], thin[inner]) + 0.5


def test_the_card_names_training_validation_and_test_patients_apart():
    card = zoo.read_card(model_io.WEIGHTS_FILE)
    training = {entry["file"] for entry in card["training_data"]}
    assert training and card["validation_data"] and card["test_data_never_used"]
    assert not training & set(card["validation_data"])
    assert not (training | set(card["validation_data"])) & set(card["test_data_never_used"])
    assert card["cpu_seconds"] > 0 and "validation" in card["metrics"]
    assert model_io.load().card["model"] == "through_plane_net"
    listed = {m["name"]: m for m in MedSRLib.list_models()}["through_plane_net"]
    assert listed["kind"] == "through_plane" and listed["weights"]


def test_the_committed_through_plane_benchmark_meets_the_bar():
    """benchmarks/results/through_plane (`medsr benchmark --through-plane`): on the test volumes
    the network gains >= 1.5 dB over cubic-z at x3 and x5 (box, contiguous), CT and MR averaged,
    and it beats cubic-z on every row, the gap case included."""
    import json
    rows = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "through_plane"
                       / "results.json").read_text(encoding="utf-8"))["rows"]
    by_case = {}
    for row in rows:
        by_case.setdefault((row["case"], row["factor"], row["thickness_ratio"]), {})[row["method"]] = row
    for methods in by_case.values():
        assert methods["MedSR through-plane"]["psnr"] > methods["cubic-z"]["psnr"]
    for factor in (3.0, 5.0):
        per_modality = []
        for modality in ("CT", "MR"):
            gains = [m["MedSR through-plane"]["psnr"] - m["cubic-z"]["psnr"]
                     for (case, f, ratio), m in by_case.items()
                     if f == factor and ratio == 1.0 and m["cubic-z"]["modality"] == modality
                     and m["cubic-z"]["role"] == "test"]
            assert gains, (factor, modality)
            per_modality.append(np.mean(gains))
        assert np.mean(per_modality) >= 1.5, (factor, per_modality)


# ---- adaptation ----------------------------------------------------------------------------------

def _digest(net: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in net.state_dict().values())).hexdigest()


def test_adaptation_trains_a_copy_within_its_budget_and_leaves_the_shipped_weights(oblique_5mm_ct):
    file_digest = hashlib.sha256(model_io.WEIGHTS_FILE.read_bytes()).hexdigest()
    shipped = model_io.load()
    before = _digest(shipped)
    image = io.read_volume(oblique_5mm_ct)
    messages = []
    out = MedSRLib.upscale(image, target_spacing=1, adapt=True, adapt_seconds=3,
                           progress=lambda fraction, message: messages.append(message))
    assert out.GetMetaData("medsr_model") == "through_plane_net + adapted"
    assert any(m.startswith("adapting to this volume") for m in messages)
    assert _digest(model_io.load()) == before and model_io.load() is shipped
    assert hashlib.sha256(model_io.WEIGHTS_FILE.read_bytes()).hexdigest() == file_digest
    plain = MedSRLib.upscale(image, target_spacing=1)
    assert not np.array_equal(sitk.GetArrayViewFromImage(out), sitk.GetArrayViewFromImage(plain))


def test_adaptation_is_cancellable(oblique_5mm_ct):
    token = MedSRLib.CancelToken()

    def progress(fraction, message):
        if message.startswith("adapting") and "step 3," in message:
            token.cancel()

    with pytest.raises(CancelledError):
        MedSRLib.upscale(io.read_volume(oblique_5mm_ct), target_spacing=1, adapt=True,
                         adapt_seconds=60, progress=progress, cancel=token)


def test_extra_training_volumes_come_with_modality_and_licence_from_their_manifest(tmp_path):
    import json

    volume = sitk.GetImageFromArray(np.random.default_rng(4).random((5, 64, 64)).astype(np.float32))
    volume.SetSpacing((0.7, 0.7, 3.0))
    sitk.WriteImage(volume, str(tmp_path / "breast.nrrd"))
    entry = {"path": "breast.nrrd", "modality": "MR", "licence": "CC BY 3.0", "what": "breast MR"}
    (tmp_path / "MANIFEST.json").write_text(json.dumps([entry]), encoding="utf-8")
    [(modality, path, card_entry)] = data.extra_sources([tmp_path])
    assert modality == "MR" and path == tmp_path / "breast.nrrd"
    assert card_entry == {"file": f"{tmp_path.name}/breast.nrrd", "licence": "CC BY 3.0",
                          "what": "breast MR"}
    units, spacing = data.load_units(path)
    planes = data.square_pixel_planes(units, spacing)
    assert planes and all(plane.shape == (64, 64) for plane in planes)  # in-plane slices only
    for bad in ({**entry, "licence": ""}, {**entry, "modality": "PET"}, {**entry, "path": "gone.nrrd"}):
        (tmp_path / "MANIFEST.json").write_text(json.dumps([bad]), encoding="utf-8")
        with pytest.raises(ValueError, match="MANIFEST.json"):
            data.extra_sources([tmp_path])
    with pytest.raises(ValueError, match="no MANIFEST.json"):
        data.extra_sources([tmp_path / "elsewhere"])


def test_averaging_runs_exports_the_mean_weights_with_every_members_data_and_cpu_time(tmp_path, shared_data):
    from MedSRLib.through_plane import train

    def saved(seed: int, name: str, card: dict) -> Path:
        torch.manual_seed(seed)
        net = ThroughPlaneEDSR(16, 2)
        path = tmp_path / name
        zoo.save_weights(net, path, {"model": model_io.MODEL_NAME, "architecture": "ThroughPlaneEDSR",
                                     "config": {"num_features": 16, "num_blocks": 2}, **card})
        return path

    start = saved(1, "start.safetensors", {"cpu_seconds": 50.0, "cpu_seconds_total": 100.0, "steps": 9,
                                           "training_data": [{"file": "ct/a.nii.gz"}], "licence": ["MIT"]})
    run = saved(2, "run.safetensors", {"cpu_seconds": 30.0, "cpu_seconds_total": 130.0, "steps": 5,
                                       "training_data": [{"file": "ct/a.nii.gz"}, {"file": "extra/b.nrrd"}],
                                       "licence": ["CC BY 3.0"]})
    out = tmp_path / "mean.safetensors"
    train.main(["--data-root", str(shared_data), "--average", str(start), str(run), "--export", str(out)])
    mean, card = load_file(out), zoo.read_card(out)
    a, b = load_file(start), load_file(run)
    for key in a:
        torch.testing.assert_close(mean[key], (a[key] + b[key]) / 2)
    assert [entry["file"] for entry in card["training_data"]] == ["ct/a.nii.gz", "extra/b.nrrd"]
    assert card["licence"] == ["CC BY 3.0", "MIT"] and len(card["averaged_from"]) == 2
    assert card["cpu_seconds"] == 30.0 and card["cpu_seconds_total"] == 130.0
    assert "mean_gain_db" in card["metrics"]["validation"]
    assert model_io.load(start).card["steps"] == 9          # the loaded start is left as it was
    torch.testing.assert_close(dict(model_io.load(start).state_dict()), a)
    other = tmp_path / "other.safetensors"
    torch.manual_seed(3)
    zoo.save_weights(ThroughPlaneEDSR(16, 3), other,
                     {"model": model_io.MODEL_NAME, "config": {"num_features": 16, "num_blocks": 3}})
    with pytest.raises(ValueError, match="different architectures"):
        train.main(["--average", str(start), str(other), "--export", str(tmp_path / "x.safetensors")])
