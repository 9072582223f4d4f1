"""`medsr models` as a table, read from the model cards alone (JSON beside each weights file)
and the packaged speed measurement: no torch, MONAI or OpenVINO import, so it answers at once.

- gain: the card's validation PSNR of the model minus bicubic's (dB, the recipe's held-out
  slices);
- ms/slice: one 512 x 512 slice on the automatic inference path, from `data/speed_frontier.json`
  (`benchmarks/bench_frontier.py` writes it beside `benchmarks/results/frontier/frontier.json`);
- default: what `zoo.default_model` picks for each modality and scale (same rule, same cards).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .default_rule import choose_default

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"
SPEED_PATH = PACKAGE_DIR.parent / "data" / "speed_frontier.json"
MODALITIES = ("CT", "MR", "XR")
SCALES = (2, 3, 4)
#: The registry's parameter-free baselines (`model_catalog.py`, kind "interpolation").
INTERPOLATION_BASELINES = ("nearest", "linear", "bicubic", "lanczos")
#: Cards of networks that are not in-plane SR models (listed apart).
NOT_INPLANE = ("lesion_detector", "lesion_segmenter", "through_plane_net")


@dataclass(frozen=True)
class ShippedWeights:
    """One shipped weights file, as its card describes it."""

    file: str
    model: str
    title: str
    scales: tuple[int, ...]
    modalities: tuple[str, ...]
    parameters: int | None
    gain_db: dict[int, float]  # scale -> validation PSNR gain over bicubic (dB)
    for_modality: str | None  # the `<stem>_<modality>` files serve that modality only
    default_for: tuple[str, ...] | None = None  # the card's "default_for", when it has one


def read_cards(weights_dir: Path = WEIGHTS_DIR) -> list[ShippedWeights]:
    """Every card beside a shipped safetensors file, in file-name order."""
    cards = []
    for path in sorted(weights_dir.glob("*.safetensors")):
        card_path = path.with_suffix(".json")
        if not card_path.is_file():
            continue
        card = json.loads(card_path.read_text(encoding="utf-8"))
        metrics = card.get("metrics") or {}
        gains = {}
        for scale in card.get("scales") or []:
            entry = metrics.get(f"x{scale}") or {}
            if "psnr" in (entry.get("model") or {}) and "psnr" in (entry.get("bicubic") or {}):
                gains[int(scale)] = entry["model"]["psnr"] - entry["bicubic"]["psnr"]
        suffix = path.stem.rsplit("_", 1)[-1].upper()
        cards.append(ShippedWeights(
            file=path.name, model=card.get("model", path.stem), title=card.get("title", ""),
            scales=tuple(int(s) for s in card.get("scales") or []),
            modalities=tuple(card.get("modality") or []),
            parameters=card.get("parameter_count"), gain_db=gains,
            for_modality=suffix if suffix in MODALITIES else None,
            default_for=tuple(card["default_for"]) if "default_for" in card else None))
    return cards


def default_models(cards: list[ShippedWeights]) -> dict[tuple[str | None, int], str]:
    """{(modality or None, scale): default model name}, by the registry's own rule
    (`default_rule.choose_default`) over the weights file that would serve each run (the
    modality's own file, else the general one)."""
    defaults = {}
    for modality in (*MODALITIES, None):
        for scale in SCALES:
            def card_of(name: str, modality=modality, scale=scale) -> dict | None:
                files = {c.for_modality or "": c for c in cards
                         if c.model == name and c.file.startswith(f"{name}_x{scale}")}
                card = files.get(modality or "") or files.get("") or (
                    next(iter(files.values())) if modality is None and len(files) == 1 else None)
                if card is None:
                    return None
                described = {"modality": list(card.modalities)}
                if card.default_for is not None:
                    described["default_for"] = list(card.default_for)
                return described

            defaults[(modality, scale)] = choose_default(modality, card_of)
    return defaults


def measured_ms(speed_path: Path = SPEED_PATH) -> tuple[dict[tuple[str, int, str | None], float], str]:
    """({(model, scale, weights' modality or None): ms per 512 x 512 slice}, the CPU it was
    measured on); empty when the measurement is not packaged."""
    if not speed_path.is_file():
        return {}, ""
    data = json.loads(speed_path.read_text(encoding="utf-8"))
    times = {}
    for row in data.get("rows", []):
        times.setdefault((row["model"], int(row["scale"]), row.get("weights_for")), row["ms"])
    return times, data.get("cpu", "")


def _grid(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def render(weights_dir: Path = WEIGHTS_DIR, speed_path: Path = SPEED_PATH,
           untrained: tuple[str, ...] = ()) -> str:
    """The `medsr models` text: defaults per modality and scale, then one row per shipped
    in-plane weights file and scale (default marked), then the other networks."""
    cards = read_cards(weights_dir)
    defaults = default_models(cards)
    times, cpu = measured_ms(speed_path)
    lines = ["Default model when --model is not given (by modality and in-plane scale):"]
    rows = [("", "x2", "x3", "x4")]
    for modality, label in (("CT", "CT"), ("MR", "MR"), ("XR", "XR, or a 2-D image without one"),
                            (None, "3-D, modality unknown")):
        rows.append((f"  {label}", *(defaults[(modality, s)] for s in SCALES)))
    lines += _grid(rows)
    lines += ["  thick slices to thin (--scale 1,1,2.5 or --target-spacing): through_plane_net", ""]

    header = ("model", "scale", "trained on", "default for", "gain vs bicubic", "ms/slice",
              "parameters")
    rows = [header]
    titles = {}
    for card in cards:
        if card.model in NOT_INPLANE:
            continue
        titles.setdefault(card.model, card.title)
        for scale in card.scales:
            serves = [card.for_modality] if card.for_modality else list(card.modalities)
            default_for = [m for m in serves if defaults.get((m, scale)) == card.model]
            gain = card.gain_db.get(scale)
            ms = times.get((card.model, scale, card.for_modality))
            rows.append((
                ("* " if default_for else "  ") + card.model, f"x{scale}",
                ", ".join(serves), ", ".join(default_for) or "-",
                "-" if gain is None else f"{gain:+.2f} dB",
                "-" if ms is None else f"{ms:.0f}",
                "-" if card.parameters is None else f"{card.parameters:,}"))
    lines.append("Shipped in-plane models (* = a default):")
    lines += _grid(rows)
    lines += ["",
              "gain vs bicubic: validation PSNR of the model minus bicubic's (dB), from its card.",
              "ms/slice: one 512 x 512 slice on the automatic backend (benchmarks/bench_frontier.py"
              + (f"), measured on: {cpu}" if cpu else ")") + ".", ""]
    lines.append("Models:")
    for name, title in titles.items():
        lines.append(f"  {name}: {title}")
    others = sorted({c.model for c in cards if c.model in NOT_INPLANE})
    lines += ["", "Also shipped: " + ", ".join(others) + " (through-plane network and lesion "
              "finders, used by --scale 1,1,z and --roi auto).",
              "Interpolation baselines (no weights): " + ", ".join(INTERPOLATION_BASELINES) + "."]
    if untrained:
        lines.append("Registered without shipped weights (need --weights): "
                     + ", ".join(untrained) + ".")
    else:
        lines.append("`medsr models --all` adds the registered models without shipped weights; "
                     "`--json` gives everything.")
    return "\n".join(lines)
