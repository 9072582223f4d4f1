"""Every registered network exports to ONNX (opset 17); ONNX Runtime matches eager within 1e-4.

Uses the TorchScript-based exporter (`dynamo=False`), which needs no extra package. Multi-scale
networks export one graph per scale (the scale is a Python int in `forward`). FMEN exports its
deploy form, the one the engine runs.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from MedSRLib.models import registry as zoo

SMALL = {"mdrn": {"num_blocks": 2}, "edsr_multiscale": {"num_blocks": 2}}


pytestmark = pytest.mark.usefixtures("single_thread")


class FixedScale(nn.Module):
    """A multi-scale network with its scale bound, so the exported graph has one input."""

    def __init__(self, network: nn.Module, scale: int):
        super().__init__()
        self.network, self.scale = network, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x, scale=self.scale)


def exportable(name: str, scale: int) -> nn.Module:
    torch.manual_seed(0)
    spec = zoo.get_spec(name)
    network = zoo.build_network(name, scale=scale, **SMALL.get(name, {})).eval()
    if hasattr(network, "reparameterize"):
        network = network.reparameterize()
    if spec.multi_scale:
        network = FixedScale(network, scale)
    return network


def export_and_run(network: nn.Module, x: torch.Tensor, n_outputs: int = 1) -> list[np.ndarray]:
    buffer = io.BytesIO()
    torch.onnx.export(network, (x,), buffer, dynamo=False, opset_version=17,
                      input_names=["image"],
                      output_names=[f"out{i}" for i in range(n_outputs)],
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}})
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 17
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})


CASES = [(name, zoo.get_spec(name).scales[-1]) for name in
         ("srcnn", "improved_srcnn", "vdsr", "fmen", "srresnet", "hybrid", "edsr_baseline",
          "mdrn", "edsr_multiscale")] + [("mdrn", 3)]


@pytest.mark.parametrize("name,scale", CASES)
def test_onnx_runtime_matches_eager(name, scale):
    network = exportable(name, scale)
    x = torch.rand(1, 1, 11, 10)
    if zoo.get_spec(name).pre_upsampled:
        x = torch.rand(1, 1, 11 * scale, 10 * scale)
    with torch.no_grad():
        expected = network(x).numpy()
    (actual,) = export_and_run(network, x)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_onnx_graph_accepts_another_input_size():
    network = exportable("edsr_baseline", 2)
    buffer = io.BytesIO()
    torch.onnx.export(network, (torch.rand(1, 1, 8, 8),), buffer, dynamo=False, opset_version=17,
                      input_names=["image"], dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 1, 13, 9)
    (actual,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(actual, network(x).numpy(), atol=1e-4, rtol=0)


def test_lesion_detector_exports_boxes_and_scores():
    torch.manual_seed(0)
    detector = zoo.build_network("lesion_detector").eval()
    x = torch.rand(2, 1, 20, 24)
    with torch.no_grad():
        boxes, scores = detector(x)
    actual_boxes, actual_scores = export_and_run(detector, x, n_outputs=2)
    np.testing.assert_allclose(actual_boxes, boxes.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(actual_scores, scores.numpy(), atol=1e-4, rtol=0)


def test_srgan_discriminator_exports():
    from MedSRLib.models.networks.srresnet import SRGANDiscriminator

    torch.manual_seed(0)
    discriminator = SRGANDiscriminator().eval()
    x = torch.rand(1, 1, 24, 24)
    with torch.no_grad():
        expected = discriminator(x).numpy()
    (actual,) = export_and_run(discriminator, x)
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
