"""The cases of a cohort: which inputs, which output each one gets, and how to recognise them.

Inputs are files, folders searched recursively (every image file and every DICOM series, one
case per series), or a CSV/TSV table with a header row naming the columns `input` (required)
and `output`, `model`, `scale`, `series` (optional).

Output paths mirror the inputs' tree under the output folder, relative to the common root of
everything named (the folder itself when one folder is named; for a file or table, its folder):
`IN/p1/ct.nii.gz` becomes `OUT/p1/ct.nii.gz`, a folder `IN/p2/dicom` holding one DICOM series
`OUT/p2/dicom.nrrd` (several series: `OUT/p2/dicom/<description>_<uid>.nrrd`). Two inputs with
the same file name in different folders therefore get different outputs by construction; an
output keeps its input's format unless a format is asked for (a DICOM series becomes NRRD).
What is still shared (a table's `output` cells, an input named twice with different options)
or what would write over an input is refused before any work.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import InputError

#: Output formats of `medsr batch --format` and their file suffix; "dicom" writes a derived
#: DICOM series into a folder (no suffix) and needs a DICOM input (`runners.write_output`).
OUTPUT_FORMATS = {"nrrd": ".nrrd", "nii.gz": ".nii.gz", "nii": ".nii", "mha": ".mha",
                  "dicom": ""}
#: The output suffix that keeps an input's format (no `--format`): the format itself where
#: MedSR writes it, its one-file form for a header/data pair, lossless PNG for 2-D images,
#: NRRD for a DICOM series.
KEPT_SUFFIXES = {".nii.gz": ".nii.gz", ".nii": ".nii", ".nrrd": ".nrrd", ".nhdr": ".nrrd",
                 ".mha": ".mha", ".mhd": ".mha", ".png": ".png", ".jpg": ".png", ".jpeg": ".png",
                 ".tif": ".png", ".tiff": ".png", ".bmp": ".png"}
#: The output suffix of a DICOM series input when the format is kept.
DICOM_KEPT_SUFFIX = ".nrrd"

#: Image files picked up when a folder is searched (as `io.read_volume` reads them).
SEARCHED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd",
                     ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: Files never looked at as DICOM (side files of NRRD/MetaImage, tables, notes).
NOT_DICOM_SUFFIXES = (".raw", ".zraw", ".img", ".json", ".jsonl", ".txt", ".csv", ".tsv", ".md",
                      ".xml", ".html", ".pdf", ".py", ".yaml", ".yml", ".log", ".zip")
TABLE_SUFFIXES = (".csv", ".tsv")
TABLE_COLUMNS = ("input", "output", "model", "scale", "series")


@dataclass(frozen=True)
class Case:
    """One input volume (file, or DICOM folder plus series UID) and its output file.

    `model` and `scale` are per-case overrides from a table (None: the batch's options);
    `output_named` is True when a table's `output` cell named the output (never renamed).
    """

    input: Path
    output: Path
    series_uid: str | None = None
    model: str | None = None
    scale: int | tuple[int, int, int] | None = None
    output_named: bool = False


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def output_suffix(output_format: str | None) -> str | None:
    """The file suffix of `output_format` ("" for a DICOM folder), None for "keep the input's";
    InputError for an unknown format."""
    if output_format is None:
        return None
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"format (--format) must be one of {', '.join(OUTPUT_FORMATS)}, "
                         f"got {output_format!r}")
    return OUTPUT_FORMATS[output_format]


def _file_suffix(path: Path, suffix: str | None) -> str:
    return KEPT_SUFFIXES.get(suffix_of(path), ".nrrd") if suffix is None else suffix


def _series_suffix(suffix: str | None) -> str:
    return DICOM_KEPT_SUFFIX if suffix is None else suffix


def parse_scale(text: str) -> int | tuple[int, int, int]:
    """"2" -> 2, "1,1,3" or "1x1x3" -> (1, 1, 3); InputError otherwise."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"scale must be an integer or x,y,z integers, got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) != 3:
        raise InputError(f"scale needs 1 or 3 integers, got {text!r}")
    return values  # type: ignore[return-value]


def discover(inputs: Sequence[str | os.PathLike], out_dir: Path,
             output_format: str | None = None) -> list[Case]:
    """Every case named by `inputs` (files, folders, tables), outputs under `out_dir`.

    Outputs mirror the inputs' paths relative to their common root (see the module text), in
    the input's format when `output_format` is None. InputError for an input that does not
    exist, a malformed table, an output folder that is an input folder, a cohort with no case,
    two cases that would write the same output (both named), and an output that is a case's
    input or lies inside a DICOM input folder.
    """
    if not inputs:
        raise InputError("no input given: name files, folders or a CSV/TSV table")
    suffix = output_suffix(output_format)
    out_dir = Path(out_dir).resolve()
    resolved: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        path = path.resolve()
        if path.is_dir() and path == out_dir:
            raise InputError(f"{path}: the output folder must not be an input folder; "
                             "choose another (inside it is fine: it is not searched)")
        resolved.append(path)
    base = common_root(resolved)
    cases: list[Case] = []
    for path in resolved:
        if path.is_dir():
            cases.extend(_search_folder(path, base, out_dir, suffix))
        elif suffix_of(path) in TABLE_SUFFIXES:
            cases.extend(_read_table(path, out_dir / path.parent.relative_to(base), out_dir,
                                     suffix))
        else:
            relative = path.relative_to(base)
            cases.append(Case(path, out_dir / _mirror_name(relative, _file_suffix(path, suffix))))
    if not cases:
        raise InputError("found no image file or DICOM series in "
                         + ", ".join(str(p) for p in inputs))
    cases = _disambiguate(_unique(cases))
    check_outputs_distinct(cases)
    check_outputs_are_not_inputs(cases)
    return cases


def common_root(paths: Sequence[Path]) -> Path:
    """The deepest folder holding every named input: a folder counts as itself, a file or
    table as its folder (one folder named: that folder)."""
    folders = [str(p if p.is_dir() else p.parent) for p in paths]
    return Path(os.path.commonpath(folders))


def check_outputs_distinct(cases: Sequence[Case]) -> None:
    """InputError naming both cases when two of them would write the same output (or one
    output would be inside another's DICOM output folder)."""
    owner: dict[Path, Case] = {}
    for case in cases:
        key = Path(os.path.normcase(case.output))
        other = owner.get(key)
        if other is not None:
            raise InputError(f"{_describe(other)} and {_describe(case)} would both be written to "
                             f"{case.output}; give them distinct outputs (a table's output "
                             "column) or run them into different --out folders")
        owner[key] = case
    for case in cases:
        for parent in Path(os.path.normcase(case.output)).parents:
            other = owner.get(parent)
            if other is not None:
                raise InputError(f"{_describe(case)} would be written to {case.output}, inside "
                                 f"the output {other.output} of {_describe(other)}")


def check_outputs_are_not_inputs(cases: Sequence[Case]) -> None:
    """InputError when a case's output is any case's input (the same path, or the same file
    under another name) or lies inside a DICOM input folder: writing it would change an input."""
    inputs: dict[Path, Case] = {case.input: case for case in cases}
    identities: dict[tuple[int, int], Case] = {}
    for case in cases:
        try:
            stat = case.input.stat()
        except OSError:
            continue
        identities[(stat.st_dev, stat.st_ino)] = case
    for case in cases:
        output = case.output.resolve()
        victim = inputs.get(output)
        if victim is None:
            try:
                stat = output.stat()
                victim = identities.get((stat.st_dev, stat.st_ino))
            except OSError:
                victim = None
        if victim is None:
            victim = next((inputs[p] for p in output.parents if p in inputs), None)
        if victim is not None:
            raise InputError(f"{case.output}: the output of {_describe(case)} would overwrite "
                             f"the input of {_describe(victim)}; choose another output")


def _describe(case: Case) -> str:
    return f"{case.input} (series {case.series_uid})" if case.series_uid else str(case.input)


def _search_folder(root: Path, base: Path, out_dir: Path, suffix: str | None) -> list[Case]:
    """Image files and DICOM series under `root`, in sorted order, skipping `out_dir`; outputs
    mirror their paths relative to `base`."""
    from ..io.volumes import list_dicom_series

    cases = []
    visited: set[Path] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        here = Path(folder)
        if here.resolve() in visited:  # a symbolic link back up the tree
            subfolders[:] = []
            continue
        visited.add(here.resolve())
        subfolders[:] = sorted(s for s in subfolders if not s.startswith(".")
                               and (here / s).resolve() != out_dir)
        images = sorted(f for f in files if not f.startswith(".")
                        and suffix_of(Path(f)) in SEARCHED_SUFFIXES)
        relative = here.relative_to(base)  # "." only for the one folder named
        for name in images:
            output = out_dir / _mirror_name(relative / name, _file_suffix(Path(name), suffix))
            cases.append(Case(here / name, output))
        others = [f for f in files if not f.startswith(".") and f not in images
                  and suffix_of(Path(f)) not in NOT_DICOM_SUFFIXES]
        if not others:
            continue
        series = list_dicom_series(here)
        series_suffix = _series_suffix(suffix)
        for entry in series:
            if len(series) == 1:
                name = relative.parent / (relative.name or root.name)
                output = out_dir / name.with_name(name.name + series_suffix)
            else:
                label = _slug(entry.description) or "series"
                output = out_dir / (relative if str(relative) != "." else Path(root.name)) / (
                    f"{label}_{_slug(entry.uid)}{series_suffix}")
            cases.append(Case(here, output, series_uid=entry.uid))
    return cases


def _mirror_name(relative: Path, suffix: str) -> Path:
    """`p1/ct.nii.gz` -> `p1/ct.nrrd` (the input's format suffix replaced by the output's)."""
    input_suffix = suffix_of(relative)
    stem = relative.name[: len(relative.name) - len(input_suffix)] if input_suffix else relative.name
    return relative.with_name(stem + suffix)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:64]


def _read_table(table: Path, mirror_dir: Path, out_dir: Path, suffix: str | None) -> list[Case]:
    """Cases from a CSV/TSV table; relative inputs are relative to the table's folder,
    relative outputs to `out_dir`; a row without output mirrors its input's path relative to
    the table's folder under `mirror_dir`."""
    delimiter = "\t" if suffix_of(table) == ".tsv" else ","
    try:
        text = table.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{table}: cannot read the table ({err})") from None
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(f"{table}: the table is empty")
    header = [cell.strip().lower() for cell in rows[0]]
    unknown = [c for c in header if c not in TABLE_COLUMNS]
    if "input" not in header or unknown or len(set(header)) != len(header):
        raise InputError(f"{table}: the first row must name the columns: input (required), "
                         f"output, model, scale, series; got {rows[0]}")
    cases = []
    for line_number, row in enumerate(rows[1:], start=2):
        if len(row) > len(header):
            raise InputError(f"{table}: line {line_number} has {len(row)} cells; the header "
                             f"names {len(header)}")
        cells = {column: (row[i].strip() if i < len(row) else "") for i, column in enumerate(header)}
        if not cells["input"]:
            raise InputError(f"{table}: line {line_number} has no input")
        source = Path(cells["input"])
        source = (source if source.is_absolute() else table.parent / source).resolve()
        if not source.exists():
            raise InputError(f"{table}: line {line_number}: {source}: no such file or folder")
        if cells.get("output"):
            output = Path(cells["output"])
            output = output if output.is_absolute() else out_dir / output
        else:
            try:
                relative = source.relative_to(table.parent.resolve())
            except ValueError:
                relative = Path(source.name)
            output = mirror_dir / (
                relative.with_name(relative.name + _series_suffix(suffix)) if source.is_dir()
                else _mirror_name(relative, _file_suffix(source, suffix)))
        try:
            scale = parse_scale(cells["scale"]) if cells.get("scale") else None
        except InputError as err:
            raise InputError(f"{table}: line {line_number}: {err}") from None
        cases.append(Case(source, output.resolve(), series_uid=cells.get("series") or None,
                          model=cells.get("model") or None, scale=scale,
                          output_named=bool(cells.get("output"))))
    return cases


def _unique(cases: Iterable[Case]) -> list[Case]:
    """Drop exact repeats (the same input named twice, same output and options), keeping the
    first; the same input with other options stays (and collides)."""
    seen, unique = set(), []
    for case in cases:
        identity = (case.input, case.series_uid, case.output, case.model, case.scale)
        if identity not in seen:
            seen.add(identity)
            unique.append(case)
    return unique


def _disambiguate(cases: list[Case]) -> list[Case]:
    """Cases in one folder whose derived outputs collide (`a.nii.gz` and `a.nrrd` with
    `--format nrrd` -> `a.nrrd`) get the input's full name in the output (`a.nii.gz.nrrd`,
    `a.nrrd.nrrd`); a series gets its UID. Outputs a table names are never renamed."""
    counts: dict[Path, int] = {}
    for case in cases:
        counts[case.output] = counts.get(case.output, 0) + 1
    result = []
    for case in cases:
        if counts[case.output] > 1 and not case.output_named:
            suffix = suffix_of(case.output)
            stem = case.output.name[: len(case.output.name) - len(suffix)]
            name = (f"{stem}_{_slug(case.series_uid)}{suffix}" if case.series_uid
                    else case.input.name + suffix)
            case = Case(case.input, case.output.with_name(name), case.series_uid, case.model,
                        case.scale)
        result.append(case)
    return result


def input_fingerprint(case: Case) -> str:
    """A short hash of the input's file names, sizes and modification times (for a folder,
    of the files directly in it): a changed input makes a done case due again."""
    digest = hashlib.sha1()
    path = case.input
    try:
        if path.is_dir():
            entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                             for e in os.scandir(path) if e.is_file())
        else:
            stat = path.stat()
            entries = [(path.name, stat.st_size, stat.st_mtime_ns)]
    except OSError:
        return "unreadable"
    for entry in entries:
        digest.update(repr(entry).encode())
    digest.update(repr(case.series_uid).encode())
    return digest.hexdigest()[:16]
