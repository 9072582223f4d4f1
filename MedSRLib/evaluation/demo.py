"""`medsr demo`: what super-resolution buys, on the bundled sample CT, against its own original.

In-plane: the sample is degraded (anti-aliased bicubic downsampling by `scale` in each slice),
restored by bicubic interpolation and by MedSR, and both are scored against the original slices
(PSNR and SSIM over the whole volume); the picture shows input | bicubic | MedSR | original of
the middle slice, with a zoomed region below.

Through-plane: the sample's 0.8 mm pixel rows are averaged four at a time into 3.2 mm thick
coronal slices, restored to 0.8 mm by cubic interpolation and by MedSR's through-plane network,
and shown in the axial plane that crosses them: thick input | cubic | MedSR | original, each
scored the same way. (The sample's own 5 mm axial slices have no thinner truth to score
against.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from PIL import Image, ImageDraw, ImageFont

from .. import api, metrics
from ..io import volumes as io
from ..errors import InputError

SAMPLE_PATH = Path(__file__).resolve().parents[1] / "data" / "ct_abdomen_sample.nrrd"
#: CT soft-tissue window (HU) for the pictures.
CT_WINDOW = (-160.0, 240.0)
#: Through-plane demo: 0.8 mm rows averaged into one thick coronal slice, and the axial slices
#: (centred on the one shown) the network runs on.
THICK_FACTOR = 4
AXIAL_SLICES = 5
#: In-plane zoom: the region (x0, y0, edge) of the original grid shown enlarged, and the factor.
ZOOM_REGION = (138, 92, 64)
ZOOM = 6


@dataclass(frozen=True)
class Score:
    """PSNR (dB) and SSIM of a restoration against the original (data range: the original's
    intensity range)."""

    psnr: float
    ssim: float

    def text(self) -> str:
        return f"PSNR {self.psnr:.2f} dB  SSIM {self.ssim:.4f}"


def score(restored: np.ndarray, original: np.ndarray, plane_axis: int = 0) -> Score:
    """PSNR over the whole volume and SSIM averaged over its planes along `plane_axis`, both
    with the original's intensity range as data range."""
    low, high = float(original.min()), float(original.max())
    scale = max(high - low, 1e-6)

    def planes(volume: np.ndarray) -> torch.Tensor:
        units = (np.moveaxis(volume, plane_axis, 0).astype(np.float32) - low) / scale
        return torch.from_numpy(np.ascontiguousarray(units))[:, None]

    a, b = planes(restored), planes(original)
    return Score(metrics.psnr(a, b), metrics.ssim(a, b))


def window_to_uint8(slice_values: np.ndarray, window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    low, high = window
    return (np.clip((slice_values - low) / (high - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def _panel(values: np.ndarray, size: tuple[int, int], title: str, subtitle: str,
           box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """One labelled panel: `values` windowed, resized to `size` (width, height), title and
    subtitle in a band above it, an optional rectangle (in display pixels)."""
    band = 46
    picture = Image.fromarray(window_to_uint8(values)).resize(size, Image.Resampling.NEAREST)
    panel = Image.new("RGB", (size[0], size[1] + band), (0, 0, 0))
    panel.paste(picture.convert("RGB"), (0, band))
    draw = ImageDraw.Draw(panel)
    draw.text((6, 3), title, fill=(255, 255, 255), font=_font(18))
    draw.text((6, 25), subtitle, fill=(255, 220, 90), font=_font(15))
    if box is not None:
        x0, y0, x1, y1 = box
        draw.rectangle((x0, y0 + band, x1, y1 + band), outline=(255, 220, 90), width=2)
    return panel


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """`text` in lines that fit `width` pixels in `font` (breaks at spaces)."""
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and measure.textlength(candidate, font=font) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + [line]


def _grid(panels: list[Image.Image], columns: int, caption: str) -> Image.Image:
    width, height = panels[0].size
    rows = (len(panels) + columns - 1) // columns
    gap, font = 4, _font(16)
    total_width = columns * width + (columns - 1) * gap
    lines = _wrap(caption, font, total_width - 12)
    top = 10 + 20 * len(lines)
    canvas = Image.new("RGB", (total_width, top + rows * height + (rows - 1) * gap), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((6, 5 + 20 * index), line, fill=(255, 255, 255), font=font)
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        canvas.paste(panel, (column * (width + gap), top + row * (height + gap)))
    return canvas


def _save_png(picture: Image.Image, path: Path) -> Path:
    temp = path.with_name(f".{path.name}.partial")
    picture.save(temp, format="PNG")
    os.replace(temp, path)
    return path


def _check_free(paths: list[Path], overwrite: bool) -> None:
    taken = [str(p) for p in paths if p.exists()]
    if taken and not overwrite:
        raise InputError(f"{', '.join(taken)}: already exists; pass --overwrite to replace it")


def _degrade_inplane(original: np.ndarray, scale: int) -> np.ndarray:
    """Each slice of `original` (K, J, I) anti-alias bicubic-downsampled by `scale` (float32)."""
    from ..transforms.degrade import bicubic_downsample
    slices = torch.from_numpy(original.astype(np.float32))[:, None]
    return bicubic_downsample(slices, scale)[:, 0].numpy()


def _image_like(voxels: np.ndarray, reference: sitk.Image, spacing_xyz) -> sitk.Image:
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    image.SetOrigin(reference.GetOrigin())
    image.SetDirection(reference.GetDirection())
    return image


def in_plane_paths(out_dir: Path, scale: int) -> tuple[Path, Path]:
    """(restored volume, picture) that the in-plane demo writes in `out_dir`."""
    return out_dir / f"ct_abdomen_sample_x{scale}_restored.nrrd", out_dir / f"in_plane_x{scale}.png"


def through_plane_path(out_dir: Path) -> Path:
    """The picture that the through-plane demo writes in `out_dir`."""
    return out_dir / f"through_plane_x{THICK_FACTOR}.png"


def in_plane_demo(out_dir: Path, model: str | None = None, scale: int = 2,
                  overwrite: bool = False) -> tuple[Path, Path, dict[str, Score]]:
    """Degrade the sample in-plane by `scale`, restore it with bicubic and `model` (default:
    the CT default); returns (restored volume path, picture path, {"bicubic"|model: Score})."""
    volume_path, figure_path = in_plane_paths(out_dir, scale)
    _check_free([volume_path, figure_path], overwrite)
    image = io.read_volume(SAMPLE_PATH)
    original = sitk.GetArrayFromImage(image)
    keep = tuple(n - n % scale for n in original.shape[1:])
    original = original[:, :keep[0], :keep[1]]
    low_res = np.round(_degrade_inplane(original, scale)).astype(original.dtype)
    spacing = image.GetSpacing()
    lr_image = _image_like(low_res, image, (spacing[0] * scale, spacing[1] * scale, spacing[2]))
    lr_image.SetMetaData(io.MODALITY_KEY, "CT")
    restored = api.upscale(lr_image, model=model, scale=scale, axis="z")
    bicubic = api.upscale(lr_image, model="bicubic", scale=scale, axis="z")
    name = restored.GetMetaData(api.MODEL_KEY)
    sr = sitk.GetArrayFromImage(restored)
    cubic = sitk.GetArrayFromImage(bicubic)
    scores = {"bicubic": score(cubic, original), name: score(sr, original)}
    io.write_volume(restored, volume_path, overwrite=overwrite)

    middle = original.shape[0] // 2
    lr_shown = np.kron(low_res[middle].astype(np.float32), np.ones((scale, scale), np.float32))
    views = [(f"input: degraded x{scale} ({low_res.shape[2]}x{low_res.shape[1]})",
              "shown with nearest pixels", lr_shown),
             ("bicubic", scores["bicubic"].text(), cubic[middle]),
             (f"MedSR {name} x{scale}", scores[name].text(), sr[middle]),
             (f"original ({original.shape[2]}x{original.shape[1]})", "the truth", original[middle])]
    x0, y0, edge = ZOOM_REGION
    display = edge * ZOOM / original.shape[2]  # the zoomed panels as wide as the full ones
    size = (int(original.shape[2] * display), int(original.shape[1] * display))
    box = tuple(int(v * display) for v in (x0, y0, x0 + edge, y0 + edge))
    panels = [_panel(values.astype(np.float32), size, title, subtitle, box)
              for title, subtitle, values in views]
    zoomed = [_panel(values[y0:y0 + edge, x0:x0 + edge].astype(np.float32),
                     (edge * ZOOM, edge * ZOOM), f"{label}: the box, zoomed", "", None)
              for label, (_, _, values) in zip(("input", "bicubic", "MedSR", "original"), views)]
    caption = (f"In-plane x{scale}: the bundled CT degraded, then restored; PSNR/SSIM against the "
               f"original over all {original.shape[0]} slices (middle slice shown)")
    _save_png(_grid(panels + zoomed, 4, caption), figure_path)
    return volume_path, figure_path, scores


def through_plane_demo(out_dir: Path, overwrite: bool = False) -> tuple[Path, dict[str, Score]]:
    """Average the sample's 0.8 mm rows along y `THICK_FACTOR` at a time into thick coronal
    slices, restore them to 0.8 mm with cubic interpolation and the through-plane network, and
    show the axial plane (it crosses the thick slices); returns (picture path,
    {"cubic"|"MedSR": Score}), scored over the axial planes run.

    The thin truth has to be finer than the thick slices: the sample's own 5 mm axial slices are
    already thick, so the thick slices are made from its 0.8 mm in-plane pixels."""
    from ..through_plane import apply
    from ..transforms import slice_profile as profile

    figure_path = through_plane_path(out_dir)
    _check_free([figure_path], overwrite)
    image = io.read_volume(SAMPLE_PATH)
    volume = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    middle = volume.shape[0] // 2
    rows = np.moveaxis(volume[middle - AXIAL_SLICES // 2:middle + (AXIAL_SLICES + 1) // 2], 1, 0)
    matrix = profile.degradation_matrix(rows.shape[0], float(THICK_FACTOR), 1.0, "box")
    thick = np.tensordot(matrix.astype(np.float32), rows, axes=(1, 0)).astype(np.float32)
    truth = rows[:thick.shape[0] * THICK_FACTOR]  # (y, z, x)
    spacing = image.GetSpacing()
    thick_mm = spacing[1] * THICK_FACTOR
    thick_image = _image_like(np.ascontiguousarray(np.moveaxis(thick, 0, 1)), image,
                              (spacing[0], thick_mm, spacing[2]))
    restored = api.upscale(thick_image, scale=(1, THICK_FACTOR, 1), axis="y", output_float=True,
                           slice_thickness=thick_mm, modality="CT")
    network = np.moveaxis(sitk.GetArrayFromImage(restored), 1, 0)[:truth.shape[0]]
    cubic = apply.cubic_resample(thick, 0, truth.shape[0])
    scores = {"cubic": score(cubic, truth, plane_axis=1),
              "MedSR": score(network, truth, plane_axis=1)}

    shown = AXIAL_SLICES // 2
    nearest = thick[np.minimum(np.arange(truth.shape[0]) // THICK_FACTOR, thick.shape[0] - 1)]
    views = [(f"input: coronal slices {thick_mm:.1f} mm thick", "shown with nearest slices",
              nearest),
             ("cubic interpolation", scores["cubic"].text(), cubic),
             (f"MedSR through-plane ({spacing[1]:.1f} mm)", scores["MedSR"].text(), network),
             (f"original ({spacing[1]:.1f} mm)", "the truth", truth)]
    display = 1.5
    size = (int(truth.shape[2] * display), int(truth.shape[0] * display))
    panels = [_panel(values[:, shown, :], size, title, subtitle) for title, subtitle, values in views]
    caption = (f"Through-plane x{THICK_FACTOR}: {THICK_FACTOR} rows of {spacing[1]:.1f} mm averaged "
               f"into {thick_mm:.1f} mm coronal slices, then restored to {spacing[1]:.1f} mm; "
               f"axial view across the slices; PSNR/SSIM against the original over "
               f"{AXIAL_SLICES} axial slices")
    _save_png(_grid(panels, 2, caption), figure_path)
    return figure_path, scores


def run_demo(out_dir: Path, model: str | None = None, scale: int = 2, overwrite: bool = False,
             in_plane: bool = True, through_plane: bool = True) -> list[tuple[str, Path, dict]]:
    """Both demos (or the one asked for) into `out_dir`; [(what, path, scores)] per file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file, not a folder for the demo's outputs")
    _check_free([*(in_plane_paths(out_dir, scale) if in_plane else ()),
                 *([through_plane_path(out_dir)] if through_plane else [])], overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if in_plane:
        volume_path, figure_path, scores = in_plane_demo(out_dir, model, scale, overwrite)
        written += [("in-plane restored volume", volume_path, {}),
                    ("in-plane picture", figure_path, scores)]
    if through_plane:
        figure_path, scores = through_plane_demo(out_dir, overwrite)
        written.append(("through-plane picture", figure_path, scores))
    return written
