"""Train the shipped through-plane network (`python -m MedSRLib.through_plane.train`).

One CPU thread by default, a wall-clock budget, a checkpoint and a JSON-lines log in `--out`;
the exported weights (safetensors) and card are those of the best validation checkpoint
(mean PSNR gain over cubic, through-plane x3 and x5 box, on the validation volumes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..models import registry as zoo
from . import data
from ..models import through_plane_io as model_io
from ..models.networks.through_plane import ThroughPlaneEDSR, ThroughPlaneNet, run_planes


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 10.0 * np.log10(1.0 / max(mse, 1e-12))


def validation_planes(root: Path, per_axis: int = 4) -> list[tuple[str, np.ndarray]]:
    """`per_axis` coronal and sagittal planes (rows = z) each, evenly spread over the middle
    40 % of each validation volume."""
    planes = []
    for modality, rel in data.VALIDATION_SOURCES:
        volume, _ = data.load_units(root / rel)
        for axis in (1, 2):
            n = volume.shape[axis]
            for index in np.unique(np.linspace(n * 0.3, n * 0.7, per_axis).astype(int)):
                planes.append((modality, np.ascontiguousarray(np.take(volume, index, axis=axis))))
    return planes


def validate(net: ThroughPlaneNet, planes: list[tuple[str, np.ndarray]]) -> dict:
    """Mean PSNR (unit intensities) of cubic and network, per modality and factor (3, 5 box)."""
    net.eval()
    scores: dict[str, list[float]] = {}
    with torch.inference_mode():
        for modality, plane in planes:
            for factor in (3.0, 5.0):
                d = data.Degradation(factor, 1.0, "box")
                up, phase, hr = data.make_pair(plane, d)
                n_valid = int(np.floor((plane.shape[0] - 0.5 - (factor / 2 - 0.5)) / factor)) + 1
                last_row = int((n_valid - 1) * factor + factor / 2)  # rows past the last centre extrapolate
                thick = data.profile.degradation_matrix(plane.shape[0], factor) @ plane.astype(np.float64)
                positions = torch.from_numpy((np.arange(plane.shape[0]) - (factor / 2 - 0.5)) / factor)
                y = run_planes(net, torch.from_numpy(thick.astype(np.float32))[None, None],
                               positions, factor, 1.0)[0, 0].numpy()
                rows = slice(0, max(last_row, 1))
                key = f"{modality}_x{int(factor)}"
                scores.setdefault(key + "_cubic", []).append(psnr(up[rows], hr[rows]))
                scores.setdefault(key + "_net", []).append(psnr(y[rows], hr[rows]))
    net.train()
    result = {k: float(np.mean(v)) for k, v in scores.items()}
    gains = [result[k[:-6] + "_net"] - result[k] for k in result if k.endswith("_cubic")]
    result["mean_gain_db"] = float(np.mean(gains))
    return result


def compare(weights: list[str], root: Path, per_axis: int) -> None:
    """Print each weights file's validation scores on `per_axis` planes per orientation (more
    than the training run's 4: a steadier choice between finished runs)."""
    planes = validation_planes(root, per_axis)
    print(f"{len(planes)} validation planes", flush=True)
    for path in weights:
        scores = validate(model_io.load(path), planes)
        per_key = ", ".join(f"{k[:-4]} {scores[k] - scores[k[:-4] + '_cubic']:+.3f}"
                            for k in sorted(scores) if k.endswith("_net"))
        print(f"{path}: mean gain over cubic {scores['mean_gain_db']:+.3f} dB ({per_key})", flush=True)


def average(weights: list[str], root: Path, export: Path, recipe: str) -> None:
    """Export the uniform average of the weights files (one architecture; a common start and
    runs that continued it) with a card: the first file's without its one-run fields, every
    member's training data, the members with their CPU time, and the validation scores of the
    average (the training run's planes)."""
    from safetensors.torch import load_file

    cards = [zoo.read_card(Path(path)) for path in weights]
    states = [load_file(path) for path in weights]
    if any(state.keys() != states[0].keys() or any(state[k].shape != states[0][k].shape for k in state)
           for state in states[1:]):
        raise ValueError(f"{weights}: the files hold different architectures; nothing to average")
    net = model_io.trainable_copy(model_io.load(weights[0]))  # the loaded one is shared
    net.load_state_dict({k: sum(state[k].float() for state in states) / len(states) for k in states[0]})
    totals = [float(c.get("cpu_seconds_total") or c.get("cpu_seconds") or 0.0) for c in cards]
    start = int(np.argmin(totals))  # the common start: the others continued it
    continued = sum(float(c.get("cpu_seconds") or 0.0) for n, c in enumerate(cards) if n != start)
    training_data = {entry["file"]: entry for c in cards for entry in c.get("training_data", [])}
    one_run = ("steps", "best_step", "selection", "recipe_note", "cpu_note", "wall_seconds",
               "init_weights")
    card = {**{k: v for k, v in cards[0].items() if k not in one_run},
            "training_data": list(training_data.values()),
            "steps": f"average of {len(weights)} networks (averaged_from)",
            "averaged_from": [{"file": str(path), "steps": c.get("steps"), "best_step": c.get("best_step"),
                               "cpu_seconds": c.get("cpu_seconds"), "recipe": c.get("recipe")}
                              for path, c in zip(weights, cards)],
            "cpu_seconds": round(continued, 1),
            "cpu_seconds_total": round(totals[start] + continued, 1),
            "licence": sorted({lic for c in cards for lic in c.get("licence", [])}),
            "metrics": {"validation": validate(net, validation_planes(root))},
            "recipe": recipe}
    zoo.save_weights(net, export, card)
    print(f"exported {export}: the average of {len(weights)} files", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=os.environ.get("MEDSR_DATA_ROOT", "../shared/data"))
    parser.add_argument("--out", default="runs/through_plane")
    parser.add_argument("--minutes", type=float, default=38.0)
    parser.add_argument("--max-steps", type=int, default=100000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--val-every", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=("thick", "cubic"), default="thick",
                        help="thick: ThroughPlaneEDSR (trunk on the thick grid); cubic: ThroughPlaneNet")
    parser.add_argument("--init-trunk", default=None, help="edsr_lite safetensors for the trunk (thick)")
    parser.add_argument("--init-weights", default=None,
                        help="through_plane_net safetensors to start from (thick; tensors of "
                             "added refine blocks keep their identity start)")
    parser.add_argument("--refine-blocks", type=int, default=0,
                        help="residual blocks on the output grid (thick)")
    parser.add_argument("--export", default=None, help="weights path of the export (default OUT/through_plane_net.safetensors)")
    parser.add_argument("--extra-train", type=Path, action="append", default=[], metavar="FOLDER",
                        help="more training volumes: a folder with a MANIFEST.json listing each "
                             "volume's path, modality and licence (e.g. made by "
                             "benchmarks/mr_data/prepare_mr_data.py); repeatable")
    parser.add_argument("--compare", nargs="+", default=None, metavar="WEIGHTS",
                        help="no training: score these through-plane weights on the validation volumes")
    parser.add_argument("--average", nargs="+", default=None, metavar="WEIGHTS",
                        help="no training: export the uniform average of these through-plane "
                             "weights (a start and runs that continued it) to --export")
    parser.add_argument("--planes-per-axis", type=int, default=16,
                        help="with --compare: validation planes per orientation and volume")
    args = parser.parse_args(argv)
    recipe = "python -m MedSRLib.through_plane.train " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    if args.compare:
        compare(args.compare, Path(args.data_root), args.planes_per_axis)
        return
    if args.average:
        export = Path(args.export or Path(args.out) / f"{model_io.MODEL_NAME}.safetensors")
        average(args.average, Path(args.data_root), export, recipe)
        return
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    root, out = Path(args.data_root), Path(args.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    log = open(out / "metrics.jsonl", "a", encoding="utf-8")
    started, cpu_started = time.time(), time.process_time()

    planes, weights, used = [], [], []
    per_modality: dict[str, list[np.ndarray]] = {"CT": [], "MR": []}
    extra = data.extra_sources(args.extra_train)
    for modality, path, entry in [(m, root / rel, {"file": rel}) for m, rel in data.TRAIN_SOURCES] + extra:
        volume, spacing = data.load_units(path)
        found = data.square_pixel_planes(volume, spacing)
        per_modality[modality] += found
        used.append({**entry, "modality": modality, "planes": len(found)})
    for modality, found in per_modality.items():  # each modality half of the draws
        planes += found
        weights += [0.5 / len(found)] * len(found)
    weights = np.asarray(weights) / np.sum(weights)
    val_planes = validation_planes(root)
    print(f"{len(planes)} training planes, {len(val_planes)} validation planes", flush=True)

    if args.arch == "thick":
        net = ThroughPlaneEDSR(args.features, args.blocks, refine_blocks=args.refine_blocks)
        if args.init_trunk:
            net.load_edsr_trunk(args.init_trunk)
        if args.init_weights:
            net.load_grown(args.init_weights)
    else:
        net = ThroughPlaneNet(args.features, args.blocks)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    best, best_step, step = -1e9, 0, 0
    last = out / "checkpoints" / "last.pt"
    if last.is_file():
        state = torch.load(last, weights_only=True)
        net.load_state_dict(state["net"]); optimizer.load_state_dict(state["optimizer"])
        step, best, best_step = state["step"], state["best"], state["best_step"]
        cpu_started -= state["cpu_seconds"]
    budget = args.minutes * 60.0
    while step < args.max_steps and time.time() - started < budget:
        progress = (time.time() - started) / budget
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (0.2 if progress > 0.75 else 1.0)
        if args.arch == "thick":
            tb = data.sample_thick_batch(planes, weights, args.batch, args.patch, rng)
            prediction = net(torch.from_numpy(tb.thick), torch.from_numpy(tb.positions),
                             tb.degradation.factor, tb.degradation.thickness_ratio)
            rows = slice(tb.margin, tb.target.shape[2] - tb.margin)
            loss = torch.nn.functional.l1_loss(prediction[:, :, rows], torch.from_numpy(tb.target[:, :, rows]))
        else:
            x, y = data.sample_batch(planes, weights, args.batch, args.patch, rng)
            prediction = net(torch.from_numpy(x))
            loss = torch.nn.functional.l1_loss(prediction, torch.from_numpy(y))
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        step += 1
        if step % 25 == 0:
            log.write(json.dumps({"step": step, "loss": float(loss.detach()), "elapsed_s": time.time() - started}) + "\n"); log.flush()
        if step % args.val_every == 0:
            scores = validate(net, val_planes)
            if scores["mean_gain_db"] > best:
                best, best_step = scores["mean_gain_db"], step
                torch.save(net.state_dict(), out / "checkpoints" / "best.pt")
            log.write(json.dumps({"step": step, "validation": scores, "best_step": best_step}) + "\n"); log.flush()
            print(f"step {step} val gain {scores['mean_gain_db']:+.3f} dB (best {best:+.3f} @ {best_step})", flush=True)
            torch.save({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "best": best, "best_step": best_step,
                        "cpu_seconds": time.process_time() - cpu_started}, last)
    scores = validate(net, val_planes)
    if scores["mean_gain_db"] > best or not (out / "checkpoints" / "best.pt").is_file():
        best, best_step = scores["mean_gain_db"], step
        torch.save(net.state_dict(), out / "checkpoints" / "best.pt")
    net.load_state_dict(torch.load(out / "checkpoints" / "best.pt", weights_only=True))
    final = validate(net, val_planes)
    init_card = zoo.read_card(Path(args.init_weights)) if args.init_weights else {}
    init_cpu_seconds = float(init_card.get("cpu_seconds_total") or init_card.get("cpu_seconds") or 0.0)
    card = {
        "model": model_io.MODEL_NAME, "architecture": net.__class__.__name__,
        "config": {"num_features": args.features, "num_blocks": args.blocks,
                   **({"refine_blocks": args.refine_blocks} if args.refine_blocks else {})},
        "init_trunk": args.init_trunk, "init_weights": args.init_weights,
        "task": ("through-plane SR of thick planes (rows along the slice axis) to any factor 1.5-8: "
                 "trunk on the thick grid, features cubic-resampled, residual over cubic"),
        "factors": list(data.FACTOR_RANGE), "profiles": ["box", "box with gap", "gaussian"],
        "modality": ["CT", "MR"], "training_data": used,
        "validation_data": [rel for _, rel in data.VALIDATION_SOURCES],
        "test_data_never_used": [rel for _, rel in data.TEST_SOURCES],
        "licence": sorted(set(data.LICENCES.values()) | {e["licence"] for _, _, e in extra}),
        "steps": step, "best_step": best_step, "batch": args.batch, "patch": args.patch,
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        # the whole lineage: this run plus the run(s) behind --init-weights
        "cpu_seconds_total": round(time.process_time() - cpu_started + init_cpu_seconds, 1),
        "wall_seconds": round(time.time() - started, 1), "threads": args.threads,
        "metrics": {"validation": final},
        "recipe": recipe,
        "init_trunk_training_data": ("edsr_lite x4's own card: its training set includes the axial "
                                     "slices of ct/head-cta-avm (in-plane x4 bicubic), the CT test "
                                     "volume of the through-plane benchmark"
                                     if args.init_trunk or args.init_weights else None),
        "parameter_count": zoo.parameter_count(net),
    }
    export = Path(args.export) if args.export else out / f"{model_io.MODEL_NAME}.safetensors"
    zoo.save_weights(net, export, card)
    print(f"exported {export}: validation {final}", flush=True)


if __name__ == "__main__":
    main()
