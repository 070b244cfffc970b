"""The module's files: valid .ui with every widget the Widget uses, parameter names that match, CMake
lists, icon, and a Qt-free library (these checks need no Slicer application)."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import scripted_module_checks
from DLIRTrainingLib.settings import TrainingSettings
from scripted_module_checks import parameter_node_fields, png_size, qt_and_application_uses, used_ui_names

REPO = Path(__file__).resolve().parents[2]

MODULE = REPO / "DLIRTraining"
UI = MODULE / "Resources" / "UI" / "DLIRTraining.ui"
SCRIPT = MODULE / "DLIRTraining.py"


def ui_widgets() -> dict:
    return scripted_module_checks.ui_widgets(UI, "DLIRTraining")


def test_ui_is_valid_and_has_every_widget_the_widget_uses() -> None:
    widgets = ui_widgets()
    used = used_ui_names(SCRIPT)
    assert {"startButton", "stopButton", "resumeButton", "stageProgressBar", "logTextEdit", "useInRegistrationButton"} <= used
    missing = sorted(used - set(widgets))
    assert not missing, f"DLIRTraining.py uses widgets the .ui lacks: {missing}"


def test_custom_widgets_are_declared() -> None:
    root = ET.parse(UI).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    qt_classes = {"QLabel", "QComboBox", "QSpinBox", "QDoubleSpinBox", "QLineEdit", "QCheckBox", "QPushButton",
                  "QTableWidget", "QProgressBar", "QPlainTextEdit"}
    for widget in root.iter("widget"):
        cls = widget.get("class")
        assert cls in declared or cls in qt_classes, f"{cls} is neither a Qt class nor declared as a custom widget"
    # MRML widgets get the scene from the top widget
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class", "").startswith("qMRML") and w.get("name") != "DLIRTraining"}
    assert mrml <= receivers


def test_parameter_names_match_the_parameter_node_and_the_settings() -> None:
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.findtext("string")
    fields = parameter_node_fields(SCRIPT, "DLIRTrainingParameterNode")
    assert sorted(bound.values()) == sorted(set(bound.values())), "one widget per parameter"
    assert set(bound.values()) == set(fields), "every parameter-node field has exactly one widget and vice versa"
    assert fields == TrainingSettings.fieldNames(), "the parameter node and TrainingSettings must list the same fields in order"


def test_the_parameter_node_and_the_ui_start_from_the_engines_defaults() -> None:
    """One set of defaults: the parameter node's are TrainingSettings' (the engine's), and so are the widgets' initial values."""
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DLIRTrainingParameterNode")
    for field in (n for n in node.body if isinstance(n, ast.AnnAssign) and n.value is not None):
        assert ast.unparse(field.value) == f"TrainingSettings.{field.target.id}", \
            f"the parameter node's default of {field.target.id} must be TrainingSettings.{field.target.id}"
    defaults = TrainingSettings()
    checked = set()
    for widget in ui_widgets().values():
        props = {p.get("name"): p for p in widget.findall("property")}
        if "SlicerParameterName" not in props:
            continue
        name = props["SlicerParameterName"].findtext("string")
        expected = getattr(defaults, name)
        prop, read = {"QSpinBox": ("value", lambda p: float(p[0].text)), "QDoubleSpinBox": ("value", lambda p: float(p[0].text)),
                      "QLineEdit": ("text", lambda p: p.findtext("string") or ""),
                      "QCheckBox": ("checked", lambda p: p.findtext("bool") == "true")}.get(widget.get("class"), (None, None))
        if prop is not None:
            value = read(props[prop]) if prop in props else {"value": 0.0, "text": "", "checked": False}[prop]  # Qt's defaults
            assert value == expected, f"the .ui's initial {prop} of {name} is {value!r}, not the default {expected!r}"
            checked.add(name)
    assert {"affineIterations", "bsplineIterations", "alpha", "gridSpacing", "bsplineSpacings", "affineStage"} <= checked


def test_library_is_qt_free() -> None:
    assert qt_and_application_uses(MODULE / "DLIRTrainingLib") == []


def test_cmake_lists_every_file_and_the_extension_adds_the_module() -> None:
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in sorted((MODULE / "DLIRTrainingLib").glob("*.py")):
        assert f"${{MODULE_NAME}}Lib/{path.name}" in cmake, f"{path.name} missing from DLIRTraining/CMakeLists.txt"
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert resource in cmake
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    assert (MODULE / "Testing" / "CMakeLists.txt").is_file() and (MODULE / "Testing" / "Python" / "CMakeLists.txt").is_file()
    top = REPO / "CMakeLists.txt"
    if top.is_file():
        assert re.search(r"^add_subdirectory\(DLIRTraining\)", top.read_text(encoding="utf-8"), re.M)


def test_icon_is_a_128_png() -> None:
    assert png_size(MODULE / "Resources" / "Icons" / "DLIRTraining.png") == (128, 128)


def test_module_script_compiles_and_names_its_classes() -> None:
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"DLIRTraining", "DLIRTrainingParameterNode", "DLIRTrainingWidget", "DLIRTrainingLogic", "DLIRTrainingTest"} <= classes
