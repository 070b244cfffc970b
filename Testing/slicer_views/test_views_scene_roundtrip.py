"""A saved scene brings everything back: the sample pair's outputs saved by slicer-core (a scene
folder, .mrml + Data/ files, as ``vtkMRMLScene::SaveSceneToSlicerDataBundleDirectory`` writes it,
and a .mrb bundle, ``WriteToMRB``) and read into a new scene with views (``Import``, ``ReadFromMRB``)
are identical (transform values and direction, warped and Jacobian volumes with their colour
table and window, the Folding segment, the propagated segments with names, colours and
terminology, the view layers) and Slicer draws the same pixels; the saved ``.h5`` transform
loads in SimpleITK and maps points as Slicer does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import vtk
from views_checks import VIEW_SIZE, matrix, table, voxels


@dataclass
class Saved:
    folder: Path  # MRML + Data/ files
    mrml: Path
    mrb: Path
    pictures: dict  # view name -> image rendered before saving


@pytest.fixture(scope="module")
def saved(sample_run, tmp_path_factory) -> Saved:
    from test_views_pixels import _positions

    run = sample_run
    run.views.jumpTo(_positions(run)["folded"])  # slices through the folding: every output is in view
    pictures = {name: run.views.render(name) for name in run.views.names}
    folder = tmp_path_factory.mktemp("saved") / "scene"
    folder.mkdir()
    assert run.scene.SaveSceneToSlicerDataBundleDirectory(str(folder), None)
    mrb = folder.parent / "scene.mrb"
    assert run.scene.WriteToMRB(str(mrb), None)
    return Saved(folder, next(folder.glob("*.mrml")), mrb, pictures)


@pytest.fixture(params=["mrml", "mrb"], scope="module")
def loaded(request, saved):
    """A new scene with views (as the application has them) into which the saved scene is read."""
    import slicer
    from slicerviews import SlicerViews, prepareScene

    from DLIRRegistrationLib.gridtransform import observeSceneImports

    scene = slicer.vtkMRMLScene()
    prepareScene(scene)
    observeSceneImports(scene)  # as the module does on the application's scene at start-up
    views = SlicerViews(scene, VIEW_SIZE)
    if request.param == "mrml":
        scene.SetURL(str(saved.mrml))
        assert scene.Import()
    else:
        assert scene.ReadFromMRB(str(saved.mrb), False)
    yield scene, views
    views.close()
    scene.Clear(1)


def _node(scene, original):
    found = scene.GetFirstNodeByName(original.GetName())
    assert found is not None and found.GetClassName() == original.GetClassName(), original.GetName()
    return found


def _leaves(transform) -> list:
    import slicer

    collection = vtk.vtkCollection()
    slicer.vtkMRMLTransformNode.FlattenGeneralTransform(collection, transform)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def _describe(leaf) -> tuple:
    """What a flattened transform is: its class, direction flag and every number that defines it."""
    from vtk.util.numpy_support import vtk_to_numpy

    leaf.Update()
    if leaf.IsA("vtkOrientedGridTransform"):
        grid = leaf.GetDisplacementGrid()
        return (leaf.GetClassName(), leaf.GetInverseFlag(), grid.GetDimensions(), grid.GetOrigin(), grid.GetSpacing(),
                matrix(leaf.GetGridDirectionMatrix()).round(12).tolist(), leaf.GetDisplacementScale(), leaf.GetDisplacementShift(),
                vtk_to_numpy(grid.GetPointData().GetScalars()).tobytes())
    assert leaf.IsA("vtkLinearTransform"), leaf.GetClassName()
    return ("linear", matrix(leaf.GetMatrix()).tolist())


def _sample_points(volume, count: int = 500) -> np.ndarray:
    bounds = np.zeros(6)
    volume.GetRASBounds(bounds)
    low, high = bounds[0::2], bounds[1::2]
    return np.random.default_rng(0).uniform(low, high, (count, 3))


def _segments(node) -> list:
    from DLIRRegistrationLib.segmentations import segmentMask

    segmentation = node.GetSegmentation()
    out = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        out.append((segment_id, segment.GetName(), segment.GetColor(), segment.GetTerminology(),
                    segmentMask(node, segment_id).tobytes()))
    return out


def _segment_display(node) -> tuple:
    d = node.GetDisplayNode()
    return (d.GetVisibility(), d.GetVisibility2D(), d.GetVisibility2DFill(), d.GetVisibility2DOutline(),
            d.GetOpacity2DFill(), d.GetOpacity2DOutline(), d.GetSliceIntersectionThickness())


def test_the_transform_comes_back_with_its_values_and_direction(sample_run, loaded) -> None:
    """Same pieces (affines, displacement grids with origin, spacing and direction), same numbers,
    still *from parent* (fixed -> moving), still referencing the fixed and moving volumes."""
    scene, _ = loaded
    original = sample_run.outputs.transformNode
    copy = _node(scene, original)
    assert copy.GetTransformFromParent() is not None
    after = _leaves(copy.GetTransformFromParent())
    assert any(leaf.IsA("vtkOrientedGridTransform") for leaf in after)
    assert [_describe(leaf) for leaf in after] == [_describe(leaf) for leaf in _leaves(original.GetTransformFromParent())]
    for role, node in ((copy.GetFixedNodeReferenceRole(), sample_run.fixed),
                       (copy.GetMovingNodeReferenceRole(), sample_run.moving)):
        assert copy.GetNodeReference(role) is not None and copy.GetNodeReference(role).GetName() == node.GetName()


def test_the_transform_maps_points_as_before(sample_run, loaded) -> None:
    """Slicer's reader makes displacement grids cubic; the module's scene-import observer sets DLIR's back to linear
    (without it points moved by up to 0.39 mm on this field)."""
    scene, _ = loaded
    original = sample_run.outputs.transformNode.GetTransformFromParent()
    copy = _node(scene, sample_run.outputs.transformNode).GetTransformFromParent()
    moved = [np.linalg.norm(np.subtract(copy.TransformPoint(p), original.TransformPoint(p)))
             for p in _sample_points(sample_run.fixed, 300)]
    assert max(moved) < 1e-6, f"points move by up to {max(moved):.3f} mm after the round trip"


def test_the_volumes_come_back_with_their_colour_table_and_window(sample_run, loaded) -> None:
    from DLIRRegistrationLib import display

    scene, _ = loaded
    for original in (sample_run.outputs.warpedVolumeNode, sample_run.outputs.jacobianVolumeNode, sample_run.fixed):
        copy = _node(scene, original)
        assert np.array_equal(voxels(copy), voxels(original)), original.GetName()
        m, n = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        original.GetIJKToRASMatrix(m)
        copy.GetIJKToRASMatrix(n)
        assert np.allclose(matrix(m), matrix(n), atol=1e-9)
    original = sample_run.outputs.jacobianVolumeNode.GetDisplayNode()
    shown = _node(scene, sample_run.outputs.jacobianVolumeNode).GetDisplayNode()
    assert (shown.GetWindow(), shown.GetLevel(), shown.GetAutoWindowLevel(), shown.GetInterpolate()) == \
        (original.GetWindow(), original.GetLevel(), 0, 0) == (2.0, 1.0, 0, 0)
    colors = shown.GetColorNode()
    assert colors.GetAttribute(display.COLOR_ATTRIBUTE) == "Jacobian"
    assert colors.GetAttribute(display.COLOR_ATTRIBUTE + ".Version") == display.COLOR_VERSION
    assert np.allclose(table(colors), table(original.GetColorNode()), atol=1 / 255)
    assert display.jacobianColorNode(scene) is colors, "a new run in the reloaded scene reuses the saved table"


def test_the_segmentations_come_back_with_names_colours_and_terminology(sample_run, loaded) -> None:
    scene, _ = loaded
    outputs = sample_run.outputs
    for original in (outputs.foldingSegmentationNode, outputs.segmentationNode, sample_run.segmentation):
        copy = _node(scene, original)
        assert _segments(copy) == _segments(original), original.GetName()
        assert _segment_display(copy) == _segment_display(original), original.GetName()
    folding = _node(scene, outputs.foldingSegmentationNode).GetSegmentation().GetSegment("Folding")
    assert folding.GetName() == "Folding" and folding.GetColor() == (1.0, 0.0, 0.0)
    propagated = _node(scene, outputs.segmentationNode).GetSegmentation()
    source = sample_run.segmentation.GetSegmentation()
    assert [propagated.GetNthSegment(i).GetTerminology() for i in range(propagated.GetNumberOfSegments())] == \
        [source.GetNthSegment(i).GetTerminology() for i in range(source.GetNumberOfSegments())]
    assert len({propagated.GetNthSegment(i).GetTerminology() for i in range(propagated.GetNumberOfSegments())}) == 4


def test_the_views_come_back_and_slicer_draws_the_same_pixels(sample_run, saved, loaded) -> None:
    scene, views = loaded
    for name in views.names:
        composite, original = views.compositeNode(name), sample_run.views.compositeNode(name)
        assert scene.GetNodeByID(composite.GetBackgroundVolumeID()).GetName() == sample_run.fixed.GetName()
        assert scene.GetNodeByID(composite.GetForegroundVolumeID()).GetName() == sample_run.outputs.jacobianVolumeNode.GetName()
        assert composite.GetForegroundOpacity() == original.GetForegroundOpacity()
        picture = views.render(name)
        difference = np.abs(picture.astype(int) - saved.pictures[name].astype(int))
        assert difference.max() <= 1, f"{name}: {np.count_nonzero(difference.max(-1))} pixels differ"


def test_the_saved_transform_loads_in_simpleitk_and_maps_points_as_slicer_does(sample_run, saved) -> None:
    import SimpleITK as sitk

    files = sorted((saved.folder / "Data").glob("*.h5"))
    assert len(files) == 1, files
    transform = sitk.ReadTransform(str(files[0]))
    slicer_transform = sample_run.outputs.transformNode.GetTransformFromParent()
    flip = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    for point in _sample_points(sample_run.fixed):
        by_itk = flip * np.array(transform.TransformPoint(tuple(flip * point)))
        assert np.allclose(by_itk, slicer_transform.TransformPoint(point), atol=1e-3), point
