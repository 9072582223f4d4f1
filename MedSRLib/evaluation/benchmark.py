"""`medsr benchmark`: degrade held-out HR slices, super-resolve them with every model, score them.

Protocol (stated again in every results.md):

- Each input (volume file, DICOM folder or 2-D PNG) is normalised exactly as in training and
  inference (`intensity.fit_mapping`: the volume's 0.5th/99.5th percentiles -> 0/1). Every
  metric is computed in those unit intensities with data_range = 1.0.
- Slices: `--slices-per-volume` evenly spaced axial slices (array axis 0) among those with at
  least 5 % foreground, the rule of the trainer's validation slices; optionally centre-cropped
  to `--max-size` pixels. Foreground = unit intensity > 0.1 on the HR slice, the training
  threshold (`data.foreground_threshold`), no morphological closing.
- Per scale s: the HR slice is cropped (bottom/right) to a multiple of the degradation's
  factors, degraded by `training.degrade.apply_pipeline` (default: anti-aliased bicubic, the
  training default), super-resolved by each model through the inference engine
  (`engine.SliceUpscaler`; a 2.5-D model also gets the slice's neighbours, each degraded alike,
  edges replicated, as inference gives them), and scored on the raw outputs (no clamping)
  after cropping `s` pixels from every border (BasicSR's crop_border = scale).
- Learned models need trained weights for the scale: without them they are skipped with a
  note, or run with random weights under --allow-untrained and labelled "(untrained)".
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..transforms import intensity
from ..io import volumes as io
from .. import metrics
from ..models import registry as zoo
from ..runtime.engine import (EngineOptions, SliceUpscaler, resolve_device, resolve_precision,
                              slice_stacks)
from ..errors import InputError, WeightsError
from ..training import data as tdata
from ..transforms import degrade
from .scores import (BASELINE_SUFFIX, FOREGROUND_THRESHOLD, BenchmarkSlice, ScaleResult,  # noqa: F401
                     image_label, mean_scores)

#: A slice is a candidate when at least this fraction of it is foreground (as in training).
MIN_FOREGROUND_FRACTION = 0.05
#: Neighbours kept around each benchmark slice for 2.5-D models (the widest model's k).
MAX_CONTEXT_SLICES = 4
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".dcm")
NOT_DICOM_SUFFIXES = (".txt", ".md", ".json", ".csv", ".yaml", ".yml", ".pdf", ".html", ".py")
DEFAULT_DEGRADATION = [{"type": "bicubic"}]

#: Validation hold-outs of the training recipes (shared/data/MANIFEST.md), relative to the data
#: root; "xray/nih/*.png[-10:]" means the last 10 X-rays by file name.
HELD_OUT = {
    "CT": ["sarcoma/STS_012/CT_image.nii.gz", "sarcoma/STS_014/CT_image.nii.gz",
           "ct/totalseg-example-ct.nii.gz"],
    "MR": ["sarcoma/STS_012/MR_T1_image.nii.gz", "sarcoma/STS_014/MR_T1_image.nii.gz",
           "mr/brain-t1-gd-skullstripped.nii.gz",
           "brats/brats_2013_pat0006_1/T1c_subtrMeanDivStd.nii.gz",
           "brats/brats_2013_pat0006_1/Flair_subtrMeanDivStd.nii.gz"],
    "XR": ["xray/nih/*.png[-10:]"],
}


# ---------------------------------------------------------------------------------------------
# Inputs and slices


def held_out_inputs(data_root: Path, modality: str) -> list[Path]:
    """The suggested held-out files of `modality` under `data_root`; InputError if one is missing."""
    paths = []
    for entry in HELD_OUT[modality]:
        if entry.endswith("[-10:]"):
            pattern = entry[:-len("[-10:]")]
            found = sorted(data_root.glob(pattern))[-10:]
            if not found:
                raise InputError(f"{data_root / pattern}: no held-out files found")
            paths.extend(found)
        else:
            path = data_root / entry
            if not path.exists():
                raise InputError(f"{path}: held-out file is missing (is --held-out the data root?)")
            paths.append(path)
    return paths


def _is_image_file(path: Path) -> bool:
    return any(path.name.lower().endswith(s) for s in VOLUME_SUFFIXES)


def _scan_folder(folder: Path, pattern: str) -> list[Path]:
    """Image files matching `pattern` under `folder`, and each sub-folder holding a DICOM series
    as one input (its files are not listed again)."""
    maybe_dicom = any(f.is_file() and (f.name.lower().endswith(".dcm") or not _is_image_file(f))
                      and f.suffix.lower() not in NOT_DICOM_SUFFIXES for f in folder.iterdir())
    if maybe_dicom and io.list_dicom_series(folder):
        return [folder]
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            found.extend(_scan_folder(entry, pattern))
        elif _is_image_file(entry) and entry.match(pattern) and not entry.name.lower().endswith(".dcm"):
            found.append(entry)
    return found


def collect_inputs(inputs: Sequence[str], pattern: str = "*") -> list[Path]:
    """Files as given; a folder is a DICOM series if it holds one, else scanned recursively for
    files matching `pattern` and DICOM series folders."""
    paths: list[Path] = []
    for text in inputs:
        path = Path(text)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_file():
            paths.append(path)
            continue
        found = _scan_folder(path, pattern)
        if not found:
            raise InputError(f"{path}: holds no NIfTI/NRRD/MHA/PNG files matching {pattern!r} "
                             "or DICOM series")
        paths.extend(found)
    return paths


def volume_labels(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the file stem, prefixed by its folder when stems repeat."""
    def stem(p: Path) -> str:
        name = p.name
        for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
            if name.lower().endswith(suffix):
                return name[:-len(suffix)]
        return name
    stems = [stem(p) for p in paths]
    labels = [f"{p.parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]
    return [f"{label}#{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def choose_slices(unit_volume: np.ndarray, count: int) -> list[int]:
    """`count` evenly spaced slice indices (axis 0) among slices with >= 5 % foreground, the
    ends excluded (the trainer's validation-slice rule); all slices if none qualifies."""
    fraction = (unit_volume > FOREGROUND_THRESHOLD).reshape(unit_volume.shape[0], -1).mean(1)
    candidates = np.flatnonzero(fraction >= MIN_FOREGROUND_FRACTION)
    if candidates.size == 0:
        candidates = np.arange(unit_volume.shape[0])
    if candidates.size <= 2:
        return [int(c) for c in candidates[:count]]
    positions = np.linspace(0, candidates.size - 1, count + 2).round().astype(int)[1:-1]
    return [int(z) for z in np.unique(candidates[positions])]


def centre_crop(plane: np.ndarray, max_size: int | None) -> np.ndarray:
    if not max_size:
        return plane
    h, w = min(plane.shape[0], max_size), min(plane.shape[1], max_size)
    y0, x0 = (plane.shape[0] - h) // 2, (plane.shape[1] - w) // 2
    return np.ascontiguousarray(plane[y0:y0 + h, x0:x0 + w])


def resize_plane(plane: np.ndarray, size: int | None) -> np.ndarray:
    """`plane` resampled to size x size (antialiased bilinear, as training's whole_slice_size)."""
    if not size:
        return plane
    from ..models.networks.lesion_detector import resize_slices
    return resize_slices(torch.from_numpy(np.ascontiguousarray(plane))[None, None], size)[0, 0].numpy()


def load_slices(path: Path, label: str, count: int, max_size: int | None,
                resize: int | None = None) -> list[BenchmarkSlice]:
    voxels = sitk.GetArrayFromImage(io.read_volume(path))
    unit = intensity.fit_mapping(voxels).to_unit(voxels)
    del voxels
    planes = []
    for z in choose_slices(unit, count):
        name = image_label(label, None if unit.shape[0] == 1 else z)
        stack = slice_stacks(unit, 0, z, z + 1, MAX_CONTEXT_SLICES)[0]
        neighbours = np.stack([centre_crop(resize_plane(plane, resize), max_size) for plane in stack])
        planes.append(BenchmarkSlice(name, str(path), neighbours[MAX_CONTEXT_SLICES // 2], neighbours))
    return planes


def model_input(item: BenchmarkSlice, lr: torch.Tensor, context_slices: int,
                steps: Sequence[dict[str, Any]], factors: tuple[int, int]) -> np.ndarray:
    """What a model gets for one benchmark slice: the degraded slice `lr` (1, 1, h, w) as
    (1, h, w), or for a 2.5-D model (`context_slices` k) (1, k + 1, h, w) with its neighbours
    degraded by the same steps and `lr` itself in the middle."""
    if not context_slices:
        return lr[:, 0].numpy()
    if item.neighbours_unit is None:
        raise ValueError(f"{item.label}: no neighbouring slices for a 2.5-D model")
    centre, half = MAX_CONTEXT_SLICES // 2, context_slices // 2
    hr = degrade.crop_to_multiple(torch.from_numpy(item.neighbours_unit)[None], factors)
    stack = degrade.apply_pipeline(hr[:, centre - half:centre + half + 1], steps,
                                   generator=torch.Generator().manual_seed(0))
    stack[:, half] = lr[:, 0]
    return stack.numpy()


# ---------------------------------------------------------------------------------------------
# Running one scale


def score_slice(output: torch.Tensor, target: torch.Tensor, border: int, xray: bool) -> dict[str, float]:
    """Metrics of one (1, 1, H, W) output against its HR target, whole slice and foreground."""
    mask = target > FOREGROUND_THRESHOLD
    scores = {"psnr_whole": metrics.psnr(output, target, 1.0, crop_border=border),
              "ssim_whole": metrics.ssim(output, target, 1.0, crop_border=border)}
    if xray:
        scores["ms_ssim_whole"] = metrics.ms_ssim(output, target, 1.0, crop_border=border)
        scores["uqi_whole"] = metrics.uqi(output, target, crop_border=border)
    try:  # an empty foreground (after the border crop and the SSIM window) has no scores
        scores["psnr_foreground"] = metrics.psnr(output, target, 1.0, mask=mask, crop_border=border)
        scores["ssim_foreground"] = metrics.ssim(output, target, 1.0, mask=mask, crop_border=border)
        if xray:
            scores["uqi_foreground"] = metrics.uqi(output, target, mask=mask, crop_border=border)
    except ValueError:
        for key in ("psnr_foreground", "ssim_foreground", "uqi_foreground"):
            scores.pop(key, None)
    return scores


def load_methods(names: Sequence[str], factors: tuple[int, int], allow_untrained: bool,
                 weights_dir: Path | None, modality: str | None = None,
                 baseline_dir: Path | None = None) -> tuple[dict[str, zoo.SRModel], list[str]]:
    """{column name: model} with bicubic first, plus notes on the models left out.

    With `baseline_dir`, every learned model that has weights there for these factors also runs
    with them, as the column "<name> (baseline)" right after its own."""
    methods: dict[str, zoo.SRModel] = {}
    notes = []
    for name in ["bicubic"] + [n for n in names if n != "bicubic"]:
        _add_method(methods, notes, name, factors, allow_untrained, weights_dir, modality)
        if baseline_dir is not None and name in methods and methods[name].spec.needs_weights:
            _add_baseline(methods, notes, name, factors, baseline_dir, modality)
    return methods, notes


def _add_baseline(methods: dict[str, zoo.SRModel], notes: list[str], name: str,
                  factors: tuple[int, int], baseline_dir: Path, modality: str | None) -> None:
    """Adds `name` with the weights of `baseline_dir` as "<name> (baseline)", if it has them."""
    try:
        model = zoo.load_model(name, factors, weights_dir=baseline_dir, modality=modality)
    except InputError as err:
        notes.append(f"{name} (baseline): skipped ({err})")
        return
    card = model.card or {}
    notes.append(f"{name} (baseline): weights {baseline_dir / str(card.get('weights_file'))} "
                 f"(recipe {card.get('recipe')})")
    methods[f"{name}{BASELINE_SUFFIX}"] = model


def _add_method(methods: dict[str, zoo.SRModel], notes: list[str], name: str,
                factors: tuple[int, int], allow_untrained: bool, weights_dir: Path | None,
                modality: str | None) -> None:
    """Adds model `name` (its weights from `weights_dir` or the shipped ones) to `methods`, or a
    note on why it is left out."""
    try:
        model = zoo.load_model(name, factors, weights_dir=weights_dir, modality=modality)
        label = name
        if model.card is not None:
            card = model.card
            notes.append(f"{name}: weights {card.get('weights_file')} (recipe {card.get('recipe')}, "
                         f"modality {card.get('modality')}, degradation {card.get('degradation')})")
    except WeightsError:
        raise  # a broken weights file must stop the benchmark, not drop the model quietly
    except InputError as err:
        if not allow_untrained or "no trained weights" not in str(err):
            notes.append(f"{name}: skipped ({err})")
            return
        model = zoo.load_model(name, factors, allow_untrained=True, weights_dir=weights_dir)
        label = f"{name} (untrained)"
    methods[label] = model


def _training_patients(card: dict[str, Any]) -> list[tuple[str, str, set[str]]]:
    """(glob, patient rule, ids of the patients it trained on) per data source of a card's recipe."""
    training = card.get("training_data") or []
    sources = ((card.get("training_config") or {}).get("data") or {}).get("sources") or []
    result = []
    for source in sources:
        pattern, rule = source.get("glob"), source.get("patient", "stem")
        if not pattern:
            continue
        ids = set()
        for path in training:
            if fnmatch.fnmatch(path, pattern):
                try:
                    ids.add(tdata.patient_of(path, rule))
                except ValueError:
                    continue
        result.append((pattern, rule, ids))
    return result


def leak_notes(methods: dict[str, zoo.SRModel], inputs: Sequence[str]) -> list[str]:
    """Warnings for inputs that a model trained on: the same file (the card's training files), or
    another file of a training patient of the same data source (e.g. a resampled copy), by the
    patient rules of the card's recipe."""
    notes = []
    for label, model in methods.items():
        card = model.card or {}
        training = card.get("training_data", [])
        sources = _training_patients(card)
        for path in inputs:
            resolved = Path(path).resolve().as_posix()
            if any(resolved.endswith("/" + t.strip("/")) for t in training):
                notes.append(f"WARNING: {label} was trained on {path}: not a held-out result")
                continue
            parts = resolved.strip("/").split("/")
            tails = ["/".join(parts[-n:]) for n in range(1, len(parts) + 1)]
            for pattern, rule, ids in sources:
                tail = next((t for t in tails if fnmatch.fnmatch(t, pattern)), None)
                if tail is None:
                    continue
                try:
                    patient = tdata.patient_of(tail, rule)
                except ValueError:
                    continue
                if patient in ids:
                    notes.append(f"WARNING: {label} was trained on patient {patient!r} of {path}: "
                                 "not a held-out result")
                    break
    return notes


def run_scale(slices: Sequence[BenchmarkSlice], scale: int, model_names: Sequence[str],
              degradation: Sequence[dict[str, Any]], options: EngineOptions, modality: str,
              allow_untrained: bool = False, weights_dir: Path | None = None,
              figure_index: int = 0, seed: int = 0, baseline_dir: Path | None = None) -> ScaleResult:
    steps = degrade.with_scale(degradation, scale)
    factors = degrade.pipeline_factors(steps)
    methods, notes = load_methods(model_names, factors, allow_untrained, weights_dir, modality,
                                  baseline_dir)
    notes += leak_notes(methods, sorted({s.volume for s in slices}))
    upscalers = {m: SliceUpscaler(model, factors, options, learned=model.spec.needs_weights)
                 for m, model in methods.items()}
    seconds = {m: 0.0 for m in methods}
    scores: dict[str, dict[str, dict[str, float]]] = {}
    figure = None
    border = max(factors)
    for index, item in enumerate(slices):
        hr = degrade.crop_to_multiple(torch.from_numpy(item.hr_unit)[None, None], factors)
        generator = torch.Generator().manual_seed(seed + 1000 * scale + index)
        lr = degrade.apply_pipeline(hr, steps, generator=generator)
        scores[item.label] = {}
        outputs = {}
        for method, upscaler in upscalers.items():
            block = model_input(item, lr, upscaler.context_slices, steps, factors)
            if index == 0:  # untimed warm-up (allocator, kernels) so timings are steady-state
                upscaler.upscale(block)
            started = time.perf_counter()
            sr = upscaler.upscale(block)
            seconds[method] += time.perf_counter() - started
            output = torch.from_numpy(sr)[:, None]
            scores[item.label][method] = score_slice(output, hr, border, modality == "XR")
            if index == figure_index:
                outputs[method] = sr[0]
        if index == figure_index:
            figure = {"image": item.label, "hr": hr[0, 0].numpy(), "outputs": outputs}
    per_slice = {m: s / max(1, len(slices)) for m, s in seconds.items()}
    return ScaleResult(scale, factors, list(methods), scores, per_slice, notes, figure)


def figure_slice_index(slices: Sequence[BenchmarkSlice]) -> int:
    """The slice with the largest foreground fraction (the figure's image)."""
    return int(np.argmax([(s.hr_unit > FOREGROUND_THRESHOLD).mean() for s in slices]))


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsr benchmark",
        description="Degrade HR images (training's degradation), super-resolve them with each "
                    "model and report PSNR/SSIM per image (paper 000, Tables II-IV layout).",
        epilog="examples:\n"
               "  medsr benchmark --held-out ../shared/data --modality CT --models shipped --out bench/ct\n"
               "  medsr benchmark scans/ --modality MR --models edsr_lite fmen --scales 2 --out bench/mr\n"
               "  medsr benchmark --through-plane --held-out ../shared/data --out bench/tp\n"
               "      (thick slices made from thin ones; `medsr benchmark --through-plane --help`)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="volume/PNG files, DICOM folders, or folders to scan")
    parser.add_argument("--pattern", default="*",
                        help='file-name pattern when scanning folders, e.g. "*CT_image*" (default: all)')
    parser.add_argument("--held-out", metavar="DATA_ROOT", default=None,
                        help="add the training recipes' held-out patients of --modality found "
                             "under DATA_ROOT (shared/data)")
    parser.add_argument("--modality", required=True, choices=("CT", "MR", "XR"),
                        help="XR adds MS-SSIM and UQI tables")
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4],
                        help="in-plane factors to degrade and restore by (default: 2 3 4)")
    parser.add_argument("--models", nargs="+", default=["bicubic"],
                        help="registry names, or 'shipped' for every model with shipped weights "
                             "at one of --scales; bicubic is always included as the reference")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--slices-per-volume", type=int, default=3,
                        help="slices scored per volume, evenly spaced (default 3)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="centre-crop slices to at most PX x PX (default: whole slices)")
    parser.add_argument("--resize", type=int, default=None, metavar="PX",
                        help="resample each HR slice to PX x PX first (paper 002's X-ray protocol: 256)")
    parser.add_argument("--degradation", default=None,
                        help='JSON list of degradation steps, e.g. \'[{"type": "bicubic"}]\' '
                             "(the scale is filled in); default: anti-aliased bicubic")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="run learned models without weights (random; labelled untrained)")
    parser.add_argument("--weights-dir", default=None,
                        help="folder of safetensors + model cards to use instead of the shipped ones")
    parser.add_argument("--baseline-weights-dir", default=None, metavar="DIR",
                        help="also run each learned model with the weights in DIR (e.g. an earlier "
                             "release) and report the step over them per volume")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: a CUDA GPU when torch sees one, else the CPU")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="as for `medsr upscale` (auto: the fastest within 0.05 dB of fp32)")
    parser.add_argument("--tile", type=int, default=None, help="tile edge in input pixels (0 = whole)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--seed", type=int, default=0, help="seed of noisy degradations")
    return parser


def _card_modalities(path: Path) -> list[str]:
    try:
        return list(zoo.read_card(path).get("modality") or [])
    except (WeightsError, ValueError, OSError):
        return []  # an unreadable card does not hide the model; loading it will say why


def expand_model_names(names: Sequence[str], scales: Sequence[int],
                       weights_dir: Path | None = None, modality: str | None = None) -> list[str]:
    """`names` with "shipped" replaced by the models that ship weights (in `weights_dir` if
    given) for any of `scales` and, with `modality`, whose card lists that modality (or none)."""
    expanded = []
    for name in names:
        if name != "shipped":
            expanded.append(name)
            continue
        for candidate in zoo.model_names():
            spec = zoo.get_spec(candidate)
            if spec.kind in ("interpolation", "detector", "through_plane"):
                continue
            files = [zoo.shipped_weights(spec, s, weights_dir, modality) for s in scales if s in spec.scales]
            files = [f for f in files if f]
            if files and (modality is None or any(
                    not _card_modalities(f) or modality in _card_modalities(f) for f in files)):
                expanded.append(candidate)
    return list(dict.fromkeys(expanded))


def main(argv: Sequence[str]) -> int:
    from . import report

    argv = list(argv)
    if "--through-plane" in argv:  # thick slices made from thin ones (issue 16)
        from . import through_plane as through_plane_benchmark
        return through_plane_benchmark.main(argv)
    args = build_parser().parse_args(argv)
    if args.slices_per_volume < 1:
        raise InputError(f"--slices-per-volume must be >= 1, got {args.slices_per_volume}")
    if any(s < 2 for s in args.scales):
        raise InputError(f"--scales must be integers >= 2, got {args.scales}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # untrained (random) weights are reproducible too
    try:
        degradation = json.loads(args.degradation) if args.degradation else DEFAULT_DEGRADATION
    except json.JSONDecodeError as err:
        raise InputError(f"--degradation is not valid JSON ({err})") from None
    paths = collect_inputs(args.inputs, args.pattern)
    if args.held_out:
        paths += held_out_inputs(Path(args.held_out), args.modality)
    if not paths:
        raise InputError("no inputs: give files/folders or --held-out DATA_ROOT")
    slices = []
    for path, label in zip(paths, volume_labels(paths)):
        slices.extend(load_slices(path, label, args.slices_per_volume, args.max_size, args.resize))
        print(f"read {path}", file=sys.stderr)
    options = EngineOptions(device=args.device, precision=args.precision, tile=args.tile)
    figure_index = figure_slice_index(slices)
    weights_dir = Path(args.weights_dir) if args.weights_dir else None
    baseline_dir = Path(args.baseline_weights_dir) if args.baseline_weights_dir else None
    if baseline_dir is not None and not baseline_dir.is_dir():
        raise InputError(f"--baseline-weights-dir {baseline_dir}: no such folder")
    model_names = expand_model_names(args.models, args.scales, weights_dir, args.modality)
    results = []
    for scale in args.scales:
        results.append(run_scale(slices, scale, model_names, degradation, options, args.modality,
                                 args.allow_untrained, weights_dir, figure_index, args.seed,
                                 baseline_dir))
        means = mean_scores(results[-1])
        print(f"x{scale}: " + ", ".join(f"{m} {v['psnr_whole']:.2f} dB" for m, v in means.items()),
              file=sys.stderr)
    run_info = {
        "command": "medsr benchmark " + shlex.join(argv), "modality": args.modality,
        "inputs": [str(p) for p in paths], "images": [s.label for s in slices],
        "degradation": degradation, "device": args.device, "precision": args.precision,
        "autocast_learned_models": str(resolve_precision(args.precision, resolve_device(args.device),
                                                         learned=True)).replace("torch.", ""),
        "slices_per_volume": args.slices_per_volume, "max_size": args.max_size, "resize": args.resize,
        "torch_threads": torch.get_num_threads(),
    }
    out_dir = Path(args.out)
    for written in report.write_all(out_dir, results, run_info):
        print(f"wrote {written}", file=sys.stderr)
    return 0
