"""The lean install: a fresh venv with torch (CPU) and `pip install .` only, no extras, runs
`medsr upscale` on the bundled sample CT and on a 2-D PNG, and weighs at most half of the test
venv (the one running this test, which holds every test extra).

Opt-in (it downloads from PyPI and takes a few minutes): `make lean-check`, or
MEDSR_LEAN_CHECK=1 pytest Testing/test_lean_install.py -s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "MedSRLib" / "data" / "ct_abdomen_sample.nrrd"
#: The torch build the project's machines use (the CPU wheel); installed before the package,
#: as docs/install.md tells a user with an existing torch.
TORCH_PIN = "torch==2.13.0"
#: Packages the extras bring and the lean install must not.
EXTRAS_ONLY = ("ray", "nncf", "onnxruntime", "PySide6", "slicer_core", "vtkmodules", "pytest",
               "yaml", "tensorboard")

pytestmark = pytest.mark.skipif(
    os.environ.get("MEDSR_LEAN_CHECK") != "1",
    reason="lean-install check is opt-in (downloads, minutes): make lean-check")


def _tree_bytes(path: Path) -> int:
    """Disk usage of `path` in bytes (du: allocated blocks, hard links once)."""
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) * 1024


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def lean_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lean")
    # The wheel is built from a copy of what it packages, so the build leaves nothing in the
    # work tree (setuptools builds in place).
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "MedSRLib", source / "MedSRLib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, TORCH_PIN], timeout=1800)
    _run([*pip, source], timeout=1800)
    return venv


def test_lean_install_has_no_extra(lean_venv: Path):
    site = next((lean_venv / "lib").glob("python*/site-packages"))
    present = [name for name in EXTRAS_ONLY if (site / name).exists()]
    assert not present, f"the lean install pulled extras' packages: {present}"
    assert (site / "openvino").is_dir(), "backend auto needs OpenVINO in the lean install"


def test_lean_install_upscales_the_bundled_sample(lean_venv: Path, tmp_path: Path):
    import SimpleITK as sitk

    out = tmp_path / "sample_x2.nrrd"
    result = _run([lean_venv / "bin" / "medsr", "upscale", SAMPLE, "-o", out, "--scale", "2",
                   "--quiet"], timeout=600, cwd=tmp_path)
    source, upscaled = sitk.ReadImage(str(SAMPLE)), sitk.ReadImage(str(out))
    assert upscaled.GetSize() == (source.GetSize()[0] * 2, source.GetSize()[1] * 2,
                                  source.GetSize()[2])
    assert upscaled.GetMetaData("medsr_model") == "edsr_lite"
    assert "Traceback" not in result.stderr


def test_lean_install_upscales_a_png_with_the_xray_default(lean_venv: Path, tmp_path: Path):
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    ramp = np.add.outer(np.arange(48), np.arange(40)).astype(np.float32) * 2.0
    pixels = np.clip(ramp + rng.normal(0, 6, ramp.shape), 0, 255).astype(np.uint8)
    png = tmp_path / "chest.png"
    Image.fromarray(pixels).save(png)
    out = tmp_path / "chest_x2.png"
    result = _run([lean_venv / "bin" / "medsr", "upscale", png, out, "--scale", "2"],
                  timeout=600, cwd=tmp_path)
    assert Image.open(out).size == (80, 96)
    assert "--modality" in result.stderr  # the notice that XR was assumed
    assert sitk.ReadImage(str(out)).GetSize() == (80, 96)


def test_lean_venv_is_at_most_half_the_test_venv(lean_venv: Path):
    lean = _tree_bytes(lean_venv)
    full = _tree_bytes(Path(sys.prefix))
    print(f"\nlean venv {lean_venv}: {lean / 2**30:.2f} GiB; test venv {sys.prefix}: "
          f"{full / 2**30:.2f} GiB ({lean / full:.0%})")
    assert sys.prefix != sys.base_prefix, "run from the test venv (make lean-check)"
    assert lean <= full / 2, f"lean venv {lean / 2**30:.2f} GiB > half of {full / 2**30:.2f} GiB"
