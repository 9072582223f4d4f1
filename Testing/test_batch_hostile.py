"""`medsr batch` against hostile cohorts and surroundings: colliding names, outputs that are
inputs or foreign files, a full disk, a deleted or symlinked manifest, unreachable clusters,
signals at awkward moments and a driver killed outright.

Every test runs on real files; the full-disk tests use real tmpfs mounts (skipped where this
process cannot mount one). Only the orphan test starts Ray.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import MedSRLib
from MedSRLib import cohort
from MedSRLib.cohort import MANIFEST_NAME, RAY_MIN_CASES
from MedSRLib.errors import InputError

from conftest import make_volume

LAUNCH = ("import sys\n"
          "from MedSRLib.cohort import runners\n"
          "runners.RAY_JOIN_SECONDS = float(sys.argv[1])\n"
          "sys.argv = ['medsr'] + sys.argv[2:]\n"
          "from MedSRLib.cli import console_main\n"
          "console_main()\n")


def medsr_command(*args: str, join_seconds: float = 30.0) -> list[str]:
    return [sys.executable, "-c", LAUNCH, str(join_seconds), *args]


def medsr(*args: str, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(medsr_command(*args, **kwargs), capture_output=True, text=True,
                          timeout=timeout)


def run_in_process(inputs, out, **options):
    options.setdefault("model", "bicubic")
    options.setdefault("use_ray", False)
    return MedSRLib.batch(inputs, out, threads_per_worker=1, **options)


def lines_of(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def voxels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@contextmanager
def tmpfs(folder: Path, size: str):
    """A real tmpfs of `size` at `folder`; skips the test where mounting is impossible."""
    folder.mkdir(parents=True, exist_ok=True)
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> None:
    """Fill the file system of `folder` until not one more byte fits."""
    descriptor = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for block in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(descriptor, b"\0" * block)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    finally:
        os.close(descriptor)


# --- outputs that cannot collide --------------------------------------------------------------


def test_equal_file_names_in_different_folders_get_distinct_outputs(tmp_path):
    for index, relative in enumerate(("p1/ct.nii.gz", "p2/ct.nii.gz", "x.nii.gz")):
        write(make_volume(seed=index), tmp_path / relative)
    out = tmp_path / "OUT"
    command = medsr_command("batch", "p1/ct.nii.gz", "p2/ct.nii.gz", "x.nii.gz", "-o", str(out),
                            "--model", "bicubic", "--no-ray")
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "3 cases: 3 ok" in run.stderr
    outputs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert outputs == ["p1/ct.nii.gz", "p2/ct.nii.gz", "x.nii.gz"]
    for relative in outputs:  # each output holds its own input, x2 in-plane
        source = voxels(tmp_path / relative)
        result = voxels(out / relative)
        assert result.shape == (source.shape[0], source.shape[1] * 2, source.shape[2] * 2)
        assert np.corrcoef(result[:, ::2, ::2].ravel(), source.ravel())[0, 1] > 0.9
    # resume converges: the same command does nothing more
    again = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert again.returncode == 0 and "3 cases: 0 ok, 3 skipped" in again.stderr, again.stderr


def test_table_outputs_that_collide_are_refused_naming_both_cases(tmp_path):
    a = write(make_volume(seed=1), tmp_path / "a.nii.gz")
    b = write(make_volume(seed=2), tmp_path / "b.nii.gz")
    table = tmp_path / "cases.csv"
    table.write_text("input,output\na.nii.gz,same.nrrd\nb.nii.gz,same.nrrd\n", encoding="utf-8")
    with pytest.raises(InputError, match=f"{a}.* and .*{b}.*would both be written to"):
        run_in_process([table], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the same input named directly and by a table with other options: one output, refused
    table.write_text("input,output,model\na.nii.gz,,lanczos\n", encoding="utf-8")
    with pytest.raises(InputError, match="would both be written to"):
        run_in_process([table, a], tmp_path / "out")


def test_a_table_output_naming_another_cases_input_is_refused(tmp_path):
    write(make_volume(seed=1), tmp_path / "a.nii.gz")
    b = write(make_volume(seed=2), tmp_path / "b.nii.gz")
    before = b.read_bytes()
    table = tmp_path / "cases.csv"
    table.write_text(f"input,output\na.nii.gz,{b}\nb.nii.gz,\n", encoding="utf-8")
    with pytest.raises(InputError, match=f"{b}: the output of .*a.nii.gz would overwrite the "
                                         f"input of {b}"):
        run_in_process([table], tmp_path / "out")
    assert b.read_bytes() == before and not (tmp_path / "out").exists()
    # the same file under another name (a hard link) is the input too
    os.link(b, tmp_path / "b-link.nii.gz")
    table.write_text("input,output\na.nii.gz,../b-link.nii.gz\nb.nii.gz,\n", encoding="utf-8")
    with pytest.raises(InputError, match="would overwrite the input"):
        run_in_process([table], tmp_path / "out")
    assert b.read_bytes() == before


def test_a_file_medsr_did_not_write_is_replaced_only_with_overwrite(tmp_path):
    source = write(make_volume(seed=3), tmp_path / "in" / "v.nrrd")
    out = tmp_path / "out"
    foreign = out / "v.nrrd"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"someone else's file")
    with pytest.raises(InputError, match=f"{foreign}: output exists and was not written by "
                                         "medsr batch.*--overwrite"):
        run_in_process([source.parent], out)
    assert foreign.read_bytes() == b"someone else's file"
    assert not (out / MANIFEST_NAME).exists() or lines_of(out / MANIFEST_NAME) == []
    summary = run_in_process([source.parent], out, overwrite=True)
    assert summary.ok == 1 and voxels(foreign).shape == (6, 40, 48)
    record = lines_of(out / MANIFEST_NAME)[-1]
    assert record["output_bytes"] == foreign.stat().st_size
    assert record["output_mtime_ns"] == foreign.stat().st_mtime_ns
    # what it wrote is its own: a rerun with other options replaces it without --overwrite
    assert run_in_process([source.parent], out, model="lanczos").ok == 1


# --- the manifest ----------------------------------------------------------------------------


def test_a_manifest_that_is_a_symbolic_link_is_refused(tmp_path):
    source = write(make_volume(), tmp_path / "in" / "v.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("do not append here\n", encoding="utf-8")
    (out / MANIFEST_NAME).symlink_to(target)
    with pytest.raises(InputError, match="manifest is a symbolic link"):
        run_in_process([source.parent], out)
    assert target.read_text(encoding="utf-8") == "do not append here\n"
    assert not (out / "v.nrrd").exists()
    (out / MANIFEST_NAME).unlink()
    (out / MANIFEST_NAME).symlink_to(tmp_path / "dangling.jsonl")  # would create its target
    with pytest.raises(InputError, match="manifest is a symbolic link"):
        run_in_process([source.parent], out)
    assert not (tmp_path / "dangling.jsonl").exists()


def test_deleting_the_manifest_mid_run_does_not_let_a_second_batch_in(tmp_path):
    source = tmp_path / "in"
    for index in range(3):
        write(make_volume(seed=index), source / f"v{index}.nrrd")
    out = tmp_path / "out"
    refusals = []

    def on_event(event):
        if event["event"] == "case" and event["output"] == "v0.nrrd":
            (out / MANIFEST_NAME).unlink()
            try:
                run_in_process([source], out)
            except InputError as err:
                refusals.append(str(err))

    summary = run_in_process([source], out, progress=on_event)
    assert summary.ok == 3
    assert len(refusals) == 1 and "another `medsr batch` is writing into this folder" in refusals[0]
    assert any("deleted or replaced during the run" in note for note in summary.notes)
    assert [r["output"] for r in lines_of(out / MANIFEST_NAME)] == ["v1.nrrd", "v2.nrrd"]
    # v0.nrrd is no longer described by the manifest: the next run will not replace it silently
    with pytest.raises(InputError, match="v0.nrrd: output exists and was not written"):
        run_in_process([source], out)


def test_a_full_disk_under_the_manifest_fails_each_case_and_the_batch_continues(tmp_path):
    """The output folder (manifest) on a full tmpfs; the outputs elsewhere (a table's absolute
    output cells): every manifest line hits a real ENOSPC."""
    source = tmp_path / "in"
    for index in range(3):
        write(make_volume(seed=index), source / f"v{index}.nrrd")
    results = tmp_path / "results"
    table = tmp_path / "cases.csv"
    table.write_text("input,output\n" + "".join(f"in/v{i}.nrrd,{results}/v{i}.nrrd\n"
                                               for i in range(3)), encoding="utf-8")
    with tmpfs(tmp_path / "out", "64k") as out:
        (out / MANIFEST_NAME).touch()
        fill(out)
        seen = []
        summary = run_in_process([table], out, progress=seen.append)
        assert (summary.ok, summary.failed, summary.remaining) == (0, 3, 0)
        assert summary.disk_full
        assert [e["status"] for e in seen if e["event"] == "case"] == ["failed"] * 3
        for record in summary.records:
            assert "No space left on device" in record["error"]
            assert "output was removed" in record["error"]
        assert (out / MANIFEST_NAME).read_bytes() == b""  # no half line left behind
        assert not list(results.glob("*.nrrd"))  # nothing unrecorded is left
        assert not [p for p in results.rglob("*") if ".medsr-" in p.name]


def test_a_full_output_disk_fails_cases_cleanly_and_exits_2_at_the_end(tmp_path):
    source = tmp_path / "in"
    rng = np.random.default_rng(0)
    for index in range(6):  # noise: about 590 kB per output; 2 MB holds some, not all
        noise = sitk.GetImageFromArray(rng.integers(-1000, 1000, (8, 96, 96), dtype=np.int16))
        write(noise, source / f"v{index}.nrrd")
    with tmpfs(tmp_path / "out", "2m") as out:
        run = medsr("batch", str(source), "-o", str(out), "--model", "bicubic", "--no-ray",
                    "--progress", "none")
        assert run.returncode == 2, run.stderr
        lines = lines_of(out / MANIFEST_NAME)  # every line whole and parsable
        ok = [r for r in lines if r["status"] == "ok"]
        failed = [r for r in lines if r["status"] == "failed"]
        assert ok and failed and len(ok) + len(failed) == 6
        assert f"{len(ok)} ok, {len(failed)} failed" in run.stderr
        assert "is full; free some space" in run.stderr
        for record in ok:
            assert (out / record["output"]).stat().st_size == record["output_bytes"]
        for record in failed:
            assert "no space left" in record["error"].lower()
            assert not (out / record["output"]).exists()
        assert not [p for p in out.rglob("*") if ".medsr-" in p.name]


# --- runners, Ray and signals ----------------------------------------------------------------


def test_few_cases_run_without_ray_and_keep_their_format(tmp_path):
    source = tmp_path / "in"
    write(make_volume(seed=1), source / "a.nii.gz")
    write(make_volume(seed=2), source / "b.mha")
    write(make_volume(seed=3), source / "c.nrrd")
    png = sitk.Cast(sitk.RescaleIntensity(make_volume(shape_kji=(1, 20, 24))[:, :, 0]),
                    sitk.sitkUInt8)
    write(png, source / "d.png")
    events = []
    summary = MedSRLib.batch([source], tmp_path / "out", model="bicubic", progress=events.append)
    assert summary.ok == 4
    start = events[0]
    assert "no Ray" in start["runner"]
    if cohort.import_ray() is not None:
        assert any(f"fewer than {RAY_MIN_CASES}" in note and "--ray" in note
                   for note in start["notes"])
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != MANIFEST_NAME)
    assert outputs == ["a.nii.gz", "b.mha", "c.nrrd", "d.png"]
    assert sitk.ReadImage(str(tmp_path / "out" / "d.png")).GetSize() == (48, 40)
    forced = run_in_process([source], tmp_path / "out-nrrd", output_format="nrrd")
    assert sorted(r["output"] for r in forced.records) == ["a.nrrd", "b.nrrd", "c.nrrd", "d.nrrd"]


def test_workers_above_the_cpu_count_are_capped_with_a_note():
    cpus = len(os.sched_getaffinity(0))
    if cohort.import_ray() is None:
        with pytest.raises(InputError, match="needs Ray"):
            cohort._plan_runner(100, 1, None, None)
        return
    plan = cohort._plan_runner(100, 1, None, None)
    assert plan.workers == cpus
    assert plan.notes == [f"--workers 100 is more than the {cpus} CPU(s) here: using {cpus} "
                          "(more workers than CPUs only share them and cost memory)"]


def test_an_unreachable_ray_address_fails_fast_with_exit_2(tmp_path):
    pytest.importorskip("ray")
    source = write(make_volume(), tmp_path / "in" / "v.nrrd")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    started = time.monotonic()
    run = medsr("batch", str(source), "-o", str(tmp_path / "out"), "--ray-address",
                f"127.0.0.1:{port}", timeout=120)
    assert run.returncode == 2, run.stderr
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr
    assert time.monotonic() - started < 90  # start-up of Python and torch included
    assert not (tmp_path / "out" / "v.nrrd").exists()


def test_a_silent_ray_address_times_out_with_exit_2(tmp_path):
    """A port that accepts but never answers: Ray would retry for minutes."""
    pytest.importorskip("ray")
    source = write(make_volume(), tmp_path / "in" / "v.nrrd")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        run = medsr("batch", str(source), "-o", str(tmp_path / "out"), "--ray-address",
                    f"127.0.0.1:{port}", join_seconds=3, timeout=150)
    assert run.returncode == 2, run.stderr
    assert f"the Ray cluster at 127.0.0.1:{port} did not answer within 3 s" in run.stderr


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_joining_a_ray_cluster_ends_the_run_at_once(tmp_path, signal_number):
    pytest.importorskip("ray")
    source = write(make_volume(), tmp_path / "in" / "v.nrrd")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.settimeout(120)
        port = silent.getsockname()[1]
        process = subprocess.Popen(medsr_command("batch", str(source), "-o", str(tmp_path / "out"),
                                                 "--ray-address", f"127.0.0.1:{port}"),
                                   stderr=subprocess.PIPE, text=True)
        try:
            silent.accept()[0].close()  # the address probe: the join starts now
            time.sleep(2.0)  # inside ray.init, which retries for 30 s
            sent = time.monotonic()
            process.send_signal(signal_number)
            stderr = process.communicate(timeout=20)[1]
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 130, stderr
    assert time.monotonic() - sent < 10
    assert "cancelled" in stderr and "Traceback" not in stderr


def _ray_descendants(pid: int) -> list:
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "ray" in " ".join([child.name(), *child.cmdline()]).lower():
                found.append(child)
        except psutil.Error:
            pass
    return found


def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path):
    pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    source = tmp_path / "in"
    for index in range(4):  # an untrained learned network: long enough to be killed mid-run
        write(make_volume(shape_kji=(16, 96, 96), seed=index), source / f"v{index}.nrrd")
    out = tmp_path / "out"
    process = subprocess.Popen(medsr_command("batch", str(source), "-o", str(out), "--ray",
                                             "--workers", "100", "--threads-per-worker", "1",
                                             "--model", "edsr_lite", "--allow-untrained",
                                             "--progress", "json"),
                               stderr=subprocess.PIPE, text=True)
    seen: dict[int, object] = {}
    notes = []
    try:
        for line in process.stderr:  # wait for the Ray workers to be up
            for helper in _ray_descendants(process.pid):
                seen[helper.pid] = helper
            if line.startswith("{") and json.loads(line)["event"] == "start":
                notes = json.loads(line)["notes"]
                time.sleep(2.0)
                break
        for helper in _ray_descendants(process.pid):
            seen[helper.pid] = helper
        assert seen, "no Ray process was started"
        process.kill()  # SIGKILL: no clean-up code of the driver runs
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.is_running() and p.status() !=
                                                  psutil.STATUS_ZOMBIE for p in seen.values()):
            time.sleep(0.5)
        left = [f"{p.pid} {p.name()}" for p in seen.values()
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not left, f"Ray processes left running after the driver was killed: {left}"
    cpus = len(os.sched_getaffinity(0))
    assert f"--workers 100 is more than the {cpus} CPU(s) here: using {cpus}" in " ".join(notes)
