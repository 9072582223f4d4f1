"""Issue 14's findings, one test each: hostile but realistic inputs and failing disks end in a
clear error (exit 2, or 130 for a cancel), never a partial output, a lost output or a lost input."""

from __future__ import annotations

import contextlib
import gc
import gzip
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import MedSRLib
from MedSRLib import api, cli
from MedSRLib.io import volumes as io, safe_write
from MedSRLib.runtime import memory_budget
from MedSRLib.evaluation.demo import SAMPLE_PATH
from MedSRLib.errors import InputError

from conftest import make_volume

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def sample_nifti(tmp_path_factory) -> Path:
    """The bundled sample CT (real HU, 256 x 256 x 16 crop of it) as .nii.gz."""
    path = tmp_path_factory.mktemp("nifti") / "ct.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE_PATH))[128:384, 128:384, :], str(path), True)
    return path


def _cli_process(args, **kwargs) -> subprocess.Popen:
    """`python -m MedSRLib.cli ARGS` (the console entry point with its signal handlers)."""
    return subprocess.Popen([sys.executable, "-m", "MedSRLib.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


# ---------------------------------------------------------------------------------------------
# Full disk: no file left, the previous output intact


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "2m"):
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); "
                    "test_file_size_limit_* covers the same failure")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture(scope="module")
def noisy_input(tmp_path_factory) -> Path:
    """Noise does not compress: its x2 output (5 MB raw) cannot fit on a 2 MB disk."""
    path = tmp_path_factory.mktemp("noise") / "noise.nrrd"
    rng = np.random.default_rng(0)
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(-1000, 1000, (20, 128, 128)).astype(np.int16)),
                    str(path))
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_full_disk_exits_2_leaves_no_file_and_keeps_the_previous_output(tmp_path, capsys,
                                                                       noisy_input, suffix):
    with small_tmpfs(tmp_path / "disk") as disk:
        out = disk / f"out{suffix}"
        code, _, err = run_cli(["upscale", noisy_input, out, "--model", "bicubic", "--quiet"], capsys)
        assert code == 2, err
        assert "no space left" in err and "nothing was written" in err
        assert files_in(disk) == []
        previous = make_volume(shape_kji=(2, 8, 8))
        io.write_volume(previous, out)
        before = out.read_bytes()
        code, _, err = run_cli(["upscale", noisy_input, out, "--model", "bicubic", "--overwrite",
                                "--quiet"], capsys)
        assert code == 2 and "no space left" in err
        assert files_in(disk) == [out.name] and out.read_bytes() == before


def _limit_file_size(limit_bytes: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write(), not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_file_size_limit_fails_the_write_cleanly(tmp_path, noisy_input, suffix):
    """The same failing write() as a full disk (EFBIG instead of ENOSPC), without a mount."""
    out = tmp_path / f"out{suffix}"
    io.write_volume(make_volume(shape_kji=(2, 8, 8)), out)
    before = out.read_bytes()
    process = _cli_process(["upscale", noisy_input, out, "--model", "bicubic", "--overwrite",
                            "--quiet"], preexec_fn=_limit_file_size(2 << 20))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert "nothing was written" in err
    assert files_in(tmp_path) == [out.name] and out.read_bytes() == before


def test_an_itk_writer_that_truncates_silently_is_caught(tmp_path, monkeypatch):
    """ITK's NIfTI writer prints "wrote only N of M bytes" and returns: the check sees it."""
    real_write = sitk.WriteImage

    def truncating_write(image, name, *args):
        real_write(image, name, *args)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(io.sitk, "WriteImage", truncating_write)
    for suffix in (".nii", ".nii.gz", ".nrrd", ".mha"):
        with pytest.raises(io.WriteError, match="incomplete"):
            io.write_volume(make_volume(), tmp_path / f"out{suffix}")
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Side files: --roi-json may not be the input, the output or the mask


def test_roi_json_pointing_at_the_input_is_refused_and_the_input_kept(tmp_path, capsys):
    source = tmp_path / "input.nrrd"
    sitk.WriteImage(make_volume(), str(source))
    before = source.read_bytes()
    code, _, err = run_cli(["upscale", source, tmp_path / "out.nrrd", "--model", "bicubic",
                            "--roi", "2,2,1,10,10,4", "--roi-model", "bicubic", "--roi-json",
                            source, "--overwrite", "--quiet"], capsys)
    assert code == 2 and "--roi-json would overwrite the input" in err
    assert source.read_bytes() == before and files_in(tmp_path) == ["input.nrrd"]


def test_roi_json_pointing_at_the_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    source = tmp_path / "input.nrrd"
    sitk.WriteImage(make_volume(), str(source))
    out = tmp_path / "out.nii.gz"
    monkeypatch.setattr(api, "upscale", lambda *a, **k: pytest.fail("ran"))
    code, _, err = run_cli(["upscale", source, out, "--model", "bicubic", "--roi", "2,2,1,10,10,4",
                            "--roi-json", out, "--quiet"], capsys)
    assert code == 2 and "--roi-json would overwrite the output" in err
    assert files_in(tmp_path) == ["input.nrrd"]


def test_output_or_roi_json_pointing_at_the_roi_mask_is_refused(tmp_path, capsys):
    source, mask = tmp_path / "input.nrrd", tmp_path / "mask.nrrd"
    sitk.WriteImage(make_volume(), str(source))
    mask_values = np.zeros((6, 20, 24), np.uint8)
    mask_values[2:4, 5:9, 6:10] = 1
    mask_image = sitk.GetImageFromArray(mask_values)
    mask_image.CopyInformation(make_volume())
    sitk.WriteImage(mask_image, str(mask))
    before = mask.read_bytes()
    for extra in (["--roi-json", mask, "--overwrite"], ["--overwrite"]):
        out = mask if extra == ["--overwrite"] else tmp_path / "out.nrrd"
        code, _, err = run_cli(["upscale", source, out, "--model", "bicubic", "--roi", mask,
                                "--roi-model", "bicubic", *extra, "--quiet"], capsys)
        assert code == 2 and "overwrite the ROI mask" in err, err
    assert mask.read_bytes() == before and files_in(tmp_path) == ["input.nrrd", "mask.nrrd"]


def test_roi_json_and_volume_are_written_together_or_not_at_all(tmp_path, capsys, monkeypatch):
    source = tmp_path / "input.nrrd"
    sitk.WriteImage(make_volume(), str(source))
    real_stage_text = io.stage_text

    def failing_text(text, path, overwrite=False):
        staged = real_stage_text(text, path, overwrite)
        staged._write = lambda name: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        return staged

    monkeypatch.setattr(io, "stage_text", failing_text)
    code, _, err = run_cli(["upscale", source, tmp_path / "out.nrrd", "--model", "bicubic",
                            "--roi", "2,2,1,10,10,4", "--roi-model", "bicubic", "--roi-json",
                            tmp_path / "roi.json", "--quiet"], capsys)
    assert code == 2 and "no space left" in err
    assert files_in(tmp_path) == ["input.nrrd"]  # not the volume without its report


# ---------------------------------------------------------------------------------------------
# Inputs read as they are


@pytest.mark.parametrize("name", ["t.nii.gz", "t.nii"])
def test_truncated_nifti_is_refused_not_zero_filled(tmp_path, capsys, sample_nifti, name):
    data = sample_nifti.read_bytes() if name.endswith(".gz") else gzip.decompress(sample_nifti.read_bytes())
    truncated = tmp_path / name
    truncated.write_bytes(data[: len(data) // 2])
    for command in (["info", truncated], ["upscale", truncated, tmp_path / "out.nrrd", "--model",
                                          "bicubic", "--quiet"]):
        code, _, err = run_cli(command, capsys)
        assert code == 2 and name in err and "truncated" in err, err
    assert files_in(tmp_path) == [name]


def test_truncated_metaimage_says_truncated_not_missing_file(tmp_path):
    path = tmp_path / "t.mha"
    sitk.WriteImage(make_volume(), str(path), False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="t.mha: file is truncated"):
        io.read_volume(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_voxels_in_nifti_are_refused(tmp_path, suffix, bad):
    values = sitk.GetArrayFromImage(make_volume(dtype=np.float32))
    values[2, 3, 4] = bad
    path = tmp_path / f"nan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # SimpleITK hides it
    with pytest.raises(InputError, match="1 NaN or infinite voxel"):
        io.read_volume(path)


def _huge_header(path: Path) -> None:
    """A valid header claiming 1200^3 float32 (6.9 GB) followed by 1 KB of data."""
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.float32)), str(path), False)
    if path.suffix == ".mha":
        header = path.read_bytes().split(b"ElementDataFile")[0].replace(b"DimSize = 4 3 2",
                                                                        b"DimSize = 1200 1200 1200")
        path.write_bytes(header + b"ElementDataFile = LOCAL\n" + bytes(1024))
    else:
        import nibabel as nib
        image = nib.load(str(path))
        header = image.header.copy()
        header.set_data_shape((1200, 1200, 1200))
        header.set_data_offset(352)
        path.write_bytes(header.binaryblock + bytes(4) + bytes(1024))


@pytest.mark.parametrize("name", ["huge.mha", "huge.nii"])
def test_header_claiming_a_huge_volume_is_refused_without_allocating(tmp_path, capsys, name):
    path = tmp_path / name
    _huge_header(path)
    started = time.perf_counter()
    for command in (["info", path], ["upscale", path, tmp_path / "out.nrrd", "--model", "bicubic",
                                     "--quiet"]):
        code, _, err = run_cli(command, capsys)
        assert code == 2 and "6,912,000,000 bytes" in err, err
    assert time.perf_counter() - started < 30  # nothing of 6.9 GB was read or allocated (minutes)
    assert files_in(tmp_path) == [name]


def test_a_complete_volume_larger_than_memory_is_refused_naming_the_size(tmp_path, monkeypatch):
    path = tmp_path / "vol.nrrd"
    sitk.WriteImage(make_volume(), str(path))
    monkeypatch.setattr(memory_budget, "available_bytes", lambda: 1000)
    with pytest.raises(InputError, match=r"needs 5\.6 KB of memory; this machine has 1000 bytes"):
        io.read_volume(path)


def test_an_output_larger_than_memory_is_refused_before_the_work(monkeypatch):
    image = make_volume()
    monkeypatch.setattr(memory_budget, "available_bytes", lambda: 40_000)
    with pytest.raises(InputError, match=r"upscaling to \(96, 80, 6\) voxels .*needs"):
        api.upscale(image, model="bicubic", scale=4)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_voxels_are_refused_in_the_api_and_the_cli(tmp_path, capsys, dtype):
    values = (sitk.GetArrayFromImage(make_volume()) * (1 + 0.5j)).astype(dtype)
    image = sitk.GetImageFromArray(values)
    with pytest.raises(InputError, match="complex voxels"):
        api.upscale(image, model="bicubic")
    path = tmp_path / "complex.nrrd"
    sitk.WriteImage(image, str(path))
    code, _, err = run_cli(["upscale", path, tmp_path / "out.nrrd", "--model", "bicubic"], capsys)
    assert code == 2 and "complex voxels" in err


def _dicom_copy(source: Path, target: Path, count: int = 8) -> list[Path]:
    target.mkdir()
    files = sorted(source.iterdir())[10:10 + count]
    for f in files:
        (target / f.name).write_bytes(f.read_bytes())
    return sorted(target.iterdir())


def _truncate_one(files):
    data = files[4].read_bytes()
    files[4].write_bytes(data[: len(data) // 2])


def _drop_position(files):
    import pydicom
    ds = pydicom.dcmread(files[4])
    del ds.ImagePositionPatient
    ds.save_as(files[4])


def _duplicate_position(files):
    import pydicom
    ds = pydicom.dcmread(files[4])
    ds.ImagePositionPatient = pydicom.dcmread(files[3], stop_before_pixels=True).ImagePositionPatient
    ds.save_as(files[4])


@pytest.mark.parametrize("damage, message", [
    (_truncate_one, "truncated or unreadable"),
    (_drop_position, "has no ImagePositionPatient"),
    (_duplicate_position, "same slice position"),
])
def test_defective_dicom_series_is_refused_not_read_with_wrong_geometry(tmp_path, capsys,
                                                                       shared_data, damage, message):
    files = _dicom_copy(shared_data / "ct" / "crlm-ct-1004-dicom", tmp_path / "series")
    damage(files)
    code, _, err = run_cli(["upscale", tmp_path / "series", tmp_path / "out.nrrd", "--model",
                            "bicubic", "--quiet"], capsys)
    assert code == 2 and message in err and files[4].name in err, err
    assert not (tmp_path / "out.nrrd").exists()


# ---------------------------------------------------------------------------------------------
# Options and output paths checked at the door


@pytest.mark.parametrize("option, value, message", [
    ("--batch", "0", "batch must be >= 1"),
    ("--batch", "-1", "batch must be >= 1"),
    ("--threads", "-1", "threads must be >= 1"),
    ("--threads", "0", "threads must be >= 1"),
    ("--tile", "-5", "tile must be 0 (whole slices) or at least 16"),
    ("--tile", "1", "tile must be 0 (whole slices) or at least 16"),
    ("--scale", "5", "in-plane factors are integers 2-4, got '5'; for thick slices use --scale 1,1,2.5"),
    ("--scale", "2.5", "in-plane factors are integers 2-4, got '2.5'; for thick slices use"),
    ("--axis", "w", "axis must be auto, x, y, z or 0-2"),
    ("--precision", "int3", "invalid choice"),
])
def test_out_of_range_options_are_usage_errors_naming_the_option(tmp_path, capsys, option, value,
                                                                 message):
    source = tmp_path / "input.nrrd"
    sitk.WriteImage(make_volume(), str(source))
    try:  # argparse's usage error (SystemExit 2), or the API's InputError (returned 2)
        code = cli.main(["upscale", str(source), str(tmp_path / "out.nrrd"), f"{option}={value}"])
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert option in err or option.lstrip("-") in err
    assert files_in(tmp_path) == ["input.nrrd"]


@pytest.mark.parametrize("argument, value, message", [
    ("batch_size", 0, "batch_size (--batch) must be an integer >= 1"),
    ("batch_size", -1, "batch_size (--batch) must be an integer >= 1"),
    ("threads", -1, "threads (--threads) must be an integer >= 1"),
    ("tile", -5, "tile (--tile) must be 0"),
    ("tile", 1, "tile (--tile) must be 0"),
    ("precision", "int3", "precision (--precision) must be one of"),
    ("device", "tpu", "device (--device) must be"),
    ("scale", 2.5, "scale must be an integer 2-4"),
    ("scale", True, "scale must be an integer 2-4"),
])
def test_out_of_range_api_arguments_raise_input_error(argument, value, message):
    with pytest.raises(InputError) as info:
        MedSRLib.upscale(make_volume(), model="bicubic", **{argument: value})
    assert message in str(info.value)


def test_output_path_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    source = tmp_path / "input.nrrd"
    sitk.WriteImage(make_volume(), str(source))
    (tmp_path / "out.nrrd").mkdir()
    monkeypatch.setattr(api, "upscale", lambda *a, **k: pytest.fail("computed before refusing"))
    code, _, err = run_cli(["upscale", source, tmp_path / "out.nrrd", "--model", "bicubic",
                            "--overwrite"], capsys)
    assert code == 2 and "is a folder" in err


def test_read_only_output_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    source = tmp_path / "input.nrrd"
    sitk.WriteImage(make_volume(), str(source))
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: a read-only mount instead
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                 capture_output=True)
        if mounted.returncode != 0:
            pytest.skip("running as root without mount: cannot make a read-only folder")
    else:
        folder.chmod(0o555)
    try:
        monkeypatch.setattr(api, "upscale", lambda *a, **k: pytest.fail("computed before refusing"))
        code, _, err = run_cli(["upscale", source, folder / "out.nrrd", "--model", "bicubic"], capsys)
        assert code == 2 and "cannot write in folder" in err, err
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


def test_fifo_input_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "input.nii"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(b"\0" * 10), daemon=True)
    writer.start()  # a writer waits on the other end: reading the FIFO twice would hang
    with pytest.raises(InputError, match="not a regular file"):
        io.read_volume(fifo)
    with open(fifo, "rb") as drain:  # release the writer thread
        drain.read()


# ---------------------------------------------------------------------------------------------
# Interrupts and temporary files


def _wait_for(predicate, timeout: float = 60.0, step: float = 0.002) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_while_writing_exits_130_and_leaves_no_file(tmp_path, signum):
    for attempt in range(3):  # a run that finished before the signal arrived is tried again
        out_folder = tmp_path / f"out{attempt}"
        out_folder.mkdir()
        out = out_folder / "big.nii.gz"
        process = _cli_process(["upscale", SAMPLE_PATH, out, "--model", "nearest", "--scale", "4",
                                "--quiet"])
        assert _wait_for(lambda: any(".part" in p.name for p in out_folder.iterdir())
                         or process.poll() is not None), "no temporary file appeared"
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
        assert "Traceback" not in err, err
        if process.returncode == 0:  # too late: the output must then be whole
            assert files_in(out_folder) == [out.name]
            assert sitk.ReadImage(str(out)).GetSize() == (1024, 1024, 16)
            continue
        assert process.returncode == 130, err
        assert "cancelled" in err
        if "was completely written" in err:  # the signal came during the final rename
            assert files_in(out_folder) == [out.name]
            assert sitk.ReadImage(str(out)).GetSize() == (1024, 1024, 16)
        else:
            assert files_in(out_folder) == [], err
        return
    pytest.fail("every run finished before the signal arrived")


@pytest.mark.parametrize("delay", [0.1, 0.4, 1.0, 1.8])
def test_ctrl_c_during_start_up_is_a_clean_cancel(tmp_path, delay):
    out = tmp_path / "out.nrrd"
    process = _cli_process(["upscale", SAMPLE_PATH, out, "--model", "nearest", "--quiet"])
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert process.returncode in (0, 130), err  # 0: it had already finished
    assert files_in(tmp_path) == (["out.nrrd"] if process.returncode == 0 else [])


def test_signal_inside_an_import_leaves_at_once_without_abort(tmp_path):
    # An extension's import (torch) runs Python from C++; a KeyboardInterrupt raised there
    # aborted the process (SIGABRT, pybind11 terminate) in CI. Here the signal arrives,
    # deterministically, while a module is being imported and a temporary output exists.
    (tmp_path / "slow_module.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"
        "raise SystemExit('the import went on after the signal')\n", encoding="utf-8")
    temp = tmp_path / ".out.nrrd.medsr-1-x.part.nrrd"
    script = (
        "import sys, pathlib\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from MedSRLib import cli\nfrom MedSRLib.io import safe_write\n"
        f"temp = pathlib.Path({str(temp)!r}); temp.write_text('partial', encoding='utf-8')\n"
        "safe_write.PENDING.add(temp)\n"
        "cli._install_signal_handlers()\n"
        "import slow_module\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 130, done.stderr
    assert "medsr: cancelled; nothing was written" in done.stderr
    assert "Traceback" not in done.stderr
    assert [n for n in files_in(tmp_path) if n != "__pycache__"] == ["slow_module.py"]


def test_temporary_file_of_a_killed_run_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.nrrd{safe_write.TEMP_MARK}{dead.pid}-abc123.part.nrrd"
    stale.write_bytes(b"half a volume")
    alive = tmp_path / f".other.nrrd{safe_write.TEMP_MARK}{os.getpid()}-def456.part.nrrd"
    alive.write_bytes(b"being written by a live process")
    io.write_volume(make_volume(), tmp_path / "out.nrrd")
    assert files_in(tmp_path) == sorted([alive.name, "out.nrrd"])


# ---------------------------------------------------------------------------------------------
# Weaker findings


def test_image_array_of_a_temporary_image_stays_valid():
    path = SAMPLE_PATH
    expected = int(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.int64).sum())
    view = io.image_array(io.read_volume(path))  # the image is a temporary
    gc.collect()
    clutter = [np.ones(1 << 20) for _ in range(20)]  # reuse freed memory, as a real run would
    assert int(view.astype(np.int64).sum()) == expected
    assert not view.flags.writeable
    del clutter


def test_non_nifti_bytes_in_a_nii_file_are_called_not_nifti(tmp_path):
    path = tmp_path / "fake.nii"
    path.write_bytes(b"\x7fELF" + bytes(400))
    with pytest.raises(InputError) as info:
        io.read_volume(path)
    assert "fake.nii: cannot read" in str(info.value) and "spacing" not in str(info.value)


@pytest.mark.parametrize("field, value", [
    ("ElementSpacing", b"1 inf 1"), ("ElementSpacing", b"nan 1 1"), ("ElementSpacing", b"1 1 -3")])
def test_non_finite_or_negative_metaimage_spacing_is_refused(tmp_path, field, value):
    path = tmp_path / "s.mha"
    sitk.WriteImage(make_volume(spacing=(1.0, 1.0, 1.0)), str(path), False)
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1 1", field.encode() + b" = " + value))
    with pytest.raises(InputError, match="non-finite voxel spacing"):
        io.read_volume(path)


@pytest.mark.parametrize("geometry_lines", [
    "spacings: -1 1 1", "spacings: nan 1 1", "spacings: 1 inf 1",
    "space: left-posterior-superior\nspace directions: (1,0,0) (0,0,0) (0,0,1)",
    "space: left-posterior-superior\nspace directions: (nan,0,0) (0,1,0) (0,0,1)"])
def test_bad_nrrd_spacing_is_refused(tmp_path, geometry_lines):
    values = sitk.GetArrayFromImage(make_volume())
    path = tmp_path / "s.nrrd"
    header = (f"NRRD0004\ntype: short\ndimension: 3\nsizes: 24 20 6\n{geometry_lines}\n"
              "endian: little\nencoding: raw\n\n")
    path.write_bytes(header.encode() + values.astype("<i2").tobytes())
    with pytest.raises(InputError, match="non-finite voxel spacing"):
        io.read_volume(path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_permissions_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = io.write_volume(make_volume(), tmp_path / "out.nrrd")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


def test_two_runs_without_overwrite_cannot_replace_each_other(tmp_path):
    target = tmp_path / "out.nrrd"
    first = io.stage_volume(make_volume(seed=1), target).prepare()
    io.write_volume(make_volume(seed=2), target)  # the other run wins the race
    winner = target.read_bytes()
    with pytest.raises(InputError, match="appeared while this run was writing"):
        first.commit()
    assert target.read_bytes() == winner and files_in(tmp_path) == ["out.nrrd"]


def test_every_real_volume_in_shared_data_passes_the_integrity_checks(shared_data):
    """No false alarm on real files: every NIfTI/NRRD/MHA volume of ../shared/data is complete,
    finite and has valid spacings (among them uint8 NIfTI with a NaN scl_slope, which SimpleITK
    reports as float32 while 1 byte per voxel is stored)."""
    from MedSRLib.io import file_integrity
    checked = []
    for path in sorted(shared_data.rglob("*")):
        if path.is_file() and io.suffix_of(path) in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
            file_integrity.check_header_spacing(path)
            file_integrity.check_payload(path)
            checked.append(path)
    assert len(checked) >= 50
    scaled = shared_data / "mr" / "brain-t1-gd-skullstripped.nii.gz"
    assert scaled in checked
    assert io.read_volume(scaled).GetPixelID() == sitk.sitkFloat32


def test_sheared_grids_are_refused_where_a_format_or_reader_would_straighten_them(tmp_path):
    """A sheared direction: NRRD/MHA files holding one are refused on reading (ITK would
    straighten it), and write_volume refuses to write one as NIfTI (which cannot hold it)."""
    image = make_volume()
    sheared = np.array([[1.0, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    image.SetDirection(tuple(sheared.reshape(-1)))
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(image, str(tmp_path / f"s{suffix}"))
        with pytest.raises(InputError, match="not orthogonal"):
            io.read_volume(tmp_path / f"s{suffix}")
    with pytest.raises(InputError, match="NIfTI cannot store"):
        io.write_volume(image, tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_uint64_extremes_survive_the_cast_back():
    """2**64 - 1 in float64 rounds up to 2**64, which wraps to 0 in uint64 unless clipped below."""
    from MedSRLib.transforms import intensity
    values = np.array([0.0, 1.8446744073709552e19, 2e19, -5.0])
    cast = intensity.cast_to_dtype(values, np.uint64)
    assert cast[1] > np.uint64(2**63) and cast[2] > np.uint64(2**63) and cast[3] == 0


@pytest.mark.parametrize("ndims", [b"-1", b"100", b"2147483648", b"4294967295", b"three"])
def test_metaimage_with_ndims_out_of_range_is_refused_not_a_crash(tmp_path, ndims):
    """Found by the fuzz suite: ITK aborted the whole process on such headers."""
    path = tmp_path / "v.mha"
    sitk.WriteImage(make_volume(), str(path), False)
    path.write_bytes(path.read_bytes().replace(b"NDims = 3", b"NDims = " + ndims))
    with pytest.raises(InputError, match="NDims"):
        io.read_volume(path)


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), -352.0, 6.118833748180992e16])
def test_nifti_with_impossible_vox_offset_is_refused(tmp_path, offset):
    """Found by the fuzz suite: ValueError/OverflowError/OSError (exit 1) instead of InputError."""
    import struct
    path = tmp_path / "v.nii"
    sitk.WriteImage(make_volume(), str(path))
    data = bytearray(path.read_bytes())
    data[108:112] = struct.pack("<f", offset)  # vox_offset
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="v.nii"):
        io.read_volume(path)
