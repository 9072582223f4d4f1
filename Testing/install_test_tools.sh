#!/bin/sh
# Test tools that do not come from PyPI, installed for `make test` when possible.
# dicom3tools gives `dciodvfy`, the independent DICOM IOD validator used by
# Testing/test_dicom_export.py. Installed with apt-get only when it is missing and apt is
# usable (root, Debian/Ubuntu); never fails the build: without it that test skips, saying why.
# Orthanc with its DICOMweb plugin is the local PACS Testing/test_pacs.py starts on loopback
# (its own configuration and ports); without it those tests skip, saying why.
# Every install is announced (what, how, why) before it starts.
echo "test tools outside PyPI: dciodvfy (Debian dicom3tools) and Orthanc; a missing one is" \
     "installed with apt-get when this runs as root, else its tests skip" >&2
if ! command -v Orthanc >/dev/null 2>&1 ||
   [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian packages orthanc and orthanc-dicomweb with apt-get (as root):" \
             "the local PACS that Testing/test_pacs.py sends to and fetches from" >&2
        if ! { apt-get install -y -q orthanc orthanc-dicomweb >/dev/null 2>&1 ||
               { apt-get update -q >/dev/null 2>&1 &&
                 apt-get install -y -q orthanc orthanc-dicomweb >/dev/null 2>&1; }; }; then
            echo "note: could not install orthanc; the PACS tests will skip" >&2
        fi
    else
        echo "note: Orthanc (Debian packages orthanc, orthanc-dicomweb) is missing and apt-get" \
             "is not usable here; the PACS tests will skip" >&2
    fi
fi
if command -v dciodvfy >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: dciodvfy (Debian package dicom3tools) is missing and apt-get is not usable here;" \
         "the DICOM validation test will skip" >&2
    exit 0
fi
echo "installing Debian package dicom3tools with apt-get (as root): its dciodvfy validates" \
     "the DICOM series that Testing/test_dicom_export.py writes" >&2
if ! { apt-get install -y -q dicom3tools >/dev/null 2>&1 ||
       { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dicom3tools >/dev/null 2>&1; }; }; then
    echo "note: could not install dicom3tools; the DICOM validation test will skip" >&2
fi
exit 0
