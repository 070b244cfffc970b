"""Regenerate the extension's screenshots: Slicer's own slice views of the module's outputs on the sample pair.

    .venv/bin/python Testing/slicer_views/make_screenshots.py [--out Resources/Screenshots] [--size 360]

Every picture is drawn by Slicer's slice logic and displayable managers (slicer-core, off screen:
see ``slicerviews.py``) from a scene set up by ``registerVolumes`` exactly as in the application;
only the captions, the view-colour bars and the legend around the views are added here.  The
sample segments get fixed colours (Slicer would give them table or random colours) so that the
pictures are reproducible.

* ``registration_jacobian.png``: the default view after *Apply* (fixed volume, Jacobian overlay,
  Folding segment, propagated segment outlines), with the bundled ``brain-mri`` stack and, below,
  with a deliberately folding-prone test stack, slices through its largest folding.
* ``registration_segments.png``: the fixed volume with the moving segmentation as it was (before)
  and with the propagated segments (after): did the labels land on the fixed anatomy?
* ``registration_before_after.png``: the fixed volume in green and the moving volume in magenta at
  50 % on top (grey where they agree), without and with the output transform as the moving
  volume's parent transform.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for folder in (REPO / "DLIRRegistration", HERE):
    sys.path.insert(0, str(folder))


def _scene(stack, size: int):
    """The sample pair registered with ``stack`` in a scene with views; returns (run-like dict)."""
    import slicer
    from DLIRRegistrationLib.registration import registerVolumes
    from DLIRRegistrationLib.samplepair import loadSamplePair
    from slicerviews import SlicerViews, prepareScene
    from views_checks import label_segments

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    prepareScene(scene)
    pair = loadSamplePair(scene)
    for volume in (pair.fixedVolumeNode, pair.movingVolumeNode):
        volume.CreateDefaultDisplayNodes()
    label_segments(pair.movingSegmentationNode)
    views = SlicerViews(scene, (size, size))
    outputs = registerVolumes(scene, pair.fixedVolumeNode, pair.movingVolumeNode, stack,
                              movingSegmentationNode=pair.movingSegmentationNode, device="cpu")
    views.fit()
    return dict(scene=scene, views=views, pair=pair, outputs=outputs)


def _row(views) -> list[np.ndarray]:
    return [views.render(name) for name in views.names]


def _voxel_ras(node, ijk) -> np.ndarray:
    import vtk
    from views_checks import matrix

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return (matrix(m) @ np.array([*ijk, 1.0]))[:3]


def _most(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    density = ndimage.uniform_filter(mask.astype(np.float32), 7)
    k, j, i = np.unravel_index(np.argmax(density), density.shape)
    return np.array([i, j, k], float)


def _figure(rows: list[tuple[str, list[np.ndarray]]], title: str, path: Path, legend: bool = False) -> None:
    """Views in a grid, each under a bar in its Slicer view colour, one caption per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from DLIRRegistrationLib import display
    from slicerviews import SLICE_VIEWS

    size = rows[0][1][0].shape[0]
    dpi = 100
    bar, caption, head = 18, 26, 34
    foot = 70 if legend else 8
    width = 3 * size + 4 * 6
    height = head + len(rows) * (caption + bar + size) + foot
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    fig.text(0.5, 1 - 20 / height, title, ha="center", va="center", fontsize=12, weight="bold")
    y = head
    for label, images in rows:
        fig.text(6 / width, 1 - (y + caption / 2) / height, label, ha="left", va="center", fontsize=10)
        y += caption
        for column, (image, (name, (orientation, color))) in enumerate(zip(images, SLICE_VIEWS.items())):
            x = 6 + column * (size + 6)
            strip = fig.add_axes([x / width, 1 - (y + bar) / height, size / width, bar / height])
            strip.set_facecolor(color)
            strip.set_xticks([])
            strip.set_yticks([])
            strip.text(0.01, 0.5, f"{name[0]}  {orientation}", va="center", ha="left", fontsize=9, color="black")
            view = fig.add_axes([x / width, 1 - (y + bar + size) / height, size / width, size / height])
            view.imshow(image, interpolation="nearest")
            view.set_axis_off()
        y += bar + size
    if legend:
        dets = np.linspace(0, 2, 256)
        strip = np.array([[display.jacobianColor(d) for d in dets]])
        grey = np.full(strip.shape[:2] + (3,), 0.5)
        shown = grey * (1 - display.FOREGROUND_OPACITY * strip[..., 3:]) + strip[..., :3] * display.FOREGROUND_OPACITY * strip[..., 3:]
        axis = fig.add_axes([0.25, 1 - (y + 28) / height, 0.5, 14 / height])
        axis.imshow(shown, aspect="auto", extent=(0, 2, 0, 1))
        axis.set_yticks([])
        axis.set_xticks([0, 0.5, 0.9, 1.1, 1.5, 2])
        axis.tick_params(labelsize=8)
        axis.set_xlabel("det J over mid-grey: blue compression, clear within 10 % of 1, orange expansion; "
                        "red segment: folding (det J <= 0)", fontsize=8)
    fig.savefig(path, dpi=dpi, facecolor="white")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots")
    parser.add_argument("--size", type=int, default=360, help="pixels per view (square)")
    args = parser.parse_args(argv)
    from dlir.stack import load_stack
    from slicerviews import offscreenRenderingError
    from views_checks import Shown, folding_stack, voxels

    error = offscreenRenderingError()
    if error:
        print(error, file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    trained = _scene(load_stack(REPO / "Resources" / "Models" / "brain-mri.safetensors"), args.size)
    folding = _scene(folding_stack(), args.size)
    written = []

    # 1. the default view after Apply: Jacobian overlay, folding, propagated outlines
    views, outputs = trained["views"], trained["outputs"]
    detail = (f"brain-mri stack: det J {np.percentile(voxels(outputs.jacobianVolumeNode), 1):.2f} to "
              f"{np.percentile(voxels(outputs.jacobianVolumeNode), 99):.2f} (1st-99th percentile), "
              f"folding {outputs.foldingPercent:.3f} %")
    rows = [(detail, _row(views))]
    det = voxels(folding["outputs"].jacobianVolumeNode)
    folding["views"].jumpTo(_voxel_ras(folding["pair"].fixedVolumeNode, _most(det <= 0)))
    rows.append((f"folding-prone test stack (not a real result): folding {folding['outputs'].foldingPercent:.1f} % "
                 f"of the fixed voxels, slices through the largest fold", _row(folding["views"])))
    path = args.out / "registration_jacobian.png"
    _figure(rows, "DLIR Registration: what the slice views show after Apply (sample pair)", path, legend=True)
    written.append(path)

    # 2. did the labels land: the moving segmentation as it was, then the propagated segments, on the fixed volume
    pair = trained["pair"]
    hide = [outputs.foldingSegmentationNode, outputs.segmentationNode]
    moving_display = pair.movingSegmentationNode.GetDisplayNode()
    moving_display.SetVisibility2D(True)
    moving_display.SetVisibility2DFill(False)
    moving_display.SetSliceIntersectionThickness(2)
    with Shown(views, foreground=None, hidden=hide):
        before = _row(views)
    moving_display.SetVisibility2D(False)
    with Shown(views, foreground=None, hidden=[outputs.foldingSegmentationNode]):
        after = _row(views)
    path = args.out / "registration_segments.png"
    _figure([("before: the moving segmentation over the fixed volume", before),
             ("after: the propagated segments (DLIR, brain-mri stack) over the fixed volume", after)],
            "Segments propagated moving -> fixed (Jacobian layer off)", path)
    written.append(path)

    # 3. the moving volume over the fixed one, without and with the output transform: fixed in green,
    #    moving in magenta at 50 % (Volumes module colour tables), grey where they agree
    moving, fixed = pair.movingVolumeNode, pair.fixedVolumeNode
    tables = [(node.GetDisplayNode(), node.GetDisplayNode().GetColorNodeID()) for node in (fixed, moving)]
    fixed.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeGreen")
    moving.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeMagenta")
    with Shown(views, foreground=moving, hidden=hide):
        views.setLayers(fixed, moving, 0.5)
        before = _row(views)
        moving.SetAndObserveTransformNodeID(outputs.transformNode.GetID())
        after = _row(views)
        moving.SetAndObserveTransformNodeID(None)
    for shown, table in tables:
        shown.SetAndObserveColorNodeID(table)
    path = args.out / "registration_before_after.png"
    _figure([("before: fixed (green) and moving (magenta, 50 %): grey where they agree, colour fringes where not", before),
             ("after: the same, with the output transform as the moving volume's parent transform", after)],
            "The moving volume under the DLIR transform (brain-mri stack)", path)
    written.append(path)

    for run in (trained, folding):
        run["views"].close()
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
