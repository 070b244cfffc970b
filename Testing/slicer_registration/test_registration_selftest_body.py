"""The self-test's Logic part (sample pair end to end) and the small library pieces around it."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("mode", ["fast", "accurate"])
def test_sample_pair_end_to_end(scene, mode: str) -> None:
    from DLIRRegistrationLib import samplepair

    pair = samplepair.loadSamplePair(scene)
    names = {pair.movingSegmentationNode.GetSegmentation().GetNthSegment(i).GetName() for i in range(4)}
    assert names == set(samplepair.SEGMENT_NAMES.values())
    stack = samplepair.selfTestStack()
    outputs, problems = samplepair.runSampleRegistration(scene, pair, stack, mode=mode)
    assert problems == []
    assert outputs.device == "cpu" and outputs.seconds > 0
    assert "s on cpu" in outputs.summary()


def test_stack_chooser_lists_summarises_and_adds(user_models, stack_file, tmp_path) -> None:
    from dlir.errors import StackError
    from DLIRRegistrationLib import stacks

    info = stacks.addStackFromFile(stack_file)
    assert info.path == user_models / "fresh-small.safetensors" and info.path.is_file()
    listed = {i.name: i for i in stacks.listStacks()}
    assert "fresh-small" in listed
    summary = stacks.stackSummary(listed["fresh-small"])
    assert summary.startswith("fresh-small | any modality, any anatomy | affine 8x8x8 mm, bspline 4x4x4 mm")
    assert "name:        fresh-small" in stacks.stackDetails(listed["fresh-small"])
    with pytest.raises(StackError, match="already exists in"):
        stacks.addStackFromFile(_copy(stack_file, tmp_path))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"x" * 64)
    with pytest.raises(StackError):
        stacks.addStackFromFile(bad)
    cache = stacks.StackCache()
    assert cache.get("fresh-small") is cache.get(str(info.path))


def _copy(path, folder):
    target = folder / "elsewhere" / path.name
    target.parent.mkdir()
    target.write_bytes(path.read_bytes())
    return target


def test_modality_warning() -> None:
    import SimpleITK as sitk

    from DLIRRegistrationLib.stacks import modalityWarning

    mr = sitk.GetImageFromArray(np.linspace(0, 800, 64, dtype=np.float32).reshape(4, 4, 4))
    ct = sitk.GetImageFromArray(np.linspace(-1024, 1500, 64, dtype=np.float32).reshape(4, 4, 4))
    assert modalityWarning("CT", mr, "fixed volume").startswith("the stack was trained on CT")
    assert modalityWarning("MR T1", ct, "moving volume").startswith("the stack was trained on MR T1")
    assert modalityWarning("CT", ct, "fixed volume") is None and modalityWarning("", ct, "x") is None


def test_jacobian_overlay_in_slice_views(scene) -> None:
    from DLIRRegistrationLib import display

    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
    jacobian = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "jac")
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    display.showInSliceViews(scene, fixed, jacobian)
    assert (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()) == (fixed.GetID(), jacobian.GetID())
    assert composite.GetForegroundOpacity() == display.FOREGROUND_OPACITY
    table = display.jacobianColorNode(scene)
    assert display.jacobianColorNode(scene) is table, "one colour table per scene"
    rgba = [0.0] * 4
    for entry in (127, 128):  # det just below and just above 1 (the middle of the [0, 2] window)
        table.GetColor(entry, rgba)
        assert rgba[3] == 0.0, "det = 1 is transparent: the fixed volume shows unchanged"


def test_slice_views_drop_an_old_jacobian_and_hide_the_propagated_source(scene) -> None:
    """A run without a Jacobian output removes a DLIR Jacobian left in the foreground (not a user's
    own foreground); the moving segmentation that was propagated is hidden in 2D only."""
    from DLIRRegistrationLib import display

    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
    old = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "old jacobian")
    display.styleJacobian(old, display.jacobianColorNode(scene))
    mine = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "user's overlay")
    mine.CreateDefaultDisplayNodes()
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    source = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moving segmentation")
    source.CreateDefaultDisplayNodes()
    composite.SetForegroundVolumeID(old.GetID())
    display.showInSliceViews(scene, fixed, None, (), source)
    assert composite.GetForegroundVolumeID() is None
    assert not source.GetDisplayNode().GetVisibility2D() and source.GetDisplayNode().GetVisibility3D()
    composite.SetForegroundVolumeID(mine.GetID())
    display.showInSliceViews(scene, fixed)
    assert composite.GetForegroundVolumeID() == mine.GetID()
