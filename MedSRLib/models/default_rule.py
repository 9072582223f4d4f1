"""The default-model rule, torch-free: the registry (`registry.default_model`) and the card
table of `medsr models` (`table.default_models`) both decide through `choose_default`, so the
two can never disagree."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

#: Preference order for the default model; the first with shipped weights for the modality and
#: scale wins (a card's "default_for" can limit the modalities it is the default for), else
#: bicubic. edsr_lite_25d is not in it: on the test patients it is level with edsr_lite
#: (-0.03 to +0.03 dB, within the noise) and has no int8 model, so on a CPU without bf16 it would
#: run in fp32, several times slower than edsr_lite's int8. srresnet before srcnn: chest X-ray
#: x4 +1.31 dB over bicubic against +0.80 dB.
DEFAULT_PREFERENCE = ("edsr_lite", "edsr_baseline", "fmen", "srresnet", "srcnn")


def choose_default(modality: str | None,
                   card_of: Callable[[str], Mapping[str, Any] | None],
                   preference: Sequence[str] = DEFAULT_PREFERENCE) -> str:
    """The first name of `preference` (DEFAULT_PREFERENCE) whose card serves `modality` ("CT",
    "MR", "XR" or None for unknown), else "bicubic".

    `card_of(name)`: the card (JSON dict) of the weights file that would run for this modality
    and scale, or None when that model cannot serve the run (not registered, no such scale, no
    weights, a 2.5-D model for a 2-D input). A card serves a modality it lists in "modality" and
    in "default_for" (the modalities on whose test patients it measured best; without it, every
    modality it was trained on); with an unknown modality, a card whose "default_for" holds
    every modality it was trained on.
    """
    for name in preference:
        card = card_of(name)
        if card is None:
            continue
        trained_on = list(card.get("modality") or [])
        default_for = list(card.get("default_for", trained_on))
        if modality is None and set(trained_on) <= set(default_for):
            return name
        if modality is not None and modality in trained_on and modality in default_for:
            return name
    return "bicubic"
