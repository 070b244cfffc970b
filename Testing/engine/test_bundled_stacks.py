"""The bundled stacks: load, are small, describe themselves, are documented in Resources/Models/README.md, and
``universal`` (trained on synthetic shapes alone) registers a real pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dlir.metrics import dice
from dlir.pairs import sample_pair
from dlir.register import register
from dlir.stack import bundled_models_dir, list_stacks, load_stack, resolve_stack

MODELS = Path(__file__).resolve().parents[2] / "Resources" / "Models"
#: Dice a stack that starts from the capture search may lose on its synthetic validation pairs against the capture alone:
#: on those pairs the bundled networks raise the images' similarity, not the labels' overlap (a known gap, kept in view:
#: Resources/Models/README.md, issue 25)
CAPTURE_MARGIN = 0.01
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
    assert validation["folding"] < 1e-3
    if manifest.recipe.initial_alignment == "search":  # the capture alone is already close: the networks must not lose it
        assert validation["dice_mean"] > validation["before"]["dice_mean"] - CAPTURE_MARGIN
    else:
        assert validation["dice_mean"] > validation["before"]["dice_mean"]
    assert manifest.training["iterations"] == [s.iterations for s in manifest.recipe.stages]
    readme = (MODELS / "README.md").read_text(encoding="utf-8")
    assert f"`{name}`" in readme and f"training/{name}.toml" in readme
    assert (MODELS / "training" / f"{name}.toml").is_file()
    if manifest.training.get("images"):  # stacks trained on images list them; universal saw synthetic shapes only
        assert (MODELS / "training" / f"{name}.csv").is_file()


def test_universal_trained_on_shapes_alone_improves_every_label_of_the_sample_pair() -> None:
    """The bundled ``universal`` stack saw synthetic shapes only, no real image: it registers the bundled MNI pair
    better than the pair's initial state, every label, and the mean Dice by more than 0.015."""
    pair = sample_pair()
    fixed_labels, moving_labels = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (pair.fixed_labels, pair.moving_labels))
    stack = load_stack(resolve_stack("universal"))
    assert not stack.manifest.training.get("images")  # trained on shapes alone
    result = register(sitk.ReadImage(str(pair.fixed)), sitk.ReadImage(str(pair.moving)), stack,
                      moving_labels=sitk.ReadImage(str(pair.moving_labels)), device="cpu")
    labels = [int(v) for v in np.unique(fixed_labels) if v]
    before = dice(fixed_labels, moving_labels, labels)
    after = dice(fixed_labels, sitk.GetArrayFromImage(result.warped_labels), labels)
    assert all(after[k] > before[k] for k in labels), (before, after)
    assert np.mean(list(after.values())) > np.mean(list(before.values())) + 0.015, (before, after)
