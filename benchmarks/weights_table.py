"""Markdown table of the shipped weights, read from their model cards: file, modality, recipe,
steps, CPU minutes, validation PSNR of model vs bicubic (the recipe's held-out slices).

    python benchmarks/weights_table.py [--weights-dir MedSRLib/models/weights]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from MedSRLib.models import registry as zoo


def rows(weights_dir: Path) -> list[str]:
    lines = ["| file | model | modality | recipe | steps | CPU min | validation PSNR model / bicubic (dB) | MB |",
             "|---|---|---|---|---|---|---|---|"]
    for path in sorted(weights_dir.glob("*.safetensors")):
        card = zoo.read_card(path)
        metrics = card.get("metrics", {})
        scores = []
        for scale in card.get("scales", []):
            entry = metrics.get(f"x{scale}", {})
            if "model" in entry and "bicubic" in entry:
                scores.append(f"x{scale} {entry['model']['psnr']:.2f} / {entry['bicubic']['psnr']:.2f}")
        lines.append(
            f"| {path.name} | {card['model']} | {', '.join(card.get('modality') or [])} | "
            f"{card.get('recipe')} | {card.get('steps')} | {(card.get('cpu_seconds') or 0) / 60:.0f} | "
            f"{'; '.join(scores) or '-'} | {path.stat().st_size / 1e6:.1f} |")
    total = sum(p.stat().st_size for p in weights_dir.glob("*.safetensors")) / 1e6
    lines.append(f"\nTotal: {total:.1f} MB in {len(list(weights_dir.glob('*.safetensors')))} files.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", type=Path, default=zoo.WEIGHTS_DIR)
    print("\n".join(rows(parser.parse_args().weights_dir)))


if __name__ == "__main__":
    main()
