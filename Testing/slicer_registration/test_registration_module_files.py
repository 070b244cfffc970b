"""The module's files: a valid .ui with every widget the Widget uses, parameter names that match,
CMake lists, icon, requirements, and a Qt-free library (these checks need no Slicer application)."""

from __future__ import annotations

import ast
import re
import struct
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "DLIRRegistration"
UI = MODULE / "Resources" / "UI" / "DLIRRegistration.ui"
SCRIPT = MODULE / "DLIRRegistration.py"


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "DLIRRegistration"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names in the .ui must be unique"
    return {w.get("name"): w for w in root.iter("widget")}


def used_ui_names() -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def parameter_node_fields() -> list[str]:
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DLIRRegistrationParameterNode")
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)]


def test_ui_is_valid_and_has_every_widget_the_widget_uses() -> None:
    widgets = ui_widgets()
    used = used_ui_names()
    assert {"applyButton", "cancelButton", "progressBar", "stackComboBox", "resultsLabel"} <= used
    missing = sorted(used - set(widgets))
    assert not missing, f"DLIRRegistration.py uses widgets the .ui lacks: {missing}"
    classes = {w.get("class") for w in widgets.values()}
    assert {"qMRMLNodeComboBox", "ctkCollapsibleButton", "QComboBox", "QSpinBox", "QPushButton", "QProgressBar", "QLabel"} <= classes
    advanced = widgets["advancedCollapsibleButton"]
    assert any(p.get("name") == "collapsed" and p.findtext("bool") == "true" for p in advanced.findall("property"))


def test_parameter_names_match_the_parameter_node() -> None:
    root = ET.parse(UI).getroot()
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.findtext("string")
    assert len(bound.values()) == len(set(bound.values())), "one widget per parameter"
    # stackPath is synchronised by hand (the stack list is dynamic); every other field has a widget
    assert set(bound.values()) == set(parameter_node_fields()) - {"stackPath"}
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    for widget in root.iter("widget"):
        cls = widget.get("class")
        assert cls.startswith("Q") or cls in declared, f"{cls} is not declared as a custom widget"
        if cls.startswith("qMRML") and widget.get("name") != "DLIRRegistration":
            assert widget.get("name") in receivers, f"{widget.get('name')} does not get the scene"


def test_library_is_qt_free() -> None:
    for path in (MODULE / "DLIRRegistrationLib").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [(node.module or "").split(".")[0]]
            else:
                modules = []
            assert not {"qt", "ctk", "PythonQt"} & set(modules), f"{path.name} imports Qt"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                assert node.attr not in ("app", "modules", "mrmlScene"), f"{path.name} uses slicer.{node.attr}"


def test_cmake_lists_every_script_and_resource() -> None:
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in sorted((MODULE / "DLIRRegistrationLib").glob("*.py")):
        assert f"${{MODULE_NAME}}Lib/{path.name}" in cmake, f"{path.name} missing from DLIRRegistration/CMakeLists.txt"
    assert "${CMAKE_CURRENT_SOURCE_DIR}/dlir/*.py" in cmake and "${DLIR_ENGINE_SCRIPTS}" in cmake
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui", "Resources/requirements.txt"):
        assert resource in cmake and (MODULE / resource.replace("${MODULE_NAME}", "DLIRRegistration")).is_file()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    assert (MODULE / "Testing" / "CMakeLists.txt").is_file() and (MODULE / "Testing" / "Python" / "CMakeLists.txt").is_file()
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for line in (r"add_subdirectory\(DLIRRegistration\)", r"add_subdirectory\(DLIRTraining\)", r'set\(EXTENSION_DEPENDS "PyTorch"\)',
                 r'set\(EXTENSION_CATEGORY "Registration"\)', r"include\(\$\{Slicer_EXTENSION_CPACK\}\)"):
        assert re.search(line, top), line


def test_requirements_are_the_engine_pins_without_torch_and_simpleitk() -> None:
    pins = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    expected = {p for p in pins if not p.lower().startswith(("torch", "simpleitk"))}
    lines = {line.strip() for line in (MODULE / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")}
    assert lines == expected


def test_icon_is_a_128_png_and_module_classes_exist() -> None:
    data = (MODULE / "Resources" / "Icons" / "DLIRRegistration.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (128, 128)
    classes = {n.name for n in ast.parse(SCRIPT.read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef)}
    assert {"DLIRRegistration", "DLIRRegistrationParameterNode", "DLIRRegistrationWidget", "DLIRRegistrationLogic",
            "DLIRRegistrationTest"} <= classes
    assert "import torch" not in SCRIPT.read_text(encoding="utf-8"), "nothing is imported from PyTorch when Slicer loads the module"
