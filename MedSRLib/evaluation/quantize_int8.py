"""Make the int8 OpenVINO model of a shipped SR weights file and write its held-out cost.

    python -m MedSRLib.evaluation.quantize_int8 --model edsr_lite --scale 2 [--modality CT]

Calibration uses slices of the card's training patients only (`training_data`); the held-out
PSNR cost against fp32 is measured on the benchmark's held-out volumes of the card's
modalities (nothing is tuned on them: the recipe in `int8_models` is fixed). Writes
`<stem>.int8-x<scale>.xml/.bin` beside the weights and the card's `int8` entry.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import benchmark as bench
from ..runtime import int8_models, openvino_runtime
from ..transforms import intensity
from ..models import registry as zoo
from ..metrics import psnr
from ..training.data import read_volume_array
from ..transforms.degrade import bicubic_downsample

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"
#: Edge of the centre crop of each calibration / held-out slice (px, HR).
CROP = 192


def _unit_slices(path: Path, count: int) -> list[np.ndarray]:
    voxels = read_volume_array(path)  # as training reads it (RGB(A) X-ray PNGs become grey)
    unit = intensity.fit_mapping(voxels).to_unit(voxels)
    return [bench.centre_crop(unit[z], CROP) for z in bench.choose_slices(unit, count)]


def _pairs(hr_slices: list[np.ndarray], scale: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    """(LR (1, 1, h, w) float32 array, HR target tensor) per slice, cropped to the scale."""
    pairs = []
    for hr in hr_slices:
        h, w = (d - d % scale for d in hr.shape)
        target = torch.from_numpy(np.ascontiguousarray(hr[:h, :w], dtype=np.float32))[None, None]
        pairs.append((bicubic_downsample(target, scale).numpy(), target))
    return pairs


def training_pairs(card: dict, data_root: Path, scale: int, per_file: int) -> tuple[list, list, list[str], list[str]]:
    """(calibration pairs, selection pairs, their files) from the card's training files: the
    even-numbered files (sorted) calibrate, the odd-numbered ones choose the float layers."""
    training = sorted(card.get("training_data") or [])
    if len(training) < 2:
        raise SystemExit("the card lists fewer than 2 training files: cannot calibrate and "
                         "select on training patients")
    calibration_files, selection_files = training[0::2], training[1::2]

    def pairs_of(files: list[str]) -> list:
        return [pair for name in files
                for pair in _pairs(_unit_slices(data_root / name, per_file), scale)]

    return pairs_of(calibration_files), pairs_of(selection_files), calibration_files, selection_files


def _psnr_of(compiled, pairs, scale: int, adds_bicubic: bool) -> float:
    values = []
    for lr, target in pairs:
        out = torch.from_numpy(next(iter(compiled(lr).values())).copy())
        if adds_bicubic:
            out += F.interpolate(torch.from_numpy(lr), scale_factor=scale, mode="bicubic",
                                 align_corners=False)
        values.append(psnr(out, target, crop_border=scale))
    return float(np.mean(values))


def held_out_costs(fp32_model, int8_model, pairs, scale: int, adds_bicubic: bool) -> dict:
    """Mean held-out PSNR of fp32 and the int8 model (float rest in fp32 and in bf16)."""
    import openvino as ov
    core = ov.Core()

    def score(model, hint: str) -> float:
        compiled = {}
        values = []
        for lr, target in pairs:
            if lr.shape not in compiled:
                shaped = model.clone()
                shaped.reshape(list(lr.shape))
                compiled[lr.shape] = core.compile_model(shaped, "CPU", {"INFERENCE_PRECISION_HINT": hint})
            values.append(_psnr_of(compiled[lr.shape], [(lr, target)], scale, adds_bicubic))
        return float(np.mean(values))

    reference = score(fp32_model, "f32")
    result = {"psnr_fp32": reference, "slices": len(pairs), "cost_db": {}}
    result["cost_db"]["fp32"] = reference - score(int8_model, "f32")
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        result["cost_db"]["bf16"] = reference - score(int8_model, "bf16")
    return result


def shipped_model_parser(description: str) -> argparse.ArgumentParser:
    """Arguments naming one shipped weights file (--model, --scale, --modality) and the data."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True)
    parser.add_argument("--scale", type=int, required=True)
    parser.add_argument("--modality", default=None)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="folder of the weights file and its card (default: the shipped ones)")
    return parser


def shipped_weights_of(args: argparse.Namespace) -> Path:
    """The weights file the arguments name, shipped or in --weights-dir (SystemExit when there is none)."""
    weights = zoo.shipped_weights(zoo.get_spec(args.model), args.scale, args.weights_dir, args.modality)
    if weights is None:
        raise SystemExit(f"no weights for {args.model} x{args.scale} {args.modality or ''} in "
                         f"{args.weights_dir or 'the shipped weights'}")
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = shipped_model_parser(__doc__.splitlines()[0])
    parser.add_argument("--per-file", type=int, default=2, help="slices per training file")
    parser.add_argument("--max-drop", type=float, default=0.04,
                        help="PSNR drop (dB) allowed on the selection patients")
    parser.add_argument("--qat-steps", type=int, default=0,
                        help="quantisation-aware fine-tuning steps (0: post-training "
                             "quantisation with accuracy control); the whole trunk in int8")
    parser.add_argument("--qat-lr", type=float, default=2e-5, help="fine-tuning learning rate")
    parser.add_argument("--qat-per-file", type=int, default=8,
                        help="HR slices per calibration file to fine-tune on")
    args = parser.parse_args(argv)
    import openvino as ov

    torch.manual_seed(0)
    weights = shipped_weights_of(args)
    model = zoo.load_model(args.model, (args.scale, args.scale), modality=args.modality,
                           weights_path=weights)
    card = dict(model.card)
    start = time.process_time()
    calibration, selection, calibration_files, selection_files = training_pairs(
        card, args.data_root, args.scale, args.per_file)
    fp32_model, adds_bicubic = openvino_runtime.converted_body(model, (args.scale, args.scale))
    if args.qat_steps:
        from . import qat_int8
        fake_quantised = qat_int8.quantise(openvino_runtime.residual_body(model),
                                           [lr for lr, _ in calibration])
        hr_slices = [s for name in calibration_files
                     for s in _unit_slices(args.data_root / name, args.qat_per_file)]
        fine_tuning = qat_int8.fine_tune(fake_quantised, hr_slices, args.scale, args.qat_steps,
                                         lr=args.qat_lr)
        fine_tuning["hr_slices"] = len(hr_slices)
        quantized = qat_int8.to_openvino(fake_quantised)
        selection_drop = held_out_costs(fp32_model, quantized, selection, args.scale,
                                        adds_bicubic)["cost_db"]["fp32"]
        print(f"QAT: selection-patient PSNR drop {selection_drop:+.4f} dB", flush=True)
        if selection_drop > args.max_drop:
            raise SystemExit(f"QAT drops {selection_drop:.3f} dB on the selection patients "
                             f"(> {args.max_drop}); nothing written")
    else:
        quantized = int8_models.quantize(
            fp32_model, [lr for lr, _ in calibration], tuple(calibration[0][0].shape[-2:]),
            selection=selection, max_drop_db=args.max_drop,
            score=lambda compiled, items: _psnr_of(compiled, items, args.scale, adds_bicubic))
    modalities = [m for m in card.get("modality", ["CT"]) if m in bench.HELD_OUT]
    if args.modality:
        modalities = [args.modality]
    held_out = []
    for modality in modalities:
        for path in bench.held_out_inputs(args.data_root, modality):
            held_out += _unit_slices(path, 3)
    costs = held_out_costs(fp32_model, quantized, _pairs(held_out, args.scale), args.scale, adds_bicubic)
    target = int8_models.ir_path(weights, args.scale)
    ov.save_model(quantized, str(target), compress_to_fp16=False)
    entry = {
        "file": target.name, "weights_sha256": int8_models.file_sha256(weights),
        **int8_models.ir_hashes(target),
        "recipe": ("NNCF quantisation-aware fine-tuning (torch), preset mixed" if args.qat_steps
                   else "NNCF PTQ, preset mixed, full bias correction")
                  + "; float: additions and convolutions changing channels or size",
        "float_convolutions": int8_models.float_layers(quantized),
        "calibration": {"training_files": calibration_files, "slices": len(calibration),
                        "crop": CROP},
        "float_layer_selection": {"training_files": selection_files, "slices": len(selection),
                                  "max_drop_db": args.max_drop},
        "held_out": {"modalities": modalities, **costs},
        **({"fine_tuning": {**fine_tuning, "selection_drop_db": round(selection_drop, 4)}}
           if args.qat_steps else {}),
        "openvino": ov.__version__, "cpu_seconds": round(time.process_time() - start, 1),
        "command": "python -m MedSRLib.evaluation.quantize_int8 " + " ".join(argv or sys.argv[1:]),
    }
    card_path = weights.with_suffix(".json")
    on_disk = json.loads(card_path.read_text(encoding="utf-8"))
    on_disk.setdefault("int8", {})[f"x{args.scale}"] = entry
    card_path.write_text(json.dumps(on_disk, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps({k: entry[k] for k in ("file", "held_out", "cpu_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
