"""Checks that a volume file holds what its header claims, before or after SimpleITK reads it.

SimpleITK (ITK 5.4) reads a NIfTI file cut in half as zero-filled slices, turns NaN voxels of a
NIfTI file into 0, replaces zero, negative, NaN or infinite header spacings by 1 mm or their
absolute value, and writes a truncated NIfTI file on a full disk without raising. These checks
look at the bytes themselves, so none of that passes silently:

- `read_header_info`: size, pixel type and voxel bytes from the header only (nothing allocated);
- `check_header_spacing`: the spacings stated by NIfTI, MetaImage and NRRD headers;
- `check_payload`: the file holds the whole voxel payload (compressed streams decoded to the end,
  CRC included) and, for NIfTI, no NaN or infinite voxel.

Hand-written because neither SimpleITK nor nibabel reports these conditions; the streams are read
in chunks, so a check needs a few MB of memory whatever the volume's size.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

#: Bytes per voxel component for each SimpleITK pixel type's component.
_COMPONENT_BYTES = {
    "8-bit": 1, "16-bit": 2, "32-bit": 4, "64-bit": 8,
}
#: Read chunk when streaming a payload (bytes).
CHUNK_BYTES = 8 << 20


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@dataclass(frozen=True)
class HeaderInfo:
    """What a file's header claims: size per axis (x, y, z, ...), pixel type, components."""

    size: tuple[int, ...]
    pixel_id: int
    pixel_type: str
    components: int

    @property
    def component_bytes(self) -> int:
        match = re.search(r"(8|16|32|64)-bit", self.pixel_type)
        bytes_ = _COMPONENT_BYTES[match.group(0)] if match else 1
        return bytes_ * (2 if self.is_complex else 1)

    @property
    def is_complex(self) -> bool:
        return self.pixel_type.startswith("complex")

    @property
    def voxel_count(self) -> int:
        return math.prod(int(s) for s in self.size)

    @property
    def payload_bytes(self) -> int:
        """Bytes of voxel data the header promises (uncompressed)."""
        return self.voxel_count * self.components * self.component_bytes


def read_header_info(path: str | os.PathLike) -> HeaderInfo:
    """The header's claims, read by SimpleITK without reading voxels. InputError if unreadable."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(f"{path}: cannot read as an image ({first_line(err)})") from None
    pixel_id = reader.GetPixelID()
    return HeaderInfo(tuple(int(s) for s in reader.GetSize()), pixel_id,
                      sitk.GetPixelIDValueAsString(pixel_id), int(reader.GetNumberOfComponents()))


def first_line(err: BaseException) -> str:
    """The useful sentence of an ITK error (ITK puts it last)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


# ---------------------------------------------------------------------------------------------
# Header spacings


def check_header_spacing(path: str | os.PathLike) -> None:
    """InputError when a NIfTI, MetaImage or NRRD header states a zero, negative, NaN or
    infinite voxel spacing (mm), or a NaN/inf origin or orientation number; other formats pass
    (SimpleITK's geometry is checked after reading)."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix in (".nii", ".nii.gz"):
        spacing = _nifti_spacing(path)
    elif suffix in (".mha", ".mhd"):
        _check_metaimage_ndims(path)
        spacing = _metaimage_spacing(path)
    elif suffix in (".nrrd", ".nhdr"):
        spacing = _nrrd_spacing(path)
    else:
        return
    if any(not (math.isfinite(s) and s > 0) for s in spacing):
        raise InputError(f"{path}: zero, negative or non-finite voxel spacing {tuple(spacing)} "
                         "in the header (each must be a positive finite number of mm)")
    numbers = _header_geometry_numbers(path, suffix)
    for field, values in numbers.items():
        if not all(math.isfinite(v) for v in values):
            raise InputError(f"{path}: non-finite {field} {tuple(values)} in the header "
                             "(SimpleITK would read it as 0)")
    axes = _header_axes(numbers, suffix)
    if axes is not None and not _orthogonal(axes):
        raise InputError(f"{path}: the header's voxel axes are not orthogonal (a sheared grid, "
                         f"axes {tuple(round(v, 6) for v in axes.reshape(-1))}); SimpleITK would "
                         "silently straighten them and move every voxel: resample the volume first")


#: Largest |cosine| between two voxel axes taken as orthogonal (float32 NIfTI headers of real
#: scans reach ~1e-6; a sheared grid is far beyond).
ORTHOGONALITY_TOLERANCE = 1e-3


def _header_axes(numbers: dict[str, list[float]], suffix: str) -> np.ndarray | None:
    """The three voxel axes (rows, any length) a header states, or None."""
    if suffix in (".mha", ".mhd"):
        values = next((numbers[k] for k in ("TransformMatrix", "Rotation", "Orientation")
                       if k in numbers), None)
        return np.asarray(values, dtype=np.float64).reshape(3, 3) if values and len(values) == 9 else None
    if suffix in (".nrrd", ".nhdr"):
        values = numbers.get("space directions")
        return np.asarray(values, dtype=np.float64).reshape(3, 3) if values and len(values) == 9 else None
    if suffix in (".nii", ".nii.gz") and "srow_x" in numbers:
        rows = np.asarray([numbers["srow_x"], numbers["srow_y"], numbers["srow_z"]])[:, :3]
        return rows.T if np.any(rows) else None  # columns of the sform = the voxel axes
    return None


def _orthogonal(axes: np.ndarray) -> bool:
    norms = np.linalg.norm(axes, axis=1)
    if np.any(norms == 0):
        return True  # zero-length axes are refused as zero spacing
    unit = axes / norms[:, None]
    cosines = unit @ unit.T - np.eye(3)
    return float(np.max(np.abs(cosines))) <= ORTHOGONALITY_TOLERANCE


def _header_geometry_numbers(path: Path, suffix: str) -> dict[str, list[float]]:
    """Origin and orientation numbers a header states (ITK turns NaN/inf there into 0)."""
    found: dict[str, list[float]] = {}
    if suffix in (".mha", ".mhd"):
        for line in _text_header_lines(path, re.compile(rb"\s*ElementDataFile")):
            key, _, value = line.partition("=")
            if key.strip() in ("Offset", "Origin", "Position", "TransformMatrix", "Rotation",
                               "Orientation"):
                found[key.strip()] = _floats(value, path, key.strip())
    elif suffix in (".nrrd", ".nhdr"):
        fields = _nrrd_fields(path)
        for key in ("space origin", "space directions"):
            if key in fields:
                text = fields[key].replace("none", "")
                found[key] = _floats(text, path, key)
    elif suffix in (".nii", ".nii.gz"):
        header = _nifti_header(path)
        for key in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z",
                    "srow_x", "srow_y", "srow_z"):
            found[key] = [float(v) for v in np.atleast_1d(header[key])]
    return found


def _nifti_header(path: Path):
    import nibabel as nib  # header parsing of NIfTI-1 and NIfTI-2, both byte orders
    try:
        opener = gzip.open if _suffix(path) == ".nii.gz" else open
        with opener(path, "rb") as handle:
            prefix = handle.read(540)
        if len(prefix) < 348:
            raise InputError(f"{path}: cannot read as NIfTI: file holds only {len(prefix)} "
                             "header bytes of 348")
        for klass in (nib.Nifti1Header, nib.Nifti2Header):
            size = klass.sizeof_hdr
            if len(prefix) < size:
                continue
            for order in ("<", ">"):
                if int(np.frombuffer(prefix[:4], dtype=order + "i4")[0]) == size:
                    return klass(prefix[:size], endianness=order, check=False)
    except InputError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise InputError(f"{path}: cannot read as NIfTI ({err})") from None
    raise InputError(f"{path}: cannot read as NIfTI: the header size field is neither 348 "
                     "(NIfTI-1) nor 540 (NIfTI-2); the file is not NIfTI")


def _nifti_spacing(path: Path) -> list[float]:
    header = _nifti_header(path)
    ndim = int(header["dim"][0])
    if not 1 <= ndim <= 7:
        raise InputError(f"{path}: cannot read as NIfTI: dim[0] = {ndim} is not 1-7")
    return [float(v) for v in header["pixdim"][1:1 + min(ndim, 3)]]


def _text_header_lines(path: Path, stop: re.Pattern[bytes], limit: int = 1 << 16) -> list[str]:
    with open(path, "rb") as handle:
        head = handle.read(limit)
    lines = []
    for raw in head.split(b"\n"):
        lines.append(raw.decode("latin-1").rstrip("\r"))
        if stop.match(raw):
            break
    return lines


def _floats(text: str, path: Path, field: str) -> list[float]:
    try:
        return [float(v) for v in text.replace("(", " ").replace(")", " ").replace(",", " ").split()]
    except ValueError:
        raise InputError(f"{path}: header field {field} = {text.strip()!r} is not a list of numbers") from None


def _check_metaimage_ndims(path: Path) -> None:
    """InputError for an NDims outside 1-4 (ITK aborts the process on some such headers)."""
    for line in _text_header_lines(path, re.compile(rb"\s*ElementDataFile")):
        key, _, value = line.partition("=")
        if key.strip() == "NDims":
            try:
                ndims = int(value.strip())
            except ValueError:
                raise InputError(f"{path}: MetaImage NDims = {value.strip()!r} is not a number") from None
            if not 1 <= ndims <= 4:
                raise InputError(f"{path}: MetaImage NDims = {ndims}: MedSR reads 2-D and 3-D images")
            return


def _metaimage_spacing(path: Path) -> list[float]:
    for line in _text_header_lines(path, re.compile(rb"\s*ElementDataFile")):
        key, _, value = line.partition("=")
        if key.strip() in ("ElementSpacing", "ElementSize"):
            return _floats(value, path, key.strip())
    return []


def _nrrd_fields(path: Path) -> dict[str, str]:
    fields = {}
    for line in _text_header_lines(path, re.compile(rb"^\s*$")):
        if ":" in line and not line.startswith("#") and ":=" not in line:
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
    return fields


def _nrrd_spacing(path: Path) -> list[float]:
    fields = _nrrd_fields(path)
    spacing = []
    if "spacings" in fields:  # NRRD's "nan" (a non-spatial axis) is refused too: ITK makes it 1 mm
        spacing += _floats(fields["spacings"], path, "spacings")
    if "space directions" in fields:
        kinds = fields.get("kinds", "").lower().split()
        tokens = re.findall(r"\(([^)]*)\)|(none)", fields["space directions"], re.IGNORECASE)
        for axis, (vector, none) in enumerate(tokens):
            if none:
                # A spatial axis without a direction: ITK invents 1 mm along it. A vector or
                # colour axis (kinds) is left to the component check.
                kind = kinds[axis] if axis < len(kinds) else "domain"
                if kind in ("domain", "space"):
                    spacing.append(float("nan"))
                continue
            components = _floats(vector, path, "space directions")
            spacing.append(float(np.linalg.norm(components)) if all(map(math.isfinite, components))
                           else float("nan"))
    return spacing


# ---------------------------------------------------------------------------------------------
# Payload completeness


@dataclass(frozen=True)
class _Payload:
    """Where a file's voxel bytes are: file, byte offset, encoding ("raw", "gzip", "zlib",
    "bzip2"), and (NIfTI) the on-disk dtype to scan for NaN/Inf."""

    file: Path
    offset: int
    encoding: str
    scan_dtype: np.dtype | None = None
    stored_bytes: int | None = None  # NIfTI: bytes of the stored voxels (the header's own dtype)


def check_payload(path: str | os.PathLike, info: HeaderInfo | None = None) -> None:
    """InputError unless `path` holds all voxel bytes its header promises (compressed streams
    decoded to their end and CRC), and, for NIfTI, no NaN or infinite voxel.

    NIfTI, MetaImage and NRRD are checked; other formats (PNG, DICOM, ...) pass unchecked.
    """
    path = Path(path)
    info = info or read_header_info(path)
    payload = _locate_payload(path)
    if payload is None:
        return
    # SimpleITK reports the pixel type after scaling (a uint8 NIfTI with a slope is float32):
    # the bytes on disk follow the file's own stored type.
    expected = payload.stored_bytes if payload.stored_bytes is not None else info.payload_bytes
    got, non_finite = _stream_payload(path, payload, expected)
    if got < expected:
        raise InputError(f"{path}: file is truncated: it holds {got:,} of the {expected:,} bytes "
                         f"of voxel data its header promises ({info.size} voxels)")
    if non_finite:
        raise InputError(f"{path}: holds {non_finite} NaN or infinite voxel(s); clean the input first")


def _locate_payload(path: Path) -> _Payload | None:
    suffix = _suffix(path)
    if suffix in (".nii", ".nii.gz"):
        header = _nifti_header(path)
        dtype = header.get_data_dtype()
        scan = dtype if dtype.kind in "fc" else None
        shape = [int(d) for d in header["dim"][1:1 + int(header["dim"][0])]]
        stored = math.prod(max(d, 1) for d in shape) * dtype.itemsize
        offset = float(header["vox_offset"])
        if not math.isfinite(offset) or offset < 0 or offset > 1 << 40:
            raise InputError(f"{path}: cannot read as NIfTI: vox_offset {offset} is not a valid "
                             "byte position of the voxel data")
        return _Payload(path, int(header.get_data_offset()),
                        "gzip" if suffix == ".nii.gz" else "raw", scan, stored)
    if suffix in (".mha", ".mhd"):
        return _metaimage_payload(path)
    if suffix in (".nrrd", ".nhdr"):
        return _nrrd_payload(path)
    return None


def _metaimage_payload(path: Path) -> _Payload | None:
    lines = _text_header_lines(path, re.compile(rb"\s*ElementDataFile"))
    fields = {}
    for line in lines:
        key, _, value = line.partition("=")
        fields[key.strip()] = value.strip()
    data_file = fields.get("ElementDataFile")
    if data_file is None:
        raise InputError(f"{path}: MetaImage header has no ElementDataFile line")
    encoding = "zlib" if fields.get("CompressedData", "False").lower() == "true" else "raw"
    if data_file.upper() == "LOCAL":
        offset = sum(len(line.encode("latin-1")) + 1 for line in lines)
        return _Payload(path, offset, encoding)
    if data_file.upper() == "LIST" or "%" in data_file or " " in data_file:
        return None  # one file per slice: left to ITK
    return _Payload(path.parent / data_file, 0, encoding)


def _nrrd_payload(path: Path) -> _Payload | None:
    fields = _nrrd_fields(path)
    encoding = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2",
                "bz2": "bzip2"}.get(fields.get("encoding", "raw").lower())
    if encoding is None or fields.get("byte skip", "0") != "0" or fields.get("line skip", "0") != "0":
        return None  # ascii/hex text or skipped bytes: left to ITK
    data_file = fields.get("data file") or fields.get("datafile")
    if data_file:
        if data_file.startswith("LIST") or " " in data_file:
            return None
        return _Payload(path.parent / data_file, 0, encoding)
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    end = re.search(rb"\r?\n\r?\n", head)
    if end is None:
        raise InputError(f"{path}: NRRD header does not end (no blank line in its first 64 KB)")
    return _Payload(path, end.end(), encoding)


def _raw_chunks(handle: BinaryIO) -> Iterator[bytes]:
    while True:
        chunk = handle.read(CHUNK_BYTES)
        if not chunk:
            return
        yield chunk


def _decoded_chunks(handle: BinaryIO, encoding: str, path: Path) -> Iterator[bytes]:
    if encoding == "raw":
        yield from _raw_chunks(handle)
        return
    if encoding == "gzip":
        stream = gzip.GzipFile(fileobj=handle, mode="rb")
        try:
            yield from _raw_chunks(stream)  # raises EOFError when the stream ends early
        except (EOFError, OSError, zlib.error) as err:
            raise InputError(f"{path}: compressed voxel data is truncated or corrupt ({err})") from None
        return
    decoder = zlib.decompressobj() if encoding == "zlib" else bz2.BZ2Decompressor()
    try:
        for chunk in _raw_chunks(handle):
            yield decoder.decompress(chunk)
            if decoder.eof:
                break
    except (OSError, zlib.error, ValueError) as err:
        raise InputError(f"{path}: compressed voxel data is corrupt ({err})") from None
    if not decoder.eof:
        raise InputError(f"{path}: compressed voxel data is truncated (the stream ends early)")


def _stream_payload(path: Path, payload: _Payload, expected: int) -> tuple[int, int]:
    """(decoded payload bytes available, up to `expected` counted; non-finite voxels seen)."""
    if not payload.file.is_file():
        raise InputError(f"{path}: its voxel data file {payload.file} does not exist")
    got, non_finite, carry = 0, 0, b""
    itemsize = payload.scan_dtype.itemsize if payload.scan_dtype is not None else 1
    with open(payload.file, "rb") as handle:
        if payload.encoding == "gzip" and payload.file == path and _suffix(path) in (".nii", ".nii.gz"):
            chunks = _decoded_chunks(handle, "gzip", path)
            skip = payload.offset  # NIfTI: the offset is inside the decompressed stream
        else:
            handle.seek(payload.offset)
            chunks = _decoded_chunks(handle, payload.encoding, path)
            skip = 0
        for chunk in chunks:
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
            chunk = chunk[: max(0, expected - got)]
            got += len(chunk)
            if payload.scan_dtype is not None and chunk:
                data = carry + chunk
                whole = len(data) - len(data) % itemsize
                values = np.frombuffer(data[:whole], dtype=payload.scan_dtype)
                non_finite += int(values.size - np.count_nonzero(np.isfinite(values)))
                carry = data[whole:]
            if got >= expected and payload.encoding in ("raw", "gzip"):
                if payload.encoding == "gzip":
                    for _ in chunks:  # decode to the end: a cut stream raises, the CRC is checked
                        pass
                break
    return got, non_finite
