"""Volumes in and out: NIfTI, NRRD, MHA, PNG and DICOM series read with their geometry,
integrity checks on the bytes, all-or-nothing writes, and the derived DICOM series writer.

May import: runtime (memory budget), models (model cards named in DICOM tags), transforms,
errors. Never api, planning, roi, through_plane, cohort.
"""
