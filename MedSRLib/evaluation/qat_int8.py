"""Quantisation-aware fine-tuning (NNCF on torch) of a shipped SR network's residual body.

Post-training quantisation of edsr_lite's whole trunk costs 0.17-0.21 dB (held-out CT, x2),
beyond the 0.05 dB contract, so `int8_models.quantize` returns the most sensitive trunk layers
to float; on a CPU without bf16 those float layers are most of the time. Here every convolution
that keeps its channel count and stride runs in int8 (the first, the pixel-shuffle and the last
convolution and the additions stay float, as in `int8_models.float_kept`), and the
fake-quantised network is fine-tuned (weights and quantiser ranges, L1 against HR, the training
loss) on HR patches of training patients, then converted to OpenVINO IR.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..transforms.degrade import bicubic_downsample


def float_kept_names(body: nn.Module) -> list[str]:
    """NNCF node names of the convolutions of `body` that stay float: those that change the
    channel count or the size (stride), i.e. the first, the pixel-shuffle ones and the last."""
    return [name.replace(".", "/") + "/conv2d/0" for name, module in body.named_modules()
            if isinstance(module, nn.Conv2d)
            and (module.in_channels != module.out_channels or module.stride != (1, 1))]


def quantise(body: nn.Module, calibration_lr: Sequence[np.ndarray]) -> nn.Module:
    """The fake-quantised copy of torch `body` ((N, 1, h, w) -> residual), NNCF PTQ ranges from
    the (1, 1, h, w) float32 LR slices `calibration_lr` (training patients only)."""
    import nncf
    scope = nncf.IgnoredScope(names=float_kept_names(body), patterns=[r".*/add/\d+$"],
                              validate=False)
    return nncf.quantize(body.eval(), nncf.Dataset([torch.from_numpy(x) for x in calibration_lr]),
                         preset=nncf.QuantizationPreset.MIXED, subset_size=len(calibration_lr),
                         ignored_scope=scope)


def random_patches(hr_slices: Sequence[np.ndarray], count: int, size: int,
                   rng: np.random.Generator) -> torch.Tensor:
    """(count, 1, size, size) random crops of the unit-intensity HR slices."""
    crops = []
    for _ in range(count):
        hr = hr_slices[int(rng.integers(len(hr_slices)))]
        y = int(rng.integers(0, hr.shape[0] - size + 1))
        x = int(rng.integers(0, hr.shape[1] - size + 1))
        crops.append(hr[y:y + size, x:x + size])
    return torch.from_numpy(np.stack(crops).astype(np.float32))[:, None]


def fine_tune(quantised: nn.Module, hr_slices: Sequence[np.ndarray], scale: int, steps: int,
              batch_size: int = 8, patch: int = 96, lr: float = 1e-5, seed: int = 0,
              log_every: int = 50, teacher: nn.Module | None = None) -> dict:
    """L1 fine-tuning of the fake-quantised body on LR patches of `hr_slices` (`patch` px HR,
    a multiple of `scale`; training patients only): against the float `teacher` body's output
    when given (distillation: only the quantisation error is learnt), else against HR with
    output = bicubic(LR) + body(LR)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    patch -= patch % scale
    hr_slices = [hr for hr in hr_slices if min(hr.shape) >= patch]
    if not hr_slices:
        raise ValueError(f"no training slice of at least {patch} x {patch} px to fine-tune on")
    optimiser = torch.optim.Adam(quantised.parameters(), lr=lr)
    quantised.train()
    start, losses = time.process_time(), []
    for step in range(1, steps + 1):
        hr = random_patches(hr_slices, batch_size, patch, rng)
        low = bicubic_downsample(hr, scale)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(low)
            loss = F.l1_loss(quantised(low), target)
        else:
            prediction = F.interpolate(low, scale_factor=scale, mode="bicubic",
                                       align_corners=False) + quantised(low)
            loss = F.l1_loss(prediction, hr)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if step % log_every == 0:
            print(f"QAT step {step}/{steps}: L1 {np.mean(losses[-log_every:]):.5f}", flush=True)
    quantised.eval()
    return {"steps": steps, "batch_size": batch_size, "patch": patch, "lr": lr,
            "loss": "L1 against the float body (distillation)" if teacher is not None
            else "L1 against HR (bicubic + body)", "cpu_seconds": round(time.process_time() - start, 1)}


def to_openvino(quantised: nn.Module, edge: int = 64):
    """The fine-tuned fake-quantised body as an OpenVINO model (FakeQuantize ops; the runtime
    reshapes it per slice)."""
    import openvino as ov
    with torch.no_grad():
        return ov.convert_model(quantised.eval(), example_input=torch.zeros(1, 1, edge, edge))
