"""register(): initial alignment, progress and cancel, label interpolation, masks, refinement."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from dlir.device import resolve_device
from dlir.errors import CancelledError, DeviceError, InputError
from dlir.geometry import image_to_tensor
from dlir.losses import ncc
from dlir.recipe import Recipe, StageSpec
from dlir.register import register
from dlir.stack import Manifest, build_stack


def blob_image(shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0), origin=(-20.0, -20.0, -16.0)) -> sitk.Image:
    """An ellipsoid of intensity 100 plus a smaller bright one, 2 mm voxels, shifted by ``shift_mm``."""
    size = (20, 20, 16)
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin(origin)
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    x = origin[0] + 2.0 * i - shift_mm[0]
    y = origin[1] + 2.0 * j - shift_mm[1]
    z = origin[2] + 2.0 * k - shift_mm[2]
    values = 100.0 * ((x / 12) ** 2 + (y / 9) ** 2 + (z / 8) ** 2 < 1)
    values += 80.0 * (((x - 4) / 4) ** 2 + (y / 4) ** 2 + ((z + 2) / 4) ** 2 < 1)
    result = sitk.GetImageFromArray(values.astype(np.float32))
    result.CopyInformation(image)
    return sitk.SmoothingRecursiveGaussian(result, 1.5)


@pytest.fixture(scope="module")
def stack():
    recipe = Recipe(stages=(
        StageSpec("affine", spacing_mm=(4.0, 4.0, 4.0), depth=2, channels=8),
        StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=4, channels=8, alpha=1.0),
    ))
    return build_stack(Manifest("tiny", recipe), seed=0)


def labels_of(image: sitk.Image) -> sitk.Image:
    return sitk.BinaryThreshold(image, 50.0, 1e9, 1, 0) + sitk.BinaryThreshold(image, 120.0, 1e9, 1, 0)


def test_centre_alignment_moves_the_moving_image_onto_the_fixed(stack) -> None:
    fixed = blob_image()
    # same anatomy, but the moving image's grid (and content) sits 10 mm further along x
    moving = blob_image(shift_mm=(10.0, 0.0, 0.0), origin=(-10.0, -20.0, -16.0))
    centred = register(fixed, moving, stack, device="cpu", initial_alignment="centre")
    searched = register(fixed, moving, stack, device="cpu")  # the default: the capture search
    uncentred = register(fixed, moving, stack, device="cpu", initial_alignment="none")
    u = sitk.GetArrayFromImage(centred.displacement)
    assert np.allclose(u[..., 0], 10.0, atol=1e-3) and np.allclose(u[..., 1:], 0.0, atol=1e-3)
    f = image_to_tensor(fixed)
    assert float(ncc(f, image_to_tensor(centred.warped))) > 0.99
    assert float(ncc(f, image_to_tensor(searched.warped))) > 0.99
    assert float(ncc(f, image_to_tensor(uncentred.warped))) < 0.9


def test_centre_of_mass_alignment(stack) -> None:
    fixed = blob_image()
    moving = blob_image(shift_mm=(4.0, -2.0, 2.0))  # same grid, content moved
    result = register(fixed, moving, stack, device="cpu", initial_alignment="com")
    assert float(ncc(image_to_tensor(fixed), image_to_tensor(result.warped))) > 0.99


def test_progress_reports_every_step_and_cancel_stops(stack) -> None:
    seen: list[tuple[str, float]] = []
    register(blob_image(), blob_image(), stack, device="cpu", progress=lambda s, f: seen.append((s, f)))
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {s for s, _ in seen} >= {"preprocess", "stage 1/2 (affine)", "stage 2/2 (bspline)", "warp", "jacobian"}
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        register(blob_image(), blob_image(), stack, device="cpu", cancel=cancel)


def test_label_interpolations_agree_on_an_identity_warp(stack) -> None:
    image = blob_image()
    labels = sitk.Cast(labels_of(image), sitk.sitkUInt8)
    for mode in ("nearest", "one-hot-linear"):
        result = register(image, image, stack, moving_labels=labels, device="cpu", label_interpolation=mode)
        assert result.warped_labels.GetPixelID() == sitk.sitkUInt8
        assert np.array_equal(sitk.GetArrayFromImage(result.warped_labels), sitk.GetArrayFromImage(labels))


def test_fixed_mask_restricts_the_jacobian_statistics(stack) -> None:
    image = blob_image()
    mask = sitk.Cast(labels_of(image) > 0, sitk.sitkUInt8)
    result = register(image, image, stack, fixed_mask=mask, device="cpu", refine=3)
    det = sitk.GetArrayFromImage(result.jacobian)
    inside = det[sitk.GetArrayFromImage(mask) > 0]
    assert result.jacobian_std == pytest.approx(float(inside.astype(np.float64).std(ddof=1)), rel=1e-4)
    empty = sitk.Image(mask)
    empty *= 0
    with pytest.raises(InputError, match="mask is empty"):
        register(image, image, stack, fixed_mask=empty, device="cpu")


def test_refinement_improves_similarity(stack) -> None:
    fixed = blob_image()
    moving = blob_image(shift_mm=(3.0, 2.0, -2.0))
    f = image_to_tensor(fixed)
    plain = register(fixed, moving, stack, device="cpu", initial_alignment="none")
    refined = register(fixed, moving, stack, device="cpu", initial_alignment="none", refine=40)
    assert float(ncc(f, image_to_tensor(refined.warped))) > float(ncc(f, image_to_tensor(plain.warped))) + 0.02
    assert refined.folding_fraction == 0.0
    assert "refine (40 steps)" in refined.timings


def test_inputs_are_never_modified(stack) -> None:
    fixed, moving = blob_image(), blob_image(shift_mm=(2.0, 0.0, 0.0))
    labels = sitk.Cast(labels_of(moving), sitk.sitkUInt8)
    before = [sitk.GetArrayFromImage(x).copy() for x in (fixed, moving, labels)]
    geometry = [(x.GetOrigin(), x.GetSpacing(), x.GetDirection(), x.GetPixelID()) for x in (fixed, moving, labels)]
    register(fixed, moving, stack, moving_labels=labels, device="cpu", refine=2)
    assert all(np.array_equal(a, sitk.GetArrayFromImage(x)) for a, x in zip(before, (fixed, moving, labels)))
    assert geometry == [(x.GetOrigin(), x.GetSpacing(), x.GetDirection(), x.GetPixelID()) for x in (fixed, moving, labels)]


def test_device_choice() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_images_smaller_than_the_networks_receptive_grid_are_padded(stack) -> None:
    rng = np.random.default_rng(0)
    tiny = sitk.GetImageFromArray(rng.random((5, 6, 7)).astype(np.float32))  # 7 x 6 x 5 mm, 1 mm voxels
    result = register(tiny, tiny, stack, device="cpu")
    assert result.warped.GetSize() == tiny.GetSize()
    assert np.allclose(sitk.GetArrayFromImage(result.warped), sitk.GetArrayFromImage(tiny), atol=1e-5)
