"""Which model runs inside the ROI of a lesion-focused run by default, per modality and scale,
with the figures that chose it (torch-free: the CLI and the Slicer panel read it to describe
the choice).

The choice: the candidate with the highest PSNR and SSIM inside the VALIDATION lesion masks
(sarcoma STS_008, STS_010 CT and T1 MR; BraTS pat0005 T1c tumour core and FLAIR whole tumour)
among those whose work inside the ROI keeps the whole lesion-focused run within
`MAX_RUN_OVER_PLAIN` of the plain default run (`benchmarks/roi_lesion_gain.py`, results in
`benchmarks/results/lesion_focus/candidates.md`). Self-ensemble (`EngineOptions.self_ensemble`)
averages the network's outputs over in-plane flips/rotations of its input; when the ROI model
is the run's own model, the whole-volume pass is the ensemble's identity member and only the
other members run on the ROI crop.

The LFSR generator (Zhu, Yang and Lio, "Lesion focused super-resolution"; `lfsr`) stays
available by name (`roi_model="lfsr"`, `--roi-model lfsr`): a GAN, it trades PSNR/SSIM inside
the lesion for sharper texture (`PERCEPTUAL_ROI_MODEL`).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Budget of the choice: the lesion-focused run's time over the plain default run's.
MAX_RUN_OVER_PLAIN = 1.5
#: The perceptual choice inside the ROI (a GAN generator): below the default in PSNR there.
PERCEPTUAL_ROI_MODEL = "lfsr"


@dataclass(frozen=True)
class RoiModelChoice:
    """A model inside the ROI: registry name, self-ensemble members (1: none), precision (None:
    the run's; e.g. "bf16" skips the int8 model the automatic path would take), and what it
    measured inside the validation lesions against the plain default run (mean PSNR gain in dB,
    mean SSIM gain, and the ROI work over the plain run's time; None when not measured)."""

    model: str
    self_ensemble: int = 1
    precision: str | None = None
    psnr_over_default_db: float | None = None
    ssim_over_default: float | None = None
    roi_work_over_plain: float | None = None

    @property
    def label(self) -> str:
        """E.g. "edsr_lite", "edsr_lite, self-ensemble x4" or "edsr_lite, bf16"."""
        parts = [self.model]
        if self.self_ensemble > 1:
            parts.append(f"self-ensemble x{self.self_ensemble}")
        if self.precision:
            parts.append(self.precision)
        return ", ".join(parts)


#: (modality, scale) -> the default ROI model (see the module docstring for the protocol).
#: Figures: mean over the validation volumes measured (CT: STS_008, STS_010; MR: their T1 and
#: pat0005 T1c); ROI work: the crop run over the plain whole-volume run on these small
#: volumes (an oracle ROI, the lesion box + 5 mm + context). Every in-budget candidate stayed
#: within 0.07 dB of the default; nothing reached +0.5 dB (mdrn, self-ensemble x4/x8: 2-15x the
#: plain run inside the ROI).
ROI_DEFAULTS: dict[tuple[str, int], RoiModelChoice] = {
    ("CT", 2): RoiModelChoice("edsr_lite", 2, None, 0.012, None, 0.68),
    ("CT", 4): RoiModelChoice("edsr_lite", 2, None, 0.051, None, 0.47),
    ("MR", 2): RoiModelChoice("edsr_lite", 2, None, 0.062, None, 0.45),
    ("MR", 4): RoiModelChoice("edsr_lite", 2, None, 0.059, None, 0.55),
}


def default_roi_choice(modality: str | None, scale: int) -> RoiModelChoice | None:
    """The table's choice for `modality` ("CT", "MR"; None or another: the choice both CT and MR
    make at `scale`, when they agree) at in-plane `scale`; None when the table has none."""
    if modality is not None and (str(modality).upper(), int(scale)) in ROI_DEFAULTS:
        return ROI_DEFAULTS[(str(modality).upper(), int(scale))]
    found = {(c.model, c.self_ensemble, c.precision) for (m, s), c in ROI_DEFAULTS.items()
             if s == int(scale)}
    if len(found) != 1:
        return None
    model, members, precision = found.pop()
    return RoiModelChoice(model, members, precision)
