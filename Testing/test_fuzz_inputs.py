"""Fuzzing `read_volume` and `upscale`: every input ends in a correct result or an InputError.

Properties (hypothesis), over shapes of 1 to a few hundred voxels per axis, every SimpleITK
real scalar pixel type plus complex and 0/1 ("bool") masks, intensity extremes, NaN/inf,
spacings from subnormal to 1e308 plus NaN/inf, orthonormal and non-orthonormal directions:
  - upscale of an in-memory image, with each interpolation model;
  - upscale's arguments (scale, axis, tile, batch size, threads, device, precision);
  - a volume written by SimpleITK as .nrrd/.mha/.nii/.nii.gz reads back unchanged;
  - write_volume then read_volume, with arbitrary metadata text;
  - edited MetaImage/NRRD header fields, edited NIfTI header fields, truncated or
    byte-damaged files: read_volume gives a usable volume (which upscale then handles) or an
    InputError.
Files are read in a guarded worker process (crash, hang and memory guard; see
fuzz_strategies.py). Profiles: MEDSR_FUZZ=ci (default, derandomized, CI budget) or
MEDSR_FUZZ=long (`make fuzz`).

The regular tests at the end pin the failing examples these properties found.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

from MedSRLib import InputError, read_volume, upscale

from fuzz_strategies import (
    COMPLEX_TYPES, LABEL_TYPES, MHA_FIELDS, NRRD_FIELDS, REAL_TYPES, GuardedWorker, apply_damage,
    apply_header_edits, apply_nifti_edits, assert_faithful, assert_read_outcome, byte_damage,
    check_upscaled, example_time_limit, fuzz_settings, header_edits, image_from_description,
    intended_factors, is_real, nifti_edits, volume_cases,
)

INTERPOLATION_MODELS = ("nearest", "linear", "bicubic", "lanczos")
FILE_SUFFIXES = (".nrrd", ".mha", ".nii", ".nii.gz")


@pytest.fixture(scope="module", autouse=True)
def keep_torch_threads():
    """`upscale(threads=n)` sets torch's global thread count: put it back afterwards."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def worker():
    """upscale/read_volume/write_volume in a separate process: crash, hang and memory guard."""
    guarded = GuardedWorker()
    yield guarded
    guarded.stop()


def _ordinary(case, factors, scale, axis) -> bool:
    """Inputs nobody may refuse: finite real voxels of moderate magnitude, spacing 1e-6..1e6 mm,
    finite origin, orthonormal direction, at least 2 voxels along every scaled axis."""
    image = case.image
    voxels = case.voxels
    if not is_real(voxels.dtype) or case.ndim == 4:
        return False
    if np.issubdtype(voxels.dtype, np.floating):
        if not np.all(np.isfinite(voxels)) or np.max(np.abs(voxels), initial=0) > 1e30:
            return False
    spacing = np.asarray(image.GetSpacing())
    if not np.all((spacing >= 1e-6) & (spacing <= 1e6)):
        return False
    origin = np.asarray(image.GetOrigin())
    if not np.all(np.isfinite(origin)) or np.max(np.abs(origin)) > 1e9:
        return False
    dims = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(dims, dims)
    if not np.allclose(direction.T @ direction, np.eye(dims), atol=1e-6):
        return False  # a non-orthonormal direction may be refused
    size = list(image.GetSize()) + [1] * (3 - dims)
    if factors is None:  # in-plane integer scale, axis chosen by upscale
        return min(size) >= 2 or (size[2] == 1 and min(size[:2]) >= 2)
    return all(n >= 2 for n, f in zip(size, factors) if f > 1)


scales_and_axes = st.one_of(
    st.tuples(st.integers(2, 4), st.sampled_from(["auto", "x", "y", "z"])),
    st.tuples(st.tuples(*[st.integers(1, 4)] * 3).filter(lambda f: max(f) >= 2),
              st.sampled_from(["auto", "x", "y", "z"])),
)


def assert_upscale_outcome(answer: dict, what: str) -> sitk.Image | None:
    """The worker's upscale answer as an image (None after an InputError); any other outcome
    (exception, crash, hang, modified input) fails."""
    details = "\n".join(str(answer.get(k, "")) for k in ("message", "traceback", "stderr") if answer.get(k))
    assume(answer["outcome"] != "unbuildable")  # SimpleITK refused to rebuild the input image
    assert answer["outcome"] in ("ok", "InputError"), \
        f"upscale({what}) ended in {answer['outcome']} {answer.get('type', '')}:\n{details}"
    assert not answer.get("input_changed"), f"upscale({what}) modified its input: {answer['input_changed']}"
    return image_from_description(answer["image"]) if answer["outcome"] == "ok" else None


@fuzz_settings(1.5)
@given(case=volume_cases(), model=st.sampled_from(INTERPOLATION_MODELS), scale_axis=scales_and_axes,
       tile=st.sampled_from([None, 0, 192, 16, 17, None, 0, 5, 2]), batch_size=st.integers(1, 5),
       output_float=st.booleans())
def test_upscale_gives_correct_result_or_input_error(worker, case, model, scale_axis, tile, batch_size,
                                                     output_float):
    scale, axis = scale_axis
    factors, _ = intended_factors(scale, axis)
    note(case.describe())
    kwargs = dict(model=model, scale=scale, axis=axis, tile=tile, batch_size=batch_size,
                  output_float=output_float)
    answer = worker.upscale(case.image, **kwargs)
    output = assert_upscale_outcome(answer, f"{kwargs}")
    if tile is not None and 0 < tile < 16:  # too small to make progress: a named usage error
        assert output is None and "tile" in answer["message"], f"tile={tile} accepted"
        return
    if output is None:
        assert not _ordinary(case, factors, scale, axis), f"ordinary input refused: {answer['message']}"
        return
    assert is_real(case.voxels.dtype), f"{case.voxels.dtype} voxels were accepted (need InputError)"
    assert not (np.issubdtype(case.voxels.dtype, np.floating) and not np.all(np.isfinite(case.voxels))), \
        "NaN/inf voxels were accepted (need InputError)"
    check_upscaled(case.image, output, factors, model, output_float)


# Arguments: invalid values must be refused, accepted ones must give the canonical result.
FUZZ_VOLUME_SHAPE = (5, 6, 7)


def _argument_volume() -> sitk.Image:
    rng = np.random.default_rng(7)
    image = sitk.GetImageFromArray((rng.random(FUZZ_VOLUME_SHAPE) * 100).astype(np.float32))
    image.SetSpacing((0.8, 0.9, 3.0))
    image.SetOrigin((-10.0, 20.0, 5.5))
    return image


scale_arguments = st.one_of(
    st.integers(-2, 6), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([2.0, 3.0, 2.5]),
    st.none(), st.booleans(), st.just(np.int64(2)),
    st.lists(st.one_of(st.integers(-1, 5), st.sampled_from([2.0, 1.5, math.nan]), st.none()),
             min_size=0, max_size=4).flatmap(lambda v: st.sampled_from([v, tuple(v)])),
)
axis_arguments = st.one_of(
    st.sampled_from(["auto", "x", "y", "z", "i", "j", "k", "X", " z ", "0", "1", "2", "3", "-1", "",
                     "xy", "AUTO"]),
    st.integers(-2, 4), st.none(), st.sampled_from([1.0, 2.5, np.int64(1)]))


@fuzz_settings(1.0)
@given(model=st.one_of(st.sampled_from(INTERPOLATION_MODELS), st.sampled_from(["", "Bicubic", "cubic", "nope"])),
       scale=scale_arguments, axis=axis_arguments,
       tile=st.one_of(st.none(), st.integers(-3, 300)),
       batch_size=st.integers(-2, 6), threads=st.sampled_from([None, 0, 1, 2, -1]),
       device=st.sampled_from(["auto", "cpu", "cuda", "gpu", ""]),
       precision=st.sampled_from(["auto", "fp32", "fp16", "int8", ""]))
def test_upscale_arguments_give_correct_result_or_input_error(model, scale, axis, tile, batch_size,
                                                              threads, device, precision):
    image = _argument_volume()
    factors, valid = intended_factors(scale, axis)
    threads_before = torch.get_num_threads()
    try:
        with example_time_limit():
            try:
                output = upscale(image, model=model, scale=scale, axis=axis, tile=tile,
                                 batch_size=batch_size, threads=threads, device=device,
                                 precision=precision)
            except InputError:
                return
    finally:
        torch.set_num_threads(threads_before)
    assert model in INTERPOLATION_MODELS, f"unknown model {model!r} accepted"
    assert device in ("auto", "cpu"), f"device {device!r} accepted"
    assert precision in ("auto", "fp32"), f"precision {precision!r} accepted on CPU"
    assert valid, f"scale={scale!r}, axis={axis!r} accepted; they have no meaning to check against"
    factors = check_upscaled(image, output, factors, model)
    reference = upscale(image, model=model, scale=factors, axis="z" if factors[2] == 1 else "auto",
                        tile=0, batch_size=4)
    expected = sitk.GetArrayFromImage(reference)
    np.testing.assert_allclose(sitk.GetArrayFromImage(output), expected, rtol=1e-4, atol=1e-3,
                               err_msg=f"tile={tile}, batch_size={batch_size}, threads={threads} "
                                       "changed the voxels")


# Files written by SimpleITK read back unchanged (or are refused). NIfTI stores float32
# geometry and an orthonormal direction (SimpleITK's writer coerces others): its cases stay
# within what the file can hold, so any difference is the reader's. write_volume, below, gets
# the unrestricted cases.
REAL_OR_COMPLEX = [np.dtype(t) for t in (*REAL_TYPES.values(), *COMPLEX_TYPES.values())]
nifti_spacings = st.tuples(*[st.one_of(st.floats(0.01, 100.0), st.sampled_from([1e-6, 1e6, 1e-30, 1e30]))] * 3)
nifti_origins = st.tuples(*[st.one_of(st.floats(-1e4, 1e4), st.sampled_from([1e9, -1e12, 1e30]))] * 3)


def _file_cases(suffix: str) -> st.SearchStrategy:
    if suffix.startswith(".nii"):
        return volume_cases(dtypes=REAL_OR_COMPLEX, allow_other_ndim=False, metadata=False,
                            direction_kinds=("identity", "rotation", "reflection", "permutation"),
                            spacing_strategy=nifti_spacings, origin_strategy=nifti_origins)
    return volume_cases(dtypes=REAL_OR_COMPLEX, allow_other_ndim=False, metadata=False)


@fuzz_settings(1.0)
@given(suffix_case=st.sampled_from(FILE_SUFFIXES).flatmap(lambda s: st.tuples(st.just(s), _file_cases(s))),
       compress=st.booleans())
def test_written_volume_reads_back_faithfully_or_input_error(worker, suffix_case, compress):
    suffix, case = suffix_case
    note(case.describe())
    direction = np.asarray(case.image.GetDirection()).reshape(case.image.GetDimension(), -1)
    sheared = np.abs(direction.T @ direction - np.diag(np.diag(direction.T @ direction))).max() > 1e-6
    # SimpleITK's NIfTI writer straightens a sheared grid ("coerced to orthogonal"): the file
    # then holds another grid than the image; MedSR's write_volume refuses that (tested below).
    assume(not (suffix.startswith(".nii") and sheared))
    # SimpleITK's writers store non-finite spacing/origin as something else (the file then holds
    # another grid than the image): no round trip to check; reading such files is fuzzed below.
    assume(np.all(np.isfinite(case.image.GetSpacing())) and np.all(np.isfinite(case.image.GetOrigin())))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"volume{suffix}"
        try:
            sitk.WriteImage(case.image, str(path), compress)
        except RuntimeError as err:
            note(f"SimpleITK cannot write this: {err}")
            assume(False)
        answer = worker.read(path, voxels=True)
    info = assert_read_outcome(answer, f"{suffix} written by SimpleITK")
    if info is not None:
        assert_faithful(case.image, info, suffix)


metadata_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)


@fuzz_settings(0.7)
@given(case=volume_cases(dtypes=[np.dtype(np.int16), np.dtype(np.float32), np.dtype(np.uint8)],
                         allow_other_ndim=False, metadata=False),
       suffix=st.sampled_from(FILE_SUFFIXES),
       metadata=st.dictionaries(st.one_of(st.sampled_from(["medsr_modality", "medsr_model", "medsr_note"]),
                                          metadata_text.filter(bool)),
                                st.one_of(metadata_text, st.sampled_from(
                                    ["CT\nDimSize = 1 1 1", "x\nsizes: 1 1 1\n\n", "a\rb", "\x00",
                                     "x\nElementDataFile = LOCAL", "x\nHeaderSize = 7", "x\n\ntype: double"])),
                                max_size=3))
def test_write_volume_then_read_volume_keeps_the_volume(worker, case, suffix, metadata):
    image = case.image
    for key, value in metadata.items():
        try:
            image.SetMetaData(key, value)
        except (RuntimeError, TypeError, UnicodeError):
            assume(False)
    note(case.describe())
    with tempfile.TemporaryDirectory() as folder:
        answer = worker.read(Path(folder) / f"volume{suffix}", voxels=True, write=image)
    write = answer.get("write", answer)
    if write["outcome"] == "InputError":
        return
    what = f"{suffix} written by write_volume with metadata {metadata!r}"
    assert write["outcome"] == "ok", \
        f"write_volume ({what}) ended in {write['outcome']} {write.get('type', '')}: " \
        f"{write.get('message', '')}\n{write.get('traceback', '')}{write.get('stderr', '')}"
    info = assert_read_outcome(answer, what)
    if info is not None:
        assert_faithful(image, info, suffix)


# Damaged files: a usable volume or an InputError, never anything else.
base_cases = volume_cases(dtypes=[np.dtype(np.int16), np.dtype(np.float32), np.dtype(np.uint8),
                                  np.dtype(np.float64)],
                          allow_other_ndim=False, metadata=False,
                          direction_kinds=("identity", "rotation", "sheared"),
                          spacing_strategy=st.tuples(*[st.floats(0.1, 5.0)] * 3),
                          origin_strategy=st.tuples(*[st.floats(-100, 100)] * 3))


def _written_bytes(image: sitk.Image, suffix: str, compress: bool) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"base{suffix}"
        sitk.WriteImage(image, str(path), compress)
        return path.read_bytes()


def _check_damaged_read(worker, data: bytes, suffix: str, what: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"damaged{suffix}"
        path.write_bytes(data)
        answer = worker.read(path, voxels=True, upscale={"model": "nearest", "scale": 2, "axis": "auto"})
    info = assert_read_outcome(answer, what)
    if info is None or "upscale" not in answer or "voxels_npy" not in info:
        return
    up = answer["upscale"]
    if up["outcome"] == "InputError":
        return
    assert up["outcome"] == "ok", \
        f"upscale of the volume read from {what} ended in {up.get('type')}: {up.get('traceback')}"
    check_upscaled(image_from_description(info), image_from_description(up["image"]), None, "nearest")


@fuzz_settings(1.5)
@given(case=base_cases, suffix=st.sampled_from([".mha", ".nrrd"]), compress=st.booleans(),
       edits=st.data())
def test_edited_text_header_reads_as_usable_volume_or_input_error(worker, case, suffix, compress,
                                                                  edits):
    fields = MHA_FIELDS if suffix == ".mha" else NRRD_FIELDS
    chosen = edits.draw(header_edits(fields), label="edits")
    data = apply_header_edits(_written_bytes(case.image, suffix, compress), suffix, chosen)
    note(data[:700].decode("latin-1"))
    _check_damaged_read(worker, data, suffix, f"{suffix} with {chosen}")


@fuzz_settings(1.5)
@given(case=base_cases, suffix=st.sampled_from([".nii", ".nii.gz"]), edits=nifti_edits())
def test_edited_nifti_header_reads_as_usable_volume_or_input_error(worker, case, suffix, edits):
    data = apply_nifti_edits(_written_bytes(case.image, suffix, True), edits, suffix == ".nii.gz")
    _check_damaged_read(worker, data, suffix, f"{suffix} with {edits}")


@fuzz_settings(1.0)
@given(case=base_cases, suffix=st.sampled_from(FILE_SUFFIXES), compress=st.booleans(),
       damage=byte_damage())
def test_truncated_or_damaged_file_reads_as_usable_volume_or_input_error(worker, case, suffix,
                                                                          compress, damage):
    data = apply_damage(_written_bytes(case.image, suffix, compress), damage)
    _check_damaged_read(worker, data, suffix, f"{suffix} (compress={compress}) with {damage}")


# ---------------------------------------------------------------------------------------------
# The failing examples the properties found, as regular tests (minimal examples). Calls that
# crashed or hung run in the guarded worker, so that a regression fails the test, not the run.


def assert_refused_in_worker(answer: dict, what: str) -> None:
    details = "\n".join(str(answer.get(k, "")) for k in ("message", "traceback", "stderr") if answer.get(k))
    assert answer["outcome"] == "InputError", \
        f"{what} ended in {answer['outcome']} {answer.get('type', '')}:\n{details}"


def _metaimage_with(folder: Path, field: bytes, value: bytes) -> Path:
    path = folder / "edited.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)), str(path), False)
    data = path.read_bytes()
    start = data.index(field + b" = ")
    end = data.index(b"\n", start)
    path.write_bytes(data[:start] + field + b" = " + value + data[end:])
    return path


@pytest.mark.parametrize("ndims", [b"-1", b"100", b"2147483648", b"4294967295"])
def test_metaimage_with_ndims_out_of_range_is_refused_without_crashing(worker, tmp_path, ndims):
    """Found by test_edited_text_header_*: SimpleITK segfaults (NDims -1, 2^31, 2^32-1) or
    corrupts its heap and aborts (NDims 100) in ReadImageInformation."""
    path = _metaimage_with(tmp_path, b"NDims", ndims)
    assert_refused_in_worker(worker.read(path), f"read_volume of an .mha with NDims = {ndims.decode()}")


@pytest.mark.parametrize("model", ["nearest", "bicubic"])
@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_constant_volume_at_the_64_bit_integer_maximum_stays_constant(dtype, model):
    """Found by test_upscale_gives_*: 2^63-1 (2^64-1) comes back as 2^63-1024 (2^64-2048),
    float64 rounding in the intensity mapping."""
    value = np.iinfo(dtype).max
    image = sitk.GetImageFromArray(np.full((2, 2, 2), value, dtype=dtype))
    output = sitk.GetArrayFromImage(upscale(image, model=model, scale=2, axis="z"))
    wrong = output[output != value]
    assert wrong.size == 0, f"{wrong.size} of {output.size} voxels are {wrong[:2]}, not {value}"


def test_nrrd_axis_without_a_space_direction_is_refused(tmp_path):
    """Found by test_written_volume_*: SimpleITK writes a NaN spacing as 'space directions:
    none (0,1,0) (0,0,1)'; read_volume then invents spacing 1 mm and a direction for that
    axis instead of refusing the file."""
    path = tmp_path / "no_direction.nrrd"
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 2 2 2\n"
              "space directions: none (0,1,0) (0,0,1)\nkinds: domain domain domain\n"
              "endian: little\nencoding: raw\n\n")
    path.write_bytes(header.encode() + bytes(16))
    with pytest.raises(InputError):
        read_volume(path)


@pytest.mark.parametrize("spacing", [(5e-324, 1.0, 1.0), (1.0, 1.0, 1e-320)])
def test_subnormal_spacing_is_refused_not_a_simpleitk_error(spacing):
    """Found by test_upscale_gives_*: spacing / factor underflowed to 0 and SimpleITK's
    SetSpacing raised RuntimeError on the output grid."""
    image = sitk.GetImageFromArray(np.zeros((2, 2, 2), np.int16))
    image.SetSpacing(spacing)
    with pytest.raises(InputError):
        upscale(image, model="nearest", scale=(1, 1, 4) if spacing[2] < 1 else 2, axis="z")


@pytest.mark.parametrize("origin", [(math.nan, 0.0, 0.0), (0.0, math.inf, 0.0)])
def test_non_finite_origin_is_refused_by_upscale(origin):
    """Found by test_upscale_gives_*: a NaN origin was accepted and gave an output whose
    physical extent is undefined."""
    image = sitk.GetImageFromArray(np.ones((3, 4, 5), np.int16))
    image.SetOrigin(origin)
    with pytest.raises(InputError):
        upscale(image, model="nearest")


@pytest.mark.parametrize("pixel_type", LABEL_TYPES)
def test_label_map_image_is_refused_without_aborting(worker, pixel_type):
    """Found by probing every pixel type: touching a label map's buffer aborts the process
    (std::terminate on an itk::simple::GenericException)."""
    answer = worker.upscale(sitk.Image([4, 4, 3], pixel_type), model="nearest")
    assert_refused_in_worker(answer, f"upscale of a {sitk.GetPixelIDValueAsString(pixel_type)} image")


def test_int64_extremes_do_not_wrap_in_nearest_upscale():
    """Found by test_upscale_gives_*: 2^63-1 rounded to 2^63 in float64 and wrapped to -2^63,
    so every output voxel was the minimum."""
    info = np.iinfo(np.int64)
    voxels = np.array([info.min, info.max] * 10, dtype=np.int64).reshape(2, 2, 5)
    image = sitk.GetImageFromArray(voxels)
    check_upscaled(image, upscale(image, model="nearest", scale=2, axis="z"), (2, 2, 1), "nearest")


@pytest.mark.parametrize("dtype, value, model", [(np.float64, 1.7e308, "nearest"),
                                                 (np.float32, 3.4e38, "bicubic")])
def test_float_intensity_extremes_are_refused_or_stay_finite(dtype, value, model):
    """Found by test_upscale_gives_*: +-1.7e308 float64 gave NaN everywhere (the range
    overflowed), +-3.4e38 float32 bicubic overshot to -inf."""
    voxels = np.array([-value, value] * 10, dtype=dtype).reshape(2, 2, 5)
    image = sitk.GetImageFromArray(voxels)
    try:
        output = upscale(image, model=model, scale=2, axis="z")
    except InputError:
        return
    check_upscaled(image, output, (2, 2, 1), model)


def test_nifti_header_on_which_simpleitk_hangs_is_refused_promptly(worker, tmp_path):
    """Found by test_write_volume_then_read_volume_*: with srow_x[0] = 0 and a NaN srow_z[3]
    and qoffset_z, SimpleITK's ReadImageInformation never returns (SimpleITK itself writes
    such a header for spacing 1e-300 and a NaN origin)."""
    path = tmp_path / "hangs.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.int16)), str(path))
    data = bytearray(path.read_bytes())
    for offset, value in ((280, 0.0), (324, math.nan), (276, math.nan)):  # srow_x[0], srow_z[3], qoffset_z
        data[offset:offset + 4] = np.float32(value).tobytes()
    path.write_bytes(bytes(data))
    assert_refused_in_worker(worker.read(path), "read_volume of a NIfTI header SimpleITK hangs on")


@pytest.mark.parametrize("suffix, spacing, origin", [
    (".nii", (1e-300, 1.0, 1.0), (0.0, 0.0, 0.0)),        # float32 pixdim 0, written as 1 mm
    (".nii", (1.0, 1.0, 1.0), (0.0, 0.0, 1e300)),         # float32 qoffset inf, read as 0
    (".nii", (1e-300, 1.0, 1.0), (0.0, 0.0, math.nan)),   # write_volume's own check hung
    (".mha", (1.0, 1.0, 1.0), (0.0, 0.0, math.nan)),      # Offset nan, read as 0
])
def test_write_volume_refuses_geometry_its_file_would_not_give_back(worker, tmp_path, suffix, spacing,
                                                                     origin):
    """Found by test_write_volume_then_read_volume_*: the volume read back had another
    geometry than the one written, or the write never returned."""
    image = sitk.GetImageFromArray(np.zeros((2, 2, 2), np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    answer = worker.read(tmp_path / f"out{suffix}", voxels=True, write=image)
    write = answer.get("write", answer)
    if write["outcome"] == "InputError":
        return
    assert write["outcome"] == "ok", f"write_volume ended in {write['outcome']}: {write}"
    info = assert_read_outcome(answer, f"{suffix} written by write_volume")
    if info is not None:
        assert_faithful(image, info, suffix)


@pytest.mark.parametrize("field, value", [(b"Offset", b"0 0 nan"),
                                          (b"TransformMatrix", b"1 0 0 0 nan 0 0 0 1")])
def test_non_finite_origin_or_direction_in_metaimage_header_is_refused(tmp_path, field, value):
    """Found by test_written_volume_*: SimpleITK reads a NaN Offset as 0 (the volume moves)."""
    with pytest.raises(InputError):
        read_volume(_metaimage_with(tmp_path, field, value))


@pytest.mark.parametrize("vox_offset", [math.nan, math.inf, -352.0, 6.118833748180992e16])
def test_nifti_with_impossible_vox_offset_is_refused(tmp_path, vox_offset):
    """Found by test_edited_nifti_header_*: the payload check raised ValueError (NaN),
    OverflowError (inf) or OSError 'Invalid argument' (negative, or beyond any file) from its
    seek instead of refusing the file."""
    path = tmp_path / "offset.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.int16)), str(path))
    data = bytearray(path.read_bytes())
    data[108:112] = np.float32(vox_offset).tobytes()  # vox_offset
    path.write_bytes(bytes(data))
    with pytest.raises(InputError):
        read_volume(path)
