"""Extra MR training volumes for the through-plane network, from a local git snapshot of
oncoray/mirp's test data (public TCIA series; nothing is downloaded).

    python benchmarks/mr_data/prepare_mr_data.py --mirp <bare git dir of oncoray/mirp> \
        --out /work/extra_data/mr_more

Writes one NRRD per series (the source voxel type, geometry as read by MedSRLib) and
`<out>/MANIFEST.json`, the list that `python -m MedSRLib.through_plane.train --extra-train
<out>` reads (path, modality, source, licence of each volume). Series of patients whose other
series already train MedSR only; none of the reserved evaluation patients.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lesion_data"))
from prepare_lesion_data import git_blob, resolve_commit  # noqa: E402

import MedSRLib  # noqa: E402

MIRP_COMMIT = "d8a6a7264a4d0ccb1f88cc670e0b6d047235909f"
CMB_CRC = "CC BY 4.0 (TCIA CMB-CRC via oncoray/mirp)"
BREAST = "CC BY 3.0 (TCIA Breast-MRI-NACT-Pilot via oncoray/mirp)"
STS = "CC BY 3.0 (TCIA Soft-tissue-Sarcoma via oncoray/mirp)"
#: (name, folder in mirp, file-name prefix of the series (a folder may hold several phases),
#: what it is, licence)
SERIES = (
    ("cmb-crc-msb-06489-t2-scan2", "test/data/adc_images_mr/SCAN_002/t2_image", "",
     "axial T2 of the pelvis, 1.5 T (the patient of mr/pelvis-t2-dicom, another series)", CMB_CRC),
    ("breast-ucsf-br-06-pre", "test/data/dce_images_mr/UCSF-BR-06/image_dce_3dfgre_orig", "1-",
     "sagittal 3-D FGRE breast MR, the first (pre-contrast) phase", BREAST),
    ("breast-ucsf-br-08-pre", "test/data/dce_images_mr/UCSF-BR-08/image_dce_3dfgre_orig", "1-",
     "sagittal 3-D FGRE breast MR, the first (pre-contrast) phase", BREAST),
    ("sts-001-t2", "test/data/sts_images_raw/STS_001/MR_T2", "",
     "axial fat-saturated T2 of sarcoma patient STS_001 (a training patient)", STS),
)


def list_files(git_dir: Path, commit: str, folder: str) -> list[str]:
    """Paths of the files under `folder` at `commit` of the bare repository `git_dir`."""
    listing = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "-r", "--name-only",
                              commit, folder + "/"], check=True, capture_output=True, text=True)
    return [line for line in listing.stdout.splitlines() if line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirp", type=Path, required=True, help="bare git dir of oncoray/mirp")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    commit = resolve_commit(args.mirp, MIRP_COMMIT)
    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, folder, prefix, what, licence in SERIES:
        with tempfile.TemporaryDirectory() as tmp:
            files = [f for f in list_files(args.mirp, commit, folder)
                     if Path(f).name.startswith(prefix) and f.endswith(".dcm")]
            for f in files:
                (Path(tmp) / Path(f).name).write_bytes(git_blob(args.mirp, commit, f))
            image = MedSRLib.read_volume(tmp)
        sitk.WriteImage(image, str(args.out / f"{name}.nrrd"), True)
        entries.append({"path": f"{name}.nrrd", "modality": "MR", "what": what, "licence": licence,
                        "source": f"oncoray/mirp@{commit[:8]}:{folder} ({len(files)} files)",
                        "size": list(image.GetSize()),
                        "spacing_mm": [round(s, 4) for s in image.GetSpacing()]})
        print(f"{name}: {image.GetSize()} {[round(s, 3) for s in image.GetSpacing()]}")
    (args.out / "MANIFEST.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
