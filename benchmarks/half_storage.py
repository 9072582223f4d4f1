"""Store shipped weights as float16 when that costs nothing measurable: for each file, run the
held-out benchmark (`medsr benchmark --held-out`, the file's modality and scales) with the float32
and the float16 copy, print the mean PSNR of both, and with --write replace the file by the
float16 copy if the difference stays below --tolerance dB at every scale.

    python benchmarks/half_storage.py MedSRLib/models/weights/srresnet_x4_xr.safetensors --data-root ../shared/data [--write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from MedSRLib.evaluation import benchmark
from MedSRLib.models import registry as zoo


def mean_psnr(weights_dir: Path, model: str, modality: str, scales: list[int], data_root: Path,
              extra: list[str]) -> dict[int, float]:
    with tempfile.TemporaryDirectory() as out:
        benchmark.main(["--held-out", str(data_root), "--modality", modality, "--models", model,
                        "--scales", *map(str, scales), "--weights-dir", str(weights_dir),
                        "--out", out, *extra])
        results = json.loads((Path(out) / "results.json").read_text(encoding="utf-8"))["scales"]
    return {s: float(np.mean([row[model]["psnr_whole"] for row in results[f"x{s}"]["per_image"].values()]))
            for s in scales}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--tolerance", type=float, default=0.01, help="dB")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    for path in args.files:
        card = zoo.read_card(path)
        modality = next(m for m in ("MR", "CT", "XR") if m in card.get("modality", []))
        extra = ["--resize", "256"] if modality == "XR" else []
        with tempfile.TemporaryDirectory() as full_dir, tempfile.TemporaryDirectory() as half_dir:
            shutil.copy(path, full_dir)
            shutil.copy(path.with_suffix(".json"), full_dir)
            state = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
            half_path = Path(half_dir) / path.name
            save_file(state, str(half_path))
            half_path.with_suffix(".json").write_text(json.dumps({**card, "storage_dtype": "float16"}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            full = mean_psnr(Path(full_dir), card["model"], modality, card["scales"], args.data_root, extra)
            half = mean_psnr(Path(half_dir), card["model"], modality, card["scales"], args.data_root, extra)
            worst = max(abs(full[s] - half[s]) for s in full)
            print(f"{path.name} ({modality}): " + "; ".join(
                f"x{s} float32 {full[s]:.4f} dB, float16 {half[s]:.4f} dB" for s in full)
                + f"; max |difference| {worst:.4f} dB")
            if args.write and worst < args.tolerance:
                card = {**card, "storage_dtype": "float16",
                        "storage_note": f"float16 copy of the float32 export; held-out mean PSNR "
                                        f"differs by {worst:.4f} dB (benchmarks/half_storage.py)"}
                shutil.copy(half_path, path)
                path.with_suffix(".json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
                print(f"  wrote {path} as float16 ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
