"""int8 OpenVINO models of shipped SR networks: how they are made, found and trusted.

An int8 model is the network's residual body (see `openvino_runtime.residual_body`) with NNCF
post-training quantisation on the convolutions that keep their channel count and size (the
trunk); the first convolution, the channel-changing ones around the pixel shuffle, the last one
and every addition stay float. That recipe was chosen by measurement on edsr_lite x2 (held-out
CT, fp32 rest): quantising everything cost 0.31 dB PSNR, head and tail float 0.17-0.21 dB,
additions float as well 0.008 dB at 2.1x the fp32 speed.

The quantised model ships beside its weights as OpenVINO IR (`<stem>.int8-x<scale>.xml/.bin`,
no pickle), made by `python -m MedSRLib.evaluation.quantize_int8` (`make weights`) from the
card's training patients only, with its held-out PSNR cost against fp32 written into the card
(`int8` entry). It is used only when the card's `weights_sha256` matches the weights file
loaded, and, under precision "auto", only when that cost is within `MAX_COST_DB`. The IR files
themselves are checked against the card's `xml_sha256` and `bin_sha256` before OpenVINO reads
them: a mismatch refuses the run (`WeightsError` naming the file); an entry without these
hashes is not used (float runs, with a notice). `python -m MedSRLib.runtime.int8_models CARD.json ...`
records the hashes of the IR files beside each card.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import model_integrity, no_telemetry  # noqa: F401 - no_telemetry: before openvino/nncf

#: Accuracy contract of the automatic choice: held-out PSNR cost against fp32, dB.
MAX_COST_DB = 0.05


def cpu_runs_int8() -> bool:
    """True when OpenVINO's CPU plugin lists INT8 among its optimisation capabilities."""
    try:
        import openvino as ov
        return "INT8" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no OpenVINO, no CPU plugin: float
        return False


def ir_path(weights_path: Path, scale: int) -> Path:
    """Where the int8 IR of `weights_path` at `scale` lives (.xml; the .bin beside it)."""
    weights_path = Path(weights_path)
    return weights_path.with_name(f"{weights_path.stem}.int8-x{scale}.xml")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (see `model_integrity.file_sha256`)."""
    return model_integrity.file_sha256(path)


def ir_hashes(xml_path: Path) -> dict[str, str]:
    """{"xml_sha256": ..., "bin_sha256": ...} of an IR (.xml and the .bin beside it), the
    fields a card's int8 entry holds for `find` to verify."""
    xml_path = Path(xml_path)
    return {"xml_sha256": file_sha256(xml_path), "bin_sha256": file_sha256(xml_path.with_suffix(".bin"))}


def card_entry(card: dict[str, Any] | None, scale: int) -> dict[str, Any] | None:
    """The card's int8 entry for `scale`, or None."""
    return ((card or {}).get("int8") or {}).get(f"x{scale}")


def held_out_cost(entry: dict[str, Any], rest: str) -> float | None:
    """Held-out PSNR cost (dB) against fp32 of the int8 model with its float layers in `rest`
    ("fp32" or "bf16"), as measured when it was made; None if not measured."""
    value = (entry.get("held_out") or {}).get("cost_db", {}).get(rest)
    return None if value is None else float(value)


def find(weights_path: Path | None, card: dict[str, Any] | None, scale: int) -> tuple[Path, dict] | None:
    """(IR path, card entry) of the int8 model made from exactly this weights file, or None."""
    if weights_path is None:
        return None
    entry = card_entry(card, scale)
    path = ir_path(weights_path, scale)
    if entry is None or not path.is_file() or not path.with_suffix(".bin").is_file():
        return None
    if entry.get("weights_sha256") != file_sha256(Path(weights_path)):
        return None  # made from other weights (a retrained file): never used
    card_name = Path(weights_path).with_suffix(".json").name
    if not (entry.get("xml_sha256") and entry.get("bin_sha256")):
        from .notices import notice
        notice(f"{path.name}: model card {card_name} records no SHA-256 for this int8 model, so "
               "it cannot be verified and is not used; running the model in float")
        return None
    model_integrity.check_shipped(path, entry["xml_sha256"], card_name)
    model_integrity.check_shipped(path.with_suffix(".bin"), entry["bin_sha256"], card_name)
    return path, entry


def record_card_hashes(card_path: Path) -> list[str]:
    """Write `xml_sha256`/`bin_sha256` of each int8 IR a card lists (files beside the card)
    into that card; returns the IR file names recorded."""
    card_path = Path(card_path)
    card = json.loads(card_path.read_text(encoding="utf-8"))
    recorded = []
    for entry in (card.get("int8") or {}).values():
        xml_path = card_path.with_name(entry["file"])
        entry.update(ir_hashes(xml_path))
        recorded.append(xml_path.name)
    if recorded:
        card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return recorded


def float_kept(model) -> list[str]:
    """Names of the convolutions of an OpenVINO model `model` (static input shape) that stay
    float: every one whose input and output differ in channels or size (the first, the
    pixel-shuffle convolutions, the last)."""
    kept = []
    for op in model.get_ops():
        if op.get_type_name() != "Convolution":
            continue
        source, result = op.input(0).get_partial_shape(), op.output(0).get_partial_shape()
        if not (source.is_static and result.is_static) or list(source.to_shape()) != list(result.to_shape()):
            kept.append(op.get_friendly_name())
    return kept


def quantize(model, calibration_lr: Sequence[np.ndarray], shape: tuple[int, int],
             selection: Sequence[tuple[np.ndarray, Any]] | None = None,
             score: Callable[[Any, Sequence], float] | None = None, max_drop_db: float = 0.04):
    """The int8 model of OpenVINO `model` ((N, 1, h, w) float32 input), calibrated on the
    (1, 1, h, w) float32 unit-intensity LR slices `calibration_lr` (training patients only).

    `shape` (h, w): a static input shape used to find the float-kept layers; the returned model
    keeps `model`'s input shape. With `selection` (items of other training patients) and
    `score(compiled_model, items)` (PSNR, dB), NNCF's accuracy control returns further layers
    to float, most sensitive first, until the selection PSNR drops by at most `max_drop_db`.
    """
    import nncf

    probe = model.clone()
    probe.reshape([1, 1, *shape])
    options = dict(preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=False,
                   subset_size=len(calibration_lr),
                   ignored_scope=nncf.IgnoredScope(names=float_kept(probe), types=["Add"],
                                                   validate=False))
    calibration = nncf.Dataset(list(calibration_lr))
    if selection is None:
        return nncf.quantize(model, calibration, **options)
    return nncf.quantize_with_accuracy_control(
        model, calibration, nncf.Dataset(list(selection)), validation_fn=score,
        max_drop=max_drop_db, drop_type=nncf.DropType.ABSOLUTE, **options)


def float_layers(quantized) -> list[str]:
    """Convolutions of an int8 OpenVINO model that run in float (no FakeQuantize on their
    input)."""
    names = []
    for op in quantized.get_ops():
        if op.get_type_name() == "Convolution":
            producer = op.input_value(0).get_node()
            if producer.get_type_name() != "FakeQuantize":
                names.append(op.get_friendly_name())
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m MedSRLib.runtime.int8_models CARD.json ...`: record the int8 IR hashes in each card."""
    cards = list(sys.argv[1:] if argv is None else argv)
    if not cards:
        print("usage: python -m MedSRLib.runtime.int8_models CARD.json ...", file=sys.stderr)
        return 2
    for card in cards:
        for name in record_card_hashes(Path(card)):
            print(f"{card}: recorded the SHA-256 of {name} and its .bin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
