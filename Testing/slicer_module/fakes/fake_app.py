"""FAKE `slicer.app`: the few qSlicerApplication calls slicer.util and MedSR.py make in tests."""


class FakeSlicerApplication:
    applicationName = "Slicer (fake, tests)"

    def __init__(self):
        self.testing = True

    def testingEnabled(self):
        return self.testing

    def processEvents(self):
        from PySide6.QtWidgets import QApplication

        QApplication.processEvents()

    def setOverrideCursor(self, cursor):
        pass

    def restoreOverrideCursor(self):
        pass

    def layoutManager(self):
        return None  # no views headless: slicer.util.setSliceViewerLayers skips fitting

    def commandOptions(self):
        return None
