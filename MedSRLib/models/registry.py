"""One registry of model names: how to build each network, its metadata and its shipped weights.

Weights live in `MedSRLib/models/weights/` as safetensors files, each with a JSON model card of the
same stem: `<name>_x<scale>.safetensors` for single-scale models, `<name>.safetensors` for
multi-scale ones. Nothing is ever unpickled.

The entries themselves are declared in `catalog.py`; this module is the mechanism.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, WeightsError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

from .spec import KINDS, ModelSpec  # noqa: F401  (re-exported)
from .default_rule import DEFAULT_PREFERENCE, choose_default  # noqa: F401  (re-exported)

_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add `spec` to the registry; a name may be registered once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model name {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_catalog() -> None:
    if not _REGISTRY:
        from .catalog import ENTRIES

        for spec in ENTRIES:
            register(spec)


def model_names() -> list[str]:
    """All registered names, in registration order."""
    _ensure_catalog()
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec registered under `name`; InputError naming the known models otherwise."""
    _ensure_catalog()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}") from None


def check_scale(spec: ModelSpec, scale: int) -> None:
    """InputError unless `spec` supports the integer 2-D `scale`."""
    if scale not in spec.scales:
        raise InputError(
            f"model {spec.name!r} does not support scale x{scale}; supported: "
            + ", ".join(f"x{s}" for s in spec.scales))


def build_network(name: str, scale: int | None = None, **config_overrides: Any) -> nn.Module:
    """Build the raw network `name` with its default config (plus overrides), random weights.

    `scale` is required for post-upsampled and interpolation models and ignored otherwise.
    """
    spec = get_spec(name)
    config = {**spec.default_config, **config_overrides}
    if spec.kind in ("post_upsampled", "interpolation"):
        if scale is None:
            raise InputError(f"model {name!r} needs a scale")
        check_scale(spec, scale)
        return spec.builder(scale=scale, **config)
    if spec.kind == "multi_scale":
        config.setdefault("scales", spec.scales)
    return spec.builder(**config)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Weights and model cards


def weights_stem(spec: ModelSpec, scale: int) -> str:
    return spec.name if spec.multi_scale or spec.kind in ("detector", "through_plane") \
        else f"{spec.name}_x{scale}"


#: Modalities that may have their own weights file, `<stem>_<modality>.safetensors` (e.g.
#: srresnet_x4_xr and srresnet_x4_mr); `<stem>.safetensors` serves every modality its card lists.
MODALITIES = ("CT", "MR", "XR")


def weights_files(spec: ModelSpec, scale: int, weights_dir: Path | None = None) -> dict[str, Path]:
    """The shipped files for (spec, scale): {"": the general file, "MR": an MR-only file, ...}."""
    folder = weights_dir or WEIGHTS_DIR
    stem = weights_stem(spec, scale)
    candidates = {"": folder / f"{stem}.safetensors",
                  **{m: folder / f"{stem}_{m.lower()}.safetensors" for m in MODALITIES}}
    return {key: path for key, path in candidates.items() if path.is_file()}


def shipped_weights(spec: ModelSpec, scale: int, weights_dir: Path | None = None,
                    modality: str | None = None) -> Path | None:
    """The shipped safetensors file for (spec, scale) and `modality`: that modality's own file,
    else the general one; without a modality, the general file or the only per-modality one.
    None when none ships (or, without a modality, when several per-modality files do)."""
    files = weights_files(spec, scale, weights_dir)
    if modality and modality in files:
        return files[modality]
    if "" in files:
        return files[""]
    return next(iter(files.values())) if modality is None and len(files) == 1 else None


def shipped_sr_weights() -> list[tuple[str, int, str | None]]:
    """(model, scale, modality or None) of every shipped super-resolution weights file."""
    cases = []
    for name in model_names():
        spec = get_spec(name)
        if spec.kind in ("interpolation", "detector", "through_plane"):
            continue
        for scale in spec.scales:
            cases += [(name, scale, modality or None) for modality in weights_files(spec, scale)]
    return cases


def check_weights_file(weights_path: Path) -> Path:
    """`weights_path` as a Path; WeightsError naming it when it does not exist or is a folder
    (checked before its card, so a mistyped --weights is not reported as a missing card)."""
    path = Path(weights_path)
    if path.is_dir():
        raise WeightsError(f"{weights_path}: is a folder, not a weights file; pass the .safetensors file")
    if not path.is_file():
        raise WeightsError(f"{weights_path}: weights file not found")
    return path


def read_card(weights_path: Path) -> dict[str, Any]:
    """The JSON model card beside `weights_path` (same stem, .json); WeightsError when the
    weights file itself is missing (`check_weights_file`), then when the card is."""
    card_path = check_weights_file(weights_path).with_suffix(".json")
    if not card_path.is_file():
        raise WeightsError(f"{weights_path}: model card {card_path.name} is missing")
    try:
        return json.loads(card_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise WeightsError(f"{card_path}: model card is not valid JSON ({err})") from None


def save_weights(module: nn.Module, weights_path: Path, card: dict[str, Any],
                 dtype: torch.dtype | None = None) -> None:
    """Write `module`'s state dict as safetensors (optionally cast, e.g. fp16) and its card."""
    from safetensors.torch import save_file

    weights_path = Path(weights_path)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in module.state_dict().items()}
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(weights_path))
    card = {**card, "weights_file": weights_path.name,
            "storage_dtype": str(dtype or next(iter(state.values())).dtype).replace("torch.", "")}
    weights_path.with_suffix(".json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def config_from_card(spec: ModelSpec, weights_path: Path) -> dict[str, Any]:
    """The registry config of `spec` with the values the weights' card records (e.g. a
    CPU-sized depth); only the registry's own keys are read. The tensors must then match
    that architecture exactly (`load_weights_into`)."""
    card_config = read_card(weights_path).get("config") or {}
    return {key: card_config.get(key, value) for key, value in spec.default_config.items()}


def load_weights_into(module: nn.Module, spec: ModelSpec, weights_path: Path, scale: int,
                      config: dict[str, Any]) -> dict[str, Any]:
    """Load safetensors weights into `module` after checking the card against the architecture.

    Returns the card. WeightsError when the card names another model or config, does not list
    `scale`, or the tensors' names/shapes differ from the module's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card = read_card(weights_path)
    if card.get("model") != spec.name:
        raise WeightsError(f"{weights_path}: card is for model {card.get('model')!r}, not {spec.name!r}")
    if scale not in card.get("scales", []):
        raise WeightsError(f"{weights_path}: card lists scales {card.get('scales')}, not x{scale}")
    card_config = card.get("config", {})
    if {k: card_config.get(k) for k in config} != _jsonable(config):
        raise WeightsError(f"{weights_path}: card config {card_config} does not match {config}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{weights_path}: not a readable safetensors file ({err})") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise WeightsError(
            f"{weights_path}: weights do not match architecture {spec.name!r} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]})")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return card


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------------------------------------
# Ready-to-run SR models


class SRModel(nn.Module):
    """A registry model made uniform: `forward(lr)` maps (N, C, h, w) to (N, C, h*sy, w*sx)
    (a 2.5-D network, `context_slices` k: (N, k + 1, h, w) to (N, 1, h*sy, w*sx)).

    Pre-upsampled networks get the bicubic image first; networks that upsample by a single
    factor s = max(sy, sx) have their output area-averaged back along an axis whose factor is
    smaller (e.g. a through-plane (3, 1) run uses the x3 network, then averages columns).
    """

    def __init__(self, spec: ModelSpec, network: nn.Module, factors: tuple[int, int],
                 card: dict[str, Any] | None):
        super().__init__()
        self.spec = spec
        self.network = network
        self.factors = factors
        self.network_scale = max(factors)
        self.card = card
        self.weights_path: Path | None = None  # the safetensors file loaded, if any

    @property
    def trained(self) -> bool:
        return self.card is not None or not self.spec.needs_weights

    @property
    def context_slices(self) -> int:
        """Neighbouring slices the network sees besides the one it super-resolves (0: a 2-D
        network; k > 0: a 2.5-D one whose input is the k + 1 slices as channels, in order
        along the slice axis, the super-resolved slice in the middle)."""
        return int(getattr(self.network, "context_slices", 0) or 0)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        sy, sx = self.factors
        out_size = (lr.shape[-2] * sy, lr.shape[-1] * sx)
        kind = self.spec.kind
        if kind == "interpolation":
            return self.network(lr)
        if kind == "pre_upsampled":
            upsampled = F.interpolate(lr, size=out_size, mode="bicubic", align_corners=False)
            return self.network(upsampled)
        if kind == "multi_scale":
            hr = self.network(lr, scale=self.network_scale)
        else:
            hr = self.network(lr)
        if hr.shape[-2:] != out_size:
            hr = F.adaptive_avg_pool2d(hr, out_size)
        return hr


def load_model(name: str, factors: int | tuple[int, int], *, allow_untrained: bool = False,
               weights_path: Path | None = None, weights_dir: Path | None = None,
               modality: str | None = None) -> SRModel:
    """The ready-to-run model `name` for 2-D factors (sy, sx), in eval mode, on CPU.

    Learned models load their shipped weights for `modality` (see `shipped_weights`) or
    `weights_path`; without any, InputError unless `allow_untrained` (random weights, for tests
    and demos of the plumbing only).
    """
    spec = get_spec(name)
    if spec.kind == "detector":
        raise InputError(f"model {name!r} is a lesion detector, not a super-resolution model")
    if spec.kind == "through_plane":
        raise InputError(f"model {name!r} is the through-plane network: ask for a through-plane "
                         "factor (--scale 1,1,2.5 or --target-spacing)")
    factors = (factors, factors) if isinstance(factors, int) else (int(factors[0]), int(factors[1]))
    if min(factors) < 1 or max(factors) < 2:
        raise InputError(f"scale factors must be integers >= 1 with one >= 2, got {factors}")
    scale = max(factors)
    check_scale(spec, scale)
    if spec.kind == "interpolation":
        return SRModel(spec, spec.builder(scale=factors), factors, None).eval()
    path = weights_path or shipped_weights(spec, scale, weights_dir, modality)
    if path is None and not allow_untrained and weights_files(spec, scale, weights_dir):
        shipped_for = ", ".join(sorted(weights_files(spec, scale, weights_dir)))
        raise InputError(
            f"model {name!r} ships x{scale} weights per modality ({shipped_for}), none for "
            f"{modality or 'an unknown modality'}: choose one with --modality")
    config = dict(spec.default_config) if path is None else config_from_card(spec, Path(path))
    network = build_network(name, scale=scale, **config)
    card = None
    if path is not None:
        card = load_weights_into(network, spec, Path(path), scale, config)
    elif not allow_untrained:
        raise InputError(
            f"model {name!r} has no trained weights for x{scale}; pass weights, pick another "
            f"model, or allow untrained weights explicitly (--allow-untrained) for testing")
    network.eval()
    if hasattr(network, "reparameterize"):  # weights ship in training form; run the deploy form
        network = network.reparameterize()
    model = SRModel(spec, network, factors, card).eval()
    model.weights_path = None if path is None else Path(path)
    return model


def load_finder(name: str, weights_path: Path | None, missing_message: str) -> tuple[nn.Module, dict[str, Any]]:
    """A scale-1 network (lesion detector or segmenter) in eval mode with its shipped (or the
    given) safetensors weights, and its card; InputError `missing_message` when none ships,
    WeightsError for a missing or mismatched file."""
    spec = get_spec(name)
    path = Path(weights_path) if weights_path is not None else shipped_weights(spec, 1)
    if path is None:
        raise InputError(missing_message)
    if not path.is_file():
        raise WeightsError(f"{path}: {spec.title} weights not found")
    config = config_from_card(spec, path)  # the widths it was trained with
    network = build_network(name, **config)
    card = load_weights_into(network, spec, path, 1, config)
    return network.eval(), card


def describe(spec: ModelSpec, weights_dir: Path | None = None) -> dict[str, Any]:
    """Registry metadata of `spec` as plain JSON-able data (for `medsr models` and the UI)."""
    weights = {}
    for scale in spec.scales:
        paths = list(weights_files(spec, scale, weights_dir).values())
        if paths:  # several per-modality files: names joined, modalities and licences merged
            cards = [read_card(path) for path in paths]
            weights[f"x{scale}"] = {
                "file": ", ".join(path.name for path in paths),
                "modality": sorted({m for card in cards for m in card.get("modality") or []}),
                "metrics": cards[0].get("metrics", {}),
                "licence": sorted({lic for card in cards for lic in card.get("licence") or []}),
                "parameters": sorted({card["parameter_count"] for card in cards
                                      if isinstance(card.get("parameter_count"), int)})}
    try:
        probe_scale = spec.scales[0]
        n_params = parameter_count(build_network(spec.name, scale=probe_scale))
    except Exception:  # a builder that cannot be probed still lists
        n_params = None
    return {
        "name": spec.name, "title": spec.title, "kind": spec.kind, "paper": spec.paper,
        "class": f"{spec.builder.__module__}.{getattr(spec.builder, '__qualname__', spec.builder)}",
        "default_config": _jsonable(spec.default_config), "pre_upsampled": spec.pre_upsampled,
        "multi_scale": spec.multi_scale, "scales": list(spec.scales),
        "modalities": list(spec.modalities), "parameters": n_params, "weights": weights,
        "description": spec.description,
    }


def describe_all(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    return [describe(get_spec(n)) for n in (names or model_names())]


def default_model(modality: str | None, scale: int, slices: int | None = None) -> str:
    """Name of the default model for a modality ("CT", "MR", "XR" or None) and scale.

    `slices`: how many slices the input has along its slice axis, when known; a 2-D input (one
    slice, e.g. an X-ray) gets no 2.5-D model (`context_slices`): it has no neighbours to show.
    """
    def card_of(name: str) -> dict | None:
        if name not in model_names():
            return None
        spec = get_spec(name)
        if scale not in spec.scales or (slices == 1 and spec.default_config.get("context_slices")):
            return None
        path = shipped_weights(spec, scale, modality=modality)
        return None if path is None else read_card(path)

    return choose_default(modality, card_of, DEFAULT_PREFERENCE)
