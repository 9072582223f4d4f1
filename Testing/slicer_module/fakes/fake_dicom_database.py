"""FAKE `slicer.dicomDatabase`: the two ctkDICOMDatabase calls MedSR.py makes.

Real one: CTK's ctkDICOMDatabase, opened by Slicer's DICOM module. `fileForInstance(uid)` gives
the file of a SOP instance ("" when the database does not have it) and `fileValue(path, tag)`
a tag's value from that file ("" when unknown). Tests install it per test with
`monkeypatch.setattr(slicer, "dicomDatabase", FakeDICOMDatabase({...}), raising=False)`.
"""

from pathlib import PurePosixPath


class FakeDICOMDatabase:
    """FAKE: instances with a known DICOM Modality (0008,0060), e.g. {"1.2.3": "CT"}."""

    def __init__(self, modality_by_instance_uid):
        self.modality_by_instance_uid = dict(modality_by_instance_uid)
        self.asked = []  # (path, tag) of every fileValue call

    def fileForInstance(self, uid):
        return f"/fake-dicom/{uid}.dcm" if uid in self.modality_by_instance_uid else ""

    def fileValue(self, path, tag):
        self.asked.append((path, tag))
        if not path or tag != "0008,0060":
            return ""
        return self.modality_by_instance_uid.get(PurePosixPath(path).stem, "")
