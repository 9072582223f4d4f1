"""Why does EDSR lite gain less over bicubic on MR than on CT at x4? Controlled experiments on
validation volumes (never the benchmark's test patients).

Each experiment follows the benchmark's protocol (`MedSRLib.evaluation.benchmark`): the volume's
0.5th/99.5th percentiles -> 0/1 units (`intensity.fit_mapping`), evenly spaced axial slices
among those with >= 5 % foreground, HR cropped to a multiple of the scale, anti-aliased bicubic
degradation (`degrade.apply_pipeline`), PSNR with data_range 1 in those units after cropping
`scale` pixels from every border, foreground = HR unit > 0.1. Networks run in fp32 torch on
whole slices, one thread. Gain = PSNR(model) - PSNR(bicubic) on the same slice, in dB.

Experiments (`--experiment`):
  baseline       per-volume bicubic PSNR, model PSNR and gain at x2/x3/x4, with per-volume
                 statistics (dtype, grey levels, noise sigma, share of HR energy above the LR
                 Nyquist frequency).
  normalisation  x4 gain when the network gets its input in other linear intensity maps
                 (min/max, other percentiles, z-score, HU windows for CT, synthetic gains and
                 offsets); outputs are mapped back, so every variant is scored in the same units.
  quantisation   x4 gain when the HR volume is first stored with 8 bits (or fewer) over its
                 min..max range, as an 8-bit export does.
  noise          x4 gain with Rician noise of sigma (units) added to the HR volume (scored against
                 the noisy HR, as real data is, and against the clean one).
  content        per-slice gain against the HR energy above the LR Nyquist frequency (MR and CT
                 pooled) and against bicubic's PSNR; per-volume spectral energy by band.
  window         CT x4 gain scored in clipped HU display windows (soft tissue -160..240 HU)
                 instead of the network's units.
  edges          share of bicubic's squared error near strong edges (HR Sobel > 0.08 units/px,
                 dilated 2 px) and the network's gain near edges and elsewhere, x2 and x4.
  cartoon        gain on each volume and on a median-filtered copy (texture and noise removed,
                 step edges kept), x2 and x4.
  ensemble       x4 gain with the 8-member geometric self-ensemble (an inference-only option).
  training-mix   how much MR the shipped x4 recipe sees: volumes, contrasts, pixels per patch.
  finetune       x4 scores of the shipped weights against other weights (`--weights` files or
                 training checkpoints) on the validation MR and CT volumes.

Example:
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mr_gain_diagnosis.py --experiment baseline \
      --out benchmarks/results/mr_diagnosis
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedSRLib import metrics  # noqa: E402
from MedSRLib.evaluation.benchmark import choose_slices  # noqa: E402
from MedSRLib.evaluation.scores import FOREGROUND_THRESHOLD  # noqa: E402
from MedSRLib.io import volumes as io  # noqa: E402
from MedSRLib.models import registry as zoo  # noqa: E402
from MedSRLib.transforms import degrade, intensity  # noqa: E402

DATA_ROOT = (ROOT / ".." / "shared" / "data").resolve()

#: Validation volumes (not the benchmark's test patients). "seen" = in edsr_lite's training set
#: (the shipped card's training_data), so its gain there is a training-set gain.
VALIDATION = {
    "MR": [("sarcoma/STS_008/MR_T1_image.nii.gz", "STS_008 MR T1", True),
           ("sarcoma/STS_010/MR_T1_image.nii.gz", "STS_010 MR T1", True),
           ("mr/totalseg-example-mr.nii.gz", "totalseg MR (3 mm)", True),
           ("brats/brats_2013_pat0005_1/T1c_subtrMeanDivStd.nii.gz", "BraTS pat0005 T1c", False),
           ("brats/brats_2013_pat0005_1/Flair_subtrMeanDivStd.nii.gz", "BraTS pat0005 FLAIR", False)],
    "CT": [("sarcoma/STS_008/CT_image.nii.gz", "STS_008 CT", True),
           ("sarcoma/STS_010/CT_image.nii.gz", "STS_010 CT", True)],
}
SLICES_PER_VOLUME = 5
LAPLACE_3X3 = torch.tensor([[1., -2., 1.], [-2., 4., -2.], [1., -2., 1.]])


# ---------------------------------------------------------------------------------------------
# Volumes, slices, models


@dataclass
class Volume:
    label: str
    modality: str
    seen: bool
    voxels: np.ndarray          # (Z, Y, X) float64, the file's values
    mapping: intensity.IntensityMapping
    unit: np.ndarray            # (Z, Y, X) float32 in the default units
    slices: list[int]
    dtype: str


def load_volume(relative: str, label: str, modality: str, seen: bool,
                count: int = SLICES_PER_VOLUME) -> Volume:
    image = io.read_volume(DATA_ROOT / relative)
    raw = sitk.GetArrayFromImage(image)
    voxels = raw.astype(np.float64)
    mapping = intensity.fit_mapping(voxels)
    unit = mapping.to_unit(voxels)
    return Volume(label, modality, seen, voxels, mapping, unit, choose_slices(unit, count), str(raw.dtype))


EXTRA_VOLUMES: list[tuple[str, str, str]] = []  # (relative path, modality, label) from --extra


def validation_volumes(modalities: Sequence[str] = ("MR", "CT")) -> list[Volume]:
    """The VALIDATION volumes of `modalities`, then any --extra volumes (marked seen when the
    shipped x4 card lists them as training data)."""
    volumes = [load_volume(path, label, m, seen) for m in modalities for path, label, seen in VALIDATION[m]]
    if EXTRA_VOLUMES:
        training = set(zoo.read_card(ROOT / "MedSRLib/models/weights/edsr_lite_x4.json")["training_data"])
        volumes += [load_volume(path, label, modality, path in training)
                    for path, modality, label in EXTRA_VOLUMES]
    return volumes


def load_network(scale: int, weights: Path | None = None) -> torch.nn.Module:
    """edsr_lite at `scale` in fp32 eval mode: shipped weights, a safetensors export, or a
    training checkpoint (.pt, its "model" state dict)."""
    if weights is None or weights.suffix == ".safetensors":
        return zoo.load_model("edsr_lite", scale, weights_path=weights).eval()
    model = zoo.load_model("edsr_lite", scale).eval()
    from MedSRLib.training import checkpoint as ckpt
    model.network.load_state_dict(ckpt.load_checkpoint(weights)["model"])
    return model.eval()


def hr_plane(unit: np.ndarray, z: int, scale: int) -> torch.Tensor:
    """(1, 1, H, W) HR slice cropped to a multiple of `scale`."""
    plane = torch.from_numpy(np.ascontiguousarray(unit[z]))[None, None]
    return degrade.crop_to_multiple(plane, (scale, scale))


def degrade_plane(hr: torch.Tensor, scale: int) -> torch.Tensor:
    steps = degrade.with_scale([{"type": "bicubic"}], scale)
    return degrade.apply_pipeline(hr, steps, generator=torch.Generator().manual_seed(0))


def bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)


def psnr_pair(output: torch.Tensor, target: torch.Tensor, scale: int,
              mask_from: torch.Tensor | None = None) -> tuple[float, float]:
    """(whole, foreground) PSNR in units, data_range 1, `scale` border pixels cropped;
    foreground = `mask_from` (default the target) > 0.1."""
    mask = (target if mask_from is None else mask_from) > FOREGROUND_THRESHOLD
    whole = metrics.psnr(output, target, 1.0, crop_border=scale)
    try:
        fg = metrics.psnr(output, target, 1.0, mask=mask, crop_border=scale)
    except ValueError:
        fg = float("nan")
    return whole, fg


@torch.no_grad()
def run_network(network: torch.nn.Module, lr: torch.Tensor, slope: float = 1.0,
                offset: float = 0.0) -> torch.Tensor:
    """The network's output for `lr` (default units) fed as slope * lr + offset and mapped back."""
    return (network(lr * slope + offset) - offset) / slope


def score(network: torch.nn.Module, hr: torch.Tensor, scale: int, lr: torch.Tensor | None = None,
          slope: float = 1.0, offset: float = 0.0, clean: torch.Tensor | None = None) -> dict[str, float]:
    """Bicubic and network PSNR (whole/foreground) of one HR slice, and the gains. `clean`
    (optional): also score against this target (e.g. the HR before noise was added)."""
    lr = degrade_plane(hr, scale) if lr is None else lr
    bic = bicubic(lr, scale)
    sr = run_network(network, lr, slope, offset)
    result = {}
    for name, target in (("", hr),) + ((("clean_", clean),) if clean is not None else ()):
        bw, bf = psnr_pair(bic, target, scale)
        sw, sf = psnr_pair(sr, target, scale)
        result.update({f"{name}bicubic": bw, f"{name}model": sw, f"{name}gain": sw - bw,
                       f"{name}bicubic_fg": bf, f"{name}model_fg": sf, f"{name}gain_fg": sf - bf})
    return result


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys()
    return {k: float(np.nanmean([r[k] for r in rows])) for k in keys}


# ---------------------------------------------------------------------------------------------
# Per-volume statistics


def noise_sigma(unit: np.ndarray, slices: Sequence[int]) -> float:
    """Median over `slices` of the robust white-noise sigma (units) in the foreground:
    median |3x3 Laplacian-like response| / (0.6745 * 6) (Immerkaer's mask, MAD estimate)."""
    values = []
    for z in slices:
        plane = torch.from_numpy(np.ascontiguousarray(unit[z]))[None, None].double()
        response = F.conv2d(plane, LAPLACE_3X3.double()[None, None])[0, 0].numpy()
        inner = unit[z][1:-1, 1:-1] > FOREGROUND_THRESHOLD
        if inner.sum() > 100:
            values.append(np.median(np.abs(response[inner])) / (0.6745 * 6.0))
    return float(np.median(values)) if values else float("nan")


def energy_above_nyquist(plane: np.ndarray, scale: int) -> float:
    """Share of the (mean-removed, Hann-windowed) slice's spectral energy above the LR Nyquist
    frequency 0.5 / scale cycles per HR pixel along either axis."""
    h, w = plane.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    spectrum = np.abs(np.fft.fft2((plane - plane.mean()) * window)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    high = (np.abs(fy) > 0.5 / scale) | (np.abs(fx) > 0.5 / scale)
    return float(spectrum[high].sum() / spectrum.sum())


SPECTRUM_BANDS = (0.0, 0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5)


def band_energies_db(plane: np.ndarray) -> list[float]:
    """Share (dB) of the mean-removed, Hann-windowed slice's spectral energy in each band of
    SPECTRUM_BANDS (cycles per HR pixel, max(|fy|, |fx|))."""
    h, w = plane.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    spectrum = np.abs(np.fft.fft2((plane - plane.mean()) * window)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    radius = np.maximum(np.abs(fy), np.abs(fx))
    shares = []
    for i, (low, high) in enumerate(zip(SPECTRUM_BANDS[:-1], SPECTRUM_BANDS[1:])):
        last = i == len(SPECTRUM_BANDS) - 2
        inside = (radius >= low) & ((radius <= high) if last else (radius < high))
        shares.append(float(spectrum[inside].sum() / spectrum.sum()))
    return shares


def grey_levels(voxels: np.ndarray) -> int:
    return int(np.unique(voxels[::2, ::2, ::2]).size)


# ---------------------------------------------------------------------------------------------
# Experiments


def experiment_baseline(volumes: Sequence[Volume], scales: Sequence[int]) -> dict:
    result = {"volumes": {}}
    networks = {s: load_network(s) for s in scales}
    for volume in volumes:
        entry = {"modality": volume.modality, "seen_in_training": volume.seen, "dtype": volume.dtype,
                 "shape": list(volume.unit.shape), "grey_levels": grey_levels(volume.voxels),
                 "slices": volume.slices, "noise_sigma_units": noise_sigma(volume.unit, volume.slices),
                 "hf_energy_x4": float(np.mean([energy_above_nyquist(volume.unit[z], 4)
                                                for z in volume.slices]))}
        for s in scales:
            entry[f"x{s}"] = mean_scores([score(networks[s], hr_plane(volume.unit, z, s), s)
                                          for z in volume.slices])
        result["volumes"][volume.label] = entry
    return result


def normalisation_variants(volume: Volume) -> dict[str, tuple[float, float]]:
    """{name: (slope, offset)} with network input = slope * default_unit + offset, from other
    ways of mapping the volume's values to units."""
    flat = volume.voxels.reshape(-1)
    o0, s0 = volume.mapping.offset, volume.mapping.scale

    def from_window(low: float, high: float) -> tuple[float, float]:
        # unit' = (v - low) / (high - low) with v = unit * s0 + o0
        span = high - low
        return s0 / span, (o0 - low) / span

    variants = {"default p0.5-p99.5": (1.0, 0.0)}
    for lo, hi in ((0.0, 100.0), (0.0, 99.5), (1.0, 99.0), (2.0, 98.0), (0.5, 99.9)):
        a, b = np.percentile(flat, [lo, hi])
        variants[f"p{lo:g}-p{hi:g}"] = from_window(a, b)
    foreground = flat[volume.unit.reshape(-1) > FOREGROUND_THRESHOLD]
    mean, std = float(foreground.mean()), float(foreground.std())
    variants["z-score (foreground mean/std)"] = (s0 / std, (o0 - mean) / std)
    variants["foreground p0.5-p99.5"] = from_window(*np.percentile(foreground, [0.5, 99.5]))
    if volume.modality == "CT":
        variants["HU -1000..1000"] = from_window(-1000.0, 1000.0)
        variants["HU -1024..3071"] = from_window(-1024.0, 3071.0)
        variants["HU -160..240 (soft tissue)"] = from_window(-160.0, 240.0)
    for gain in (0.5, 0.75, 1.5, 2.0):
        variants[f"synthetic x{gain:g}"] = (gain, 0.0)
    for shift in (-0.5, -0.2, 0.2):
        variants[f"synthetic {shift:+g}"] = (1.0, shift)
    return variants


def experiment_normalisation(volumes: Sequence[Volume], scale: int) -> dict:
    network = load_network(scale)
    result = {}
    for volume in volumes:
        result[volume.label] = {}
        for name, (slope, offset) in normalisation_variants(volume).items():
            rows = [score(network, hr_plane(volume.unit, z, scale), scale, slope=slope, offset=offset)
                    for z in volume.slices]
            result[volume.label][name] = {"slope": slope, "offset": offset, **mean_scores(rows)}
    return result


def quantised(voxels: np.ndarray, levels: int) -> np.ndarray:
    """`voxels` stored with `levels` grey levels over its min..max range (as an 8-bit export),
    in the original value scale."""
    low, high = float(voxels.min()), float(voxels.max())
    step = (high - low) / (levels - 1)
    return np.rint((voxels - low) / step) * step + low


def experiment_quantisation(volumes: Sequence[Volume], scales: Sequence[int],
                            levels_list: Sequence[int] = (256, 128, 64)) -> dict:
    networks = {s: load_network(s) for s in scales}
    result = {}
    for volume in volumes:
        result[volume.label] = {"grey_levels": grey_levels(volume.voxels)}
        for levels in (None, *levels_list):
            voxels = volume.voxels if levels is None else quantised(volume.voxels, levels)
            mapping = intensity.fit_mapping(voxels)
            unit = mapping.to_unit(voxels)
            span = volume.voxels.max() - volume.voxels.min()
            step_units = float("nan") if levels is None else float(span / (levels - 1) / mapping.scale)
            name = "original" if levels is None else f"{levels} levels"
            result[volume.label][name] = {"step_units": step_units}
            for s in scales:
                rows = [score(networks[s], hr_plane(unit, z, s), s) for z in volume.slices]
                result[volume.label][name][f"x{s}"] = mean_scores(rows)
    return result


def rician(unit: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    real = unit + rng.normal(0.0, sigma, unit.shape)
    imaginary = rng.normal(0.0, sigma, unit.shape)
    return np.sqrt(real ** 2 + imaginary ** 2).astype(np.float32)


def experiment_noise(volumes: Sequence[Volume], scale: int,
                     sigmas: Sequence[float] = (0.0, 0.01, 0.02, 0.04, 0.08)) -> dict:
    """Noise added to the default-unit volume (the mapping is not refitted: a 0.01 sigma stays
    0.01 units, comparable across volumes); scored against the noisy HR and the clean HR."""
    network = load_network(scale)
    result = {}
    for volume in volumes:
        result[volume.label] = {"estimated_sigma_units": noise_sigma(volume.unit, volume.slices)}
        for sigma in sigmas:
            noisy = volume.unit if sigma == 0 else rician(volume.unit, sigma, seed=int(sigma * 1e4))
            rows = []
            for z in volume.slices:
                hr = hr_plane(noisy, z, scale)
                rows.append(score(network, hr, scale, clean=hr_plane(volume.unit, z, scale)))
            result[volume.label][f"sigma {sigma:g}"] = {
                "estimated_sigma_after": noise_sigma(noisy, volume.slices), **mean_scores(rows)}
    return result


def experiment_content(volumes: Sequence[Volume], scale: int) -> dict:
    network = load_network(scale)
    rows = []
    for volume in volumes:
        for z in volume.slices:
            hr = hr_plane(volume.unit, z, scale)
            entry = score(network, hr, scale)
            rows.append({"volume": volume.label, "modality": volume.modality, "z": z,
                         "hf_energy": energy_above_nyquist(hr[0, 0].numpy(), scale),
                         "bicubic": entry["bicubic"], "model": entry["model"], "gain": entry["gain"]})
    hf = np.array([r["hf_energy"] for r in rows])
    gain = np.array([r["gain"] for r in rows])
    bic = np.array([r["bicubic"] for r in rows])
    bands = {}
    for volume in volumes:
        shares = np.mean([band_energies_db(volume.unit[z].astype(np.float64)) for z in volume.slices],
                         axis=0)
        bands[volume.label] = {f"{lo:g}-{hi:g}": float(10 * np.log10(share + 1e-12)) for lo, hi, share
                               in zip(SPECTRUM_BANDS[:-1], SPECTRUM_BANDS[1:], shares)}
    return {"slices": rows, "band_energy_db": bands,
            "pearson_gain_vs_log_hf_energy": float(np.corrcoef(np.log10(hf), gain)[0, 1]),
            "pearson_gain_vs_bicubic_psnr": float(np.corrcoef(bic, gain)[0, 1])}


def experiment_window(volumes: Sequence[Volume], scale: int,
                      windows: Sequence[tuple[float, float]] = ((-160.0, 240.0), (-1000.0, 1000.0))
                      ) -> dict:
    """CT x4 gain scored in display windows (HU, clipped) instead of the network's units: the
    network still gets the default units; target, bicubic and model output are mapped to
    (clip(HU, low, high) - low) / (high - low) before PSNR (data_range 1; foreground = the
    target's window value > 0.1)."""
    network = load_network(scale)
    result = {}
    for volume in volumes:
        if volume.modality != "CT":
            continue
        result[volume.label] = {}
        for low, high in windows:
            def to_window(units: torch.Tensor) -> torch.Tensor:
                hu = units.double() * volume.mapping.scale + volume.mapping.offset
                return ((hu.clamp(low, high) - low) / (high - low)).float()
            rows = []
            for z in volume.slices:
                hr = hr_plane(volume.unit, z, scale)
                lr = degrade_plane(hr, scale)
                target, bic = to_window(hr), to_window(bicubic(lr, scale))
                sr = to_window(run_network(network, lr))
                bw, bf = psnr_pair(bic, target, scale)
                sw, sf = psnr_pair(sr, target, scale)
                rows.append({"bicubic": bw, "model": sw, "gain": sw - bw, "bicubic_fg": bf,
                             "model_fg": sf, "gain_fg": sf - bf})
            result[volume.label][f"HU {low:g}..{high:g}"] = mean_scores(rows)
    return result


def edge_mask(hr: torch.Tensor, threshold: float = 0.08, dilate: int = 2) -> torch.Tensor:
    """(1, 1, H, W) bool: pixels within `dilate` px of a strong edge of the HR slice, i.e. where
    the Sobel gradient magnitude of the Gaussian-smoothed (sigma 1 px) slice exceeds
    `threshold` units per pixel."""
    from scipy import ndimage
    plane = ndimage.gaussian_filter(hr[0, 0].double().numpy(), 1.0)
    magnitude = np.hypot(ndimage.sobel(plane, 0), ndimage.sobel(plane, 1)) / 8.0
    mask = ndimage.binary_dilation(magnitude > threshold, iterations=dilate)
    return torch.from_numpy(mask)[None, None]


def experiment_edges(volumes: Sequence[Volume], scales: Sequence[int]) -> dict:
    """Where bicubic's squared error sits (near strong edges or elsewhere: texture, smooth
    tissue, noise) and how much of it the network removes in each region, per volume."""
    networks = {s: load_network(s) for s in scales}
    result = {}
    for volume in volumes:
        result[volume.label] = {}
        for s in scales:
            sums = {"edge": [0.0, 0.0, 0], "rest": [0.0, 0.0, 0]}
            for z in volume.slices:
                hr = hr_plane(volume.unit, z, s)
                lr = degrade_plane(hr, s)
                bic_err = (bicubic(lr, s) - hr)[..., s:-s, s:-s] ** 2
                sr_err = (run_network(networks[s], lr) - hr)[..., s:-s, s:-s] ** 2
                edges = edge_mask(hr)[..., s:-s, s:-s]
                for name, region in (("edge", edges), ("rest", ~edges)):
                    sums[name][0] += float(bic_err[region].sum())
                    sums[name][1] += float(sr_err[region].sum())
                    sums[name][2] += int(region.sum())
            total_bic = sums["edge"][0] + sums["rest"][0]
            total_sr = sums["edge"][1] + sums["rest"][1]
            entry = {"pixel_share_edge": sums["edge"][2] / (sums["edge"][2] + sums["rest"][2]),
                     "bicubic_error_share_edge": sums["edge"][0] / total_bic,
                     "model_error_share_edge": sums["edge"][1] / total_sr,
                     "gain_all_db": 10 * np.log10(total_bic / total_sr)}
            for name, (b, m, _) in sums.items():
                entry[f"gain_{name}_db"] = 10 * np.log10(b / m) if m > 0 else float("nan")
            result[volume.label][f"x{s}"] = entry
    return result


def cartoon(unit: np.ndarray, size: int = 3, passes: int = 2) -> np.ndarray:
    """Edge-preserving smoothing of each axial slice (`passes` x `size` median filter): removes
    fine texture and noise, keeps step edges (a 'CT-like' piecewise-flat image)."""
    from scipy import ndimage
    out = unit.astype(np.float32).copy()
    for _ in range(passes):
        out = ndimage.median_filter(out, size=(1, size, size))
    return out


def experiment_cartoon(volumes: Sequence[Volume], scales: Sequence[int]) -> dict:
    """Gain on each volume and on its median-filtered ('cartoon') version, HR target included."""
    networks = {s: load_network(s) for s in scales}
    result = {}
    for volume in volumes:
        smooth = cartoon(volume.unit)
        result[volume.label] = {}
        for name, unit in (("original", volume.unit), ("cartoon", smooth)):
            result[volume.label][name] = {
                f"x{s}": mean_scores([score(networks[s], hr_plane(unit, z, s), s) for z in volume.slices])
                for s in scales}
            result[volume.label][name]["noise_sigma_units"] = noise_sigma(unit, volume.slices)
    return result


class SelfEnsemble(torch.nn.Module):
    """Mean of `network` over the 8 dihedral transforms (transpose, row flip, column flip) of
    its input, each output transformed back (the engine's `self_ensemble=8`)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        total = None
        for transpose in (False, True):
            for dims in ([], [-2], [-1], [-2, -1]):
                x = lr.transpose(-2, -1) if transpose else lr
                x = torch.flip(x, dims) if dims else x
                y = self.network(x)
                y = torch.flip(y, dims) if dims else y
                y = y.transpose(-2, -1) if transpose else y
                total = y if total is None else total + y
        return total / 8


def experiment_ensemble(volumes: Sequence[Volume], scale: int) -> dict:
    """x4 gain of the plain network and of its 8-member geometric self-ensemble."""
    network = load_network(scale)
    ensemble = SelfEnsemble(network)
    result = {}
    for volume in volumes:
        result[volume.label] = {
            name: mean_scores([score(net, hr_plane(volume.unit, z, scale), scale) for z in volume.slices])
            for name, net in (("plain", network), ("self-ensemble x8", ensemble))}
    return result


def experiment_training_mix(patch: int = 128) -> dict:
    card = zoo.read_card(ROOT / "MedSRLib/models/weights/edsr_lite_x4.json")
    rows = []
    for relative in card["training_data"]:
        image = io.read_volume(DATA_ROOT / relative)
        z, y, x = sitk.GetArrayFromImage(image).shape
        spacing = image.GetSpacing()
        inside = min(y, patch) * min(x, patch) / patch ** 2  # share of a patch that is image, not padding
        modality = "MR" if "MR" in relative or relative.startswith("mr/") else "CT"
        rows.append({"path": relative, "modality": modality,
                     "shape_zyx": [z, y, x], "spacing_xyz_mm": [round(s, 2) for s in spacing],
                     "axial_pixels": z * y * x, "patch_share_inside_image": round(inside, 3)})
    summary = {}
    for modality in ("CT", "MR"):
        part = [r for r in rows if r["modality"] == modality]
        summary[modality] = {"volumes": len(part),
                             "share_of_patches": len(part) / len(rows),
                             "mean_patch_share_inside_image":
                                 float(np.mean([r["patch_share_inside_image"] for r in part])),
                             "axial_pixels": int(sum(r["axial_pixels"] for r in part))}
    return {"patch_size": patch, "volumes": rows, "summary": summary}


def experiment_finetune(volumes: Sequence[Volume], scale: int, weights: Sequence[Path]) -> dict:
    networks: dict[str, torch.nn.Module] = {"shipped": load_network(scale)}
    for path in weights:
        networks[str(path)] = load_network(scale, path)
    result = {}
    for volume in volumes:
        result[volume.label] = {"seen_in_shipped_training": volume.seen}
        for name, network in networks.items():
            rows = [score(network, hr_plane(volume.unit, z, scale), scale) for z in volume.slices]
            result[volume.label][name] = mean_scores(rows)
    return result


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True,
                        choices=("baseline", "normalisation", "quantisation", "noise", "content",
                                 "training-mix", "finetune", "window", "edges", "cartoon", "ensemble"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/mr_diagnosis"))
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--weights", nargs="*", default=[], help="finetune: safetensors or .pt files")
    parser.add_argument("--modalities", nargs="*", default=["MR", "CT"],
                        help="validation sets to use (none: only --extra volumes)")
    parser.add_argument("--extra", nargs="*", default=[], metavar="PATH:MODALITY",
                        help="more volumes (relative to the data root), e.g. mr/brain-mr-seg3d.nii.gz:MR; "
                             "never the benchmark's test patients")
    args = parser.parse_args(argv)
    for item in args.extra:
        path, modality = item.rsplit(":", 1)
        EXTRA_VOLUMES.append((path, modality, Path(path).name.split(".")[0]))
    torch.set_num_threads(1)
    started = time.process_time()
    experiments: dict[str, Callable[[], dict]] = {
        "baseline": lambda: experiment_baseline(validation_volumes(args.modalities), (2, 3, 4)),
        "normalisation": lambda: experiment_normalisation(validation_volumes(args.modalities), args.scale),
        "quantisation": lambda: experiment_quantisation(validation_volumes(args.modalities), (2, 4)),
        "noise": lambda: experiment_noise(validation_volumes(args.modalities), args.scale),
        "content": lambda: experiment_content(validation_volumes(args.modalities), args.scale),
        "training-mix": experiment_training_mix,
        "ensemble": lambda: experiment_ensemble(validation_volumes(args.modalities), args.scale),
        "edges": lambda: experiment_edges(validation_volumes(args.modalities), (2, 4)),
        "cartoon": lambda: experiment_cartoon(validation_volumes(args.modalities), (2, 4)),
        "window": lambda: experiment_window(validation_volumes(["CT"]), args.scale),
        "finetune": lambda: experiment_finetune(validation_volumes(args.modalities), args.scale,
                                                [Path(w) for w in args.weights]),
    }
    result = experiments[args.experiment]()
    result = {"experiment": args.experiment, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "cpu_seconds": round(time.process_time() - started, 1), "result": result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.experiment}.json"
    path.write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    print(json.dumps(result, indent=1, default=float)[:6000])
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
