"""The engine's structure and packaging: layers without import cycles, no Slicer in ``dlir``, and
every engine file in both the wheel and the Slicer extension's install list."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "DLIRRegistration" / "dlir"
#: what the engine must never import: the Slicer application, Qt, VTK/MRML, or the modules' glue
FORBIDDEN = ("slicer", "qt", "vtk", "ctk", "DLIRRegistrationLib", "DLIRTrainingLib")


def engine_files() -> list[Path]:
    """Every ``.py`` file of the engine, relative to ``DLIRRegistration/`` (e.g. ``dlir/training/config.py``)."""
    return sorted(p.relative_to(ENGINE.parent) for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse((ENGINE.parent / path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import module`
    return found


def import_graph() -> dict[str, set[str]]:
    """Engine module -> the engine modules it imports."""
    modules = {module_name(p): p for p in engine_files()}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_engine_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "dlir.cli" in graph and "dlir.training.trainer" in graph and "dlir.evaluation.bench" in graph
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_layers_point_down_only() -> None:
    """Core modules never import training, evaluation or the command line; training and evaluation never the command line."""
    for name, imported in import_graph().items():
        if name in ("dlir.cli", "dlir.__main__"):  # the top: the command line and its `python -m dlir` entry
            continue
        assert "dlir.cli" not in imported, f"{name} imports the command line"
        if not name.startswith(("dlir.training", "dlir.evaluation")):
            upper = sorted(m for m in imported if m.startswith(("dlir.training", "dlir.evaluation")))
            assert not upper, f"the core module {name} imports {upper}"


def test_the_engine_never_imports_slicer_qt_or_the_modules() -> None:
    for path in engine_files():
        bad = sorted(m for m in imports_of(path) if m.split(".")[0] in FORBIDDEN)
        assert not bad, f"{path} imports {bad}"


def test_the_wheel_holds_every_engine_file(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("dlir-*.whl")
    packaged = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("dlir/") and n.endswith(".py")}
    missing = sorted({str(p.as_posix()) for p in engine_files()} - packaged)
    assert not missing, f"the wheel leaves out {missing}"


#: stands in for Slicer's build macros: prints the scripts the module's CMakeLists.txt would install
CMAKE_STUB = """
set(CMAKE_CURRENT_SOURCE_DIR "{source}")
set(CMAKE_BINARY_DIR "{binary}")
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/qt-scripted-modules)
set(BUILD_TESTING OFF)
function(install)
endfunction()
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${{ARGN}})
  foreach(script IN LISTS M_SCRIPTS)
    message(STATUS "SCRIPT ${{script}}")
  endforeach()
endfunction()
include("{cmakelists}")
"""


def test_the_slicer_extension_installs_every_engine_file(tmp_path: Path) -> None:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed here (apt install cmake): the install list cannot be evaluated")
    # script mode refuses CONFIGURE_DEPENDS (it only makes a build re-glob); everything else is the real file
    cmakelists = tmp_path / "CMakeLists.txt"
    text = (REPO / "DLIRRegistration" / "CMakeLists.txt").read_text(encoding="utf-8")
    cmakelists.write_text(text.replace("CONFIGURE_DEPENDS", ""), encoding="utf-8")
    stub = tmp_path / "stub.cmake"
    stub.write_text(CMAKE_STUB.format(source=(REPO / "DLIRRegistration").as_posix(), binary=(tmp_path / "build").as_posix(),
                                      cmakelists=cmakelists.as_posix()), encoding="utf-8")
    result = subprocess.run([cmake, "-P", str(stub)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    installed = set(re.findall(r"SCRIPT (\S+)", result.stdout + result.stderr))
    assert "DLIRRegistration.py" in installed
    missing = sorted({str(p.as_posix()) for p in engine_files()} - installed)
    assert not missing, f"the Slicer extension leaves out {missing}"
