"""Re-create the extra lesion-masked volumes (image + binary lesion mask on one grid) from local
git snapshots of the public repositories that hold them. Nothing is downloaded.

    python benchmarks/lesion_data/prepare_lesion_data.py \
        --pyradiomics /work/.mirror/AIM-Harvard+pyradiomics/repo \
        --ct-slicing /work/.mirror/PabloLION+ct-slicing/repo \
        --concept-to-clinic /work/.mirror/drivendataorg+concept-to-clinic/repo/.git \
        --out /work/extra_data/lesions

Writes `<out>/<source>/<case>/image.nii.gz` (original voxel type) and `mask.nii.gz` (uint8, 0/1)
for each case, and `<out>/MANIFEST.md`. A snapshot may be omitted; its cases are then skipped
(the whole-slice LIDC slabs need both ct-slicing and concept-to-clinic). Volumes of the
reserved test patients are refused, wherever they come from.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# Patient IDs that no calibration, selection or test may touch: the project's one list.
from MedSRLib.training.localiser import RESERVED_PATIENTS as RESERVED_PATIENT_IDS  # noqa: E402

PYRADIOMICS_COMMIT = "8ed579383b44806651c463d5e691f3b2b57522ab"
CT_SLICING_COMMIT = "07d32abf6d8b8f1c61a0dccb685affa29b1512af"
CONCEPT_TO_CLINIC_COMMIT = "3a2cea3aa54d9c1219f8516b91f61de583e79ddc"
# concept-to-clinic `tests/assets/test_image_data/small/<patient>/<study>/<series>/`: 512x512 DICOM
# slices of LIDC-IDRI scans around a nodule; ct-slicing `data/CT/nodule_mask/` holds the
# whole-scan nodule masks of the same series.
LIDC_SLAB_PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0003")
LIDC_MIN_DIAMETER_MM = 20.0
GEOMETRY_TOLERANCE_MM = 1e-4


@dataclass(frozen=True)
class Case:
    """One lesion-masked volume and where it came from."""

    source: str
    case: str
    repo: str
    commit: str
    image_path: str
    mask_path: str
    patient_id: str
    collection: str
    modality: str
    lesion: str
    licence: str
    role: str  # "test or calibration" or "calibration only" (origin not documented)


def git_blob(git_dir: Path, commit: str, path: str) -> bytes:
    """Return the bytes of `path` at `commit` in the bare repository `git_dir`."""
    return subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "blob", f"{commit}:{path}"],
                          check=True, capture_output=True).stdout


def resolve_commit(git_dir: Path, pinned: str) -> str:
    """The pinned commit if the snapshot has it, else the snapshot's HEAD (with a warning)."""
    probe = subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "-e", f"{pinned}^{{commit}}"],
                           capture_output=True)
    if probe.returncode == 0:
        return pinned
    head = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    print(f"warning: {git_dir} lacks commit {pinned}; using HEAD {head}", file=sys.stderr)
    return head


def read_blob_image(git_dir: Path, commit: str, path: str, workdir: Path) -> sitk.Image:
    """Read an ITK-readable file (NRRD, NIfTI) stored at `commit:path`."""
    local = workdir / path.replace("/", "__")
    local.write_bytes(git_blob(git_dir, commit, path))
    return sitk.ReadImage(str(local))


def check_same_grid(image: sitk.Image, mask: sitk.Image, name: str) -> None:
    """Raise ValueError unless size, spacing, origin and direction agree."""
    if image.GetSize() != mask.GetSize():
        raise ValueError(f"{name}: mask size {mask.GetSize()} != image size {image.GetSize()}")
    for what, a, b in (("spacing", image.GetSpacing(), mask.GetSpacing()),
                       ("origin", image.GetOrigin(), mask.GetOrigin()),
                       ("direction", image.GetDirection(), mask.GetDirection())):
        if not np.allclose(a, b, atol=GEOMETRY_TOLERANCE_MM):
            raise ValueError(f"{name}: mask {what} {b} != image {what} {a}")


def write_pair(folder: Path, image: sitk.Image, mask: sitk.Image) -> tuple[str, str]:
    """Write `folder`/image.nii.gz and mask.nii.gz (compressed); return the image's size and
    spacing as the MANIFEST writes them ("512x512x16", "0.703x0.703x2.5")."""
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / "image.nii.gz"), useCompression=True)
    sitk.WriteImage(mask, str(folder / "mask.nii.gz"), useCompression=True)
    return ("x".join(str(s) for s in image.GetSize()),
            "x".join(f"{s:.3g}" for s in image.GetSpacing()))


def write_case(case: Case, git_dir: Path, out: Path, workdir: Path) -> str:
    """Write one case's image and uint8 mask; return its manifest table row."""
    if case.patient_id in RESERVED_PATIENT_IDS:
        raise ValueError(f"{case.case}: patient {case.patient_id} is reserved")
    image = read_blob_image(git_dir, case.commit, case.image_path, workdir)
    mask = read_blob_image(git_dir, case.commit, case.mask_path, workdir)
    check_same_grid(image, mask, case.case)
    labels = sitk.GetArrayFromImage(mask)
    binary = sitk.GetImageFromArray((labels > 0).astype(np.uint8))
    binary.CopyInformation(image)
    lesion_voxels = int((labels > 0).sum())
    if lesion_voxels == 0:
        raise ValueError(f"{case.case}: empty lesion mask")
    size, spacing = write_pair(out / case.source / case.case, image, binary)
    return (f"| {case.source}/{case.case} | {case.repo} `{case.image_path}` @ {case.commit[:10]} | "
            f"{case.patient_id} ({case.collection}) | {case.modality} | {case.lesion} | {size}, "
            f"{spacing} mm, {lesion_voxels} lesion vx | {case.licence} | {case.role} |")


def pyradiomics_cases(commit: str) -> list[Case]:
    """brain1 (TCGA-02-0003, named so in the commit that renamed it), brain2 and breast1."""
    repo = "AIM-Harvard/pyradiomics"
    return [
        Case("pyradiomics", "brain1", repo, commit, "data/brain1_image.nrrd", "data/brain1_label.nrrd",
             "TCGA-02-0003", "TCIA TCGA-GBM", "MR T1 post-Gd", "glioblastoma",
             "CC BY 3.0 (TCIA TCGA-GBM)", "test or calibration"),
        Case("pyradiomics", "brain2", repo, commit, "data/brain2_image.nrrd", "data/brain2_label.nrrd",
             "not documented", "copied from radiomics_platform", "MR T1 post-Gd", "brain tumour",
             "BSD-3 (repository); origin not documented", "calibration only"),
        Case("pyradiomics", "breast1", repo, commit, "data/breast1_image.nrrd", "data/breast1_label.nrrd",
             "not documented (TestPatient1)", "not documented", "MR breast (pre-contrast)",
             "breast lesion", "BSD-3 (repository); origin not documented", "calibration only"),
    ]


def xlsx_rows(data: bytes) -> list[dict[str, str]]:
    """Rows of the first sheet of an .xlsx file as dicts keyed by the header row."""
    ns = {"a": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(io.BytesIO(data)) as book:
        shared = ["".join(t.text or "" for t in si.iter(f"{{{ns['a']}}}t"))
                  for si in ET.fromstring(book.read("xl/sharedStrings.xml")).findall("a:si", ns)]
        sheet = ET.fromstring(book.read("xl/worksheets/sheet1.xml"))
    table = []
    for row in sheet.find("a:sheetData", ns).findall("a:row", ns):
        values = []
        for cell in row.findall("a:c", ns):
            v = cell.find("a:v", ns)
            text = "" if v is None else v.text
            values.append(shared[int(text)] if cell.get("t") == "s" and text else text)
        table.append(values)
    return [dict(zip(table[0], r)) for r in table[1:]]


def lidc_voi_cases(git_dir: Path, commit: str, min_diameter_mm: float) -> list[Case]:
    """The largest nodule VOI of each LIDC-IDRI patient whose max-voting diameter is at least
    `min_diameter_mm`, from PabloLION/ct-slicing `data/VOIs` (crops of the original CT)."""
    listing = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "--name-only", commit,
                              "data/VOIs/image/"], check=True, capture_output=True, text=True).stdout
    present = {Path(p).name for p in listing.split()}
    rows = xlsx_rows(git_blob(git_dir, commit, "data/MetadatabyNoduleMaxVoting.xlsx"))
    best: dict[str, tuple[float, dict[str, str]]] = {}
    for row in rows:
        name = f"{row['patient_id']}_R_{row['nodule_id']}.nii.gz"
        diameter = float(row["diameter_mm"])
        if name not in present or diameter < min_diameter_mm or row["patient_id"] in RESERVED_PATIENT_IDS:
            continue
        if row["patient_id"] not in best or diameter > best[row["patient_id"]][0]:
            best[row["patient_id"]] = (diameter, row)
    cases = []
    for patient in sorted(best):
        diameter, row = best[patient]
        name = f"{patient}_R_{row['nodule_id']}"
        cases.append(Case("lidc-voi", name, "PabloLION/ct-slicing", commit,
                          f"data/VOIs/image/{name}.nii.gz", f"data/VOIs/nodule_mask/{name}.nii.gz",
                          patient, "TCIA LIDC-IDRI", "CT (chest, nodule VOI crop)",
                          f"lung nodule, {diameter:.0f} mm, {row['Diagnosis'].lower()}",
                          "CC BY 3.0 (TCIA LIDC-IDRI)", "test or calibration"))
    return cases


def lidc_slab_row(patient: str, c2c_dir: Path, c2c_commit: str, slicing_dir: Path,
                  slicing_commit: str, out: Path, workdir: Path) -> str:
    """Write the 512x512 DICOM slab of `patient` (concept-to-clinic) with the union of its
    ct-slicing whole-scan nodule masks resampled onto the slab (nearest neighbour; the grids
    share spacing and in-plane origin); return its manifest row, which names any nodule that
    the slab's first or last slice cuts."""
    if patient in RESERVED_PATIENT_IDS:
        raise ValueError(f"patient {patient} is reserved")
    base = "tests/assets/test_image_data/small"
    files = subprocess.run(["git", "--git-dir", str(c2c_dir), "ls-tree", "-r", "--name-only", c2c_commit,
                            f"{base}/{patient}/"], check=True, capture_output=True, text=True).stdout.split()
    series_dir = workdir / patient
    series_dir.mkdir()
    for path in files:
        if path.endswith(".dcm"):
            (series_dir / Path(path).name).write_bytes(git_blob(c2c_dir, c2c_commit, path))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    image = reader.Execute()
    hu = sitk.GetArrayViewFromImage(image)
    if hu.min() < -32768 or hu.max() > 32767:
        raise ValueError(f"{patient}: HU range {hu.min()}..{hu.max()} does not fit int16")
    image = sitk.Cast(image, sitk.sitkInt16)
    masks = subprocess.run(["git", "--git-dir", str(slicing_dir), "ls-tree", "--name-only", slicing_commit,
                            "data/CT/nodule_mask/"], check=True, capture_output=True, text=True).stdout.split()
    union = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
    notes = []
    for path in (m for m in masks if Path(m).name.startswith(patient + "_R_")):
        whole = read_blob_image(slicing_dir, slicing_commit, path, workdir)
        on_slab = sitk.GetArrayFromImage(sitk.Resample(whole, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
        whole_slices = int((sitk.GetArrayViewFromImage(whole) > 0).any(axis=(1, 2)).sum())
        slab_slices = int(on_slab.any(axis=(1, 2)).sum())
        if slab_slices and slab_slices < whole_slices:
            notes.append(f"{Path(path).name[:-7]} cut by the slab end ({slab_slices} of {whole_slices} slices)")
        union |= on_slab.astype(np.uint8)
    if not union.any():
        raise ValueError(f"{patient}: no nodule on the slab")
    mask = sitk.GetImageFromArray(union)
    mask.CopyInformation(image)
    size, spacing = write_pair(out / "lidc-slab" / patient, image, mask)
    return (f"| lidc-slab/{patient} | drivendataorg/concept-to-clinic `{base}/{patient}/` @ {c2c_commit[:10]} "
            f"+ PabloLION/ct-slicing `data/CT/nodule_mask/{patient}_R_*` @ {slicing_commit[:10]} | "
            f"{patient} (TCIA LIDC-IDRI) | CT chest, whole 512x512 slices | lung nodule(s), "
            f"same patient as lidc-voi/{patient}_R_*{'; ' + '; '.join(notes) if notes else ''} | {size}, {spacing} mm, {int(union.sum())} lesion vx | "
            f"CC BY 3.0 (TCIA LIDC-IDRI) | test or calibration (keep in the split of lidc-voi/{patient}_R_*) |")


HEADER = """# Extra lesion-masked volumes for the lesion finder

Made by `benchmarks/lesion_data/prepare_lesion_data.py` (MedSR repository) from local git
snapshots; `image.nii.gz` keeps the source voxel type (CT in HU), `mask.nii.gz` is uint8 0/1 on
the image's grid (size, spacing, origin and direction checked equal before writing).
Reserved test patients (LIDC-IDRI-0314, LUNG1-001, CRLM-CT-1006, STS_015/018/019/022/023/024,
BraTS 2013 pat0001/0002, VS-SEG-001) are refused by the script; none is below.
"calibration only": the source does not document the patient, so it cannot be proven disjoint
from the reserved set; do not report test results on it. The two lidc-slab patients are also
lidc-voi cases (same nodule): keep each patient's cases in one split.

| case | source (repo, path, commit) | patient (collection) | modality | lesion | size, spacing | licence (data) | use |
|---|---|---|---|---|---|---|---|
"""


NOT_USED = """
## Looked at, not used

- pyradiomics lung1/lung2: images absent from the snapshot (over 4 MiB); origin not documented
  (could be LUNG1-001 or an LIDC scan).
- oncoray/mirp: CRLM masks absent (over 4 MiB); CRLM-CT-1006, LUNG1-001 and DICOM4QI data_1
  (LIDC-IDRI-0314) are reserved; UCSF-BR-06/08 SEGs mask breast tissue, not the lesion;
  QIN-HEADNECK-01-0139 SEG is on PET only; IBSI CT phantom (PAT1, NSCLC) is CC BY-NC and its
  patient cannot be told apart from LUNG1-001.
- QIICR/dcmqi: organ masks on 3 CT slices, no lesion. Git LFS pointers only: DanielNobbe/ignition
  (MSD liver crops), danielabler/glimslib (TCGA-06-0190 T1-Gd + label), concept-to-clinic "full".
- A bundled HCC-TACE-Seg HCC_048 CT (liver) found elsewhere has no expert lesion mask.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyradiomics", type=Path, help="bare git dir of AIM-Harvard/pyradiomics")
    parser.add_argument("--ct-slicing", type=Path, help="bare git dir of PabloLION/ct-slicing")
    parser.add_argument("--concept-to-clinic", type=Path,
                        help="bare git dir of drivendataorg/concept-to-clinic")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lidc-min-diameter-mm", type=float, default=LIDC_MIN_DIAMETER_MM)
    args = parser.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.pyradiomics:
            commit = resolve_commit(args.pyradiomics, PYRADIOMICS_COMMIT)
            rows += [write_case(c, args.pyradiomics, args.out, workdir) for c in pyradiomics_cases(commit)]
        if args.ct_slicing:
            commit = resolve_commit(args.ct_slicing, CT_SLICING_COMMIT)
            for case in lidc_voi_cases(args.ct_slicing, commit, args.lidc_min_diameter_mm):
                rows.append(write_case(case, args.ct_slicing, args.out, workdir))
            if args.concept_to_clinic:
                c2c_commit = resolve_commit(args.concept_to_clinic, CONCEPT_TO_CLINIC_COMMIT)
                rows += [lidc_slab_row(p, args.concept_to_clinic, c2c_commit, args.ct_slicing, commit,
                                       args.out, workdir) for p in LIDC_SLAB_PATIENTS]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "MANIFEST.md").write_text(HEADER + "\n".join(rows) + "\n" + NOT_USED, encoding="utf-8")
    print(f"wrote {len(rows)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
