"""RAS <-> LPS conversions and the grid transform's direction, on oblique, anisotropic volumes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from dlir_registration_helpers import ijk_to_ras, volume_from_array, voxels


def oblique_ijk_to_ras() -> np.ndarray:
    """Rotation of 17 deg about an oblique axis, spacing 0.7 x 1.3 x 2.9 mm, an odd origin."""
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    angle = np.deg2rad(17)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    m = np.eye(4)
    m[:3, :3] = rotation @ np.diag([0.7, 1.3, 2.9])
    m[:3, 3] = [-12.34, 56.7, -8.9]
    return m


def test_node_to_engine_image_to_node_is_exact(scene) -> None:
    from DLIRRegistrationLib.volumes import imageToVolumeNode, volumeNodeToImage

    array = np.random.default_rng(1).normal(size=(7, 9, 11)).astype(np.float32)
    node = volume_from_array(scene, array, oblique_ijk_to_ras(), "oblique")
    image = volumeNodeToImage(node, "moving volume")
    # the engine's LPS geometry: x and y flipped, spacing kept, voxel order kept
    directions = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(directions)
    ras_dirs = np.array([[directions.GetElement(r, c) for c in range(3)] for r in range(3)])
    flip = np.diag([-1.0, -1.0, 1.0])
    assert image.GetSize() == (11, 9, 7)
    assert image.GetSpacing() == node.GetSpacing()
    assert image.GetOrigin() == tuple(flip @ np.array(node.GetOrigin()))
    assert image.GetDirection() == tuple((flip @ ras_dirs).ravel())
    assert np.array_equal(sitk.GetArrayFromImage(image), array)
    back = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "back")
    imageToVolumeNode(image, back)
    assert np.array_equal(ijk_to_ras(back), ijk_to_ras(node))  # bit for bit
    assert back.GetSpacing() == node.GetSpacing() and back.GetOrigin() == node.GetOrigin()
    assert np.array_equal(voxels(back), array)
    # a physical point agrees: voxel (1, 2, 3) in RAS, and in LPS through the image
    ras = ijk_to_ras(node) @ [1, 2, 3, 1]
    assert np.allclose(flip @ ras[:3], image.TransformIndexToPhysicalPoint((1, 2, 3)), atol=1e-12)


def test_linear_parent_transforms_are_folded_in_and_non_linear_ones_refused(scene) -> None:
    import slicer

    from dlir.errors import InputError
    from DLIRRegistrationLib.volumes import volumeGeometry, volumeNodeToImage, vtkMatrix

    node = volume_from_array(scene, np.zeros((4, 5, 6), np.int16), oblique_ijk_to_ras(), "v")
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid")
    rigid = np.eye(4)
    rigid[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    rigid[:3, 3] = [5, -3, 2]
    parent.SetMatrixTransformToParent(vtkMatrix(rigid))
    node.SetAndObserveTransformNodeID(parent.GetID())
    assert np.allclose(volumeGeometry(node, "fixed volume").ijkToRAS(), rigid @ oblique_ijk_to_ras(), atol=1e-12)
    grid = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    grid.SetAndObserveTransformToParent(slicer.vtkOrientedGridTransform())
    parent.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear transform"):
        volumeNodeToImage(node, "fixed volume")


def test_grid_transform_is_from_parent_fixed_to_moving_in_ras(scene) -> None:
    from DLIRRegistrationLib.gridtransform import setRegistrationResult
    from DLIRRegistrationLib.volumes import volumeNodeToImage

    fixed = volume_from_array(scene, np.zeros((6, 7, 8), np.float32), oblique_ijk_to_ras(), "fixed")
    moving = volume_from_array(scene, np.zeros((6, 7, 8), np.float32), np.eye(4), "moving")
    reference = volumeNodeToImage(fixed, "fixed volume")
    field = np.zeros((6, 7, 8, 3), np.float32)
    field[..., 0] = 10.0  # +10 mm L in LPS = -10 mm R
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.CopyInformation(reference)
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "t")
    setRegistrationResult(transform, sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64)), fixed, moving)
    point = ijk_to_ras(fixed) @ [3, 3, 3, 1]
    mapped = transform.GetTransformFromParent().TransformPoint(point[:3])
    assert np.allclose(np.array(mapped) - point[:3], [-10.0, 0.0, 0.0], atol=1e-9)
    assert transform.GetNodeReferenceID(transform.GetFixedNodeReferenceRole()) == fixed.GetID()
