"""Training: every recipe trains on real data (CI variants), resume is exact, DDP ranks agree.

Needs the shared training data (../shared/data relative to the repository, or MEDSR_DATA_ROOT).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from MedSRLib.models import registry as zoo
from MedSRLib.training import data as tdata
from MedSRLib.training.__main__ import main as train_main
from MedSRLib.training.config import CONFIG_DIR, load_config
from MedSRLib.training.losses import AdversarialLoss, VGGPerceptualLoss, build_loss, vgg19_features
from MedSRLib.training.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("MEDSR_DATA_ROOT", REPO.parent / "shared" / "data")).resolve()
pytestmark = pytest.mark.skipif(not (DATA_ROOT / "MANIFEST.md").is_file(),
                                reason=f"training data not found at {DATA_ROOT}")

#: CI recipes in run order; value = the recipe whose export initialises it (papers 002/003/004).
CI_RECIPES = {
    "srcnn": None, "improved_srcnn": None, "vdsr": None, "fmen": None,
    "edsr_baseline_x2": None, "edsr_baseline_x4": "edsr_baseline_x2", "edsr_lite": None,
    "edsr_lite_25d": "edsr_lite", "mdrn_x2": None, "mdrn": "mdrn_x2", "edsr_multiscale": None,
    "srresnet": None, "srgan": "srresnet", "lfsr": "edsr_lite", "hybrid_pretrain": None, "hybrid": "hybrid_pretrain",
    "lesion_detector": None, "vdsr_through_plane": None,
}


def _ci_config(name: str, *overrides: str) -> dict:
    return load_config(CONFIG_DIR / "ci" / f"{name}.yaml", [f"data.root={DATA_ROOT}", *overrides])


@pytest.fixture(scope="module")
def ci_runs(tmp_path_factory):
    """Train every CI recipe once (a few steps each), chained where a recipe starts from another."""
    root = tmp_path_factory.mktemp("ci_runs")
    summaries = {}
    for name, parent in CI_RECIPES.items():
        overrides = [f"init_from={summaries[parent]['export']}"] if parent else []
        summaries[name] = train(_ci_config(name, *overrides), root / name, progress=False)
    return summaries


#: Learned models trained by their own module instead of a YAML recipe (tested in their own
#: test file): the lesion segmenter's Dice + CE on cached 2.5-D stacks (Testing/test_localiser.py).
OWN_TRAINING = {"lesion_segmenter": "MedSRLib.training.localiser"}


def test_every_registered_network_has_a_ci_recipe_and_a_full_recipe():
    import importlib

    for module in OWN_TRAINING.values():
        assert callable(importlib.import_module(module).train)
    # the through-plane network has its own recipe (through_plane/train.py, test_through_plane.py)
    learned = [n for n in zoo.model_names()
               if zoo.get_spec(n).kind not in ("interpolation", "through_plane")
               and n not in OWN_TRAINING]
    ci_models = {load_config(CONFIG_DIR / "ci" / f"{n}.yaml")["model"] for n in CI_RECIPES}
    full_models = {load_config(p)["model"] for p in CONFIG_DIR.glob("*.yaml")}
    assert set(learned) <= ci_models, f"no CI recipe for {set(learned) - ci_models}"
    assert set(learned) <= full_models, f"no full recipe for {set(learned) - full_models}"


@pytest.mark.parametrize("name", list(CI_RECIPES))
def test_recipe_loss_decreases_on_a_fixed_batch(ci_runs, name):
    start, end = ci_runs[name]["fixed_batch_loss"]
    assert np.isfinite(start) and np.isfinite(end)
    assert end < start, f"{name}: fixed-batch loss went from {start} to {end}"


@pytest.mark.parametrize("name", list(CI_RECIPES))
def test_export_is_safetensors_with_a_complete_model_card(ci_runs, name):
    export = Path(ci_runs[name]["export"])
    card = json.loads(export.with_suffix(".json").read_text(encoding="utf-8"))
    for key in ("model", "scales", "config", "modality", "training_data", "licence", "steps",
                "metrics", "normalisation", "parameter_count", "cpu_seconds"):
        assert key in card, f"{name}: card lacks {key}"
    assert card["steps"] == _ci_config(name)["train"]["steps"] and card["training_data"] and card["licence"]
    assert not set(card["training_data"]) & set(card["validation_data"])
    spec = zoo.get_spec(card["model"])
    network = zoo.build_network(spec.name, scale=max(card["scales"]), **card["config"])
    zoo.load_weights_into(network, spec, export, card["scales"][-1], card["config"])
    assert card["parameter_count"] == zoo.parameter_count(network)
    if spec.kind != "detector":
        for scale_metrics in card["metrics"].values():
            assert {"psnr", "ssim", "ms_ssim", "uqi"} <= set(scale_metrics["model"])
            assert scale_metrics["bicubic"]["psnr"] > 20
    else:  # the card is what roi.detect_lesion_roi reads: scale x1, the recipe's threshold
        assert card["scales"] == [1]
        assert card["score_threshold"] == _ci_config(name)["score_threshold"]
        from MedSRLib.roi import focus as roi
        assert roi.load_detector(export)[1]["score_threshold"] == card["score_threshold"]


def test_validation_patients_never_reach_training():
    config = load_config(CONFIG_DIR / "edsr_baseline_x2.yaml", [f"data.root={DATA_ROOT}"])
    split = tdata.split_sources(config["data"]["sources"], DATA_ROOT)
    train_patients = {i.patient for i in split.train}
    validation = {i.patient for i in split.validation}
    assert {"STS_012", "STS_014", "totalseg-example-ct", "brain-t1-gd-skullstripped"} <= validation
    assert not train_patients & validation
    assert not any("totalseg-example-ct" in i.path for i in split.train)  # 3 mm and DICOM copies too
    xrays = sorted(i.path for i in split.train + split.validation if i.path.startswith("xray"))
    assert {i.path for i in split.validation if i.path.startswith("xray")} == set(xrays[-10:])


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    overrides = ["train.steps=6", "train.checkpoint_every=3", "train.val_every=3", "train.log_every=1"]
    straight = train(_ci_config("srresnet", *overrides), tmp_path / "straight", progress=False)
    train(_ci_config("srresnet", *overrides[1:], "train.steps=3"), tmp_path / "resumed", progress=False)
    resumed = train(_ci_config("srresnet", *overrides), tmp_path / "resumed", resume=True, progress=False)
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"][3:]]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_metrics_log_holds_one_run_history(tmp_path):
    from MedSRLib.training.trainer import _Logger

    def steps_in_file():
        return [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    first = _Logger(tmp_path, True, "run")
    for step in (1, 2, 3, 4):
        first.write({"step": step, "loss": 1.0})
    with (tmp_path / "metrics.jsonl").open("a") as stream:
        stream.write('{"step": 5, "lo')  # torn line of an interrupted run
    _Logger(tmp_path, True, "run", start_step=2).write({"step": 3, "loss": 0.5})  # resumed at 2
    assert steps_in_file() == [1, 2, 3]
    _Logger(tmp_path, True, "run").write({"step": 1, "loss": 0.1})  # a new run in the same folder
    assert steps_in_file() == [1]


def test_torchrun_two_ranks_end_identical_and_only_rank0_writes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSR_DATA_ROOT": str(DATA_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "MedSRLib.training", str(CONFIG_DIR / "ci" / "srcnn.yaml"), "--out", str(out),
               "--steps", "4", "--no-progress", "--set", "train.log_every=1", "--set", "train.val_every=2"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one writer: each step logged once
    final = records[-1]["final"]
    assert final["world_size"] == 2 and final["weight_spread"] == 0.0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["checkpoints/best.pt", "checkpoints/last.pt", "metrics.jsonl",
                       "srcnn_x2.json", "srcnn_x2.safetensors"]


def test_bf16_autocast_switch_trains(tmp_path):
    summary = train(_ci_config("srcnn", "train.precision=bf16", "train.steps=4", "train.val_every=4"),
                    tmp_path, progress=False)
    assert all(np.isfinite(r["loss"]) for r in summary["history"])


def test_foreground_sampling_centres_patches_on_the_body():
    volume = np.zeros((1, 8, 200, 200), dtype=np.float32)
    volume[:, :, 90:110, 90:110] = 1.0
    item = tdata.ForegroundIndicesd(0.5)({"image": volume})

    def foreground_share(probability):
        sampler = tdata.RandSlicePatchd(32, axes=(0,), num_samples=50, foreground_probability=probability)
        sampler.set_random_state(0)
        return np.mean([float((p["image"] > 0.5).any()) for p in sampler(item)])
    assert foreground_share(1.0) == 1.0
    assert foreground_share(0.0) < 0.3


def test_batches_depend_only_on_epoch_and_index_not_on_resume_position():
    items = [{"image": np.random.default_rng(i).random((1, 4, 64, 64), dtype=np.float32),
              "foreground_indices": np.arange(100)} for i in range(3)]
    dataset = tdata.SeededVisitDataset(items, tdata.random_transforms({"patch_size": 16}), 12, seed=5)
    sampler = tdata.ResumableDistributedSampler(dataset, 1, 0, seed=5)
    sampler.set_position(2, 0)
    full = [dataset[key] for key in sampler]
    sampler.set_position(2, 7)
    tail = [dataset[key] for key in sampler]
    assert len(tail) == 5
    for a, b in zip(full[7:], tail):
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_vgg_loss_needs_a_local_file_and_loads_one(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(ValueError, match="weights"):
        VGGPerceptualLoss(layer="relu1_2")
    reference = vgg19_features("relu2_2")
    save_file({f"features.{k}": v for k, v in reference.state_dict().items()}, str(tmp_path / "vgg.safetensors"))
    loss = VGGPerceptualLoss(layer="relu2_2", weights=tmp_path / "vgg.safetensors")
    assert torch.equal(loss.features[0].weight, reference[0].weight)
    image = torch.rand(2, 1, 32, 32)
    assert float(loss(image, image)) == 0.0 and float(loss(image, image.flip(-1))) > 0
    with pytest.raises(FileNotFoundError):
        VGGPerceptualLoss(weights=tmp_path / "missing.safetensors")


def test_adversarial_and_composite_losses():
    adversarial = AdversarialLoss()
    confident = torch.tensor([[8.0]]), torch.tensor([[-8.0]])
    fooled = torch.tensor([[-8.0]]), torch.tensor([[8.0]])
    assert adversarial.discriminator_loss(*confident) < 0.01 < adversarial.discriminator_loss(*fooled)
    assert adversarial.generator_loss(torch.tensor([[8.0]])) < adversarial.generator_loss(torch.tensor([[-8.0]]))
    total, parts = build_loss([{"type": "l1", "weight": 2.0}, {"type": "mse"}])(
        torch.full((1, 1, 8, 8), 0.5), torch.zeros(1, 1, 8, 8))
    assert parts == {"l1": 0.5, "mse": 0.25} and float(total) == pytest.approx(1.25)


def test_cli_help_explains_training_on_your_own_folder(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "own folder" in text and "glob" in text and "torchrun" in text


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_full_recipe_resolves_its_data_and_model(path):
    config = load_config(path, [f"data.root={DATA_ROOT}"])
    spec = zoo.get_spec(config["model"])
    sources = config["data"]["sources"]
    extra = [s for s in sources if s.get("prepared_by") and not list(DATA_ROOT.glob(s["glob"]))]
    for source in extra:  # made by a script from outside the shared data: the error says which
        assert (REPO / source["prepared_by"]).is_file()
        with pytest.raises(ValueError, match=source["prepared_by"]):
            tdata.split_sources([source], DATA_ROOT)
    split = tdata.split_sources([s for s in sources if s not in extra], DATA_ROOT)
    assert split.train and split.validation
    assert not {i.patient for i in split.train} & {i.patient for i in split.validation}
    if spec.kind == "detector":
        assert all(i.mask for i in split.train)
    if config["data"].get("patch_centres") == "lesion":
        assert all(i.mask for i in split.train)
    if any(i.licence.startswith("BraTS") for i in split.train):
        # default SR weights train on the permissive part only (BraTS is non-commercial)
        assert config["model"] not in zoo.DEFAULT_PREFERENCE
    assert config["optimizer"]["lr"] > 0


def test_a_grown_network_starts_as_the_one_it_grew_from(tmp_path):
    """init_zero: blocks the init file lacks get a zero last convolution, so the deeper network's
    output equals the shipped one's; a pattern matching nothing is refused."""
    config = load_config(CONFIG_DIR / "ci" / "edsr_lite.yaml",
                         ["model_config={num_blocks: 9}", f"data.root={DATA_ROOT}",
                          f"init_from={zoo.WEIGHTS_DIR / 'edsr_lite_x2.safetensors'}",
                          "init_zero=[trunk.blocks.*.body.1.*]", "scale=2"])
    trainer = Trainer(config, tmp_path / "grown", progress=False)
    shipped = zoo.load_model("edsr_lite", (2, 2)).network
    grown = trainer.network
    assert len(grown.trunk.blocks) == len(shipped.trunk.blocks) + 1
    x = torch.rand(1, 1, 20, 20)
    with torch.no_grad():
        assert torch.equal(grown(x), shipped(x))
        assert grown.trunk.blocks[-1].body[1].conv.weight.abs().sum() == 0
    config["init_zero"] = ["no.such.tensor"]
    with pytest.raises(ValueError, match="init_zero"):
        Trainer(config, tmp_path / "nothing", progress=False)


def test_box_targets_follow_the_detector_convention_cx_cy_w_h():
    mask = np.zeros((1, 40, 80), dtype=np.uint8)
    mask[0, 10:20, 20:60] = 1  # rows 10..19 (y), columns 20..59 (x)
    box = tdata.BoxFromMaskd()({"mask": mask})["box"]
    assert torch.allclose(box, torch.tensor([40 / 80, 15 / 40, 40 / 80, 10 / 40]))
    assert torch.equal(tdata.BoxFromMaskd()({"mask": np.zeros((1, 8, 8))})["box"], torch.zeros(4))


def test_sources_take_explicit_file_lists_and_reject_unknown_patients():
    split = tdata.split_sources([{"files": ["sarcoma/STS_001/CT_image.nii.gz", "sarcoma/STS_002/CT_image.nii.gz"],
                                  "patient": "parent", "validation": ["STS_002"]}], DATA_ROOT)
    assert [i.patient for i in split.train] == ["STS_001"] and [i.patient for i in split.validation] == ["STS_002"]
    with pytest.raises(ValueError, match="STS_099"):
        tdata.split_sources([{"glob": "sarcoma/*/CT_image.nii.gz", "patient": "parent",
                              "validation": ["STS_099"]}], DATA_ROOT)


def test_whole_slice_sampler_resizes_slices_and_prefers_lesion_slices():
    volume = np.zeros((1, 12, 30, 50), dtype=np.float32)
    mask = np.zeros((1, 12, 30, 50), dtype=np.uint8)
    mask[0, 7, 10:20, 5:15] = 1
    volume[0, 7] = 1.0
    foreground = np.flatnonzero(mask[0].reshape(-1))
    sampler = tdata.RandWholeSliced(size=16, num_samples=6, lesion_probability=1.0)
    sampler.set_random_state(0)
    items = sampler({"image": volume, "mask": mask, "foreground_indices": foreground})
    assert len(items) == 6
    for item in items:
        assert item["image"].shape == (1, 16, 16) and item["mask"].shape == (1, 16, 16)
        assert item["mask"].sum() > 0 and float(item["image"].max()) == pytest.approx(1.0)
        box = tdata.BoxFromMaskd()(item)["box"]   # the same normalised box as on the full slice
        assert torch.allclose(box, torch.tensor([10 / 50, 15 / 30, 10 / 50, 10 / 30]), atol=1 / 16)
    sampler = tdata.RandWholeSliced(size=16, num_samples=40, lesion_probability=0.0)
    sampler.set_random_state(1)
    empty = [item for item in sampler({"image": volume, "mask": mask, "foreground_indices": foreground})
             if item["mask"].sum() == 0]
    assert len(empty) > 20          # 11 of 12 slices hold no lesion


def test_recipe_extends_another_and_a_new_optimizer_type_replaces_the_old(tmp_path):
    base = load_config("vdsr_x2")
    child = load_config("vdsr_cpu_x2")
    assert base["optimizer"]["type"] == "sgd" and "grad_clip" in base["optimizer"]
    assert child["optimizer"] == {"type": "adam", "lr": 1.0e-4, "betas": [0.9, 0.999], "weight_decay": 0.0}
    assert child["data"]["sources"] == base["data"]["sources"]       # inherited
    assert child["data"]["patch_size"] == 48 and child["name"] == "vdsr_cpu_x2"
    assert load_config("vdsr_cpu_x4")["init_from"].endswith("vdsr_x2.safetensors")
    (tmp_path / "a.yaml").write_text("extends: " + str(tmp_path / "b.yaml") + "\nmodel: srcnn\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("extends: " + str(tmp_path / "a.yaml") + "\nmodel: srcnn\n", encoding="utf-8")
    with pytest.raises(ValueError, match="loops back"):
        load_config(tmp_path / "a.yaml")


def test_whole_slice_sr_validation_uses_the_resized_slice():
    """Paper 002's protocol (whole X-rays at 256x256 HR) holds for validation slices too."""
    config = load_config("srresnet_xr_x4", [f"data.root={DATA_ROOT}"])
    split = tdata.split_sources(config["data"]["sources"], DATA_ROOT)
    volumes = tdata.volume_dataset([i.as_dict(DATA_ROOT) for i in split.validation[:2]], config["data"])
    slices = tdata.validation_slices(volumes, config["data"], 4)
    assert slices and all(tuple(s.image.shape[-2:]) == (256, 256) for s in slices)


def test_scheduler_warmup_ramps_linearly_then_follows_the_milestones():
    from types import SimpleNamespace

    from MedSRLib.training.trainer import Trainer

    fake = SimpleNamespace(config={"scheduler": {"warmup": 4, "milestones": [6], "gamma": 0.5}})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = Trainer._scheduler(fake, optimizer)
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.5, 0.5]


def test_data_root_flag_wins_over_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSR_DATA_ROOT", str(tmp_path / "nowhere"))
    status = train_main(["ci/srcnn", "--data-root", str(DATA_ROOT), "--steps", "1", "--no-progress",
                         "--out", str(tmp_path / "run"), "--set", "train.val_every=1"])
    assert status == 0 and (tmp_path / "run" / "srcnn_x2.safetensors").is_file()
    assert os.environ["MEDSR_DATA_ROOT"] == str(tmp_path / "nowhere")  # restored afterwards


def test_data_modalities_keeps_only_those_sources_and_their_hold_outs():
    config = load_config(CONFIG_DIR / "edsr_lite_x2.yaml", [f"data.root={DATA_ROOT}", "data.modalities=[CT]"])
    split = tdata.split_sources(config["data"]["sources"], DATA_ROOT, config["data"]["modalities"])
    everything = tdata.split_sources(config["data"]["sources"], DATA_ROOT)
    assert {i.modality for i in split.train + split.validation} == {"CT"}
    assert {i.path for i in split.train} == {i.path for i in everything.train if i.modality == "CT"}
    assert {i.patient for i in split.validation} == {"STS_012", "STS_014", "totalseg-example-ct"}
    assert any(i.modality == "MR" for i in everything.train)
    with pytest.raises(ValueError, match="XR"):
        tdata.split_sources(config["data"]["sources"], DATA_ROOT, ["XR"])
