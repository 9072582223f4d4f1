"""`medsr batch` / `MedSRLib.batch`: a cohort, resumable, on local Ray workers or in one process.

The Ray tests run the real command with an embedded local Ray runtime (2 workers x 1 thread)
on small volumes; the same cohort without Ray (the `ray` module hidden) must give
voxel-identical outputs. The in-process tests use the API with `use_ray=False`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import MedSRLib
from MedSRLib.cohort import MANIFEST_NAME, cases, manifest
from MedSRLib.errors import InputError

from conftest import make_volume

CT_DICOM = "ct/crlm-ct-1004-dicom"
LAUNCH = ("import sys\n"
          "if sys.argv[1] == 'hide-ray':\n"
          "    sys.modules['ray'] = None  # as if Ray were not installed\n"
          "sys.argv = ['medsr'] + sys.argv[2:]\n"
          "from MedSRLib.cli import console_main\n"
          "console_main()\n")


def medsr(*args: str, hide_ray: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LAUNCH, "hide-ray" if hide_ray else "-", *args],
                          capture_output=True, text=True, timeout=timeout)


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def events(stderr: str) -> list[dict]:
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".medsr-" in p.name]


def raylet_pids() -> set[int]:
    result = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True)
    return {int(pid) for pid in result.stdout.split()}


def build_cohort(root: Path, shared_data: Path) -> Path:
    """Six cases: NIfTI, NRRD, MetaImage, float NRRD, a 4-slice DICOM series, a corrupt file."""
    (root / "p1").mkdir(parents=True)
    (root / "p2" / "ct-dicom").mkdir(parents=True)
    sitk.WriteImage(make_volume(seed=1), str(root / "p1" / "a.nii.gz"))
    sitk.WriteImage(make_volume(seed=2), str(root / "p1" / "b.nrrd"))
    sitk.WriteImage(make_volume(seed=3, dtype=np.uint16), str(root / "c.mha"))
    sitk.WriteImage(make_volume(seed=4, dtype=np.float32), str(root / "p2" / "d.nrrd"))
    for name in sorted(os.listdir(shared_data / CT_DICOM))[:4]:
        shutil.copy(shared_data / CT_DICOM / name, root / "p2" / "ct-dicom" / name)
    (root / "p2" / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a NIfTI file")
    return root


# each output keeps its input's format; the DICOM series becomes NRRD
EXPECTED_OUTPUTS = {"p1/a.nii.gz", "p1/b.nrrd", "c.mha", "p2/d.nrrd", "p2/ct-dicom.nrrd"}


@pytest.fixture(scope="module")
def ray_cohort(tmp_path_factory, shared_data):
    """The six-case cohort and the first `medsr batch` over it with 2 local Ray workers."""
    pytest.importorskip("ray")
    base = tmp_path_factory.mktemp("batch")
    cohort = build_cohort(base / "cohort", shared_data)
    out = base / "out-ray"
    before = raylet_pids()
    run = medsr("batch", str(cohort), "--out", str(out), "--model", "bicubic", "--workers", "2",
                "--threads-per-worker", "1", "--progress", "json")
    return {"cohort": cohort, "out": out, "run": run, "raylets_before": before}


def test_ray_batch_runs_every_case_and_reports_the_corrupt_one(ray_cohort):
    run, out = ray_cohort["run"], ray_cohort["out"]
    assert run.returncode == 3, run.stderr  # some cases failed
    lines = records(out)
    assert len(lines) == 6
    by_status = {status: [r for r in lines if r["status"] == status] for status in ("ok", "failed")}
    assert {r["output"] for r in by_status["ok"]} == EXPECTED_OUTPUTS
    assert [r["input"].endswith("corrupt.nii.gz") for r in by_status["failed"]] == [True]
    assert "corrupt.nii.gz" in by_status["failed"][0]["error"]
    for record in by_status["ok"]:
        output = out / record["output"]
        assert output.stat().st_size == record["output_bytes"]
        assert record["model"] == "bicubic" and record["seconds"] > 0
        assert record["peak_memory_mb"] > 0
    assert len({r["worker"] for r in lines}) == 2  # both Ray workers took cases
    found = events(run.stderr)
    assert "2 Ray worker(s) x 1 thread(s) on the local Ray runtime" in found[0]["runner"]
    progress = [e for e in found if e["event"] == "case"]
    assert len(progress) == 6 and progress[-1]["remaining"] == 0
    assert all(e["volumes_per_hour"] > 0 and e["eta_seconds"] is not None for e in progress)
    dicom = sitk.ReadImage(str(out / "p2" / "ct-dicom.nrrd"))
    assert dicom.GetSize() == (1024, 1024, 4)
    assert not temporaries(out)
    assert raylet_pids() <= ray_cohort["raylets_before"]  # the embedded runtime is shut down


def test_ray_rerun_redoes_exactly_the_deleted_output(ray_cohort):
    out = ray_cohort["out"]
    if ray_cohort["run"].returncode != 3:
        pytest.skip("the first run failed (see the test above)")
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.nrrd") if p.name != "b.nrrd"}
    (out / "p1" / "b.nrrd").unlink()
    before = len(records(out))
    run = medsr("batch", str(ray_cohort["cohort"]), "--out", str(out), "--model", "bicubic",
                "--workers", "2", "--threads-per-worker", "1", "--progress", "none")
    assert run.returncode == 3, run.stderr  # the corrupt case is still failed
    rerun = records(out)[before:]
    assert [r["output"] for r in rerun if r["status"] == "ok"] == ["p1/b.nrrd"]
    assert sorted(r["output"] for r in rerun if r["status"] == "skipped") == sorted(
        EXPECTED_OUTPUTS - {"p1/b.nrrd"})
    failed = [r for r in rerun if r["status"] == "failed"]
    assert len(failed) == 1 and "not retried" in failed[0]["note"]
    assert (out / "p1" / "b.nrrd").is_file()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing else was rewritten
    assert "1 ok, 4 skipped (done earlier), 1 failed" in run.stderr


def test_without_ray_the_same_cohort_gives_voxel_identical_outputs(ray_cohort, tmp_path):
    out = tmp_path / "out-no-ray"
    run = medsr("batch", str(ray_cohort["cohort"]), "--out", str(out), "--model", "bicubic",
                "--threads-per-worker", "1", "--progress", "none", hide_ray=True)
    assert run.returncode == 3, run.stderr
    assert "Ray is not installed" in run.stderr and "MedSRLib[cluster]" in run.stderr
    for relative in EXPECTED_OUTPUTS:
        with_ray = sitk.ReadImage(str(ray_cohort["out"] / relative))
        without = sitk.ReadImage(str(out / relative))
        assert np.array_equal(sitk.GetArrayFromImage(with_ray), sitk.GetArrayFromImage(without))
        assert with_ray.GetPixelID() == without.GetPixelID()
        assert with_ray.GetOrigin() == without.GetOrigin()
        assert with_ray.GetSpacing() == without.GetSpacing()
        assert with_ray.GetDirection() == without.GetDirection()


# --- in one process (API) -------------------------------------------------------------------


def small_cohort(root: Path, count: int = 3) -> Path:
    root.mkdir(parents=True)
    for index in range(count):
        sitk.WriteImage(make_volume(seed=index), str(root / f"v{index}.nrrd"))
    return root


def run_in_process(inputs, out, **options):
    options.setdefault("model", "bicubic")
    return MedSRLib.batch(inputs, out, use_ray=False, threads_per_worker=1, **options)


def test_table_sets_output_model_and_scale_per_row(tmp_path):
    source = small_cohort(tmp_path / "in", 2)
    table = tmp_path / "cases.csv"
    table.write_text("input,output,model,scale\n"
                     "in/v0.nrrd,renamed/first.nii.gz,lanczos,1x1x2\n"
                     "in/v1.nrrd,,,\n", encoding="utf-8")
    summary = run_in_process([table], tmp_path / "out")
    assert (summary.ok, summary.failed) == (2, 0)
    first = sitk.ReadImage(str(tmp_path / "out" / "renamed" / "first.nii.gz"))
    assert first.GetSize() == (24, 20, 12)  # (x, y, z) with z doubled
    by_output = {r["output"]: r for r in summary.records}
    assert by_output["renamed/first.nii.gz"]["model"] == "lanczos"
    assert by_output["renamed/first.nii.gz"]["factors_xyz"] == [1, 1, 2]
    second = sitk.ReadImage(str(tmp_path / "out" / "in" / "v1.nrrd"))
    assert second.GetMetaData("medsr_model") == "bicubic" and second.GetSize() == (48, 40, 6)
    assert source.is_dir()


def test_table_errors_name_the_line(tmp_path):
    table = tmp_path / "cases.tsv"
    table.write_text("input\tscale\nmissing.nrrd\t2\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2.*missing.nrrd"):
        run_in_process([table], tmp_path / "out")
    table.write_text("path\n", encoding="utf-8")
    with pytest.raises(InputError, match="first row must name the columns"):
        run_in_process([table], tmp_path / "out")


def test_folder_search_mirrors_the_tree_and_skips_the_output_folder(tmp_path, shared_data):
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / "mixed").mkdir()
    sitk.WriteImage(make_volume(), str(root / "a" / "b" / "x.nii.gz"))
    sitk.WriteImage(make_volume(), str(root / "a" / "x.nrrd"))
    sitk.WriteImage(make_volume(), str(root / "a" / "x.mha"))  # collides with x.nrrd -> x.nrrd
    (root / "a" / "notes.txt").write_text("not an image", encoding="utf-8")
    (root / ".hidden.nrrd").write_text("skipped", encoding="utf-8")
    for series in (CT_DICOM, "mr/pelvis-t2-dicom"):  # two series in one folder
        for name in sorted(os.listdir(shared_data / series))[:3]:
            shutil.copy(shared_data / series / name, root / "mixed" / f"{series[:2]}-{name}")
    out = root / "sr"  # an output folder inside the input folder is not searched
    (out).mkdir()
    sitk.WriteImage(make_volume(), str(out / "old.nrrd"))
    found = cases.discover([root], out, "nrrd")
    outputs = sorted(c.output.relative_to(out.resolve()).as_posix() for c in found)
    assert outputs[:3] == ["a/b/x.nrrd", "a/x.mha.nrrd", "a/x.nrrd.nrrd"]
    series = [c for c in found if c.series_uid]
    assert len(series) == 2 and all(c.input.name == "mixed" for c in series)
    assert all(c.output.parent.name == "mixed" and c.output.suffix == ".nrrd" for c in series)
    with pytest.raises(InputError, match="must not be an input folder"):
        cases.discover([root], root, "nrrd")


def test_rerun_skips_done_cases_and_replaces_changed_outputs_only_with_overwrite(tmp_path):
    source = small_cohort(tmp_path / "in")
    out = tmp_path / "out"
    assert run_in_process([source], out).ok == 3
    # a changed output (size differs from the manifest), and one without an ok line
    (out / "v0.nrrd").write_bytes((out / "v0.nrrd").read_bytes()[:-10])
    lines = records(out)
    (out / MANIFEST_NAME).write_text("".join(json.dumps(r) + "\n" for r in lines
                                             if r["output"] != "v1.nrrd"), encoding="utf-8")
    changed = (out / "v0.nrrd").read_bytes()
    with pytest.raises(InputError, match=r"v0\.nrrd, .*v1\.nrrd: output exists and was not "
                                         "written by medsr batch.*--overwrite"):
        run_in_process([source], out)
    assert (out / "v0.nrrd").read_bytes() == changed and len(records(out)) == 2
    summary = run_in_process([source], out, overwrite=True)
    assert (summary.ok, summary.skipped, summary.failed) == (2, 1, 0)
    assert {r["output"] for r in summary.records if r["status"] == "ok"} == {"v0.nrrd", "v1.nrrd"}
    assert sitk.ReadImage(str(out / "v0.nrrd")).GetSize() == (48, 40, 6)
    # other options make every case due again
    summary = run_in_process([source], out, model="lanczos")
    assert summary.ok == 3
    assert run_in_process([source], out, model="lanczos").skipped == 3


def test_torn_last_manifest_line_is_ignored_and_the_next_starts_fresh(tmp_path):
    source = small_cohort(tmp_path / "in", 2)
    out = tmp_path / "out"
    run_in_process([source], out)
    (out / "v1.nrrd").unlink()
    with open(out / MANIFEST_NAME, "a") as handle:
        handle.write('{"input": "/x", "output": "v1.nr')  # killed while writing
    summary = run_in_process([source], out)
    assert (summary.ok, summary.skipped) == (1, 1)
    assert any("1 unreadable line" in note for note in summary.notes)
    text = (out / MANIFEST_NAME).read_text(encoding="utf-8")
    assert text.endswith("\n") and len(text.splitlines()) == 5
    latest, unreadable = manifest.read_records(out / MANIFEST_NAME)
    assert unreadable == 1 and latest["v1.nrrd"]["status"] == "ok"


def test_failed_case_is_retried_when_its_input_changes_or_when_asked(tmp_path):
    source = small_cohort(tmp_path / "in", 1)
    bad = source / "bad.nrrd"
    bad.write_text("NRRD0004\ntype: what\n\n", encoding="utf-8")
    out = tmp_path / "out"
    first = run_in_process([source], out)
    assert (first.ok, first.failed) == (1, 1) and not first.all_ok
    again = run_in_process([source], out)
    assert (again.ok, again.skipped, again.failed) == (0, 1, 1)
    assert again.records[0]["seconds"] == 0.0  # carried over, not run
    assert run_in_process([source], out, retry_failed=True).records[-1]["seconds"] > 0
    sitk.WriteImage(make_volume(seed=9), str(bad))  # fixed input
    fixed = run_in_process([source], out)
    assert (fixed.ok, fixed.skipped, fixed.failed) == (1, 1, 0) and fixed.all_ok


def test_model_is_loaded_once_per_worker(tmp_path, monkeypatch):
    from MedSRLib.runtime import model_cache
    from MedSRLib.models import registry as zoo

    model_cache.clear()
    loads = []
    original = zoo.load_model
    monkeypatch.setattr(zoo, "load_model", lambda *a, **k: loads.append(a) or original(*a, **k))
    summary = run_in_process([small_cohort(tmp_path / "in", 4)], tmp_path / "out")
    assert summary.ok == 4 and len(loads) == 1


def test_second_batch_into_a_folder_being_written_is_refused(tmp_path):
    source = small_cohort(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    with manifest.ManifestWriter(out / MANIFEST_NAME):
        with pytest.raises(InputError, match="another `medsr batch`"):
            run_in_process([source], out)


def test_bad_arguments_are_refused_before_any_case(tmp_path, monkeypatch):
    source = small_cohort(tmp_path / "in", 1)
    out = tmp_path / "out"
    with pytest.raises(TypeError, match="threads_per_worker"):
        MedSRLib.batch([source], out, threads=2)
    with pytest.raises(InputError, match="unknown model"):
        run_in_process([source], out, model="no-such-model")
    with pytest.raises(InputError, match="workers"):
        MedSRLib.batch([source], out, use_ray=False, workers=2)
    import MedSRLib.cohort as cohort
    monkeypatch.setattr(cohort, "import_ray", lambda: None)  # as if Ray were not installed
    with pytest.raises(InputError, match=r"MedSRLib\[cluster\]"):
        MedSRLib.batch([source], out, ray_address="auto")
    assert not out.exists()


def test_cli_usage_errors_exit_2(tmp_path):
    run = medsr("batch", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "out"))
    assert run.returncode == 2 and "no such file or folder" in run.stderr
    run = medsr("batch", str(tmp_path), "--out", str(tmp_path / "o"), "--no-ray", "--workers", "2")
    assert run.returncode == 2 and "needs Ray" in run.stderr


def test_dicom_output_format_writes_a_series_per_dicom_case(tmp_path, shared_data):
    pytest.importorskip("MedSRLib.io.dicom_export")
    root = tmp_path / "in"
    (root / "ct").mkdir(parents=True)
    for name in sorted(os.listdir(shared_data / CT_DICOM))[:3]:
        shutil.copy(shared_data / CT_DICOM / name, root / "ct" / name)
    sitk.WriteImage(make_volume(), str(root / "volume.nrrd"))
    summary = run_in_process([root], tmp_path / "out", output_format="dicom")
    assert (summary.ok, summary.failed) == (1, 1)
    assert "is not a DICOM series" in [r for r in summary.records if r["status"] == "failed"][0]["error"]
    series = MedSRLib.read_volume(tmp_path / "out" / "ct")
    reference = run_in_process([root / "ct"], tmp_path / "ref")
    assert reference.ok == 1
    expected = sitk.ReadImage(str(tmp_path / "ref" / "ct.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(series), sitk.GetArrayFromImage(expected))
    assert run_in_process([root], tmp_path / "out", output_format="dicom").skipped == 1


@pytest.mark.parametrize("runner", ["one process", "ray"])
def test_ctrl_c_stops_cleanly_and_the_rerun_continues(tmp_path, runner):
    if runner == "ray":
        pytest.importorskip("ray")
    source = tmp_path / "in"
    source.mkdir()
    for index in range(6):  # a learned (untrained) network: about a second per case
        sitk.WriteImage(make_volume(shape_kji=(16, 96, 96), seed=index), str(source / f"v{index}.nrrd"))
    out = tmp_path / "out"
    command = [sys.executable, "-c", LAUNCH, "-", "batch", str(source), "--out", str(out),
               "--model", "edsr_lite", "--allow-untrained", "--threads", "1", "--progress", "none"]
    before = raylet_pids()
    process = subprocess.Popen(command + (["--workers", "2"] if runner == "ray" else ["--no-ray"]),
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if (out / MANIFEST_NAME).is_file() and (out / MANIFEST_NAME).read_text(encoding="utf-8").count("\n") >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr
    assert "cancelled" in stderr and "run the same command again" in stderr
    done = records(out)
    assert 1 <= len(done) < 6 and all(r["status"] == "ok" for r in done)
    assert sorted(p.name for p in out.glob("*.nrrd")) == sorted(r["output"] for r in done)
    assert not temporaries(out)
    assert raylet_pids() <= before
    # the rerun continues (in one process: the manifest does not care who ran a case)
    rerun = subprocess.run(command + ["--no-ray"], capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    lines = records(out)[len(done):]
    assert sorted(r["output"] for r in lines if r["status"] == "skipped") == sorted(
        r["output"] for r in done)
    assert len([r for r in lines if r["status"] == "ok"]) == 6 - len(done)
    assert len(list(out.glob("*.nrrd"))) == 6
