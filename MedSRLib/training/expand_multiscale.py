"""Function-preserving expansion of a multi-scale EDSR into a wider and deeper one.

A trained `MultiScaleEDSR` (F filters, B trunk blocks, P pre-processing blocks per scale) becomes
one with F' >= F filters, B' >= B blocks and P' >= P pre-processing blocks whose output is the
same for every input (up to float rounding), so that training the larger network starts where
the smaller one stands (Net2Net, Chen et al. 2016, in its zero-padding form):

- Feature channels F..F'-1 of the residual stream start at exactly zero: every convolution that
  writes the stream (the head, the last conv of each residual block, the trunk's closing conv)
  has zero weights and bias for those output channels, and every convolution has zero weights
  on its extra input channels.
- Hidden channels that nothing reads yet (the extra outputs of a block's first conv and of the
  sub-pixel convolutions) keep the larger network's fresh random initialisation: their readers
  see them through zero weights, so the output does not change, and the readers' gradients are
  non-zero from the first step (zero on both sides would be a saddle that never trains).
- The added residual blocks (trunk blocks B..B'-1 after the copied ones, pre-processing blocks
  P..P'-1) are identities: fresh first conv, zeroed last conv, as `zero_last_conv` does.
  Their random first convs read the whole stream, so the zero channels receive gradients too.
- Sub-pixel convolutions keep the pixel-shuffle layout: output channel c*r*r + k is feature c at
  sub-position k, so feature channels 0..F-1 are the first F*r*r outputs in both networks.

    python -m MedSRLib.training.expand_multiscale MedSRLib/models/weights/edsr_multiscale.safetensors \\
        runs/mdrn_init/mdrn_init.safetensors --num-features 64 --num-blocks 80 --preprocess-blocks 2

The source's card (same stem, .json) supplies its architecture; the output is a plain
safetensors state dict for a recipe's `init_from`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..models.networks.edsr import MultiScaleEDSR

#: Architecture keys a source card must state (the rest of MultiScaleEDSR's arguments).
ARCHITECTURE_KEYS = ("in_channels", "num_features", "num_blocks", "res_scale", "preprocess_blocks",
                     "preprocess_kernel_size", "bicubic_residual")

# Convolutions whose outputs are added to the residual stream: extra output channels start at 0.
_STREAM_WRITERS = re.compile(r"^(head\.conv|trunk\.conv\.conv|.*\.body\.1\.conv)\.(weight|bias)$")
_TRUNK_BLOCK = re.compile(r"^trunk\.blocks\.(\d+)\.")
_PREPROCESS_BLOCK = re.compile(r"^preprocess\.(x\d+)\.(\d+)\.")


def _source_name(name: str, source_blocks: int, source_preprocess: int) -> str | None:
    """The source tensor a target tensor is copied from, None for a tensor of an added block."""
    trunk = _TRUNK_BLOCK.match(name)
    if trunk and int(trunk.group(1)) >= source_blocks:
        return None
    preprocess = _PREPROCESS_BLOCK.match(name)
    if preprocess and int(preprocess.group(2)) >= source_preprocess:
        return None
    return name


def _is_added_block_last_conv(name: str) -> bool:
    return name.endswith(".body.1.conv.weight") or name.endswith(".body.1.conv.bias")


def expand_state(source_state: Mapping[str, torch.Tensor], source_config: Mapping[str, Any],
                 target: MultiScaleEDSR) -> dict[str, torch.Tensor]:
    """The state dict for `target` (its architecture a superset of `source_config`'s) that
    computes the same function as `source_state`; `target`'s own tensors supply the fresh
    initialisation of the parts that are not copied (see the module docstring).

    ValueError when the architectures cannot be matched (narrower or shallower target, other
    kernel size, residual scaling, input channels, global residual or scales)."""
    target_state = target.state_dict()
    source_blocks = int(source_config["num_blocks"])
    source_preprocess = int(source_config["preprocess_blocks"])
    expanded: dict[str, torch.Tensor] = {}
    for name, fresh in target_state.items():
        origin = _source_name(name, source_blocks, source_preprocess)
        if origin is None:  # an added residual block: fresh first conv, zero last conv (identity)
            expanded[name] = torch.zeros_like(fresh) if _is_added_block_last_conv(name) else fresh.clone()
            continue
        if origin not in source_state:
            raise ValueError(f"source weights have no tensor {origin!r} for the target's {name!r}")
        old = source_state[origin].to(fresh.dtype)
        if old.dim() != fresh.dim() or any(o > n for o, n in zip(old.shape, fresh.shape)):
            raise ValueError(f"{name}: source shape {tuple(old.shape)} does not fit in {tuple(fresh.shape)}")
        if old.dim() == 4 and old.shape[2:] != fresh.shape[2:]:
            raise ValueError(f"{name}: kernel {tuple(old.shape[2:])} differs from {tuple(fresh.shape[2:])}")
        # extra output channels: zero for stream writers, fresh for hidden producers
        tensor = torch.zeros_like(fresh) if _STREAM_WRITERS.match(name) else fresh.clone()
        if tensor.dim() == 4:
            tensor[:old.shape[0], :] = 0.0  # extra input channels of copied outputs read through 0
            tensor[:, old.shape[1]:] = 0.0  # and so do the fresh outputs' extra inputs
        tensor[tuple(slice(0, size) for size in old.shape)] = old
        expanded[name] = tensor
    return expanded


def check_compatible(source_config: Mapping[str, Any], target_config: Mapping[str, Any],
                     source_scales: Sequence[int], target_scales: Sequence[int]) -> None:
    """ValueError naming the first architecture choice the expansion cannot preserve."""
    for key in ("in_channels", "res_scale", "preprocess_kernel_size", "bicubic_residual"):
        if source_config[key] != target_config[key]:
            raise ValueError(f"{key} must stay {source_config[key]!r} to preserve the function, "
                             f"got {target_config[key]!r}")
    for key in ("num_features", "num_blocks", "preprocess_blocks"):
        if int(target_config[key]) < int(source_config[key]):
            raise ValueError(f"{key} can only grow: source {source_config[key]}, target {target_config[key]}")
    if sorted(source_scales) != sorted(target_scales):
        raise ValueError(f"scales must stay {sorted(source_scales)}, got {sorted(target_scales)}")


def expand_network(source: MultiScaleEDSR, source_config: Mapping[str, Any], *, num_features: int,
                   num_blocks: int, preprocess_blocks: int, seed: int = 0) -> MultiScaleEDSR:
    """A `MultiScaleEDSR` of `num_features` x `num_blocks` (and `preprocess_blocks` per scale)
    that computes what `source` computes, for the scales of `source`; fresh parts drawn with
    `seed`."""
    config = {key: source_config[key] for key in ARCHITECTURE_KEYS}
    target_config = {**config, "num_features": int(num_features), "num_blocks": int(num_blocks),
                     "preprocess_blocks": int(preprocess_blocks)}
    check_compatible(config, target_config, source.scales, source.scales)
    torch.manual_seed(seed)
    target = MultiScaleEDSR(scales=source.scales, **target_config)
    target.load_state_dict(expand_state(source.state_dict(), config, target), strict=True)
    return target


def load_source(weights_path: Path) -> tuple[MultiScaleEDSR, dict[str, Any]]:
    """The multi-scale network stored at `weights_path` (safetensors + card of the same stem)
    and its architecture config (float32)."""
    from safetensors.torch import load_file

    weights_path = Path(weights_path)
    card_path = weights_path.with_suffix(".json")
    if not card_path.is_file():
        raise ValueError(f"{weights_path}: model card {card_path.name} is missing")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    config = card.get("config") or {}
    missing = [key for key in ARCHITECTURE_KEYS if key not in config]
    if missing:
        raise ValueError(f"{card_path}: config lacks {missing}")
    network = MultiScaleEDSR(scales=card["scales"], **{key: config[key] for key in ARCHITECTURE_KEYS})
    state = load_file(str(weights_path))
    network.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return network.eval(), {key: config[key] for key in ARCHITECTURE_KEYS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m MedSRLib.training.expand_multiscale",
        description="Expand a multi-scale EDSR (safetensors + card) into a wider/deeper one that "
                    "computes the same function; writes a safetensors state dict for init_from.")
    parser.add_argument("source", type=Path, help="source .safetensors (its .json card beside it)")
    parser.add_argument("output", type=Path, help="output .safetensors")
    parser.add_argument("--num-features", type=int, required=True)
    parser.add_argument("--num-blocks", type=int, required=True)
    parser.add_argument("--preprocess-blocks", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh (non-copied) weights")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    source, config = load_source(args.source)
    target = expand_network(source, config, num_features=args.num_features, num_blocks=args.num_blocks,
                            preprocess_blocks=args.preprocess_blocks, seed=args.seed)
    probe = torch.rand(1, int(config["in_channels"]), 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        worst = max(float((target(probe, s) - source(probe, s)).abs().max()) for s in source.scales)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in target.state_dict().items()}, str(args.output))
    print(json.dumps({"output": str(args.output), "parameters": sum(p.numel() for p in target.parameters()),
                      "max_abs_difference_on_probe": worst}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
