"""Measure the held-out PSNR cost of bf16 against fp32 for a shipped SR weights file and write
it into its card (`bf16` entry, per scale).

    python -m MedSRLib.evaluation.bf16_cost --model fmen --scale 2

bf16 is the automatic float precision on CPUs that have it (OpenVINO, or torch autocast). Most
shipped networks lose <= 0.02 dB in bf16; FMEN loses 0.13 dB on the bundled CT: its
BN-folded convolutions and attention are sensitive to bf16 rounding. The card records the cost
per held-out volume (3 slices each, the benchmark's volumes; nothing is tuned on them) and
`automatic`: whether every volume stays within `int8_models.MAX_COST_DB`; the engine's
automatic precision keeps fp32 for a model whose card says it does not.
"""

from __future__ import annotations

import json
import sys
import time

from . import benchmark as bench
from ..runtime import int8_models, openvino_runtime
from ..models import registry as zoo
from .quantize_int8 import (_pairs, _unit_slices, held_out_costs, shipped_model_parser,
                            shipped_weights_of)


def main(argv: list[str] | None = None) -> int:
    args = shipped_model_parser(__doc__.splitlines()[0]).parse_args(argv)
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise SystemExit("this CPU has no bf16: the cost cannot be measured here")
    weights = shipped_weights_of(args)
    model = zoo.load_model(args.model, (args.scale, args.scale), modality=args.modality,
                           weights_path=weights)
    start = time.process_time()
    modalities = [args.modality] if args.modality else \
        [m for m in model.card.get("modality", ["CT"]) if m in bench.HELD_OUT]
    fp32_model, adds_bicubic = openvino_runtime.converted_body(model, (args.scale, args.scale))
    per_volume, slices = {}, 0
    for m in modalities:
        for path in bench.held_out_inputs(args.data_root, m):
            pairs = _pairs(_unit_slices(path, 3), args.scale)
            costs = held_out_costs(fp32_model, fp32_model, pairs, args.scale, adds_bicubic)
            per_volume[str(path.relative_to(args.data_root))] = round(costs["cost_db"]["bf16"], 4)
            slices += len(pairs)
    worst = max(per_volume.values())
    entry = {"held_out_cost_db": round(sum(per_volume.values()) / len(per_volume), 4),
             "worst_volume_cost_db": worst, "per_volume_cost_db": per_volume,
             "automatic": worst <= int8_models.MAX_COST_DB,
             "slices": slices, "modalities": modalities, "backend": "openvino",
             "openvino": ov.__version__, "cpu_seconds": round(time.process_time() - start, 1),
             "command": "python -m MedSRLib.evaluation.bf16_cost " + " ".join(argv or sys.argv[1:])}
    card_path = weights.with_suffix(".json")
    on_disk = json.loads(card_path.read_text(encoding="utf-8"))
    on_disk.setdefault("bf16", {})[f"x{args.scale}"] = entry
    card_path.write_text(json.dumps(on_disk, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
