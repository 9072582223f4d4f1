"""Loading the through-plane network from safetensors with its JSON card (never unpickled)."""

from __future__ import annotations

import copy
from pathlib import Path

from . import registry as zoo
from ..errors import WeightsError
from .networks.through_plane import ThroughPlaneEDSR, ThroughPlaneNet

#: Architectures a card may name ("architecture"; default ThroughPlaneEDSR).
ARCHITECTURES = {"ThroughPlaneEDSR": ThroughPlaneEDSR, "ThroughPlaneNet": ThroughPlaneNet}

MODEL_NAME = "through_plane_net"
WEIGHTS_FILE = zoo.WEIGHTS_DIR / f"{MODEL_NAME}.safetensors"

_LOADED: dict[tuple, ThroughPlaneNet] = {}


def load(weights_path: str | Path | None = None) -> ThroughPlaneEDSR | ThroughPlaneNet:
    """The network with `weights_path` (default: the shipped file), eval mode, CPU; `.card`
    holds its card. WeightsError when the file, its card or the architecture do not match.
    Loaded once per process and file version: callers that train must `copy.deepcopy` it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = zoo.check_weights_file(Path(weights_path or WEIGHTS_FILE))
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _LOADED:
        return _LOADED[key]
    card = zoo.read_card(path)
    if card.get("model") != MODEL_NAME:
        raise WeightsError(f"{path}: card is for model {card.get('model')!r}, not {MODEL_NAME!r}")
    config = card.get("config") or {}
    architecture = ARCHITECTURES.get(card.get("architecture", "ThroughPlaneEDSR"))
    if architecture is None:
        raise WeightsError(f"{path}: unknown architecture {card.get('architecture')!r}; known: "
                           f"{', '.join(ARCHITECTURES)}")
    try:
        extra = {"refine_blocks": int(config["refine_blocks"])} if config.get("refine_blocks") else {}
        net = architecture(int(config["num_features"]), int(config["num_blocks"]), **extra)
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: card config {config} lacks num_features/num_blocks") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    expected = net.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise WeightsError(f"{path}: weights do not match the {MODEL_NAME} architecture of its card")
    net.load_state_dict({k: v.float() for k, v in state.items()})
    net.eval()
    net.card = card  # type: ignore[attr-defined]
    _LOADED[key] = net
    return net


def trainable_copy(net: ThroughPlaneEDSR | ThroughPlaneNet) -> ThroughPlaneEDSR | ThroughPlaneNet:
    """A deep copy to fine-tune; the loaded (shipped) network is never changed."""
    clone = copy.deepcopy(net)
    clone.card = getattr(net, "card", None)  # type: ignore[attr-defined]
    return clone
