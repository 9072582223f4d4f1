"""`medsr` command line: upscale, batch, models, info, demo, train, benchmark.

Exit status: 0 success, 2 bad input or usage (the message names the file or option and the
problem; a full disk is one), 1 internal error, 3 (`medsr batch`) some cases failed (their
messages are in the manifest), 130 cancelled (Ctrl-C, SIGTERM or SIGHUP, at any
moment). Nothing is written unless the whole run succeeds; an existing output is replaced
only by a complete new one.

Heavy imports (numpy, torch, SimpleITK) happen inside the commands, after the signal handlers
of `console_main` are in place, so an early Ctrl-C is a clean cancel too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import CancelledError, InputError

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_CANCELLED = 0, 1, 2, 130
EXIT_SOME_CASES_FAILED = 3  # `medsr batch`: the other cases are done; see the manifest


def _parse_scale(text: str) -> int | tuple[int | float, ...]:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:  # per-axis factors may be real (through-plane: 1,1,2.5); one value is an integer
        values = tuple(int(p) if p.strip().lstrip("+-").isdigit() else float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"scale must be an integer or x,y,z numbers, got {text!r}")
    if len(values) == 1:
        if not isinstance(values[0], int):
            raise argparse.ArgumentTypeError(
                f"an in-plane scale must be an integer 2-4, got {text!r}; a real factor is "
                "through-plane: --scale 1,1,2.5 or --target-spacing")
        return values[0]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"scale needs 1 or 3 numbers, got {text!r}")
    return values


def _parse_spacing(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"target spacing must be mm or x,y,z mm, got {text!r}") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"target spacing needs 1 or 3 numbers (mm), got {text!r}")
    return values[0] if len(values) == 1 else values


def _positive_float(what: str):
    """argparse type: a positive finite number (usage error naming the option otherwise)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not (value > 0 and value != float("inf")):
            raise argparse.ArgumentTypeError(f"{what} must be positive, got {text!r}")
        return value
    return parse


def _int_at_least(minimum: int, what: str):
    """argparse type: an integer >= `minimum` (usage error naming the option otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}, got {value}")
        return value
    return parse


def _parse_tile(text: str) -> int:
    from .engine import MIN_TILE
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile must be an integer, got {text!r}") from None
    if value != 0 and value < MIN_TILE:
        raise argparse.ArgumentTypeError(
            f"tile must be 0 (whole slices) or at least {MIN_TILE} pixels, got {value}")
    return value


def _parse_axis(text: str) -> str:
    if text.strip().lower() not in ("auto", "x", "y", "z", "i", "j", "k", "0", "1", "2"):
        raise argparse.ArgumentTypeError(f"axis must be auto, x, y, z or 0-2, got {text!r}")
    return text


class _Progress:
    """Progress reporter on stderr: a tqdm bar, JSON lines (for the Slicer module), or nothing."""

    def __init__(self, style: str):
        self.style = style
        self._bar = None

    def __call__(self, fraction: float, message: str) -> None:
        if self.style == "json":
            print(json.dumps({"fraction": round(fraction, 4), "message": message}),
                  file=sys.stderr, flush=True)
        elif self.style == "bar":
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(total=1000, file=sys.stderr, unit="‰", leave=False,
                                 bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
            self._bar.set_description_str(message)
            self._bar.update(int(fraction * 1000) - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="registry name (see `medsr models`); default: the shipped default "
                             "model for the modality and scale")
    parser.add_argument("--scale", type=_parse_scale, default=None,
                        help="in-plane factor 2-4 (default 2), or per-axis x,y,z factors such as "
                             "1,1,3 or 1,1,2.5 (through-plane: any factor up to 8)")
    parser.add_argument("--axis", default="auto", type=_parse_axis,
                        help="slice axis: auto (in-plane: the stored slices; through-plane: "
                             "largest spacing), x, y or z")
    parser.add_argument("--target-spacing", type=_parse_spacing, default=None,
                        help="output spacing in mm, e.g. 1 (every coarser axis) or 1,1,1; "
                             "factors are computed from the input spacing")
    parser.add_argument("--slice-thickness", type=_positive_float("slice thickness"), default=None,
                        help="thick slices' thickness in mm (default: DICOM SliceThickness, "
                             "else the slice spacing); below the spacing = a gap")
    parser.add_argument("--slice-profile", choices=("box", "gaussian"), default="box",
                        help="assumed slice profile for through-plane SR (default box)")
    parser.add_argument("--adapt", action="store_true",
                        help="through-plane: fine-tune the network on this volume's own "
                             "in-plane slices first")
    parser.add_argument("--adapt-seconds", type=_positive_float("adapt seconds"), default=None,
                        help="CPU budget of --adapt in seconds (default 180)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"),
                        help="inference runtime: auto (OpenVINO on the CPU for learned networks, "
                             "torch on CUDA), torch or openvino")
    parser.add_argument("--precision", default="auto",
                        choices=("auto", "fp32", "bf16", "fp16", "int8"),
                        help="auto: the fastest within 0.05 dB PSNR of fp32 on this machine "
                             "(a shipped int8 model that meets it, bf16 layers on CPUs that have "
                             "bf16); int8: the OpenVINO int8 model whatever its cost")
    parser.add_argument("--tile", type=_parse_tile, default=None,
                        help="tile edge in input pixels (0 = whole slices; default automatic)")
    parser.add_argument("--batch", type=_int_at_least(1, "batch"), default=4,
                        help="slices per batch (>= 1)")
    parser.add_argument("--threads", type=_int_at_least(1, "threads"), default=None,
                        help="CPU threads for torch (>= 1)")
    parser.add_argument("--modality", choices=("CT", "MR", "XR"), default=None,
                        help="modality used to pick the default model (else from DICOM tags)")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="run a learned model that has no trained weights (random weights: "
                             "for testing the plumbing only)")
    parser.add_argument("--weights", default=None, help="safetensors weights to use instead")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsr", description="Super-resolution for medical volumes.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upscale", help="super-resolve a volume or 2-D image")
    up.add_argument("input", help="NIfTI/NRRD/MHA file, DICOM series folder, or PNG")
    up.add_argument("output", help="output file: .nii.gz, .nii, .nrrd, .mha (or .png for 2-D), "
                                   "or a folder for a DICOM series (--format dicom)")
    _add_run_options(up)
    up.add_argument("--series", default=None, help="DICOM SeriesInstanceUID when a folder has several")
    up.add_argument("--overwrite", action="store_true",
                    help="replace an existing output file (or non-empty DICOM output folder)")
    up.add_argument("--format", dest="output_format", choices=("auto", "dicom"), default="auto",
                    help="auto: from the output's suffix, or a DICOM series when it has none and "
                         "the input is DICOM; dicom: a derived DICOM series in folder OUTPUT, one "
                         "file per slice, in the source's study")
    up.add_argument("--dicom-template", default=None, metavar="DIR",
                    help="DICOM series giving the DICOM output its patient, study, frame of "
                         "reference and stored representation (needed for a non-DICOM input)")
    up.add_argument("--float", dest="output_float", action="store_true",
                    help="write float32 voxels instead of the input's pixel type")
    up.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    up.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                    help="progress on stderr: bar, JSON lines, or none")
    up.add_argument("--roi", default=None, metavar="auto|x0,y0,z0,x1,y1,z1|MASK_FILE",
                    help="lesion-focused mode: run --roi-model inside this ROI (plus a margin) and "
                         "--model elsewhere, feathered: 'auto' (lesion segmenter: one ROI per "
                         "lesion found; 'auto:lesion_detector' for paper 003's box detector), a "
                         "box of input voxel indices (lower inclusive, upper exclusive; several "
                         "joined by ';'), or a mask file on the input's grid")
    up.add_argument("--roi-model", default=None,
                    help="model inside the ROI (default: lfsr, the LFSR generator, when its weights "
                         "ship and are trained on the input's modality when that is known; "
                         "else the run's model)")
    up.add_argument("--roi-margin", type=float, default=None, metavar="MM",
                    help="margin around the ROI in mm (default 5); the feathering lies in it")
    up.add_argument("--roi-json", default=None, metavar="PATH",
                    help="write the ROI, detector score and fallback as JSON to PATH")

    models = sub.add_parser("models", help="list the registered models")
    models.add_argument("--json", action="store_true", help="machine-readable JSON")

    info = sub.add_parser("info", help="size, spacing, orientation and intensity range of a volume")
    info.add_argument("input")
    info.add_argument("--series", default=None)

    demo = sub.add_parser("demo", help="upscale the bundled sample CT and write a comparison PNG")
    demo.add_argument("--out", default="medsr-demo", help="output folder (default: medsr-demo)")
    demo.add_argument("--model", default=None)
    demo.add_argument("--scale", type=_int_at_least(2, "scale"), default=2)
    demo.add_argument("--overwrite", action="store_true")

    _add_batch_parser(sub)
    sub.add_parser("train", help="train a model from a recipe config (see `medsr train --help`)",
                   add_help=False)
    sub.add_parser("benchmark", help="benchmark models on a folder of HR volumes", add_help=False)
    return parser


def _cmd_upscale(args: argparse.Namespace) -> int:
    from . import api, io

    mask = None if args.roi is None else _roi_mask_path(args.roi)
    dicom_source = _dicom_output_source(args)
    if dicom_source is None:
        output = io.check_output_path(args.input, args.output, args.overwrite, {"ROI mask": mask})
    else:
        output = io.check_output_folder(args.input, args.output, args.overwrite,
                                        {"ROI mask": mask, "DICOM template": args.dicom_template})
    if args.roi is None:
        for flag in ("roi_model", "roi_margin", "roi_json"):
            if getattr(args, flag) is not None:
                raise InputError(f"--{flag.replace('_', '-')} needs --roi")
    elif args.roi_json is not None:
        io.check_side_file(args.roi_json, {"input": args.input, "output": output,
                                           "ROI mask": mask},
                           args.overwrite, "--roi-json")
    image = io.read_volume(args.input, series_uid=args.series)
    progress = _Progress("none" if args.quiet else args.progress)
    started = time.perf_counter()
    if args.roi is not None:
        return _upscale_with_roi(args, image, output, progress, started, dicom_source)
    try:
        result = api.upscale(
            image, model=args.model, scale=args.scale, axis=args.axis, device=args.device,
            precision=args.precision, tile=args.tile, batch_size=args.batch, threads=args.threads,
            backend=args.backend, modality=args.modality, allow_untrained=args.allow_untrained,
            output_float=args.output_float, weights=args.weights, progress=progress,
            **_through_plane_options(args))
    finally:
        progress.close()
    _write_output(result, output, args, dicom_source)
    used = result.GetMetaData(api.MODEL_KEY)
    if args.model is None and used == "bicubic":
        print("medsr: note: no trained model ships for this modality and scale; used bicubic "
              "(see `medsr models`)", file=sys.stderr)
    if not args.quiet:
        print(f"wrote {output}: {result.GetSize()} voxels, spacing "
              f"{tuple(round(s, 4) for s in result.GetSpacing())} mm, model "
              f"{result.GetMetaData(api.MODEL_KEY)}, {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
    return EXIT_OK


def _dicom_output_source(args: argparse.Namespace):
    """The `dicom_export.DicomSource` giving a DICOM series output its identity (checked before
    any work), or None when the output is a volume file."""
    from . import io

    input_is_dicom = Path(args.input).is_dir() or io.is_dicom_file(args.input)
    wanted = args.output_format == "dicom" or (
        io.suffix_of(args.output) == "" and (input_is_dicom or args.dicom_template is not None))
    if not wanted:
        if args.dicom_template is not None:
            raise InputError(f"{args.output}: --dicom-template is for a DICOM series output "
                             "(--format dicom, or an output folder without a file suffix)")
        return None
    if not Path(args.input).exists():
        raise InputError(f"{args.input}: no such file or folder")
    from . import dicom_export

    if args.dicom_template is not None:
        return dicom_export.load_source(args.dicom_template)
    if not input_is_dicom:
        raise InputError(f"{args.input}: is not DICOM, so a DICOM output has no patient, study "
                         "or frame of reference to belong to; pass --dicom-template DIR (a DICOM "
                         "series of the same patient and frame of reference)")
    if Path(args.input).is_dir():
        return dicom_export.load_source(args.input, series_uid=args.series)
    return dicom_export.load_source([args.input])


def _write_output(result, output: Path, args: argparse.Namespace, dicom_source,
                  side_files=()) -> None:
    """The volume file (or DICOM series folder) and its side files, all or none: side files are
    prepared before the series is written and committed after it."""
    from . import io

    if dicom_source is None:
        io.write_all([io.stage_volume(result, output, overwrite=args.overwrite), *side_files])
        return
    from .dicom_export import write_dicom_series

    prepared = []
    try:
        for item in side_files:
            prepared.append(item.prepare())
        write_dicom_series(result, dicom_source, output, overwrite=args.overwrite,
                           weights=args.weights, modality=args.modality,
                           derived_from_source=args.dicom_template is None)
        for item in prepared:
            item.commit()
    finally:
        for item in prepared:
            item.discard()


def _roi_mask_path(roi: str) -> str | None:
    """The mask file named by --roi, if it names one (not auto, not a box)."""
    from .roi import looks_like_box
    text = roi.strip()
    boxes = ";" in text and all(looks_like_box(part) for part in text.split(";") if part.strip())
    auto = text.lower() == "auto" or text.lower().startswith("auto:")
    return None if auto or boxes or looks_like_box(text) else text


def _through_plane_options(args: argparse.Namespace) -> dict:
    """The through-plane options of `api.upscale` from the command line (only those given)."""
    options = {"target_spacing": args.target_spacing, "slice_thickness": args.slice_thickness,
               "adapt_seconds": args.adapt_seconds}
    options = {key: value for key, value in options.items() if value is not None}
    if args.slice_profile != "box":
        options["slice_profile"] = args.slice_profile
    if args.adapt:
        options["adapt"] = True
    return options


def _upscale_with_roi(args: argparse.Namespace, image, output: Path, progress: _Progress,
                      started: float, dicom_source=None) -> int:
    from . import api, io, roi

    margin = {} if args.roi_margin is None else {"roi_margin_mm": args.roi_margin}
    try:
        result = api.upscale(
            image, roi=args.roi, roi_model=args.roi_model, model=args.model, scale=args.scale,
            axis=args.axis, device=args.device, precision=args.precision, tile=args.tile,
            batch_size=args.batch, threads=args.threads, backend=args.backend,
            modality=args.modality,
            allow_untrained=args.allow_untrained, output_float=args.output_float,
            weights=args.weights, progress=progress, **margin, **_through_plane_options(args))
    finally:
        progress.close()
    report = roi.RoiReport.from_image(result)
    side_files = []
    if args.roi_json is not None:  # both outputs or neither
        side_files.append(io.stage_text(report.to_json(), args.roi_json, overwrite=args.overwrite))
    _write_output(result, output, args, dicom_source, side_files)
    if report.fallback:
        print(f"medsr: {report.message}", file=sys.stderr)
    if not args.quiet:
        where = ("nowhere (fallback)" if report.fallback else
                 f"ROI {report.roi_index_xyz} (+{report.margin_voxels_xyz} voxels margin)"
                 if len(report.regions) <= 1 else
                 f"{len(report.regions)} ROIs " + ", ".join(str(r["index_xyz"]) for r in report.regions)
                 + f" (+{report.margin_voxels_xyz} voxels margin)")
        print(f"wrote {output}: {result.GetSize()} voxels, model {report.model} everywhere, "
              f"{report.roi_model} in {where}, {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
        if args.roi_json is not None:
            print(f"wrote {args.roi_json}", file=sys.stderr)
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    from . import zoo

    rows = zoo.describe_all()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    header = ("name", "kind", "scales", "params", "weights", "paper")
    table = [header]
    for row in rows:
        weights = ", ".join(f"{k}:{v['modality']}" for k, v in row["weights"].items()) or (
            "-" if row["kind"] == "interpolation" else "none (untrained)")
        # the shipped networks' sizes (a card's config may be smaller than the registry default)
        shipped = sorted({n for v in row["weights"].values() for n in v.get("parameters", [])})
        counts = shipped or ([row["parameters"]] if row["parameters"] else [0])
        table.append((row["name"], row["kind"], ",".join(f"x{s}" for s in row["scales"]),
                      "/".join(f"{n:,}" for n in counts), weights, row["paper"][:40]))
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from . import io

    image = io.read_volume(args.input, series_uid=args.series)
    voxels = io.image_array(image)
    finite = np.isfinite(voxels) if np.issubdtype(voxels.dtype, np.floating) else None
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    info = {
        "file": str(args.input),
        "size_xyz": list(image.GetSize()),
        "spacing_mm_xyz": [round(s, 6) for s in image.GetSpacing()],
        "origin_lps_mm": [round(o, 4) for o in image.GetOrigin()],
        "direction_lps": [[round(float(v), 6) for v in row] for row in direction],
        "orientation": _orientation_code(direction),
        "pixel_type": image.GetPixelIDTypeAsString(),
        "modality": io.modality_of(image),
        "intensity_min": float(np.min(voxels if finite is None else voxels[finite])),
        "intensity_max": float(np.max(voxels if finite is None else voxels[finite])),
        "non_finite_voxels": int(0 if finite is None else finite.size - np.count_nonzero(finite)),
    }
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key.ljust(width)}  {value}")
    return EXIT_OK


def _orientation_code(direction) -> str:
    """DICOM-style code of the axis each image axis points to most (LPS: e.g. "LPS", "RAS")."""
    letters = (("L", "R"), ("P", "A"), ("S", "I"))
    import numpy as np

    code = ""
    for column in direction.T:
        axis = int(np.argmax(np.abs(column)))
        code += letters[axis][0 if column[axis] > 0 else 1]
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    volume_path, figure_path = run_demo(Path(args.out), model=args.model, scale=args.scale,
                                        overwrite=args.overwrite)
    print(f"wrote {volume_path}\nwrote {figure_path}")
    return EXIT_OK


def _add_batch_parser(sub) -> None:
    from .cohort.cases import OUTPUT_FORMATS

    batch = sub.add_parser("batch", help="super-resolve a cohort: files, folders (every volume "
                           "and DICOM series) or a CSV/TSV table; resumable, on Ray workers")
    batch.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="file, folder (searched recursively) or CSV/TSV table with columns "
                            "input[,output][,model][,scale][,series]")
    batch.add_argument("--out", required=True, metavar="DIR",
                       help="output folder: outputs mirror the input tree; manifest "
                            "medsr-batch.jsonl (rerun the same command to resume)")
    _add_run_options(batch)
    try:
        batch.add_argument("--format", dest="output_format", choices=tuple(OUTPUT_FORMATS),
                           default="nrrd", help="output format (default nrrd); dicom: a derived "
                           "DICOM series folder per DICOM input")
    except argparse.ArgumentError:  # the shared run options define --format themselves
        pass
    batch.add_argument("--float", dest="output_float", action="store_true",
                       help="write float32 voxels instead of the input's pixel type")
    batch.add_argument("--workers", type=_int_at_least(1, "workers"), default=None,
                       help="parallel Ray workers (default: one per GPU, else CPUs / threads)")
    batch.add_argument("--threads-per-worker", type=_int_at_least(1, "threads-per-worker"),
                       default=None, help="torch threads per worker (default: CPUs / workers)")
    batch.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (e.g. auto, ray://head:10001) instead of "
                            "starting a local Ray runtime")
    batch.add_argument("--no-ray", action="store_true",
                       help="run the cases one at a time in this process, even with Ray installed")
    batch.add_argument("--retry-failed", action="store_true",
                       help="also rerun cases that failed before with unchanged input")
    batch.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                       help="progress on stderr: a bar over cases, one JSON line per case, or none")
    batch.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")


class _BatchProgress:
    """Progress over cases on stderr: a tqdm bar (failures printed above it), JSON lines, or
    nothing; keeps the counts for the summary of a cancelled run."""

    def __init__(self, style: str):
        self.style = style
        self.finished = {"ok": 0, "failed": 0}  # this run's cases, for a cancelled run's summary
        self._bar = None

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "case":
            self.finished[event["status"]] = self.finished.get(event["status"], 0) + 1
        if self.style == "json":
            print(json.dumps(event), file=sys.stderr, flush=True)
            return
        if kind == "start" and self.style != "quiet":
            for note in event["notes"]:
                print(f"medsr: note: {note}", file=sys.stderr)
        if self.style != "bar":
            return
        if kind == "start":
            print(f"medsr batch: {event['cases']} cases, {event['to_run']} to run "
                  f"({event['skipped']} done earlier, {event['failed_earlier']} failed earlier), "
                  f"on {event['runner']}", file=sys.stderr)
            if event["to_run"]:
                from tqdm import tqdm
                self._bar = tqdm(total=event["to_run"], file=sys.stderr, unit="case",
                                 bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}<{remaining}]"
                                            "{postfix}")
        elif kind == "case" and self._bar is not None:
            if event["status"] == "failed":
                self._bar.write(f"medsr: failed: {event['error']}", file=sys.stderr)
            rate = event["volumes_per_hour"]
            self._bar.set_postfix_str(f"ok {event['done']}, failed {event['failed']}, "
                                      f"left {event['remaining']}"
                                      + (f", {rate:.0f} vol/h" if rate else ""), refresh=False)
            self._bar.update(1)
        elif kind == "end":
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _cmd_batch(args: argparse.Namespace) -> int:
    from .cohort import batch

    threads = args.threads_per_worker
    if args.threads is not None:
        if threads is not None and threads != args.threads:
            raise InputError(f"--threads {args.threads} and --threads-per-worker {threads} "
                             "disagree; give one of them")
        threads = args.threads
    if any(_through_plane_options(args).values()):
        raise InputError("--target-spacing, --slice-thickness, --slice-profile and --adapt are "
                         "for `medsr upscale`; `medsr batch` does not take them yet")
    options = dict(model=args.model, scale=2 if args.scale is None else args.scale, axis=args.axis,
                   device=args.device,
                   precision=args.precision, tile=args.tile, batch_size=args.batch,
                   modality=args.modality, allow_untrained=args.allow_untrained,
                   output_float=args.output_float, weights=args.weights)
    if getattr(args, "backend", None) is not None:
        options["backend"] = args.backend
    progress = _BatchProgress("quiet" if args.quiet else args.progress)
    try:
        summary = batch(args.inputs, args.out, output_format=args.output_format,
                        workers=args.workers, threads_per_worker=threads,
                        ray_address=args.ray_address, use_ray=False if args.no_ray else None,
                        retry_failed=args.retry_failed, progress=progress, **options)
    except (CancelledError, KeyboardInterrupt):
        progress.close()
        done = progress.finished
        print(f"medsr batch: cancelled; the cases finished in this run are kept ({done['ok']} "
              f"ok, {done['failed']} failed, in the manifest), the cases in progress wrote "
              "nothing; run the same command again to continue", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        progress.close()
    if not args.quiet:
        print(f"medsr batch: {summary.line()}; manifest {summary.manifest}", file=sys.stderr)
        failures = [r for r in summary.records if r["status"] == "failed"]
        for record in failures[:10]:
            print(f"  failed: {record['error']}", file=sys.stderr)
        if len(failures) > 10:
            print(f"  ... and {len(failures) - 10} more (see the manifest)", file=sys.stderr)
    return EXIT_OK if summary.all_ok else EXIT_SOME_CASES_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _guarded(lambda: _train(argv[1:]))
    if argv and argv[0] == "benchmark":
        return _guarded(lambda: _benchmark(argv[1:]))
    args = build_parser().parse_args(argv)
    handler = {"upscale": _cmd_upscale, "models": _cmd_models, "info": _cmd_info,
               "demo": _cmd_demo, "batch": _cmd_batch}[args.command]
    return _guarded(lambda: handler(args))


def _train(argv: list[str]) -> int:
    from .training.__main__ import main as train_main
    return train_main(argv)


def _benchmark(argv: list[str]) -> int:
    from .benchmark import main as benchmark_main
    return benchmark_main(argv)


def _committed_since(count: int) -> list:
    if "MedSRLib.safe_write" not in sys.modules:
        return []
    return sys.modules["MedSRLib.safe_write"].COMMITTED[count:]


def _guarded(run) -> int:
    safe_write = sys.modules.get("MedSRLib.safe_write")
    committed_before = len(safe_write.COMMITTED) if safe_write is not None else 0
    try:
        return int(run() or 0)
    except InputError as err:
        print(f"medsr: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except (CancelledError, KeyboardInterrupt):
        written = _committed_since(committed_before)
        if written:  # the signal came while the last rename was held back: the output is whole
            print(f"medsr: cancelled after {', '.join(map(str, written))} was completely "
                  "written", file=sys.stderr)
        else:
            print("medsr: cancelled; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as err:  # noqa: BLE001 - last-resort report for the CLI
        if _is_out_of_memory(err):
            print("medsr: error: out of memory; use a smaller --tile or --batch, a lighter model, "
                  "or a machine with more memory", file=sys.stderr)
            return EXIT_INPUT
        print(f"medsr: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_INTERNAL


def _is_out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _interrupt(signum, frame) -> None:
    if _inside_import(frame):
        _leave_at_once()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _inside_import(frame) -> bool:
    """True while a module is being imported: an extension's import (torch, OpenVINO) runs
    Python from C++, and an exception raised there aborts the process (pybind11 terminate)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _leave_at_once() -> None:
    """Cancel without unwinding: remove this run's temporary files, report, exit 130."""
    safe_write = sys.modules.get("MedSRLib.safe_write")
    if safe_write is not None:
        for temp in list(safe_write.PENDING):
            temp.unlink(missing_ok=True)
    written = _committed_since(0)
    if written:
        print(f"medsr: cancelled after {', '.join(map(str, written))} was completely written",
              file=sys.stderr)
    else:
        print("medsr: cancelled; nothing was written", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CANCELLED)


def _install_signal_handlers() -> None:
    """SIGTERM and SIGHUP cancel like Ctrl-C (a batch scheduler or Slicer stopping the run)."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _interrupt)


def console_main() -> None:
    """The `medsr` executable: main() with signals as cancels; exit status as documented."""
    _install_signal_handlers()
    try:
        code = main()
    except KeyboardInterrupt:  # between argument parsing and the guarded command
        print("medsr: cancelled; nothing was written", file=sys.stderr)
        code = EXIT_CANCELLED
    # The work is done (or cleanly undone): a late signal must not print a traceback.
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if code == EXIT_CANCELLED:
        # An interrupt that cut through an extension's embedded Python (torch's import runs
        # pybind11 exec) leaves CPython's "unhandled KeyboardInterrupt" flag set, and the
        # interpreter would then kill itself with SIGINT at exit: leave with our status instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
