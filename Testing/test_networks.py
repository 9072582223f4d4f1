"""Every registered network: shapes per scale on odd and even sizes, gradients, determinism,
pinned parameter counts (and the papers' counts), FMEN re-parameterisation, zoo loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from MedSRLib.models import registry as zoo
from MedSRLib.errors import InputError
from MedSRLib.models.networks.edsr import MultiScaleEDSR
from MedSRLib.models.networks.fmen import FMEN
from MedSRLib.models.networks.hybrid import HybridSRGANVDSR
from MedSRLib.models.networks.improved_srcnn import OverlappingMaxPool
from MedSRLib.models.networks.lesion_detector import LesionDetector
from MedSRLib.models.networks.srresnet import SRGANDiscriminator, SRResNet
from MedSRLib.models.networks.upsampling import upscale_steps
from MedSRLib.models.networks.vdsr import VDSR

SR_NETWORKS = ("srcnn", "improved_srcnn", "vdsr", "fmen", "srresnet", "srgan", "hybrid",
               "edsr_baseline", "mdrn", "edsr_multiscale")
#: Overrides that keep the heavy trunks small in tests that run them (counts use the full ones).
SMALL = {"mdrn": {"num_blocks": 2}, "edsr_multiscale": {"num_blocks": 2}}
LR_SIZES = ((12, 12), (13, 11))


pytestmark = pytest.mark.usefixtures("single_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_small(name: str, scale: int) -> nn.Module:
    torch.manual_seed(0)
    return zoo.build_network(name, scale=scale, **SMALL.get(name, {}))


def run(name: str, network: nn.Module, lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Feed the network as the zoo does: HR-sized input for pre-upsampled models."""
    spec = zoo.get_spec(name)
    if spec.pre_upsampled:
        return network(nn.functional.interpolate(lr, scale_factor=scale, mode="bicubic"))
    if spec.multi_scale:
        return network(lr, scale=scale)
    return network(lr)


def sr_cases():
    for name in SR_NETWORKS:
        for scale in zoo.get_spec(name).scales:
            yield name, scale


def test_every_sr_network_is_registered_with_its_kind():
    kinds = {name: zoo.get_spec(name).kind for name in SR_NETWORKS}
    assert kinds == {"srcnn": "pre_upsampled", "improved_srcnn": "pre_upsampled",
                     "vdsr": "pre_upsampled", "fmen": "post_upsampled",
                     "srresnet": "post_upsampled", "srgan": "post_upsampled",
                     "hybrid": "post_upsampled", "edsr_baseline": "post_upsampled",
                     "mdrn": "multi_scale", "edsr_multiscale": "multi_scale"}
    assert zoo.get_spec("lesion_detector").kind == "detector"


@pytest.mark.parametrize("name,scale", list(sr_cases()))
def test_output_is_scale_times_input_on_odd_and_even_sizes(name, scale):
    network = build_small(name, scale).eval()
    for h, w in LR_SIZES:
        with torch.no_grad():
            out = run(name, network, torch.rand(2, 1, h, w), scale)
        assert out.shape == (2, 1, h * scale, w * scale)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SR_NETWORKS)
def test_in_channels_is_settable(name):
    scale = zoo.get_spec(name).scales[-1]
    torch.manual_seed(0)
    network = zoo.build_network(name, scale=scale, in_channels=3, **SMALL.get(name, {})).eval()
    with torch.no_grad():
        out = run(name, network, torch.rand(1, 3, 12, 13), scale)
    assert out.shape == (1, 3, 12 * scale, 13 * scale)


@pytest.mark.parametrize("name", SR_NETWORKS)
def test_gradient_reaches_every_parameter_of_the_used_path(name):
    scale = zoo.get_spec(name).scales[-1]
    network = build_small(name, scale).train()
    run(name, network, torch.rand(2, 1, 8, 9), scale).square().mean().backward()
    unused = ("preprocess.x", "tails.x")  # other scales' branches of multi-scale models
    for pname, param in network.named_parameters():
        other_branch = any(pname.startswith(p) and not pname.startswith(f"{p}{scale}.")
                           for p in unused)
        if other_branch:
            assert param.grad is None, pname
        else:
            assert param.grad is not None, pname
            assert torch.isfinite(param.grad).all(), pname
    first = next(network.parameters())
    assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", SR_NETWORKS + ("lesion_detector",))
def test_eval_mode_is_deterministic(name):
    spec = zoo.get_spec(name)
    network = build_small(name, spec.scales[0]).eval()
    lr = torch.rand(2, 1, 13, 12)
    with torch.no_grad():
        if spec.kind == "detector":
            first, second = network(lr), network(lr)
            assert all(torch.equal(a, b) for a, b in zip(first, second))
        else:
            assert torch.equal(run(name, network, lr, spec.scales[0]),
                               run(name, network, lr, spec.scales[0]))


# ---- parameter counts -------------------------------------------------------------------------

#: Default (registry) configs, 1 channel; computed from the architectures, see networks/README.md.
PINNED_COUNTS = {
    ("srcnn", 2): 57_281, ("improved_srcnn", 2): 83_138, ("vdsr", 2): 664_704,
    ("fmen", 2): 1_025_122, ("fmen", 3): 1_027_377, ("fmen", 4): 1_030_534,
    ("srresnet", 2): 1_381_011, ("srresnet", 3): 1_565_651, ("srresnet", 4): 1_528_724,
    ("srgan", 4): 1_528_724, ("hybrid", 2): 1_383_424, ("hybrid", 4): 1_494_208,
    ("edsr_baseline", 2): 1_367_553, ("edsr_baseline", 3): 1_552_193,
    ("edsr_baseline", 4): 1_515_265, ("mdrn", 2): 7_952_835, ("edsr_multiscale", 2): 3_226_051,
    ("lesion_detector", 1): 2_797_253, ("lesion_segmenter", 1): 496_210,
}


@pytest.mark.parametrize("name,scale", list(PINNED_COUNTS))
def test_parameter_count_of_default_config_is_pinned(name, scale):
    assert n_params(zoo.build_network(name, scale=scale)) == PINNED_COUNTS[(name, scale)]


def test_vdsr_count_matches_paper_001_with_three_channels_and_no_bias():
    # 20 bias-free 3x3 convs: 3*64*9 + 18*64*64*9 + 64*3*9 = 667,008 (paper 001 Table 2).
    assert 3 * 64 * 9 + 18 * 64 * 64 * 9 + 64 * 3 * 9 == 667_008
    assert n_params(VDSR(in_channels=3)) == 667_008
    assert n_params(VDSR(in_channels=3, bias=True)) == 667_008 + 19 * 64 + 3


def test_fmen_deploy_count_matches_paper_001_on_rgb_x4():
    trained = FMEN(in_channels=3, scale=4)
    assert n_params(trained.reparameterize()) == 341_066  # paper 001 Table 2
    assert n_params(trained) == 1_045_866  # training form: RRRB expansions and BNs
    assert n_params(FMEN(scale=4).reparameterize()) == 325_734  # grayscale deploy form


def test_srgan_count_of_paper_001_is_5_block_generator_plus_discriminator_on_rgb_x4():
    generator = SRResNet(in_channels=3, num_blocks=5, scale=4)
    discriminator = SRGANDiscriminator(in_channels=3)
    assert (n_params(generator), n_params(discriminator)) == (734_219, 5_215_425)
    assert n_params(generator) + n_params(discriminator) == 5_949_644  # paper 001 Table 2
    assert n_params(SRGANDiscriminator()) == 5_214_273


# ---- FMEN re-parameterisation -----------------------------------------------------------------

def randomise_batch_norms(network: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(c, generator=generator) - 0.5)


@pytest.mark.parametrize("scale", (2, 3, 4))
def test_fmen_deploy_form_equals_training_form_in_eval_mode(scale):
    torch.manual_seed(0)
    trained = FMEN(scale=scale)
    randomise_batch_norms(trained)
    trained.eval()
    deployed = trained.reparameterize()
    assert deployed.deploy and not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    for h, w in LR_SIZES:
        lr = torch.rand(2, 1, h, w)
        with torch.no_grad():
            expected, actual = trained(lr), deployed(lr)
        assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()


def test_fmen_deploy_form_after_a_training_step_still_matches():
    torch.manual_seed(0)
    trained = FMEN(scale=2, num_erbs_per_hfab=(1, 1, 1, 1, 1))
    optimiser = torch.optim.SGD(trained.parameters(), lr=0.1)
    trained.train()
    trained(torch.rand(4, 1, 12, 12)).mean().backward()  # moves BN statistics and weights
    optimiser.step()
    trained.eval()
    lr = torch.rand(1, 1, 13, 11)
    with torch.no_grad():
        assert torch.allclose(trained.reparameterize()(lr), trained(lr), atol=1e-5)


def test_zoo_runs_the_fmen_deploy_form():
    model = zoo.load_model("fmen", 4, allow_untrained=True)
    assert isinstance(model.network, FMEN) and model.network.deploy
    assert n_params(model.network) == 325_734


# ---- zoo path (what `medsr upscale --allow-untrained` runs) -------------------------------------

@pytest.mark.parametrize("name,scale", list(sr_cases()))
def test_load_model_untrained_upscales_by_the_factors(name, scale, tmp_path):
    model = zoo.load_model(name, scale, allow_untrained=True, weights_dir=tmp_path)  # no weights
    assert not model.trained
    with torch.no_grad():
        out = model(torch.rand(1, 1, 13, 12))
    assert out.shape == (1, 1, 13 * scale, 12 * scale)


def test_load_model_handles_a_through_plane_only_factor():
    model = zoo.load_model("edsr_baseline", (3, 1), allow_untrained=True)
    with torch.no_grad():
        assert model(torch.rand(1, 1, 10, 9)).shape == (1, 1, 30, 9)


def test_load_model_refuses_untrained_without_the_flag_and_refuses_the_detector():
    with pytest.raises(InputError, match="allow untrained"):
        zoo.load_model("vdsr", 2, weights_dir=zoo.WEIGHTS_DIR / "nonexistent")
    with pytest.raises(InputError, match="detector"):
        zoo.load_model("lesion_detector", 2, allow_untrained=True)


# ---- network-specific behaviour ----------------------------------------------------------------

def test_overlapping_pool_keeps_size_and_takes_the_clipped_2x2_window_max():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    expected = torch.tensor([[4.0, 5.0, 5.0], [7.0, 8.0, 8.0], [7.0, 8.0, 8.0]])
    assert torch.equal(OverlappingMaxPool(2)(x)[0, 0], expected)


def test_vdsr_with_zeroed_last_layer_returns_its_input():
    network = VDSR().eval()
    nn.init.zeros_(network.residual[-1].conv.weight)
    x = torch.rand(1, 1, 9, 10)
    with torch.no_grad():
        assert torch.equal(network(x), x)


def test_multi_scale_network_rejects_an_unknown_scale():
    with pytest.raises(ValueError, match="scale must be one of"):
        MultiScaleEDSR(num_blocks=1)(torch.rand(1, 1, 8, 8), scale=8)


def test_hybrid_sharpening_layer_is_fixed_and_x3_needs_another_input_upsampling():
    network = HybridSRGANVDSR(scale=4, num_res_blocks=1, num_vdsr_layers=2)
    names = dict(network.named_parameters())
    assert not any(n.startswith("sharpen") for n in names)
    assert "sharpen.kernel" in network.state_dict()
    with pytest.raises(ValueError, match="multiple of input_upsampling"):
        HybridSRGANVDSR(scale=3)
    assert HybridSRGANVDSR(scale=3, input_upsampling=1, num_res_blocks=1, num_vdsr_layers=2)(
        torch.rand(1, 1, 8, 7)).shape == (1, 1, 24, 21)


def test_upscale_steps_split_into_sub_pixel_stages():
    assert upscale_steps(2) == [2] and upscale_steps(3) == [3] and upscale_steps(4) == [2, 2]
    with pytest.raises(ValueError):
        upscale_steps(5)


@pytest.mark.parametrize("shape", ((12, 12), (13, 17), (64, 80)))
def test_lesion_detector_gives_one_normalised_box_and_score_per_slice(shape):
    torch.manual_seed(0)
    detector = LesionDetector().eval()
    with torch.no_grad():
        boxes, scores = detector(torch.rand(3, 1, *shape))
    assert boxes.shape == (3, 4) and scores.shape == (3,)
    assert ((boxes >= 0) & (boxes <= 1)).all()


def test_lesion_detector_gradient_flows():
    detector = LesionDetector().train()
    boxes, scores = detector(torch.rand(2, 1, 16, 16))
    (boxes.sum() + scores.sum()).backward()
    assert all(p.grad is not None for p in detector.parameters())


@pytest.mark.parametrize("shape", ((24, 24), (25, 31)))
def test_srgan_discriminator_returns_one_logit_per_image_of_any_size(shape):
    discriminator = SRGANDiscriminator().train()
    logits = discriminator(torch.rand(2, 1, *shape))
    assert logits.shape == (2, 1)
    logits.sum().backward()
    assert all(p.grad is not None for p in discriminator.parameters())


def test_edsr_bicubic_residual_adds_exactly_the_bicubic_image():
    """With the tail's last conv zeroed, the residual EDSR (edsr_lite) returns plain bicubic."""
    network = zoo.build_network("edsr_lite", scale=3).eval()
    last_conv = [m for m in network.tail.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    torch.nn.init.zeros_(last_conv.weight)
    torch.nn.init.zeros_(last_conv.bias)
    x = torch.rand(2, 1, 11, 12)
    expected = torch.nn.functional.interpolate(x, scale_factor=3, mode="bicubic", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(network(x), expected, atol=1e-6)
    assert zoo.get_spec("edsr_lite").default_config["bicubic_residual"] is True
    assert not zoo.get_spec("edsr_baseline").default_config.get("bicubic_residual", False)


def test_srresnet_bicubic_residual_adds_exactly_the_bicubic_image_and_is_off_by_default():
    network = zoo.build_network("srresnet", scale=2, num_blocks=1, num_features=8,
                                bicubic_residual=True).eval()
    torch.nn.init.zeros_(network.tail.conv.weight)
    torch.nn.init.zeros_(network.tail.conv.bias)
    x = torch.rand(2, 1, 9, 10)
    expected = torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(network(x), expected, atol=1e-6)
    for name in ("srresnet", "srgan"):   # the papers' generator by default
        assert zoo.get_spec(name).default_config["bicubic_residual"] is False
