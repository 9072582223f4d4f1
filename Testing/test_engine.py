"""Engine: tiled equals untiled, any slice axis, progress and cancel, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedSRLib.models import registry as zoo
from MedSRLib.runtime.engine import (CancelToken, EngineOptions, SliceUpscaler, plan_passes,
                                     effective_radius, receptive_radius, resolve_device,
                                     super_resolve_volume)
from MedSRLib.errors import CancelledError, InputError

# One per architecture style (pre-upsampled, pooling, deep residual, re-parameterised,
# post-upsampling without BN, with BN); heavier relatives add run time, not coverage.
LEARNED = [n for n in ("srcnn", "improved_srcnn", "vdsr", "fmen", "edsr_baseline", "srresnet")
           if n in zoo.model_names()]


def _identity(values):
    return np.asarray(values, dtype=np.float32)


def _run(volume, factors_kji, slice_axis, name, tile, scale_model=None, **kwargs):
    torch.manual_seed(0)
    cache = {}

    def model_for(factors):
        if factors not in cache:
            cache[factors] = zoo.load_model(name, factors, allow_untrained=True)
        return cache[factors], True

    return super_resolve_volume(volume, factors_kji, slice_axis, model_for, _identity, _identity,
                                np.float32, EngineOptions(tile=tile, precision="fp32", batch_size=2),
                                **kwargs)


@pytest.mark.parametrize("name", LEARNED + ["bicubic", "lanczos"])
def test_tiled_equals_whole_slice_in_fp32(name):
    rng = np.random.default_rng(0)
    volume = rng.random((1, 37, 42)).astype(np.float32)
    whole = _run(volume, (1, 2, 2), 0, name, tile=0)
    tiled = _run(volume, (1, 2, 2), 0, name, tile=16)  # MIN_TILE: 3 x 3 tiles, partial ones included
    assert whole.shape == (1, 74, 84)
    assert np.abs(whole - tiled).max() < 1e-4


def test_receptive_radius_is_measured_not_guessed():
    bicubic = zoo.load_model("bicubic", 2)
    assert receptive_radius(bicubic, (2, 2)) <= 4
    srcnn = zoo.load_model("srcnn", 2, allow_untrained=True)
    radius = receptive_radius(srcnn, (2, 2))
    assert 4 <= radius <= 10  # 9-5-5 kernels: 8 HR px = 4 LR px, plus bicubic support


def _box_filter_stack(layers: int) -> torch.nn.Module:
    """`layers` 3x3 mean filters in a row: an output pixel depends on a (2 layers + 1)^2 window,
    mostly on its centre (a binomial-like spread), with weights summing to one."""
    convs = [torch.nn.Conv2d(1, 1, 3, padding=1, bias=False) for _ in range(layers)]
    for conv in convs:
        torch.nn.init.constant_(conv.weight, 1.0 / 9.0)
    return torch.nn.Sequential(*convs).eval()


def test_a_crop_with_the_effective_radius_misses_at_most_the_tolerated_dependence():
    model = _box_filter_stack(20)
    exact = receptive_radius(model, (1, 1))
    effective = effective_radius(model, (1, 1), tolerance=1e-4)
    assert 20 <= exact <= 22 and effective < exact - 5  # the far rings hold almost nothing
    assert effective_radius(model, (1, 1), tolerance=0.0) >= 21  # every ring with any weight
    image = torch.rand(1, 1, 120, 120, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(image)[0, 0, 50:70, 50:70]

        def crop_error(context: int) -> float:
            crop = image[..., 50 - context:70 + context, 50 - context:70 + context]
            return float((model(crop)[0, 0, context:context + 20, context:context + 20] - whole).abs().max())

        # inputs in [0, 1], weights summing to one: the error is at most the mass left out
        assert crop_error(effective) <= 1e-4
        assert crop_error(exact) < 1e-6
        assert crop_error(effective - 3) > 1e-4


def test_shipped_default_needs_about_half_its_receptive_field_as_crop_context():
    weights = zoo.shipped_weights(zoo.get_spec("edsr_lite"), 2)
    if weights is None:
        pytest.skip("no edsr_lite weights ship")
    model = zoo.load_model("edsr_lite", 2).eval()
    assert effective_radius(model, (2, 2)) <= receptive_radius(model, (2, 2)) * 0.6


def test_slicing_along_x_equals_transposed_slicing_along_z():
    rng = np.random.default_rng(1)
    volume = rng.random((9, 10, 4)).astype(np.float32)
    along_x = _run(volume, (2, 2, 1), 2, "srcnn", tile=0)
    along_z = _run(np.ascontiguousarray(volume.transpose(2, 0, 1)), (1, 2, 2), 0, "srcnn", tile=0)
    np.testing.assert_allclose(along_x, along_z.transpose(1, 2, 0), atol=1e-5)


def test_plan_passes_in_plane_then_through_plane():
    assert [(p.slice_axis, p.plane_factors) for p in plan_passes((1, 2, 2), 0)] == [(0, (2, 2))]
    passes = plan_passes((3, 2, 2), 0)
    assert [(p.slice_axis, p.plane_factors) for p in passes] == [(0, (2, 2)), (1, (3, 1))]
    assert [(p.slice_axis, p.plane_factors) for p in plan_passes((3, 1, 1), 1)] == [(1, (3, 1))]
    assert [(p.slice_axis, p.plane_factors) for p in plan_passes((3, 1, 1), 0)] == [(1, (3, 1))]


def test_progress_is_monotonic_and_ends_at_one():
    seen = []
    _run(np.zeros((5, 8, 8), np.float32), (2, 2, 2), 0, "bicubic", tile=0,
         progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) > 3


def test_cancel_raises_after_current_batch():
    token = CancelToken()
    calls = []

    def progress(fraction, message):
        calls.append(fraction)
        token.cancel()

    with pytest.raises(CancelledError, match="cancelled"):
        _run(np.zeros((10, 8, 8), np.float32), (1, 2, 2), 0, "bicubic", tile=0,
             progress=progress, cancel=token)
    assert len(calls) == 1


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(InputError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="fp16 is for CUDA"):
        SliceUpscaler(zoo.load_model("bicubic", 2), (2, 2), EngineOptions(precision="fp16", device="cpu"))


def test_bf16_autocast_stays_close_to_fp32():
    rng = np.random.default_rng(2)
    volume = rng.random((2, 24, 24)).astype(np.float32)
    model = zoo.load_model("srcnn", 2, allow_untrained=True)
    fp32 = SliceUpscaler(model, (2, 2), EngineOptions(precision="fp32", tile=0)).upscale(volume)
    bf16 = SliceUpscaler(model, (2, 2), EngineOptions(precision="bf16", tile=0)).upscale(volume)
    assert bf16.dtype == np.float32
    assert 0 < np.abs(fp32 - bf16).max() < 0.05


def test_receptive_radius_cache_tells_models_of_one_name_apart():
    """The tile halo is measured per loaded model: two edsr_lite of different depths (a card may
    record a smaller config) must not share one cached radius."""
    from MedSRLib.runtime import engine

    spec = zoo.get_spec("edsr_lite")
    shallow, deep = (zoo.SRModel(spec, zoo.build_network("edsr_lite", scale=2, num_blocks=n), (2, 2), None).eval()
                     for n in (1, 6))
    small, large = engine._cached_radius(shallow, (2, 2)), engine._cached_radius(deep, (2, 2))
    assert small is not None and large is not None and small < large
    assert engine._cached_radius(deep, (2, 2)) == large
