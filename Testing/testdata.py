"""What the tests share: where the development data lives, the small seeded stage stacks the tests
register with, and the 4 mm MNI152 template.  Imported by the conftest files and by test helpers
(``Testing/`` is on ``sys.path``, see ``Testing/conftest.py``); the pytest fixtures that wrap these
live in the conftest files."""

from __future__ import annotations

from pathlib import Path

#: ../shared/data seen from the repository root (real images and synthetic pairs with ground truth)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def small_recipe():
    """Affine at 8 mm + one B-spline stage at 4 mm (control points every 16 mm): fast on 2 CPU cores."""
    from dlir.recipe import Recipe, StageSpec

    return Recipe(stages=(
        StageSpec("affine", spacing_mm=(8.0, 8.0, 8.0), depth=2, channels=8),
        StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=4, depth=2, channels=8, alpha=0.05),
    ))


def small_stack(name: str = "fresh-small", description: str = "freshly initialised test stack", modality: str = ""):
    """The :func:`small_recipe` stack with seeded (seed 0) freshly initialised weights, in memory."""
    from dlir.stack import Manifest, build_stack

    return build_stack(Manifest(name, small_recipe(), description=description, modality=modality), seed=0)


def coarse_stack():
    """Affine (depth 3) + B-spline, both at 8 mm, freshly initialised (seed 0): the untrained stages are
    the identity, so ``dlir evaluate`` / ``dlir bench`` on it measure the pipeline, not a network."""
    from dlir.recipe import Recipe, StageSpec
    from dlir.stack import Manifest, build_stack

    stages = (StageSpec("affine", spacing_mm=(8.0, 8.0, 8.0), depth=3, channels=8),
              StageSpec("bspline", spacing_mm=(8.0, 8.0, 8.0), control_point_spacing=4, channels=8, alpha=0.05))
    return build_stack(Manifest("test-tiny", Recipe(stages=stages)), seed=0)


def identity_bspline_stack(name: str = "identity"):
    """A freshly initialised one-stage stack (B-spline at 4 mm, no initial alignment): its untrained
    stage is exactly the identity, so accurate mode starts from T(x) = x."""
    from dlir.recipe import Recipe, StageSpec
    from dlir.stack import Manifest, build_stack

    recipe = Recipe(stages=(StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=4, channels=8, alpha=1.0),),
                    initial_alignment="none")
    return build_stack(Manifest(name, recipe), seed=0)


def folding_stack(name: str = "folding"):
    """:func:`identity_bspline_stack` with large seeded random output weights: a stack that does not fit any pair,
    whose fields fold (about 14 % of the sample pair's fixed voxels), for the tests of fast mode's warnings."""
    import torch

    stack = identity_bspline_stack(name)
    output = stack.stages[0].net.output
    with torch.no_grad():
        output.weight.copy_(torch.randn(output.weight.shape, generator=torch.Generator().manual_seed(0)) * 60.0)
    return stack


def mni_template_4mm(data: Path = SHARED_DATA):
    """The MNI152 T1 template resampled (linear) to 4 mm on its own origin and direction, 50 x 58 x 48
    voxels (x, y, z): a real image small enough that one registration takes about a second."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(data / "mni152_2009a_sym" / "t1.nii.gz"), sitk.sitkFloat32)
    return sitk.Resample(image, [50, 58, 48], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [4.0] * 3, image.GetDirection())
