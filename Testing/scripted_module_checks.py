"""Checks of a Slicer scripted module's files that need no Slicer application (shared by both modules' tests).

``.ui`` widgets (Qt Designer XML), the ``self.ui.NAME`` names a Widget uses, the fields of a
parameter-node class, Qt/application use in a Qt-free library, and an icon's PNG size.
"""

from __future__ import annotations

import ast
import struct
import xml.etree.ElementTree as ET
from pathlib import Path


def ui_widgets(ui: Path, top_name: str) -> dict[str, ET.Element]:
    """The widgets of a ``.ui`` file by name; asserts Designer 4.0 XML, a ``qMRMLWidget`` top and unique names."""
    root = ET.parse(ui).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == top_name
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names in the .ui must be unique"
    return {w.get("name"): w for w in root.iter("widget")}


def used_ui_names(script: Path) -> set[str]:
    """Every ``NAME`` in ``self.ui.NAME`` of a module script."""
    names = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def parameter_node_fields(script: Path, class_name: str) -> list[str]:
    """The annotated fields of the parameter-node wrapper class ``class_name``."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)]


def qt_and_application_uses(library: Path) -> list[str]:
    """What in ``library/*.py`` needs Qt or the Slicer application (empty for a Qt-free library)."""
    found = []
    for path in sorted(library.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules = {(node.module or "").split(".")[0]}
            else:
                modules = set()
            if modules & {"qt", "ctk", "PythonQt"}:
                found.append(f"{path.name} imports Qt")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer" \
                    and node.attr in ("app", "modules", "mrmlScene"):
                found.append(f"{path.name} uses slicer.{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr in ("loadUI", "launchConsoleProcess", "tempDirectory"):
                found.append(f"{path.name} uses the application-only slicer.util.{node.attr}")
    return found


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file; asserts the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])
