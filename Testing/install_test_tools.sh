#!/bin/sh
# Test tools that do not come from PyPI, installed for `make test` when possible.
# dicom3tools gives `dciodvfy`, the independent DICOM IOD validator used by
# Testing/test_dicom_export.py. Installed with apt-get only when it is missing and apt is
# usable (root, Debian/Ubuntu); never fails the build: without it that test skips, saying why.
if command -v dciodvfy >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: dciodvfy (Debian package dicom3tools) is missing and apt-get is not usable here;" \
         "the DICOM validation test will skip" >&2
    exit 0
fi
echo "installing dicom3tools (dciodvfy) for the DICOM export tests" >&2
if ! { apt-get install -y -q dicom3tools >/dev/null 2>&1 ||
       { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dicom3tools >/dev/null 2>&1; }; }; then
    echo "note: could not install dicom3tools; the DICOM validation test will skip" >&2
fi
exit 0
