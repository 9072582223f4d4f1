"""`medsr` command line: upscale, batch, listen, models, info, demo, train, benchmark.

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
#: Appended to a rejected --scale: the form that takes factors above 4 or real factors.
SCALE_HINT = ("for thick slices use --scale 1,1,2.5 (any factor up to 8 along one axis) or "
              "--target-spacing")


def _parse_scale(text: str) -> int | tuple[int | float, ...]:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:  # per-axis factors may be real (through-plane: 1,1,2.5); one value is an integer
        values = tuple(int(p) if p.strip().lstrip("+-").isdigit() else float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"scale must be an integer or x,y,z numbers, got {text!r}")
    if len(values) == 1:
        if not isinstance(values[0], int) or not 2 <= values[0] <= 4:
            raise argparse.ArgumentTypeError(
                f"in-plane factors are integers 2-4, got {text!r}; {SCALE_HINT}")
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
    from .runtime.engine import MIN_TILE
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
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: a CUDA GPU when torch sees one, else the CPU")
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
                        help="modality used to pick the default model (else from DICOM tags; a "
                             "2-D image without one is taken as X-ray, XR)")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="run a learned model that has no trained weights (random weights: "
                             "for testing the plumbing only)")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="safetensors weights (with their JSON card beside them) to use "
                             "instead of the shipped ones for --model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsr", description="Super-resolution for medical volumes.",
        epilog=_EXAMPLES["medsr"], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version_text())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("upscale", help="super-resolve a volume or 2-D image")
    up.add_argument("input", help="NIfTI/NRRD/MHA file, DICOM series folder, PNG, or a DICOMweb "
                                  "series URL (http(s)://HOST/dicom-web/studies/UID/series/UID)")
    up.add_argument("output", nargs="?", metavar="OUT",
                    help="output file: .nii.gz, .nii, .nrrd, .mha (or .png for 2-D), or a folder "
                         "for a DICOM series (--format dicom); optional with --send")
    up.add_argument("-o", "--out", dest="out", default=None, metavar="OUT",
                    help="the output, as an option (same as the positional OUT)")
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
                         "reference and stored representation (needed for a non-DICOM input); "
                         "it must match a DICOM input's PatientID, StudyInstanceUID or "
                         "FrameOfReferenceUID, and Modality")
    up.add_argument("--dicom-template-series", default=None, metavar="UID",
                    help="SeriesInstanceUID of the template series when the --dicom-template "
                         "folder holds several")
    up.add_argument("--accept-template-mismatch", action="store_true",
                    help="use a --dicom-template of another patient, study or modality anyway "
                         "(a warning names both patients)")
    up.add_argument("--float", dest="output_float", action="store_true",
                    help="write float32 voxels instead of the input's pixel type")
    up.add_argument("--quiet", "-q", action="store_true",
                    help="no progress bar, no line naming the defaults chosen, no summary")
    up.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                    help="progress on stderr: bar, JSON lines, or none")
    up.add_argument("--roi", default=None, metavar="auto|x0,y0,z0,x1,y1,z1|MASK_FILE",
                    help="lesion-focused mode: run --roi-model inside this ROI (plus a margin) and "
                         "--model elsewhere, feathered: 'auto' (lesion segmenter: one ROI per "
                         "lesion found; 'auto:lesion_detector' for the lesion-focused SR paper's box detector), a "
                         "box of input voxel indices (lower inclusive, upper exclusive; several "
                         "joined by ';'), or a mask file on the input's grid")
    up.add_argument("--roi-model", default=None,
                    help="model inside the ROI (default: the model measured most accurate inside "
                         "validation lesions for the modality and scale, within 1.5x the plain "
                         "run's time; lfsr, the LFSR generator, is the perceptual choice)")
    up.add_argument("--roi-self-ensemble", type=int, default=None, choices=(1, 2, 4, 8),
                    metavar="N", help="average the ROI model over N in-plane flips/rotations "
                                      "(1, 2, 4 or 8; default: the measured choice)")
    up.add_argument("--roi-margin", type=float, default=None, metavar="MM",
                    help="margin around the ROI in mm (default 5); the feathering lies in it")
    up.add_argument("--roi-json", default=None, metavar="PATH",
                    help="write the ROI, detector score and fallback as JSON to PATH")
    up.add_argument("--send", default=None, metavar="URL|AET@HOST:PORT",
                    help="store the derived DICOM series (the files of --format dicom) with "
                         "STOW-RS at a DICOMweb base URL or with C-STORE at a DICOM node; "
                         "credentials from netrc or MEDSR_DICOMWEB_* (see docs/pacs.md)")

    models = sub.add_parser("models", help="list the models: defaults, measured gain and time")
    models.add_argument("--json", action="store_true",
                        help="every registered model as machine-readable JSON (registry and "
                             "model cards; slower: it builds each network to count parameters)")
    models.add_argument("--all", action="store_true",
                        help="also list the registered models that ship no trained weights")

    info = sub.add_parser("info", help="size, spacing, orientation and intensity range of a volume")
    info.add_argument("input", help="NIfTI/NRRD/MHA file, DICOM series folder or 2-D image")
    info.add_argument("--series", default=None, metavar="UID",
                      help="DICOM SeriesInstanceUID when the folder holds several series")

    demo = sub.add_parser("demo", help="degrade the bundled sample CT, restore it with bicubic "
                          "and MedSR, and write comparison pictures with PSNR/SSIM")
    demo.add_argument("--out", "-o", default="medsr-demo",
                      help="output folder (default: medsr-demo)")
    demo.add_argument("--model", default=None,
                      help="model to compare with bicubic (default: the CT default for --scale)")
    demo.add_argument("--scale", type=_int_at_least(2, "scale"), default=2,
                      help="in-plane factor 2-4 of the degradation and restoration (default 2)")
    demo.add_argument("--through-plane", action="store_true",
                      help="only the through-plane picture (thick coronal slices restored to "
                           "thin, axial view)")
    demo.add_argument("--in-plane", action="store_true",
                      help="only the in-plane picture")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the pictures and volume of an earlier demo in --out")

    _add_batch_parser(sub)
    _add_listen_parser(sub)
    sub.add_parser("train", help="train a model from a recipe config (see `medsr train --help`)",
                   add_help=False)
    sub.add_parser("benchmark", help="benchmark models on a folder of HR volumes", add_help=False)
    for name, command in sub.choices.items():
        if command.add_help:  # train and benchmark parse their own arguments (and --version)
            command.formatter_class = argparse.RawDescriptionHelpFormatter
            command.epilog = _EXAMPLES.get(name)
            command.add_argument("--version", action="version", version=_version_text())
    return parser


def _version_text() -> str:
    from . import __version__
    return f"medsr {__version__}"


#: `medsr COMMAND --help` ends with these examples.
_EXAMPLES = {
    "medsr": """examples:
  medsr demo                                   # see what SR does, on the bundled CT
  medsr upscale ct.nii.gz -o ct_x2.nii.gz      # in-plane x2 with the default model
  medsr upscale thick.nrrd -o thin.nrrd --scale 1,1,2.5
  medsr models                                 # defaults, measured gain and time
  medsr COMMAND --help                         # options and examples of one command""",
    "upscale": """examples:
  medsr upscale ct.nii.gz -o ct_x2.nii.gz                 # in-plane x2, default model
  medsr upscale chest.png -o chest_x4.png --scale 4       # 2-D image: X-ray model
  medsr upscale chest.png -o chest_x4.png --scale 4 --modality CT
  medsr upscale thick.nrrd -o thin.nrrd --scale 1,1,2.5   # thick slices to thin
  medsr upscale thick.nrrd -o thin.nrrd --target-spacing 1
  medsr upscale dicom_folder/ -o sr_series/ --format dicom
  medsr upscale mr.nii.gz -o mr_x2.nii.gz --model fmen --backend torch
  medsr upscale mr.nii.gz -o mr_x2.nii.gz --roi auto      # lesion-focused mode""",
    "batch": """examples:
  medsr batch cohort/ --out sr/                     # every volume and DICOM series, x2
  medsr batch cases.csv --out sr/ --scale 4         # a table: input[,output][,model]...
  medsr batch cohort/ --out sr/ --retry-failed      # rerun: resumes, retries failures""",
    "models": """examples:
  medsr models            # shipped models: defaults per modality and scale, gain, time
  medsr models --all      # plus registered models without shipped weights
  medsr models --json     # everything, machine-readable""",
    "info": """examples:
  medsr info ct.nii.gz
  medsr info dicom_folder/ --series 1.2.840.113619.2.55.3""",
    "demo": """examples:
  medsr demo                        # both pictures in ./medsr-demo
  medsr demo --scale 4 -o demo4     # in-plane x4
  medsr demo --through-plane        # thick slices to thin only""",
    "listen": """examples:
  medsr listen --port 11112 --allow-ae SCANNER1 --send PACS@pacs.example.org:104""",
}


def _cmd_upscale(args: argparse.Namespace) -> int:
    from . import api
    from .io import volumes as io

    _output_from_option(args)
    if _pacs_run(args):  # a DICOMweb URL input or --send: fetch, run this command, send
        from .pacs.runs import upscale_through_pacs
        return upscale_through_pacs(args, _cmd_upscale)

    mask = None if args.roi is None else _roi_mask_path(args.roi)
    dicom_source = _dicom_output_source(args)
    if dicom_source is None:
        output = io.check_output_path(args.input, args.output, args.overwrite, {"ROI mask": mask})
    else:
        output = io.check_output_folder(args.input, args.output, args.overwrite,
                                        {"ROI mask": mask, "DICOM template": args.dicom_template})
    if args.roi is None:
        for flag in ("roi_model", "roi_margin", "roi_json", "roi_self_ensemble"):
            if getattr(args, flag) is not None:
                raise InputError(f"--{flag.replace('_', '-')} needs --roi")
    elif args.roi_json is not None:
        io.check_side_file(args.roi_json, {"input": args.input, "output": output,
                                           "ROI mask": mask},
                           args.overwrite, "--roi-json")
    image = io.read_volume(args.input, series_uid=args.series)
    if not args.quiet:
        _print_choices(args, image)
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
            before_compute=_free_space_check(output, dicom_source),
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


def _print_choices(args: argparse.Namespace, image) -> None:
    """One line on stderr naming what the run chose for the user (modality, model, axis,
    backend); nothing when every choice was given."""
    from .api import describe_choices

    line = describe_choices(
        image, model=args.model, scale=args.scale, axis=args.axis, device=args.device,
        backend=args.backend, precision=args.precision, modality=args.modality,
        target_spacing=args.target_spacing, slice_thickness=args.slice_thickness,
        slice_profile=args.slice_profile, roi=args.roi)
    if line and args.progress == "json":  # a reader of JSON lines gets JSON only
        print(json.dumps({"fraction": 0.0, "message": line}), file=sys.stderr, flush=True)
    elif line:
        print(f"medsr: {line}", file=sys.stderr)


def _silence_library_warnings() -> None:
    """ITK's own warnings (with its build paths) off: MedSR checks the same conditions and
    names the file and the problem itself (e.g. a folder without a DICOM series)."""
    import SimpleITK as sitk
    sitk.ProcessObject.SetGlobalWarningDisplay(False)


def _output_from_option(args: argparse.Namespace) -> None:
    """One output: the positional OUT or -o/--out (the same path given twice is fine)."""
    if args.out is None:
        return
    if args.output is not None and Path(args.output) != Path(args.out):
        raise InputError(f"two outputs given: OUT {args.output} and -o/--out {args.out}; "
                         "name the output once")
    args.output = args.out


def _free_space_check(output: Path, dicom_source):
    """The `before_compute` of `api.upscale`: InputError naming the output's folder when its
    disk cannot hold the output (`safe_write.check_free_space`), before any voxel work."""
    from .io import volumes as io, safe_write

    compressed = dicom_source is None and io.suffix_of(output) != ".nii"

    def check(size_xyz, dtype) -> None:
        raw = 1
        for n in size_xyz:
            raw *= int(n)
        safe_write.check_free_space(Path(output), raw * dtype.itemsize, compressed)
    return check


def _dicom_output_source(args: argparse.Namespace):
    """The `dicom_export.DicomSource` giving a DICOM series output its identity (checked before
    any work), or None when the output is a volume file."""
    from .io import volumes as io

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
    from .io import dicom_export

    if args.dicom_template is not None:
        from .io.dicom_identity import check_template_identity, recorded_modality, series_header

        template = dicom_export.load_source(
            args.dicom_template, getattr(args, "dicom_template_series", None),
            role="DICOM template", series_option="--dicom-template-series")
        # Checked before any work: a template of another patient would file these pixels under
        # that patient's name. The writer checks again (same rule).
        args.dicom_input_header = (series_header(args.input, args.series) if input_is_dicom
                                   else None)
        modality = args.modality or (None if input_is_dicom else recorded_modality(args.input))
        check_template_identity(template, args.dicom_input_header, modality,
                                accept=getattr(args, "accept_template_mismatch", False),
                                input_name=f"the input {args.input}", warn=False)
        return template
    if getattr(args, "dicom_template_series", None) is not None:
        raise InputError("--dicom-template-series needs --dicom-template")
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
    from .io import volumes as io

    if dicom_source is None:
        io.write_all([io.stage_volume(result, output, overwrite=args.overwrite), *side_files])
        return
    from .io.dicom_export import write_dicom_series

    prepared = []
    try:
        for item in side_files:
            prepared.append(item.prepare())
        write_dicom_series(result, dicom_source, output, overwrite=args.overwrite,
                           weights=args.weights, modality=args.modality,
                           derived_from_source=args.dicom_template is None,
                           input_series=getattr(args, "dicom_input_header", None),
                           accept_template_mismatch=getattr(args, "accept_template_mismatch",
                                                            False))
        for item in prepared:
            item.commit()
    finally:
        for item in prepared:
            item.discard()


def _roi_mask_path(roi: str) -> str | None:
    """The mask file named by --roi, if it names one (not auto, not a box)."""
    from .roi.focus import looks_like_box
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
    from . import api
    from .io import volumes as io
    from .roi import focus as roi

    margin = {} if args.roi_margin is None else {"roi_margin_mm": args.roi_margin}
    try:
        result = api.upscale(
            image, roi=args.roi, roi_model=args.roi_model, model=args.model, scale=args.scale,
            roi_self_ensemble=args.roi_self_ensemble,
            axis=args.axis, device=args.device, precision=args.precision, tile=args.tile,
            batch_size=args.batch, threads=args.threads, backend=args.backend,
            modality=args.modality,
            allow_untrained=args.allow_untrained, output_float=args.output_float,
            weights=args.weights, progress=progress, **margin, **_through_plane_options(args),
            before_compute=_free_space_check(output, dicom_source))
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
    if args.json:  # the registry itself (builds each network to count its parameters)
        from .models import registry as zoo
        print(json.dumps(zoo.describe_all(), indent=2))
        return EXIT_OK
    from .models import table as model_table  # the cards alone: no torch import, answers at once

    untrained = ()
    if args.all:
        from .models import registry as zoo
        untrained = tuple(name for name in zoo.model_names()
                          if zoo.get_spec(name).needs_weights
                          and not any(zoo.weights_files(zoo.get_spec(name), s)
                                      for s in zoo.get_spec(name).scales))
    print(model_table.render(untrained=untrained))
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from .io import volumes as io

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
    from .evaluation.demo import run_demo

    if args.in_plane and args.through_plane:
        raise InputError("--in-plane and --through-plane each ask for one picture only; give "
                         "neither for both")
    written = run_demo(Path(args.out), model=args.model, scale=args.scale,
                       overwrite=args.overwrite, in_plane=not args.through_plane,
                       through_plane=not args.in_plane)
    for what, path, scores in written:
        print(f"wrote {path}  ({what})")
        for method, value in scores.items():
            print(f"  {method:<24} {value.text()}")
    return EXIT_OK


def _add_batch_parser(sub) -> None:
    from .cohort.cases import OUTPUT_FORMATS

    batch = sub.add_parser("batch", help="super-resolve a cohort: files, folders (every volume "
                           "and DICOM series) or a CSV/TSV table; resumable, on Ray workers")
    batch.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="file, folder (searched recursively) or CSV/TSV table with columns "
                            "input[,output][,model][,scale][,series]")
    batch.add_argument("-o", "--out", required=True, metavar="DIR",
                       help="output folder: outputs mirror the inputs' tree under their common "
                            "folder (p1/ct.nii.gz -> DIR/p1/ct.nii.gz); manifest "
                            "medsr-batch.jsonl (rerun the same command to resume)")
    _add_run_options(batch)
    try:
        batch.add_argument("--format", dest="output_format", choices=tuple(OUTPUT_FORMATS),
                           default=None, help="output format (default: each input's own; a "
                           "DICOM series gives nrrd); dicom: a derived DICOM series folder per "
                           "DICOM input")
    except argparse.ArgumentError:  # the shared run options define --format themselves
        pass
    batch.add_argument("--overwrite", action="store_true",
                       help="replace files at output paths that medsr batch did not write "
                            "there (without it such a file stops the run before any work)")
    batch.add_argument("--float", dest="output_float", action="store_true",
                       help="write float32 voxels instead of the input's pixel type")
    batch.add_argument("--workers", type=_int_at_least(1, "workers"), default=None,
                       help="parallel Ray workers (default: one per GPU, else CPUs / threads)")
    batch.add_argument("--threads-per-worker", type=_int_at_least(1, "threads-per-worker"),
                       default=None, help="torch threads per worker (default: CPUs / workers)")
    batch.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (e.g. auto, ray://head:10001) instead of "
                            "starting a local Ray runtime")
    ray_choice = batch.add_mutually_exclusive_group()
    ray_choice.add_argument("--ray", dest="use_ray", action="store_const", const=True,
                            default=None, help="always use Ray workers (default: Ray only for a "
                            "named cluster, --workers > 1, or 16 or more cases due with more "
                            "than one worker fitting here)")
    ray_choice.add_argument("--no-ray", dest="use_ray", action="store_const", const=False,
                            help="run the cases one at a time in this process, even with Ray "
                                 "installed")
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
        summary = batch(_local_inputs(args.inputs, args.out), args.out,
                        output_format=args.output_format,
                        workers=args.workers, threads_per_worker=threads,
                        ray_address=args.ray_address, use_ray=args.use_ray,
                        retry_failed=args.retry_failed, overwrite=args.overwrite,
                        progress=progress, **options)
    except InputError as err:
        from .cohort.runners import ray_join_pending
        if not ray_join_pending():
            raise
        # a Ray cluster that did not answer: its join still runs inside Ray's C++ core, which
        # can abort the interpreter at exit; report and leave at once
        progress.close()
        print(f"medsr: error: {err}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INPUT)
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
    if summary.disk_full:  # the user must free space: like any other full disk, exit 2
        print(f"medsr: error: {summary.ok} ok, {summary.failed} failed: the disk of "
              f"{summary.manifest.parent} is full; free some space and run the same command "
              "again", file=sys.stderr)
        return EXIT_INPUT
    return EXIT_OK if summary.all_ok else EXIT_SOME_CASES_FAILED


def _pacs_run(args: argparse.Namespace) -> bool:
    from .pacs import is_url
    return is_url(args.input) or args.send is not None or args.output is None


def _local_inputs(inputs: Sequence[str], out: str) -> list[str]:
    """`medsr batch` inputs with DICOMweb study/series URLs downloaded under OUT."""
    from .pacs import is_url
    if not any(is_url(item) for item in inputs):
        return list(inputs)
    from .pacs.runs import batch_inputs
    return batch_inputs(inputs, out)


def _add_listen_parser(sub) -> None:
    listen = sub.add_parser("listen", help="a DICOM node (C-STORE SCP): super-resolve each "
                            "series trusted AE titles send and forward the derived series")
    listen.add_argument("--port", type=_int_at_least(1, "port"), required=True,
                        help="TCP port to listen on")
    listen.add_argument("--host", default="0.0.0.0",
                        help="address to listen on (default: all; 127.0.0.1: this machine only)")
    listen.add_argument("--ae-title", default="MEDSR", help="this node's AE title (default MEDSR)")
    listen.add_argument("--allow-ae", action="append", required=True, metavar="AET",
                        help="calling AE title allowed to send (repeat for several); "
                             "associations from any other are refused")
    listen.add_argument("--send", required=True, metavar="URL|AET@HOST:PORT",
                        help="where derived series go: DICOMweb base URL (STOW-RS) or DICOM "
                             "node (C-STORE)")
    listen.add_argument("--idle-seconds", type=_positive_float("idle seconds"), default=10.0,
                        help="a series is complete when none of its instances arrived for this "
                             "long (default 10)")
    _add_run_options(listen)


def _cmd_listen(args: argparse.Namespace) -> int:
    from .pacs.listener import listen

    options = dict(model=args.model, scale=args.scale, axis=args.axis, device=args.device,
                   precision=args.precision, tile=args.tile, batch_size=args.batch,
                   threads=args.threads, backend=args.backend, modality=args.modality,
                   allow_untrained=args.allow_untrained, weights=args.weights,
                   **_through_plane_options(args))
    return listen(port=args.port, host=args.host, ae_title=args.ae_title,
                  allowed_ae_titles=args.allow_ae, target=args.send,
                  idle_seconds=args.idle_seconds, upscale_options=options)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["train"], ["benchmark"]) and "--version" in argv[1:]:
        print(_version_text())
        return EXIT_OK
    if argv and argv[0] == "train":
        return _guarded(lambda: _train(argv[1:]))
    if argv and argv[0] == "benchmark":
        return _guarded(lambda: _benchmark(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.command in ("upscale", "info", "batch", "demo", "listen"):
        _silence_library_warnings()
    handler = {"upscale": _cmd_upscale, "models": _cmd_models, "info": _cmd_info,
               "demo": _cmd_demo, "batch": _cmd_batch, "listen": _cmd_listen}[args.command]
    return _guarded(lambda: handler(args))


def _train(argv: list[str]) -> int:
    from .training.__main__ import main as train_main
    return train_main(argv)


def _benchmark(argv: list[str]) -> int:
    from .evaluation.benchmark import main as benchmark_main
    return benchmark_main(argv)


def _committed_since(count: int) -> list:
    if "MedSRLib.io.safe_write" not in sys.modules:
        return []
    return sys.modules["MedSRLib.io.safe_write"].COMMITTED[count:]


def _guarded(run) -> int:
    safe_write = sys.modules.get("MedSRLib.io.safe_write")
    committed_before = len(safe_write.COMMITTED) if safe_write is not None else 0
    try:
        return int(run() or 0)
    except InputError as err:
        message = str(err)
        if message.startswith("scale factors must be integers"):  # point to the form that works
            message += f"; {SCALE_HINT}"
        print(f"medsr: error: {message}", file=sys.stderr)
        return EXIT_INPUT
    except (CancelledError, KeyboardInterrupt):
        written = _committed_since(committed_before)
        if written:  # the signal came while the last rename was held back: the output is whole
            print(f"medsr: cancelled after {', '.join(map(str, written))} was completely "
                  "written", file=sys.stderr)
        else:
            print("medsr: cancelled; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except BrokenPipeError:  # the reader went away (`medsr models | head`): nothing to report
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # the interpreter's final flush must not fail again
        return 0
    except Exception as err:  # noqa: BLE001 - last-resort report for the CLI
        if _is_out_of_memory(err):
            from .runtime.memory_budget import out_of_memory_message
            print(f"medsr: error: {out_of_memory_message()}", file=sys.stderr)
            return EXIT_INPUT
        print(f"medsr: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_INTERNAL


def _is_out_of_memory(err: BaseException) -> bool:
    from .runtime.memory_budget import is_out_of_memory
    return is_out_of_memory(err)


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
    safe_write = sys.modules.get("MedSRLib.io.safe_write")
    if safe_write is not None:
        for temp in list(getattr(safe_write, "PENDING", ())):  # may be half-imported
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
