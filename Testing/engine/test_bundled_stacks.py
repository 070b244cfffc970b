"""The bundled stacks: load, are small, describe themselves, and are documented in Resources/Models/README.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlir.stack import bundled_models_dir, list_stacks, load_stack

MODELS = Path(__file__).resolve().parents[2] / "Resources" / "Models"
BUNDLED = {"brain-mri": ("MR", "brain"), "chest-ct": ("CT", "chest"), "universal": ("", "")}  # universal: any modality and anatomy


def test_the_registry_finds_the_bundled_models_folder() -> None:
    assert bundled_models_dir() == MODELS
    assert {info.name for info in list_stacks() if info.path.parent == MODELS} == set(BUNDLED)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_stack_is_complete_small_and_documented(name: str) -> None:
    path = MODELS / f"{name}.safetensors"
    assert path.stat().st_size < 20 * 2**20
    stack = load_stack(name)
    manifest = stack.manifest
    assert (manifest.modality, manifest.anatomy) == BUNDLED[name]
    kinds = [s.kind for s in manifest.recipe.stages]
    assert kinds[0] == "affine" and kinds.count("bspline") >= 2
    validation = manifest.validation
    assert validation["dice_mean"] > validation["before"]["dice_mean"] and validation["folding"] < 1e-3
    assert manifest.training["iterations"] == [s.iterations for s in manifest.recipe.stages]
    readme = (MODELS / "README.md").read_text(encoding="utf-8")
    assert f"`{name}`" in readme and f"training/{name}.toml" in readme
    assert (MODELS / "training" / f"{name}.toml").is_file()
    if manifest.training.get("images"):  # stacks trained on images list them; universal saw synthetic shapes only
        assert (MODELS / "training" / f"{name}.csv").is_file()
