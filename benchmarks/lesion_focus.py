"""Lesion-focused SR on the TEST lesion patients: finder coverage, quality inside the lesion mask
and time, per volume, of `upscale(roi="auto")` against the plain default run.

Volumes: sarcoma STS_012 and STS_014 (CT, T1 MR; *_mask) and BraTS pat0006 (T1c: labels 1, 3, 4;
FLAIR: labels 1-4), plus the extra public lesion volumes of the finder's test patients
(`MedSRLib.training.localiser.EXTRA_LESIONS`; skipped when their folder is absent), degraded in-plane by x2 and x4 (`MedSRLib.evaluation.lesion_focus`, the
protocol). Per volume: lesion slices the finder's ROIs cover perfectly / acceptably (>= 95 %),
ROI share of the volume, PSNR (SSIM) gain over bicubic inside the mask of the plain default and
of roi="auto", and the wall time roi="auto" / plain (median of interleaved rounds after a warm-up,
same process, 1 torch thread).

    OMP_NUM_THREADS=1 python benchmarks/lesion_focus.py --data-root ../shared/data \\
        --out benchmarks/results/lesion_focus/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedSRLib.evaluation import lesion_focus as protocol  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import cpu_flags  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--extra", type=Path, default=None,
                        help="folder of the extra lesion volumes (default: $MEDSR_EXTRA_LESIONS "
                             "or ../extra_data/lesions; their test patients are used)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lesion_focus/results"))
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--volumes", nargs="*", default=None, help="substrings of volume names")
    parser.add_argument("--max-extra", type=int, default=None,
                        help="at most this many extra volumes (default: every usable one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    volumes = list(protocol.TEST_VOLUMES) + protocol.extra_volumes(args.extra)[:args.max_extra]
    rows = []
    for volume in volumes:
        if args.volumes and not any(s in volume.name for s in args.volumes):
            continue
        hr, mask = protocol.read_lesion_volume(args.data_root, volume)
        for factor in args.scales:
            row = protocol.benchmark_case(volume, factor, hr, mask, args.rounds)
            rows.append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)  # each case saved as it ends
            args.out.with_suffix(".partial.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
            print(protocol.markdown_table([row])[2], flush=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/lesion_focus.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    flags = cpu_flags()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "cpu_flags": flags, "torch_threads": 1, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    roi_model = sorted({f"{r['roi_model']} (self-ensemble x{r['roi_self_ensemble']})" for r in rows})
    lines = ["# Lesion-focused SR on the test lesion patients", "", f"Command: `{command}`", "",
             f"CPU flags: {flags}; 1 torch thread. ROI model: {', '.join(roi_model)}.", "",
             "Gains are PSNR (SSIM) over bicubic inside the lesion mask; time is the wall time of "
             "roi=\"auto\" over the plain default run (medians, interleaved, same process).", "",
             *protocol.markdown_table(rows)]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
