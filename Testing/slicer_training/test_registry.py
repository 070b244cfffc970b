"""Finished stacks into the registry DLIR Registration lists (``dlir.stack``), with untrained tiny stacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from DLIRTrainingLib.job import JobError
from DLIRTrainingLib.registry import installStack, modelsDir, registryStack, stackNameTaken


def tiny_stack(path: Path, name: str, seed: int = 0) -> Path:
    """An untrained one-stage stack called ``name`` written to ``path``."""
    from dlir.recipe import Recipe, StageSpec
    from dlir.stack import Manifest, build_stack, save_stack

    recipe = Recipe(stages=(StageSpec("affine", spacing_mm=(8.0, 8.0, 8.0), channels=2, depth=1),))
    return save_stack(build_stack(Manifest(name, recipe), seed=seed), path)


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DLIR_MODELS_DIR", str(tmp_path / "user-models"))
    return tmp_path / "user-models"


def test_the_default_models_folder_is_the_registrys_user_folder(user_models: Path, tmp_path: Path) -> None:
    assert modelsDir() == user_models
    assert modelsDir("", tmp_path / "default") == tmp_path / "default"
    assert modelsDir(tmp_path / "chosen", tmp_path / "default") == tmp_path / "chosen"


def test_a_stack_outside_the_registry_is_copied_into_the_user_folder(user_models: Path, tmp_path: Path) -> None:
    from dlir.stack import list_stacks

    elsewhere = installStack(tiny_stack(tmp_path / "job" / "mine.safetensors", "mine"), tmp_path / "my-folder")
    assert elsewhere == tmp_path / "my-folder" / "mine.safetensors"
    assert stackNameTaken("mine", tmp_path / "my-folder") == elsewhere
    assert stackNameTaken("mine", tmp_path / "other") is None  # my-folder is not a registry folder
    listed = registryStack(elsewhere)
    assert listed == user_models / "mine.safetensors" and listed.read_bytes() == elsewhere.read_bytes()
    assert [i.path for i in list_stacks() if i.name == "mine"] == [listed]
    assert registryStack(elsewhere) == listed  # a second "Use in DLIR Registration" finds the same copy
    assert registryStack(listed) == listed


def test_another_stack_of_the_same_name_is_not_replaced(user_models: Path, tmp_path: Path) -> None:
    tiny_stack(user_models / "same.safetensors", "same", seed=1)
    new = tiny_stack(tmp_path / "job" / "same.safetensors", "same", seed=2)
    with pytest.raises(JobError, match="already lists another stack named same"):
        registryStack(new)
    with pytest.raises(JobError, match="already exists"):
        installStack(new, user_models)
    (tmp_path / "broken.safetensors").write_bytes(b"no stack")
    with pytest.raises(JobError, match="cannot be used"):
        registryStack(tmp_path / "broken.safetensors")
