"""Ship an MDRN export: copy `<run>/mdrn.safetensors` and its card into MedSRLib/models/weights/, with the
card completed by what the trainer does not know: the function-preserving start and its
validation PSNR, the benchmark's test patients (in neither training nor validation), how the
trained form differs from paper 004, and the commands that resume and re-export the run.

    python benchmarks/finish_mdrn_card.py runs/mdrn_from_multiscale [--start-validation FILE] [--float16]

--start-validation: the trainer's validation of the start (a JSON file as written by
`Trainer.validate`), recorded beside the exported checkpoint's. --float16: store the tensors as
float16 (after benchmarks/half_storage.py showed it moves the held-out PSNR by < 0.01 dB).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from MedSRLib.evaluation import benchmark
from MedSRLib.models import registry as zoo

RESUME = [
    "OMP_NUM_THREADS=1 nohup python -m MedSRLib.training mdrn_from_multiscale --resume --no-progress "
    ">> runs/mdrn_from_multiscale/train.log 2>&1 &",
    "# further than train.steps: add --steps N (and e.g. --set 'scheduler.milestones=[N0]')",
    "# export the best checkpoint without training: --resume --steps <the step of checkpoints/last.pt>",
    "python benchmarks/finish_mdrn_card.py runs/mdrn_from_multiscale --start-validation "
    "runs/mdrn_from_multiscale/start_validation.json",
]

PAPER_FORM = (
    "Paper 004's MDRN size: shared trunk of 80 residual blocks x 64 filters (no batch norm, "
    "res_scale 1), two 5x5 pre-processing residual blocks and one sub-pixel head per scale "
    "(x2/x3/x4). Differences: a global bicubic residual is added to every head's output (so the "
    "network could start from the shipped 8x48 edsr_multiscale without changing its output); "
    "trained on CT/MR slices (not DIV2K + private lesion images) for far fewer steps than "
    "paper 004 / Lim et al. (hundreds of CPU steps, not ~10^5 GPU steps).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="training folder holding mdrn.safetensors and mdrn.json")
    parser.add_argument("--start-validation", type=Path, default=None)
    parser.add_argument("--float16", action="store_true")
    parser.add_argument("--weights-dir", type=Path, default=zoo.WEIGHTS_DIR)
    args = parser.parse_args()
    card = json.loads((args.run / "mdrn.json").read_text(encoding="utf-8"))
    if card.get("model") != "mdrn":
        raise SystemExit(f"{args.run / 'mdrn.json'}: not an mdrn card")
    test_files = sorted({entry for m in ("CT", "MR") for entry in benchmark.HELD_OUT[m]})
    card["test_data"] = {
        "files": test_files,
        "note": "the benchmark's held-out volumes (medsr benchmark --held-out): used for no "
                "training step and no checkpoint choice; other files of the same patients "
                "(totalseg-example-ct-3mm, the J2K DICOM copy) are excluded from training too"}
    card["start"] = {
        "weights": "edsr_multiscale.safetensors (8 blocks x 48 filters, 1 pre-processing block)",
        "method": "MedSRLib.training.expand_multiscale: zero-padded channels, added blocks as "
                  "identities; the expanded network computes the same output (Testing/test_mdrn.py)",
    }
    if args.start_validation:
        start = json.loads(args.start_validation.read_text(encoding="utf-8"))
        card["start"]["validation_psnr"] = {k: round(v["model"]["psnr"], 4) for k, v in start.items()}
    card["validation_psnr"] = {k: round(v["model"]["psnr"], 4) for k, v in card["metrics"].items()}
    card["paper_form"] = PAPER_FORM
    card["resume"] = RESUME
    state = load_file(str(args.run / "mdrn.safetensors"))
    dtype = torch.float16 if args.float16 else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    target = args.weights_dir / "mdrn.safetensors"
    save_file(state, str(target))
    card = {**card, "weights_file": target.name, "storage_dtype": str(dtype).replace("torch.", "")}
    old_card = target.with_suffix(".json")
    if old_card.is_file():  # keep measurements made on the shipped file (bf16 cost) only if same weights
        previous = json.loads(old_card.read_text(encoding="utf-8"))
        if previous.get("exported_weights") == card["exported_weights"] and "bf16" in previous:
            card["bf16"] = previous["bf16"]
    old_card.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, {card['storage_dtype']}) and {old_card.name}")


if __name__ == "__main__":
    main()
