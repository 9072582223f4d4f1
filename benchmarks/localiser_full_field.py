"""ROIs the lesion localiser finds on full-field scans that have no lesion mask (not scorable).

For each scan: how many ROIs the first segmenter alone and the shipped ensemble return, the
share of the volume inside them (no margin) and the top confidences: what a user sees on a
whole-body, pelvis, brain or head scan, unlike the tight tumour crops of the coverage benchmark.

    python benchmarks/localiser_full_field.py --data-root ../shared/data [--threads 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedSRLib.io import volumes as io  # noqa: E402
from MedSRLib.roi import localiser as loc, boxes as roi_boxes
from localiser_time import compared_localisers  # noqa: E402  (this folder is on sys.path)

SCANS = ("ct/crlm-ct-1004-dicom", "mr/pelvis-t2-dicom", "ct/totalseg-example-ct.nii.gz",
         "mr/brain-t1-gd-skullstripped.nii.gz", "ct/head-cta-avm.nii.gz")


def main(argv: list[str] | None = None) -> int:
    args, localisers = compared_localisers(__doc__.splitlines()[0], argv)
    for relative in SCANS:
        image = io.read_volume(args.data_root / relative)
        parts = []
        for name, localiser in localisers.items():
            found = loc.find_regions(image, localiser=localiser)
            share = roi_boxes.union_mask([r.box for r in found.regions],
                                         image.GetSize()[::-1]).mean()
            parts.append(f"{name}: {len(found.regions)} ROI(s), {share:.1%} of the volume, "
                         f"confidence {[round(r.confidence, 2) for r in found.regions[:4]]}")
        print(f"{relative} {image.GetSize()}: " + " | ".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
