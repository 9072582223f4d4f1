"""Render the MedSR panel offscreen (real MedSR.ui, harness fakes) to MedSRExtension/Screenshots/slicer-panel.png.

    QT_QPA_PLATFORM=offscreen python Testing/slicer_module/render_panel_screenshot.py [out.png]

The qMRML/CTK widgets are the harness fakes (plain combo boxes and group boxes), so the
picture shows the panel's content and layout, not Slicer's exact styling.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
for path in (REPO_ROOT, REPO_ROOT / "MedSRExtension" / "MedSR", HERE):
    sys.path.insert(0, str(path))


def render(out_path):
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    from fakes import install

    install()
    import MedSR
    import slicer

    node, _ = MedSR.MedSRTest.makeObliqueAnisotropicVolume("CT chest")
    widget = MedSR.MedSRWidget()
    widget.setup()
    widget.ui.inputSelector.setCurrentNode(node)
    widget.ui.modelComboBox.setCurrentIndex(widget.ui.modelComboBox.findData("bicubic"))
    widget.ui.progressBar.setVisible(True)
    widget.ui.progressBar.setValue(42)
    widget.ui.statusLabel.setText("pass 1/1: slice 3/6 (4 s)")
    widget.parent.resize(440, 700)
    widget.parent.show()
    for _ in range(5):
        app.processEvents()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    if not widget.parent.grab().save(str(out_path)):
        raise RuntimeError(f"could not write {out_path}")
    widget.cleanup()
    slicer.mrmlScene.Clear(1)
    return out_path


if __name__ == "__main__":
    print(render(sys.argv[1] if len(sys.argv) > 1 else REPO_ROOT / "MedSRExtension" / "Screenshots" / "slicer-panel.png"))
