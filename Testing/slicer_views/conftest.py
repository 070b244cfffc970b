"""Fixtures of the view tests: registrations with Slicer views attached (slicer-core, off-screen VTK).

Each run builds a scene as the application has it (:func:`slicerviews.prepareScene`: default
colour nodes, slice views), loads a pair, gives the moving segments fixed colours and
terminology, and calls ``registerVolumes``, which sets the views up itself (background fixed,
Jacobian foreground, segmentations).  The stack is folding-prone on purpose
(:func:`views_checks.folding_stack`), so that compression, expansion beyond both ends of the
Jacobian window and folding all appear in the pictures.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for folder in (REPO / "DLIRRegistration", HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


@pytest.fixture(scope="session")
def offscreen() -> None:
    """Skip (with the reason) where VTK cannot render off screen; fail instead where
    ``DLIR_REQUIRE_OFFSCREEN=1`` (``.ci/run`` sets it after installing Mesa's EGL)."""
    from slicerviews import offscreenRenderingError

    error = offscreenRenderingError()
    if error and os.environ.get("DLIR_REQUIRE_OFFSCREEN") == "1":
        pytest.fail(error)
    if error:
        pytest.skip(error)


@dataclass
class Run:
    """A registration in a scene with views: the inputs, ``registerVolumes``' outputs, the views."""

    scene: object
    views: object
    fixed: object
    moving: object
    segmentation: object  # the moving segmentation
    outputs: object


def register_with_views(scene, fixed, moving, segmentation) -> Run:
    """``registerVolumes`` with the folding-prone stack in a scene whose views exist already (as in Slicer)."""
    import slicer
    from slicerviews import SlicerViews
    from views_checks import VIEW_SIZE, folding_stack, label_segments

    from DLIRRegistrationLib.registration import registerVolumes

    slicer.mrmlScene = scene
    views = SlicerViews(scene, VIEW_SIZE)
    label_segments(segmentation)
    for volume in (fixed, moving):
        if volume.GetDisplayNode() is None:
            volume.CreateDefaultDisplayNodes()  # as loading a volume in Slicer does
    outputs = registerVolumes(scene, fixed, moving, folding_stack(), movingSegmentationNode=segmentation, device="cpu")
    views.fit()
    return Run(scene, views, fixed, moving, segmentation, outputs)


@pytest.fixture(scope="module")
def sample_run(offscreen):
    """The bundled sample pair (MNI152, 2 mm, axis-aligned), registered; views fitted to the fixed volume."""
    import slicer
    from slicerviews import prepareScene

    from DLIRRegistrationLib.samplepair import loadSamplePair

    scene = slicer.vtkMRMLScene()
    prepareScene(scene)  # before loading: new volumes take the application's default colour nodes
    pair = loadSamplePair(scene)
    run = register_with_views(scene, pair.fixedVolumeNode, pair.movingVolumeNode, pair.movingSegmentationNode)
    yield run
    run.views.close()
    scene.Clear(1)


@pytest.fixture(scope="module")
def oblique_run(offscreen, shared_data: Path, tmp_path_factory):
    """``mni_oblique_aniso`` (oblique, anisotropic, fixed and moving on different grids) shrunk 2x, registered."""
    import SimpleITK as sitk
    import slicer
    from slicerviews import prepareScene
    from views_checks import read_volume, segmentation_from_labels

    source = shared_data / "pairs" / "mni_oblique_aniso"
    folder = tmp_path_factory.mktemp("oblique")
    files = {}
    for name, shrink in (("fixed", sitk.BinShrink), ("moving", sitk.BinShrink), ("moving_labels", sitk.Shrink)):
        files[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(shrink(sitk.ReadImage(str(source / f"{name}.nii.gz")), [2, 2, 2]), str(files[name]))
    scene = slicer.vtkMRMLScene()
    prepareScene(scene)
    fixed = read_volume(scene, files["fixed"], "oblique fixed")
    moving = read_volume(scene, files["moving"], "oblique moving")
    segmentation = segmentation_from_labels(scene, files["moving_labels"], "oblique moving segmentation")
    run = register_with_views(scene, fixed, moving, segmentation)
    yield run
    run.views.close()
    scene.Clear(1)


@pytest.fixture(params=["sample", "oblique"])
def any_run(request):
    """The sample run, then the oblique one."""
    return request.getfixturevalue(f"{request.param}_run")
