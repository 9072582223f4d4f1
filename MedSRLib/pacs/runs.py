"""The command-line glue: `medsr upscale` with a DICOMweb URL input or `--send`, and
`medsr batch` with DICOMweb URL inputs."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from . import dicomweb, is_url, send
from .errors import PacsError

__all__ = ["uses_pacs", "upscale_through_pacs", "batch_inputs"]


def uses_pacs(args: argparse.Namespace) -> bool:
    """True when an `upscale` command line needs this package (URL input, --send, no OUTPUT)."""
    return is_url(args.input) or getattr(args, "send", None) is not None or args.output is None


def upscale_through_pacs(args: argparse.Namespace,
                         upscale: Callable[[argparse.Namespace], int]) -> int:
    """Run `upscale` (the local command) on the downloaded series and/or send its DICOM output.

    The target and the output are checked before the download; with `--send` and no OUTPUT the
    derived series is written to a temporary folder (removed afterwards). The send comes only
    after the whole series is written and verified; a failed send exits 2 saying what was
    stored (a rerun completes it without duplicates).
    """
    from ..io import volumes as io

    target = send.check_target(args.send) if args.send is not None else None
    if args.output is None and target is None:
        raise PacsError("OUTPUT is missing: give an output file or folder, or --send "
                        "URL|AET@HOST:PORT")
    if is_url(args.input) and args.series is not None:
        raise PacsError(f"--series: the URL {dicomweb.parse_address(args.input).url} names the "
                        "series already")
    if target is not None:
        if args.output_format != "dicom" and args.output is not None and io.suffix_of(args.output):
            raise PacsError(f"{args.output}: --send stores a DICOM series; give an output "
                            "folder (or no OUTPUT), not a volume file")
        args.output_format = "dicom"
    with contextlib.ExitStack() as stack:
        if args.output is None:
            args.output = str(Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="medsr-send-"))) / "series")
        elif args.output_format == "dicom" or not io.suffix_of(args.output):
            io.check_output_folder(None, args.output, args.overwrite)  # before the download
        else:
            io.check_output_path(None, args.output, args.overwrite)
        if is_url(args.input):
            args.input = str(stack.enter_context(dicomweb.fetched_series(args.input)))
        args.send = None
        code = upscale(args)
        if code != 0 or target is None:
            return code
        report = send.send_series(args.output, str(_target_text(target)))
        if not args.quiet:
            print(f"medsr: {report.line()}", file=sys.stderr)
    return code


def _target_text(target) -> str:
    return target.url if isinstance(target, dicomweb.DicomwebAddress) else str(target)


def batch_inputs(inputs: Sequence[str], out_dir: str | os.PathLike) -> list[str]:
    """`medsr batch` inputs with every DICOMweb URL replaced by local series folders.

    A study URL expands to its image series (QIDO-RS); each series is downloaded (WADO-RS)
    into `OUT/.dicomweb/STUDY/SERIES` once: a rerun (resume) finds the complete folder and
    reads it again without downloading. Other inputs are returned unchanged.
    """
    result = []
    for item in inputs:
        if not is_url(item):
            result.append(item)
            continue
        for url in dicomweb.series_urls(item):
            address = dicomweb.parse_address(url)
            folder = Path(out_dir) / ".dicomweb" / address.study_uid / address.series_uid
            if not folder.is_dir():
                folder.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(prefix=".partial-", dir=folder.parent) as temp:
                    dicomweb.download_series(address, temp)
                    os.rename(temp, folder)
                    os.mkdir(temp)  # for TemporaryDirectory's cleanup
            result.append(str(folder))
    return result
