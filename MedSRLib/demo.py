"""`medsr demo`: upscale the bundled sample CT and draw input | bicubic | SR side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

from . import api, io

SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "ct_abdomen_sample.nrrd"
#: CT soft-tissue window (HU) for the figure.
CT_WINDOW = (-160.0, 240.0)


def window_to_uint8(slice_values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    return (np.clip((slice_values - low) / (high - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def side_by_side_png(panels: list[tuple[str, np.ndarray]], window: tuple[float, float],
                     path: Path) -> Path:
    """Write labelled panels (title, 2-D array) of equal size next to each other as a PNG."""
    height, width = panels[0][1].shape
    label_height = 18
    canvas = Image.new("L", (width * len(panels), height + label_height), color=0)
    draw = ImageDraw.Draw(canvas)
    for i, (title, values) in enumerate(panels):
        canvas.paste(Image.fromarray(window_to_uint8(values, window)), (i * width, label_height))
        draw.text((i * width + 4, 3), title, fill=255)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def run_demo(out_dir: Path, model: str | None = None, scale: int = 2,
             overwrite: bool = False) -> tuple[Path, Path]:
    """Upscale the sample in-plane by `scale`; returns (SR volume path, comparison PNG path)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    volume_path = io.check_output_path(SAMPLE_PATH, out_dir / f"ct_abdomen_sample_SRx{scale}.nrrd",
                                       overwrite)
    figure_path = out_dir / f"ct_abdomen_sample_SRx{scale}_comparison.png"
    image = io.read_volume(SAMPLE_PATH)
    sr = api.upscale(image, model=model, scale=scale, axis="z")
    bicubic = api.upscale(image, model="bicubic", scale=scale, axis="z")
    io.write_volume(sr, volume_path, overwrite=overwrite)
    middle = image.GetSize()[2] // 2
    lr = sitk.GetArrayViewFromImage(image)[middle].astype(np.float32)
    lr_shown = np.kron(lr, np.ones((scale, scale), dtype=np.float32))  # nearest, same display size
    panels = [(f"input ({lr.shape[1]}x{lr.shape[0]})", lr_shown),
              ("bicubic", sitk.GetArrayViewFromImage(bicubic)[middle].astype(np.float32)),
              (f"{sr.GetMetaData(api.MODEL_KEY)} x{scale}",
               sitk.GetArrayViewFromImage(sr)[middle].astype(np.float32))]
    side_by_side_png(panels, CT_WINDOW, figure_path)
    return volume_path, figure_path
