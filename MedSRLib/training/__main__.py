"""`python -m MedSRLib.training CONFIG` (and `medsr train CONFIG`): train one recipe.

Under `torchrun --nproc_per_node=N -m MedSRLib.training CONFIG` the same entry point runs
DistributedDataParallel (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

EPILOG = """\
examples:
  python -m MedSRLib.training edsr_baseline_x2                 # a shipped recipe
  python -m MedSRLib.training my_recipe.yaml --steps 200 --out runs/try
  python -m MedSRLib.training my_recipe.yaml --resume          # continue runs/<name>
  torchrun --nproc_per_node=2 -m MedSRLib.training my_recipe.yaml

train on your own folder of volumes: copy a recipe from MedSRLib/training/configs/ and set
  data:
    root: /data/my_scans
    sources:
      - glob: "*/*.nii.gz"        # files (NIfTI, NRRD, MHA, PNG) or DICOM series folders
        patient: parent           # patient id: parent folder ('parent'), file stem ('stem') or a regex
        modality: CT
        licence: "my institution, internal use"
        validation: [patient_017, patient_018]   # held-out patients
or keep the recipe and pass --data-root plus --set overrides, e.g.
  --set 'data.sources=[{glob: "*.nii.gz", validation_last: 2, modality: MR}]'
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsr train", description="Train a MedSR model from a recipe config (YAML or JSON).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="config file, or a shipped recipe name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    parser.add_argument("--out", help="output folder (default: output.dir or runs/<name>)")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>/checkpoints/last.pt when it exists")
    parser.add_argument("--data-root", help="folder the data paths are relative to (data.root)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="override train.precision")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, value parsed as YAML (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        from .config import CONFIG_DIR
        for path in sorted(CONFIG_DIR.rglob("*.yaml")):
            print(path.relative_to(CONFIG_DIR).with_suffix(""))
        return 0
    if args.config is None:
        parser.error("a config (file or recipe name) is required")
    from .config import check_data_root, load_config
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.data_root:  # quoted: a folder name is a string even when it looks like YAML ("2024", "a: b")
        overrides.append(f"data.root={json.dumps(str(args.data_root))}")
    config = load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    from .trainer import train
    saved_root = os.environ.get("MEDSR_DATA_ROOT")
    if args.data_root:  # the explicit flag wins over MEDSR_DATA_ROOT, which resolve_data_root reads first
        os.environ["MEDSR_DATA_ROOT"] = str(args.data_root)
    try:
        check_data_root(config)  # a missing data folder is the user's to fix (exit 2), before any work
        summary = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    finally:
        if saved_root is None:
            os.environ.pop("MEDSR_DATA_ROOT", None)
        else:
            os.environ["MEDSR_DATA_ROOT"] = saved_root
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
