"""Images of different contrasts (issue 27): the MIND-SSC similarity (dlir.modality), accurate mode with it, and the
automatic same/different choice (dlir.contrast).

The multi-contrast pair: the MNI152 T1 template at 4 mm as the moving image, a T2-like image made from its tissue
probabilities (CSF bright, grey matter middle, white matter dark, as Testing/benchmarks/intersubject/make_contrast.py)
as the fixed one, under a known transform (fixed point -> moving point, LPS mm).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dlir.contrast import MODALITY_TAG, header_choice, initial_alignment_and_contrast
from dlir.geometry import Grid
from dlir.losses import ncc
from dlir.modality import compare, features, mind_similarity, mind_ssc
from dlir.pipeline import PreparedImage
from dlir.recipe import IntensitySpec
from dlir.register import register
from testdata import identity_bspline_stack

SPACING_MM = 4.0


def _template(shared_data: Path, name: str, interpolator: int = sitk.sitkLinear, pixel: int = sitk.sitkFloat32) -> sitk.Image:
    image = sitk.ReadImage(str(shared_data / "mni152_2009a_sym" / name), pixel)
    size = [int(n * s / SPACING_MM) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), [SPACING_MM] * 3, image.GetDirection())


@pytest.fixture(scope="module")
def contrasts(shared_data: Path) -> dict[str, sitk.Image]:
    """The 4 mm T1 template, its T2-like twin on the same grid (aligned: the identity), the tissue labels and
    probabilities (gm, wm, brain)."""
    t1 = _template(shared_data, "t1.nii.gz")
    gm, wm, brain = (_template(shared_data, f"{n}.nii.gz") for n in ("gm_prob", "wm_prob", "brain_mask"))
    csf = sitk.Clamp(brain - gm - wm, sitk.sitkFloat32, 0.0, 1.0)
    labels = _template(shared_data, "labels.nii.gz", sitk.sitkNearestNeighbor, sitk.sitkUInt8)
    return {"t1": t1, "t2like": 200.0 * csf + 120.0 * gm + 50.0 * wm, "labels": labels, "gm": gm, "wm": wm, "brain": brain}


def _affine(image: sitk.Image, degrees=(0.0, 0.0, 0.0), shift=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0)) -> sitk.AffineTransform:
    """Rotation (degrees about x, y, z), per-axis scale and shift (mm) about the image's centre (fixed -> moving)."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    rigid = sitk.Euler3DTransform(centre, *np.radians(degrees), shift)
    out = sitk.AffineTransform(3)
    out.SetCenter(centre)
    out.SetMatrix((np.asarray(rigid.GetMatrix()).reshape(3, 3) @ np.diag(scale)).ravel().tolist())
    out.SetTranslation(list(shift))
    return out


def _tensor(image: sitk.Image) -> torch.Tensor:
    values = torch.as_tensor(sitk.GetArrayFromImage(image), dtype=torch.float32)[None, None]
    return values / values.max()


def _mind(fixed: sitk.Image, moving: sitk.Image) -> float:
    return float(mind_similarity(mind_ssc(_tensor(fixed)), mind_ssc(_tensor(moving)))[0])


def test_mind_is_highest_at_the_true_alignment_of_two_contrasts(contrasts):
    t1, t2 = contrasts["t1"], contrasts["t2like"]
    aligned = _mind(t2, t1)
    for axis in range(3):
        shift, degrees = [0.0] * 3, [0.0] * 3
        shift[axis], degrees[axis] = 3.0, 5.0
        for offset in (_affine(t1, shift=shift), _affine(t1, degrees=degrees)):
            assert _mind(t2, sitk.Resample(t1, t1, offset, sitk.sitkLinear)) < aligned - 0.02


def test_mind_sees_an_image_and_a_non_monotonic_remap_of_it_as_alike(contrasts):
    """A 4-class image (background, CSF, grey, white matter) against a non-monotonic remap of its classes: MIND-SSC
    gives nearly its value against itself (exactly only where at most two classes meet, since its descriptors divide
    by the local variance; where three meet the remap changes their ratios: 0.88 here, about what a 3 mm shift of the
    image costs at 4 mm); NCC sees the remap as anti-correlated."""
    probability = {n: sitk.GetArrayFromImage(contrasts[n]) for n in ("gm", "wm", "brain")}
    classes = np.where(probability["brain"] < 0.5, 0, np.where(probability["wm"] > 0.5, 3, np.where(probability["gm"] > 0.5, 2, 1)))

    def image(values: list[float]) -> sitk.Image:
        out = sitk.GetImageFromArray(np.asarray(values, dtype=np.float32)[classes])
        out.CopyInformation(contrasts["t1"])
        return out

    t1_like, remapped = image([0, 30, 80, 120]), image([100, 0, 200, 50])
    assert _mind(t1_like, t1_like) == pytest.approx(1.0)
    assert _mind(t1_like, remapped) == pytest.approx(1.0, abs=0.15)
    assert float(ncc(_tensor(t1_like), _tensor(remapped))[0]) < -0.5


def test_mind_descriptors_do_not_depend_on_a_linear_intensity_map():
    image = torch.rand(1, 1, 12, 14, 10)
    assert torch.allclose(mind_ssc(image), mind_ssc(3.0 * image + 7.0), atol=1e-5)
    assert features("mind", image, 2.0).shape == (1, 12, 12, 14, 10)


def test_ngf_the_compared_alternative_ignores_which_side_is_brighter():
    image = torch.rand(1, 1, 12, 14, 10)
    itself = compare("ngf", features("ngf", image, 2.0), features("ngf", image, 2.0))
    inverted = compare("ngf", features("ngf", image, 2.0), features("ngf", 5.0 - 2.0 * image, 2.0))
    assert torch.allclose(itself, inverted, atol=1e-5)
    assert compare("ngf", features("ngf", image, 2.0), features("ngf", torch.rand(1, 1, 12, 14, 10), 2.0)) < 0.5 * itself


@pytest.fixture(scope="module")
def deformed_pair(contrasts):
    """(fixed T2-like, its labels) under a known affine: 6 / -4 / 5 degrees, 6 / -4 / 3 % scale, 4 / -3 / 3 mm."""
    t1 = contrasts["t1"]
    known = _affine(t1, degrees=(6.0, -4.0, 5.0), shift=(4.0, -3.0, 3.0), scale=(1.06, 0.96, 1.03))
    fixed = sitk.Resample(contrasts["t2like"], t1, known, sitk.sitkLinear, 0.0)
    return fixed, sitk.Resample(contrasts["labels"], t1, known, sitk.sitkNearestNeighbor, 0)


def _dice(reference: sitk.Image, warped: sitk.Image) -> float:
    a, b = sitk.GetArrayFromImage(reference), sitk.GetArrayFromImage(warped)
    return float(np.mean([2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum()) for v in (1, 2, 3, 4)]))


def test_accurate_mode_registers_two_contrasts_with_mind_and_not_with_ncc(contrasts, deformed_pair):
    fixed, fixed_labels = deformed_pair
    moving, moving_labels = contrasts["t1"], contrasts["labels"]
    stack = identity_bspline_stack()
    before = _dice(fixed_labels, moving_labels)
    different = register(fixed, moving, stack, moving_labels=moving_labels, refine="auto", similarity="different",
                         outputs=("labels",))
    same = register(fixed, moving, stack, moving_labels=moving_labels, refine="auto", similarity="same", outputs=("labels",))
    assert before < 0.6
    assert _dice(fixed_labels, different.warped_labels) > 0.8
    assert different.folding_fraction == 0.0
    assert _dice(fixed_labels, same.warped_labels) < 0.7  # NCC pulls the T1's tissue onto the wrong T2 tissue
    assert different.summary()["contrast"] == {"asked": "different", "contrast": "different", "measure": "MIND-SSC",
                                               "reason": "as asked"}


def _prepared(image: sitk.Image, offset: np.ndarray) -> PreparedImage:
    return PreparedImage.from_array(sitk.GetArrayFromImage(image), Grid.from_image(image).translated(offset), IntensitySpec())


def _choose(fixed: sitk.Image, moving: sitk.Image) -> str:
    offset = -Grid.from_image(fixed).centre()
    _, choice = initial_alignment_and_contrast("auto", "search", fixed, moving, _prepared(fixed, offset), _prepared(moving, offset))
    return choice.contrast


@pytest.fixture(scope="module")
def chest_ct(shared_data: Path) -> sitk.Image:
    """The chest CT at 4 x 4 x 5 mm (HU)."""
    ct = sitk.ReadImage(str(shared_data / "chest_ct_lung1" / "ct.nii.gz"), sitk.sitkFloat32)
    size = [int(n * s / t) for n, s, t in zip(ct.GetSize(), ct.GetSpacing(), (4.0, 4.0, 5.0))]
    return sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), [4.0, 4.0, 5.0], ct.GetDirection(), -1000.0)


def test_auto_picks_different_on_a_ct_and_an_mr_like_image(chest_ct):
    hu = sitk.GetArrayFromImage(chest_ct)
    # an MR-like contrast (T1-ish): air and lung dark, fat brightest, muscle middle, bone dark
    mr = np.interp(hu, [-1000, -900, -500, -150, -60, 20, 60, 200, 400, 2000], [0, 10, 20, 220, 230, 120, 110, 60, 30, 20])
    mr_like = sitk.GetImageFromArray(mr.astype(np.float32))
    mr_like.CopyInformation(chest_ct)
    moved = sitk.Resample(mr_like, chest_ct, _affine(chest_ct, degrees=(0.0, 0.0, 4.0), shift=(6.0, -4.0, 5.0)), sitk.sitkLinear, 0.0)
    assert _choose(chest_ct, moved) == "different"


def test_auto_picks_same_on_a_same_contrast_pair(shared_data: Path):
    fixed = sitk.ReadImage(str(shared_data / "brain_mr_tumor1" / "t1.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(shared_data / "brain_mr_tumor2" / "t1.nii.gz"), sitk.sitkFloat32)
    assert _choose(fixed, moving) == "same"


def test_the_header_modality_decides_when_it_can():
    ct, mr, other_mr = (sitk.Image(4, 4, 4, sitk.sitkFloat32) for _ in range(3))
    ct.SetMetaData(MODALITY_TAG, "CT ")
    mr.SetMetaData(MODALITY_TAG, "MR")
    other_mr.SetMetaData(MODALITY_TAG, "MR")
    assert header_choice(ct, mr).contrast == "different"
    assert header_choice(ct, ct).contrast == "same"
    assert header_choice(mr, other_mr) is None  # two MR sequences: the images decide
    assert header_choice(ct, sitk.Image(4, 4, 4, sitk.sitkFloat32)) is None


def test_a_training_stage_can_use_mind():
    """``dlir train`` takes the similarity per stage from the recipe (``similarity = "mind"`` in a stage's TOML table):
    the stage's loss is then MIND-SSC, 1 for identical images, differentiable."""
    from dlir.losses import stage_loss
    from dlir.recipe import StageSpec

    spec = StageSpec.from_dict({"kind": "bspline", "similarity": "mind"})
    fixed = torch.rand(2, 1, 16, 16, 16)
    moving = torch.rand(2, 1, 16, 16, 16, requires_grad=True)
    assert float(stage_loss(spec, fixed, fixed).similarity) == pytest.approx(1.0)
    terms = stage_loss(spec, fixed, moving)
    terms.loss.backward()
    assert float(terms.similarity.detach()) < 0.9 and moving.grad is not None and bool(moving.grad.abs().sum() > 0)


def test_dlir_register_reports_the_choice(contrasts, deformed_pair, coarse_stack_file: Path, tmp_path: Path, capsys):
    """``dlir register --similarity``: the choice on the command line and in result.json (auto: with its reason)."""
    import json

    from dlir.cli import main

    fixed, moving = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    sitk.WriteImage(deformed_pair[0], str(fixed))
    sitk.WriteImage(contrasts["t1"], str(moving))
    assert main(["register", str(fixed), str(moving), "--stack", str(coarse_stack_file), "--out", str(tmp_path / "auto"),
                 "--outputs", "transform"]) == 0
    assert "different contrasts (the intensities are related but not linearly (NCC" in capsys.readouterr().out
    contrast = json.loads((tmp_path / "auto" / "result.json").read_text(encoding="utf-8"))["contrast"]
    assert contrast["asked"] == "auto" and contrast["contrast"] == "different" and contrast["measure"] == "MIND-SSC"
    assert main(["register", str(fixed), str(moving), "--stack", str(coarse_stack_file), "--out", str(tmp_path / "same"),
                 "--outputs", "transform", "--similarity", "same"]) == 0
    assert "same contrast (as asked): similarity NCC" in capsys.readouterr().out


def test_one_contrast_networks_do_not_run_on_two_contrasts(contrasts, deformed_pair):
    """A stack made for one modality: on different contrasts its networks do not run (fast mode: the capture alone,
    with a warning; accurate mode starts from the capture); on one contrast, and with a stack made for any contrast
    (no modality), they run."""
    import dataclasses

    fixed, moving = deformed_pair[0], contrasts["t1"]
    any_contrast = identity_bspline_stack()
    one_contrast = identity_bspline_stack()
    one_contrast.manifest = dataclasses.replace(one_contrast.manifest, modality="MR")

    def ran(stack, refine, similarity) -> bool:
        result = register(fixed, moving, stack, refine=refine, similarity=similarity, outputs=())
        stages = any(name.startswith("stage ") for name in result.timings)
        summary = result.summary()
        assert stages == ("networks_skipped" not in summary)
        warned = any("the result is the initial alignment (affine) alone" in w for w in result.warnings)
        assert warned == (not stages and refine == 0)
        if refine:
            assert summary["refinement"]["started_from_networks_field"] == stages
        return stages

    assert not ran(one_contrast, 0, "different")
    assert not ran(one_contrast, 2, "different")
    assert ran(one_contrast, 0, "same")
    assert ran(any_contrast, 2, "different")
