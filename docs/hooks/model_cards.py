"""The "Models and their cards" content, generated from the JSON model cards that ship with
the installed MedSRLib package (every `weights/*.json` below the package folder).

Nothing here is typed twice: a new or changed card changes the page at the next build.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any


def package_root() -> Path:
    """The folder of the installed (or editable) MedSRLib package, found without importing it."""
    spec = importlib.util.find_spec("MedSRLib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MedSRLib is not installed: pip install -e '.[docs]'")
    return Path(list(spec.submodule_search_locations)[0])


def card_paths(root: Path | None = None) -> list[Path]:
    """Every model card: `weights/*.json` anywhere below the package folder, sorted by name."""
    root = package_root() if root is None else root
    paths = sorted(root.rglob("weights/*.json"), key=lambda p: p.name)
    if not paths:
        raise RuntimeError(f"no model cards (weights/*.json) below {root}")
    return paths


def load_cards(root: Path | None = None) -> dict[str, dict[str, Any]]:
    """{card file stem: card} for every shipped card."""
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in card_paths(root)}


def _listing(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "-"
    return str(value)


def _cpu_minutes(card: dict) -> str:
    seconds = card.get("cpu_seconds")
    return f"{seconds / 60:.0f}" if isinstance(seconds, (int, float)) else "-"


def _validation_psnr(card: dict) -> str:
    """Model vs bicubic validation PSNR per scale, e.g. "x2: 36.00 (bicubic 32.09)"."""
    metrics = card.get("metrics") or {}
    parts = []
    for key, value in metrics.items():
        if isinstance(value, dict) and "model" in value and "bicubic" in value:
            parts.append(f"{key}: {value['model']['psnr']:.2f} (bicubic {value['bicubic']['psnr']:.2f})")
    if not parts and isinstance(metrics.get("validation"), dict):
        gain = metrics["validation"].get("mean_gain_db")
        if isinstance(gain, (int, float)):
            parts.append(f"+{gain:.2f} dB over cubic")
    return "; ".join(parts) or "-"


def _anchor(stem: str) -> str:
    """The card section's anchor (set explicitly, so links do not depend on the slugifier)."""
    return "card-" + stem.replace("_", "-").replace(".", "-").lower()


def overview_table(cards: dict[str, dict]) -> str:
    lines = ["| card | model | title | modality | scales | parameters | training steps | CPU minutes | validation PSNR, dB | weights licence |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for stem, card in cards.items():
        licence = "non-commercial" if "non-commercial" in json.dumps(card.get("licence", "")).lower() else "permissive"
        params = card.get("parameter_count")
        lines.append("| [`{}`](#{}) | `{}` | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            stem, _anchor(stem), card.get("model", "-"), card.get("title") or card.get("task", "-"),
            _listing(card.get("modality")), _listing(card.get("scales") or card.get("factors")),
            f"{params:,}" if isinstance(params, int) else "-", card.get("steps", "-"),
            _cpu_minutes(card), _validation_psnr(card), licence))
    return "\n".join(lines)


def _metrics_section(card: dict) -> list[str]:
    metrics = card.get("metrics") or {}
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict) and "model" in value and "bicubic" in value:
            for who in ("model", "bicubic"):
                m = value[who]
                rows.append(f"| {key} | {who} | {m.get('psnr', float('nan')):.2f} | "
                            f"{m.get('ssim', float('nan')):.4f} | {m.get('psnr_fg', float('nan')):.2f} | "
                            f"{value.get('slices', '-')} |")
    out: list[str] = []
    if rows:
        out += ["Validation (the patients under \"Validation data\"; whole slice and foreground):", "",
                "| scale | method | PSNR dB | SSIM | PSNR foreground dB | slices |",
                "|---|---|---|---|---|---|", *rows, ""]
        return out
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    if flat:
        out += ["Validation metrics:", "", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                for k, v in flat.items() if isinstance(v, (int, float, str))]
        out.append("")
    return out


def _precision_section(card: dict) -> list[str]:
    out: list[str] = []
    for scale, entry in (card.get("int8") or {}).items():
        held = entry.get("held_out", {})
        cost = held.get("cost_db", {})
        out.append(f"- int8 {scale} (`{entry.get('file', '-')}`): held-out cost against fp32 "
                   f"{cost.get('fp32', float('nan')):.3f} dB with float layers in fp32, "
                   f"{cost.get('bf16', float('nan')):.3f} dB in bf16, on {held.get('slices', '-')} "
                   f"slices; {len(entry.get('float_convolutions', []))} convolutions left float; "
                   f"made by `{entry.get('command', '-')}`")
    for scale, entry in (card.get("bf16") or {}).items():
        out.append(f"- bf16 {scale}: held-out cost {entry.get('held_out_cost_db', '-')} dB; "
                   f"used automatically: {'yes' if entry.get('automatic') else 'no (fp32)'}; "
                   f"measured by `{entry.get('command', '-')}`")
    return (["Reduced precision:", "", *out, ""]) if out else []


def _files_block(title: str, files: Any) -> list[str]:
    if not files:
        return []
    if isinstance(files, list):
        items = [f"{f['file']} ({f.get('modality', '')}, {f.get('planes', '')} planes)"
                 if isinstance(f, dict) and "file" in f else str(f) for f in files]
    else:
        items = [str(files)]
    body = "\n".join(f"    - `{item}`" for item in items)
    return [f'??? note "{title} ({len(items)})"', "", body, ""]


def card_section(stem: str, card: dict) -> str:
    title = card.get("title") or card.get("task") or card.get("status") or ""
    out = [f"### {stem} {{ #{_anchor(stem)} }}", "", f"**{title}**" if title else "", ""]
    facts = [("model (registry name)", f"`{card.get('model', '-')}`"),
             ("weights file", f"`{card.get('weights_file', '-')}` ({card.get('storage_dtype', '-')})"),
             ("modality", _listing(card.get("modality"))),
             ("scales", _listing(card.get("scales") or card.get("factors"))),
             ("parameters", f"{card['parameter_count']:,}" if isinstance(card.get("parameter_count"), int) else "-"),
             ("network configuration", ", ".join(f"{k}={v}" for k, v in (card.get("config") or {}).items()) or "-"),
             ("training recipe", f"`{card.get('recipe', '-')}`"),
             ("training steps", f"{card.get('steps', '-')}; exported: {card.get('exported_weights', '-')}"),
             ("CPU minutes (last stage)", _cpu_minutes(card)),
             ("degradation", ", ".join(d.get("type", "?") for d in card.get("degradation") or []) or "-"),
             ("normalisation", card.get("normalisation", "-")),
             ("licence of the training data", _listing(card.get("licence")))]
    out += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], ""]
    notes = [f"- {key.replace('_', ' ')}: {card[key]}" for key in sorted(card)
             if (key.endswith("note") or key in ("task", "inference", "status", "augmentation"))
             and isinstance(card[key], str)]
    if notes:
        out += ["Notes from the card:", "", *notes, ""]
    out += _metrics_section(card)
    out += _precision_section(card)
    out += _files_block("Training data", card.get("training_data"))
    out += _files_block("Validation data", card.get("validation_data"))
    out += _files_block("Test data (never used for training or choices)",
                        card.get("test_data") or card.get("test_data_never_used"))
    return "\n".join(out)


def markdown(root: Path | None = None) -> str:
    """The generated part of the models page: an overview table, then one section per card."""
    cards = load_cards(root)
    parts = [overview_table(cards), "", "## The cards", ""]
    parts += [card_section(stem, card) for stem, card in cards.items()]
    return "\n".join(parts)
