"""Every text file the package and the Slicer module read or write names its encoding (UTF-8).

Without it Python uses the locale's encoding: cp1252 on many Windows installations of Slicer,
and ASCII in any process after SimpleITK has written a DICOM file with tags (its DICOM writer
sets the C locale and leaves it set), where the first non-ASCII character fails to decode."""

from __future__ import annotations

import ast
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPOSITORY / "MedSRLib").rglob("*.py"), *(REPOSITORY / "MedSRExtension").rglob("*.py")])


def _mode(call: ast.Call, position: int) -> str | None:
    """The call's mode argument when it is a literal string (positional `position` or mode=)."""
    for keyword in call.keywords:
        if keyword.arg == "mode":
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else None
    if len(call.args) > position and isinstance(call.args[position], ast.Constant):
        return call.args[position].value
    return "r" if len(call.args) <= position else None


def text_calls_without_encoding(tree: ast.AST) -> list[int]:
    """Lines of `Path.read_text()`, `Path.write_text(text)`, `open(path[, mode])` and
    `path.open([mode])` calls in text mode that do not pass an encoding."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "read_text" and not node.args:
            lines.append(node.lineno)
        elif isinstance(func, ast.Attribute) and func.attr == "write_text" and len(node.args) == 1:
            lines.append(node.lineno)  # MedSRLib.io.write_text(text, path, ...) takes two
        elif isinstance(func, ast.Name) and func.id == "open" and node.args:
            mode = _mode(node, 1)
            if mode is not None and "b" not in mode:
                lines.append(node.lineno)
        elif isinstance(func, ast.Attribute) and func.attr == "open" and isinstance(func.value, (ast.Name, ast.Attribute, ast.Call, ast.BinOp)) \
                and not (isinstance(func.value, ast.Name) and func.value.id in ("os", "Image", "gzip", "tarfile", "zipfile")):
            mode = _mode(node, 0)
            if mode is not None and "b" not in mode and (node.args or node.keywords):
                lines.append(node.lineno)
    return lines


def test_the_check_sees_each_kind_of_call():
    source = ("p.read_text()\np.write_text('x')\nopen(p)\nopen(p, 'a')\np.open('w')\n"
              "p.read_text(encoding='utf-8')\nopen(p, 'rb')\nio.write_text(t, p)\nos.open(p, 0)\n")
    assert text_calls_without_encoding(ast.parse(source)) == [1, 2, 3, 4, 5]


def test_every_text_file_access_names_its_encoding():
    found = [f"{path.relative_to(REPOSITORY)}:{line}" for path in SOURCES
             for line in text_calls_without_encoding(ast.parse(path.read_text(encoding="utf-8")))]
    assert not found, "text file access without encoding=:\n" + "\n".join(found)
