"""`medsr demo`: the bundled CT degraded and restored, in-plane and through-plane; MedSR beats
the interpolation it is compared with, and the pictures and scores say so."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from MedSRLib import cli
from MedSRLib.evaluation import demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`medsr demo` once into a fresh folder: (folder, exit status, stdout)."""
    out = tmp_path_factory.mktemp("demo") / "medsr-demo"
    capture = tmp_path_factory.getbasetemp() / "demo-stdout.txt"
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(["demo", "-o", str(out)])
    capture.write_text(buffer.getvalue(), encoding="utf-8")
    return out, code, buffer.getvalue()


def _scores(stdout: str) -> dict[str, tuple[float, float]]:
    """{method: (PSNR dB, SSIM)} from the demo's printed score lines."""
    scores = {}
    for line in stdout.splitlines():
        words = line.split()
        if len(words) == 6 and words[1] == "PSNR":
            scores[words[0]] = (float(words[2]), float(words[5]))
    return scores


def test_demo_writes_both_pictures_and_the_restored_volume(demo_run):
    out, code, stdout = demo_run
    assert code == 0, stdout
    volume = sitk.ReadImage(str(out / "ct_abdomen_sample_x2_restored.nrrd"))
    sample = sitk.ReadImage(str(demo.SAMPLE_PATH))
    assert volume.GetSize() == sample.GetSize() and volume.GetPixelID() == sample.GetPixelID()
    in_plane = Image.open(out / "in_plane_x2.png")
    through = Image.open(out / "through_plane_x4.png")
    assert in_plane.mode == "RGB" and in_plane.size[0] > 4 * sample.GetSize()[0]
    assert in_plane.size[1] > 2 * sample.GetSize()[1]  # full slices and the zoomed row
    assert through.mode == "RGB" and through.size[0] > 2 * sample.GetSize()[0]


def test_medsr_beats_interpolation_in_both_demos(demo_run):
    _, code, stdout = demo_run
    scores = _scores(stdout)
    assert code == 0 and set(scores) == {"bicubic", "edsr_lite", "cubic", "MedSR"}, stdout
    assert scores["edsr_lite"][0] > scores["bicubic"][0] + 1.0
    assert scores["edsr_lite"][1] > scores["bicubic"][1]
    assert scores["MedSR"][0] > scores["cubic"][0] + 1.0
    assert scores["MedSR"][1] > scores["cubic"][1]


def test_restored_volume_scores_as_printed(demo_run):
    out, _, stdout = demo_run
    restored = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ct_abdomen_sample_x2_restored.nrrd")))
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(demo.SAMPLE_PATH)))
    measured = demo.score(restored, original)
    assert measured.psnr == pytest.approx(_scores(stdout)["edsr_lite"][0], abs=0.01)


def test_the_picture_shows_the_scores_and_differs_between_panels(demo_run):
    out, _, _ = demo_run
    picture = np.asarray(Image.open(out / "in_plane_x2.png").convert("RGB"))
    yellow = (picture[..., 0] > 200) & (picture[..., 1] > 180) & (picture[..., 2] < 150)
    assert yellow.sum() > 500  # the score text and the zoom boxes are drawn


def test_a_second_demo_needs_overwrite_and_keeps_the_first(demo_run, capsys):
    out, _, _ = demo_run
    before = (out / "in_plane_x2.png").read_bytes()
    code = cli.main(["demo", "-o", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "in_plane_x2.png").read_bytes() == before


def test_in_plane_and_through_plane_together_are_refused(tmp_path, capsys):
    code = cli.main(["demo", "-o", str(tmp_path / "d"), "--in-plane", "--through-plane"])
    assert code == 2 and "neither" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
