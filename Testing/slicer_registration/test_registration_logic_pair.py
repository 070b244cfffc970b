"""``registerVolumes`` on a real oblique, anisotropic pair with different fixed and moving grids
(``mni_oblique_aniso``, shrunk 2x to keep the test short): the scene outputs agree with the
engine and with Slicer's own resampling through the output transform."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dlir_registration_helpers import ijk_to_ras, read_volume, segmentation_from_labels, voxels


@pytest.fixture(scope="module")
def pair_files(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The pair shrunk by 2 along each axis (direction and anisotropy kept), as NIfTI files."""
    source = shared_data / "pairs" / "mni_oblique_aniso"
    out = tmp_path_factory.mktemp("pair")
    files = {}
    for name, shrink in (("fixed", sitk.BinShrink), ("moving", sitk.BinShrink), ("moving_labels", sitk.Shrink)):
        image = shrink(sitk.ReadImage(str(source / f"{name}.nii.gz")), [2, 2, 2])
        files[name] = out / f"{name}.nii.gz"
        sitk.WriteImage(image, str(files[name]))
    return files


@pytest.fixture(scope="module")
def run(pair_files, stack):
    """Nodes of the pair read by Slicer, and the outputs of one registration with every output (one scene per module)."""
    import slicer

    from DLIRRegistrationLib.registration import registerVolumes

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene

    fixed = read_volume(scene, pair_files["fixed"], "fixed")
    moving = read_volume(scene, pair_files["moving"], "moving")
    segmentation = segmentation_from_labels(scene, pair_files["moving_labels"], "moving segmentation")
    outputs = registerVolumes(scene, fixed, moving, stack, movingSegmentationNode=segmentation, device="cpu")
    yield fixed, moving, segmentation, outputs
    scene.Clear(1)


def test_outputs_are_on_the_fixed_grid_and_match_the_engine(run, pair_files, stack) -> None:
    from dlir.register import register

    fixed, moving, segmentation, outputs = run
    engine = register(sitk.ReadImage(str(pair_files["fixed"])), sitk.ReadImage(str(pair_files["moving"])), stack,
                      moving_labels=sitk.ReadImage(str(pair_files["moving_labels"])), device="cpu")
    for node in (outputs.warpedVolumeNode, outputs.jacobianVolumeNode):
        assert np.array_equal(ijk_to_ras(node), ijk_to_ras(fixed))
        assert node.GetParentTransformNode() is None
    # Slicer's and SimpleITK's NIfTI readers agree, so the node path gives the engine's own result
    assert np.allclose(voxels(outputs.warpedVolumeNode), sitk.GetArrayFromImage(engine.warped), atol=1e-3 * 255)
    assert np.allclose(voxels(outputs.jacobianVolumeNode), sitk.GetArrayFromImage(engine.jacobian), atol=1e-4)
    assert np.array_equal(voxels(outputs.jacobianVolumeNode), sitk.GetArrayFromImage(outputs.registration.jacobian))
    assert outputs.foldingPercent == pytest.approx(100 * engine.folding_fraction, abs=1e-6)
    assert outputs.jacobianStd == pytest.approx(engine.jacobian_std, rel=1e-4, abs=1e-6)


def test_moving_under_the_transform_resampled_by_slicer_matches_the_warped_volume(run) -> None:
    import slicer

    fixed, moving, segmentation, outputs = run
    transform = outputs.transformNode
    assert transform.GetNodeReferenceID(transform.GetFixedNodeReferenceRole()) == fixed.GetID()
    assert transform.GetNodeReferenceID(transform.GetMovingNodeReferenceRole()) == moving.GetID()
    moving.SetAndObserveTransformNodeID(transform.GetID())  # what a user does to see the alignment
    resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed)
    warped = voxels(outputs.warpedVolumeNode).astype(np.float64)
    by_slicer = voxels(resampled).astype(np.float64)
    inside = _well_inside(outputs, moving)
    assert inside.mean() > 0.2, "the test transform must keep most of the moving image in view"
    scale = float(voxels(moving).max() - voxels(moving).min())
    assert np.max(np.abs(by_slicer - warped)[inside]) / scale < 1e-3


def test_propagated_segmentation_matches_the_engine_label_warp(run, pair_files) -> None:
    import slicer

    from DLIRRegistrationLib.segmentations import segmentMask

    fixed, moving, segmentation, outputs = run
    engine_labels = sitk.GetArrayFromImage(outputs.registration.warped_labels)
    source, propagated = segmentation.GetSegmentation(), outputs.segmentationNode.GetSegmentation()
    assert propagated.GetNumberOfSegments() == source.GetNumberOfSegments() == 4
    # segments keep ID, name and colour; the label they came from is the number in their name
    merged = np.zeros(engine_labels.shape, np.int32)
    for index in range(source.GetNumberOfSegments()):
        segment_id = source.GetNthSegmentID(index)
        original, copy = source.GetSegment(segment_id), propagated.GetSegment(segment_id)
        assert (copy.GetName(), copy.GetColor()) == (original.GetName(), original.GetColor())
        label = int(re.findall(r"\d+", original.GetName())[-1])
        mask = segmentMask(outputs.segmentationNode, segment_id)
        assert mask.shape == engine_labels.shape
        merged[mask] = label
    assert np.mean(merged == engine_labels) >= 0.999
    # and with Slicer's nearest-neighbour resampling of the moving labels through the output transform
    labels = read_volume(slicer.mrmlScene, pair_files["moving_labels"], "labels", "vtkMRMLLabelMapVolumeNode")
    labels.SetAndObserveTransformNodeID(outputs.transformNode.GetID())
    by_slicer = voxels(slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(labels, fixed))
    assert np.mean(by_slicer == merged) >= 0.999


def test_jacobian_is_styled_and_folding_is_a_red_segment(run) -> None:
    from DLIRRegistrationLib import display
    from DLIRRegistrationLib.segmentations import segmentMask

    fixed, moving, segmentation, outputs = run
    shown = outputs.jacobianVolumeNode.GetDisplayNode()
    assert (shown.GetWindow(), shown.GetLevel()) == (2.0, 1.0)
    assert shown.GetColorNode().GetAttribute(display.COLOR_ATTRIBUTE) == "Jacobian"
    folding = outputs.foldingSegmentationNode.GetSegmentation().GetSegment("Folding")
    assert folding.GetName() == "Folding" and folding.GetColor() == (1.0, 0.0, 0.0)
    det = voxels(outputs.jacobianVolumeNode)
    assert np.array_equal(segmentMask(outputs.foldingSegmentationNode, "Folding"), det <= 0)
    spacing = np.linalg.norm(ijk_to_ras(fixed)[:3, :3], axis=0)
    assert outputs.foldingVolumeMm3 == pytest.approx(np.count_nonzero(det <= 0) * np.prod(spacing))


def _well_inside(outputs, moving) -> np.ndarray:
    """Fixed voxels whose transformed point is at least one voxel inside the moving image."""
    field = sitk.GetArrayFromImage(outputs.registration.displacement).astype(np.float64)  # LPS
    fixed_grid = outputs.registration.displacement
    k, j, i = np.meshgrid(*(np.arange(n) for n in field.shape[:3]), indexing="ij")
    index = np.stack([i, j, k], -1).reshape(-1, 3).astype(np.float64)
    direction = np.array(fixed_grid.GetDirection()).reshape(3, 3)
    points = index @ (direction @ np.diag(fixed_grid.GetSpacing())).T + np.array(fixed_grid.GetOrigin())
    mapped = points + field.reshape(-1, 3)
    ras = mapped * np.array([-1.0, -1.0, 1.0])
    moving_index = (np.c_[ras, np.ones(len(ras))] @ np.linalg.inv(ijk_to_ras(moving)).T)[:, :3]
    size = np.array(moving.GetImageData().GetDimensions())
    ok = np.all((moving_index >= 1) & (moving_index <= size - 2), axis=1)
    return ok.reshape(field.shape[:3])


def test_the_transform_node_is_compact_and_saves_as_the_engines_composite(run, tmp_path: Path) -> None:
    """The node holds the stages (affines and fields on the network grids, linear), and writes back what the engine writes."""
    import slicer

    fixed, moving, segmentation, outputs = run
    general = outputs.transformNode.GetTransformFromParent()
    parts = [general.GetConcatenatedTransform(i) for i in range(general.GetNumberOfConcatenatedTransforms())]
    grids = [p for p in parts if p.IsA("vtkGridTransform")]
    ours = outputs.registration.itk_transform()
    assert len(parts) == ours.GetNumberOfTransforms() >= 3  # the initial alignment and every stage
    assert len(grids) == sum(ours.GetNthTransform(i).GetName() == "DisplacementFieldTransform" for i in range(len(parts))) >= 1
    for grid in grids:
        assert grid.GetInterpolationModeAsString() == "Linear"
        assert min(grid.GetDisplacementGrid().GetSpacing()) >= 4.0  # a network grid, not the fixed image's
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(str(tmp_path / "saved.h5"))
    assert storage.WriteData(outputs.transformNode)
    saved = sitk.ReadTransform(str(tmp_path / "saved.h5"))
    rng = np.random.default_rng(1)
    for point in rng.uniform(-60, 60, (50, 3)):
        assert np.allclose(saved.TransformPoint(tuple(point)), ours.TransformPoint(tuple(point)), atol=1e-4)
