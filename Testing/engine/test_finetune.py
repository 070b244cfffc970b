"""Fine-tuning a stack for pairs of different subjects (issue 25): a job that starts from a stack file's weights
(``start_from``, ``start_from_stages``), the folding penalty in a B-spline stage's training loss (``fold_weight``) and
validation pairs of two different training images (``data.validation_inter_subject``)."""

from __future__ import annotations

import hashlib
import tomllib
from argparse import ArgumentParser
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dlir.errors import InputError
from dlir.losses import folding_penalty, stage_loss
from dlir.recipe import INTENSITY_PRESETS, Recipe, StageSpec
from dlir.stack import Manifest, build_stack, save_stack
from dlir.training.config import DataSpec, TrainConfig, add_flags, apply_flags
from dlir.training.trainer import Trainer

def _config(tmp_path: Path, images: str, channels: int = 8, inter_subject: int = 0, alignment: str = "centre") -> TrainConfig:
    """A two-stage job (affine with a scale range symmetric about 1, so its fresh head is the identity; a B-spline
    stage with a folding penalty) on ``images``, relative to ``tmp_path``."""
    stages = (StageSpec("affine", spacing_mm=(8.0, 8.0, 8.0), channels=8, depth=2, min_scale=0.8, max_scale=1.2),
              StageSpec("bspline", spacing_mm=(8.0, 8.0, 8.0), control_point_spacing=4, channels=channels, fold_weight=10.0,
                        patch_size=16))
    return TrainConfig(name="tiny-finetune", seed=3,
                       data=DataSpec(images=str(tmp_path / images), validation_pairs_per_image=1,
                                     validation_inter_subject=inter_subject),
                       recipe=Recipe(stages, INTENSITY_PRESETS["mr"], alignment))


def _stack_file(config: TrainConfig, path: Path, seed: int) -> Path:
    return save_stack(build_stack(Manifest(config.name, config.recipe), seed=seed), path)


def test_a_job_starts_from_the_weights_of_the_stack_it_fine_tunes(tmp_path: Path) -> None:
    base = _config(tmp_path, "images/")
    source = _stack_file(base, tmp_path / "base.safetensors", seed=11)
    theirs = build_stack(Manifest(base.name, base.recipe), seed=11).weights()
    seeded = build_stack(Manifest(base.name, base.recipe), seed=base.seed).weights()
    assert any(not torch.equal(theirs[n], seeded[n]) for n in theirs)  # two seeds, two sets of weights
    every = Trainer(replace(base, start_from=str(source)), tmp_path / "job").stack.weights()
    assert all(torch.equal(every[n], theirs[n]) for n in theirs)
    trainer = Trainer(replace(base, start_from=str(source), start_from_stages=(2,)), tmp_path / "job")
    for name, tensor in trainer.stack.weights().items():  # stage 1 from its seeded start (the identity), stage 2 from the file
        assert torch.equal(tensor, (theirs if name.startswith("stage1.") else seeded)[name])
    provenance = trainer._final_manifest(0.0).training["start_from"]  # the stack says what it was fine-tuned from
    assert provenance == {"file": "base.safetensors", "sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "stages": [2]}


def test_a_stack_of_other_networks_is_refused_as_a_start(tmp_path: Path) -> None:
    wider = _config(tmp_path, "images/", channels=16)
    source = _stack_file(wider, tmp_path / "wide.safetensors", seed=1)
    with pytest.raises(InputError, match="stage 2 of wide.safetensors is not the network of this recipe's stage 2"):
        Trainer(replace(_config(tmp_path, "images/"), start_from=str(source)), tmp_path / "job")
    with pytest.raises(InputError, match="does not exist"):
        Trainer(replace(_config(tmp_path, "images/"), start_from=str(tmp_path / "none.safetensors")), tmp_path / "job")
    with pytest.raises(InputError, match="start_from_stages needs start_from"):
        replace(_config(tmp_path, "images/"), start_from_stages=(1,)).check()
    with pytest.raises(InputError, match="from 1 to 2"):
        replace(_config(tmp_path, "images/"), start_from=str(source), start_from_stages=(3,)).check()


def test_the_fine_tuning_keys_are_flags_and_survive_the_job_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    parser = ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--start-from", "base.safetensors", "--start-from-stages", "2,3",
                              "--validation-inter-subject", "6", "--fold-weight", "0,10"])
    config = apply_flags(_config(tmp_path, "images/"), args)
    assert config.start_from == str(tmp_path / "base.safetensors") and config.start_from_stages == (2, 3)
    assert config.data.validation_inter_subject == 6 and [s.fold_weight for s in config.recipe.stages] == [0.0, 10.0]
    assert TrainConfig.from_dict(tomllib.loads(config.to_toml())) == config
    with pytest.raises(InputError, match="validation_inter_subject"):
        DataSpec(validation_inter_subject=-1)


def test_a_stage_with_a_fold_weight_pays_for_folding_in_training() -> None:
    spacing = (8.0, 8.0, 8.0)
    fixed = torch.rand((1, 1, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    smooth = torch.zeros((1, 3, 8, 8, 8))
    folded = smooth.clone()
    folded[0, 0, :, :, 4] = -12.0  # x jumps back by 1.5 voxels: the cells on either side fold
    assert float(folding_penalty(smooth, spacing)) == 0.0 and float(folding_penalty(folded, spacing)) > 0.1
    plain = StageSpec("bspline", spacing_mm=spacing, control_point_spacing=4, alpha=0.0)
    weighted = replace(plain, fold_weight=10.0)
    assert float(stage_loss(plain, fixed, fixed, folded, spacing).loss) == pytest.approx(-1.0, abs=1e-5)
    terms = stage_loss(weighted, fixed, fixed, folded, spacing)
    assert float(terms.loss) == pytest.approx(-1.0 + 10.0 * float(folding_penalty(folded, spacing)), rel=1e-5)
    batch = torch.cat([smooth, folded])  # the penalty of a batch is the mean of its pairs'
    assert float(folding_penalty(batch, spacing)) == pytest.approx(float(folding_penalty(folded, spacing)) / 2, rel=1e-6)


def test_validation_adds_pairs_of_two_subjects_each_started_once(shared_data: Path, tmp_path: Path) -> None:
    csv = tmp_path / "brains.csv"
    csv.write_text("image,labels\n"
                   f"{shared_data / 'mni152_2009a_sym' / 't1.nii.gz'},{shared_data / 'mni152_2009a_sym' / 'labels.nii.gz'}\n"
                   f"{shared_data / 'brain_mr_tumor1' / 't1.nii.gz'},\n", encoding="utf-8")
    trainer = Trainer(_config(tmp_path, str(csv), inter_subject=5, alignment="search"), tmp_path / "job")
    trainer.load_data()
    synthetic, two = trainer.validation[:1], trainer.validation[1:]
    assert len(synthetic) == 1 and len(two) == 2  # one labelled image, one deformation; both orders of the two images
    a, b = trainer.train_images
    assert [(p.fixed.tensor is a.prepared.tensor, p.moving.tensor is b.prepared.tensor) for p in two] == [(True, True), (False, False)]
    assert all(p.initial is not None for p in trainer.validation)  # the capture, computed once per pair
    metrics = trainer.validate(-1)
    assert set(metrics) >= {"dice", "folding", "ncc"} and metrics["folding"] == 0.0
