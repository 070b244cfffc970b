"""The module's files: a valid .ui with every widget the Widget uses, parameter names that match,
CMake lists, icon, requirements, and a Qt-free library (these checks need no Slicer application)."""

from __future__ import annotations

import ast
import re
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import scripted_module_checks
from scripted_module_checks import parameter_node_fields, png_size, qt_and_application_uses, used_ui_names

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "DLIRRegistration"
UI = MODULE / "Resources" / "UI" / "DLIRRegistration.ui"
SCRIPT = MODULE / "DLIRRegistration.py"


def ui_widgets() -> dict:
    return scripted_module_checks.ui_widgets(UI, "DLIRRegistration")


def test_ui_is_valid_and_has_every_widget_the_widget_uses() -> None:
    widgets = ui_widgets()
    used = used_ui_names(SCRIPT)
    assert {"applyButton", "cancelButton", "progressBar", "stackComboBox", "resultsLabel"} <= used
    missing = sorted(used - set(widgets))
    assert not missing, f"DLIRRegistration.py uses widgets the .ui lacks: {missing}"
    classes = {w.get("class") for w in widgets.values()}
    assert {"qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget", "ctkCollapsibleButton", "QComboBox", "QSpinBox", "QPushButton",
            "QProgressBar", "QLabel"} <= classes
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
    # stackPath and fixedMaskSegmentId are synchronised by hand (the stack list is dynamic; Slicer has no
    # parameter-node connector for a segment selector); every other field has a widget
    by_hand = {"stackPath", "fixedMaskSegmentId"}
    assert set(bound.values()) == set(parameter_node_fields(SCRIPT, "DLIRRegistrationParameterNode")) - by_hand
    script = SCRIPT.read_text(encoding="utf-8")
    assert all(f"p.{name}" in script or f"_parameterNode.{name}" in script for name in by_hand)
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    for widget in root.iter("widget"):
        cls = widget.get("class")
        assert cls.startswith("Q") or cls in declared, f"{cls} is not declared as a custom widget"
        if cls.startswith("qMRML") and widget.get("name") != "DLIRRegistration":
            assert widget.get("name") in receivers, f"{widget.get('name')} does not get the scene"


def test_library_is_qt_free() -> None:
    assert qt_and_application_uses(MODULE / "DLIRRegistrationLib") == []


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
    assert png_size(MODULE / "Resources" / "Icons" / "DLIRRegistration.png") == (128, 128)
    classes = {n.name for n in ast.parse(SCRIPT.read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef)}
    assert {"DLIRRegistration", "DLIRRegistrationParameterNode", "DLIRRegistrationWidget", "DLIRRegistrationLogic",
            "DLIRRegistrationTest"} <= classes
    assert "import torch" not in SCRIPT.read_text(encoding="utf-8"), "nothing is imported from PyTorch when Slicer loads the module"
