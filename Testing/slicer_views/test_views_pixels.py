"""What the clinician sees: the module's outputs drawn by Slicer's own slice logic and displayable
managers (slicer-core, off-screen VTK), checked pixel by pixel against the data on the fixed grid.

Every check maps each pixel back to the fixed voxel it shows (the slice node's XY-to-RAS, then the
fixed volume's RAS-to-IJK) and compares the colour Slicer drew with the colour it must draw there:
the fixed volume's grey value, blended with the Jacobian table's colour at the layer opacity, the
red Folding segment, each propagated segment in its colour where its label is.  Runs on the sample
pair and on the oblique, anisotropic development pair, both after ``registerVolumes`` with a
folding-prone stack (see conftest.py).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from views_checks import Shown, at, blend, dilate, matrix, near, pixel_voxels, ras_to_ijk, table, voxels


def _hidden_segmentations(run) -> list:
    return [run.outputs.foldingSegmentationNode, run.outputs.segmentationNode]


def _voxel_ras(node, ijk) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return (matrix(m) @ np.array([*ijk, 1.0]))[:3]


def _positions(run) -> dict[str, np.ndarray]:
    """World points the views are moved to: the fixed centre, the most folded and the most expanded place."""
    from scipy import ndimage

    det = voxels(run.outputs.jacobianVolumeNode)
    folded = ndimage.uniform_filter((det <= 0).astype(np.float32), 5)
    expanded = ndimage.uniform_filter((det >= 2).astype(np.float32), 5)
    centre = (np.array(det.shape[::-1]) - 1) / 2
    places = {"centre": centre}
    for name, density in (("folded", folded), ("expanded", expanded)):
        k, j, i = np.unravel_index(np.argmax(density), density.shape)
        places[name] = np.array([i, j, k], float)
    return {name: _voxel_ras(run.fixed, ijk) for name, ijk in places.items()}


def test_the_background_is_the_fixed_volume_as_slicer_shows_it(any_run) -> None:
    """The renderer's pixel -> world map is right: the background pixels are the fixed volume's
    voxels (linear interpolation, the display node's window), also on an oblique, anisotropic grid."""
    from scipy import ndimage

    run = any_run
    display = run.fixed.GetDisplayNode()
    low = display.GetLevel() - display.GetWindow() / 2
    array = voxels(run.fixed).astype(np.float64)
    with Shown(run.views, foreground=None, hidden=_hidden_segmentations(run)):
        for name in run.views.names:
            image = run.views.render(name)
            ras = run.views.pixelRAS(name)
            ijk = (np.concatenate([ras, np.ones(ras.shape[:2] + (1,))], -1) @ ras_to_ijk(run.fixed).T)[..., :3]
            dims = np.array(array.shape[::-1])
            inside = np.all((ijk >= 1) & (ijk <= dims - 2), -1)
            values = ndimage.map_coordinates(array, [ijk[..., 2], ijk[..., 1], ijk[..., 0]], order=1)
            grey = np.clip((values - low) / display.GetWindow() * 255.0, 0, 255)
            assert inside.sum() > 0.2 * inside.size, name
            assert np.all(image[..., 0] == image[..., 2]), f"{name}: the fixed volume alone must be grey"
            good = np.abs(image[..., 0].astype(np.float64) - grey) <= 3
            assert good[inside].mean() > 0.98, f"{name}: {good[inside].mean():.3f} of the pixels show the fixed voxels"


def test_jacobian_overlay_leaves_det_1_clear_and_shows_both_ends_of_the_colour_map(any_run) -> None:
    """Slicer blends the Jacobian layer over the fixed volume as the module styled it: where
    |det J - 1| < 0.1 the fixed grey values are left as they are; elsewhere the table's colour at
    the module's opacity, reaching the blue end (det <= 0) and the orange end (det >= 2)."""
    from DLIRRegistrationLib import display

    run = any_run
    jacobian = run.outputs.jacobianVolumeNode
    shown = jacobian.GetDisplayNode()
    composite = run.views.compositeNode("Red")
    assert composite.GetForegroundVolumeID() == jacobian.GetID() and composite.GetBackgroundVolumeID() == run.fixed.GetID()
    opacity = composite.GetForegroundOpacity()
    assert opacity == display.FOREGROUND_OPACITY
    assert (shown.GetWindow(), shown.GetLevel(), shown.GetInterpolate()) == (2.0, 1.0, 0)
    rgba = table(shown.GetColorNode())
    assert np.allclose(rgba[0, :3], display.COMPRESSION_COLOR, atol=0.01) and rgba[0, 3] == 1.0
    assert np.allclose(rgba[-1, :3], display.EXPANSION_COLOR, atol=0.01) and rgba[-1, 3] == 1.0
    det = voxels(jacobian).astype(np.float64)

    counts = {"clear": 0, "compressed": 0, "expanded": 0, "blue end": 0, "orange end": 0}
    agree, total = 0, 0
    for place in _positions(run).values():
        run.views.jumpTo(place)
        for name in run.views.names:
            with Shown(run.views, hidden=_hidden_segmentations(run)):
                overlay = run.views.render(name)
            with Shown(run.views, foreground=None, hidden=_hidden_segmentations(run)):
                background = run.views.render(name)
            nearest, certain = pixel_voxels(run.views, name, jacobian)
            d = at(det, nearest)
            index = np.clip(np.floor(d / 2.0 * 256), 0, 255).astype(int)
            # the entry a value falls in, or its neighbour where float rounding may decide
            ok = np.zeros(d.shape, bool)
            for shift in (0, -1, 1):
                entry = rgba[np.clip(index + shift, 0, 255)]
                ok |= near(overlay, blend(background, entry[..., :3], opacity * entry[..., 3]), 2)
            agree += int(ok[certain].sum())
            total += int(certain.sum())
            clear = certain & (np.abs(d - 1) < display.CLEAR_WITHIN - 0.01)
            assert near(overlay, background.astype(np.float64), 1)[clear].all(), f"{name}: det ~ 1 must leave the fixed grey values"
            counts["clear"] += int(clear.sum())
            counts["compressed"] += int((certain & (d < 1 - display.CLEAR_WITHIN - 0.01)).sum())
            counts["expanded"] += int((certain & (d > 1 + display.CLEAR_WITHIN + 0.01)).sum())
            for end, where, color in (("blue end", d <= 0, display.COMPRESSION_COLOR),
                                      ("orange end", d >= 2, display.EXPANSION_COLOR)):
                mask = certain & where
                counts[end] += int(mask.sum())
                assert near(overlay, blend(background, color, opacity), 3)[mask].all(), f"{name}: {end}"
    run.views.fit()
    assert agree / total > 0.995, f"only {agree / total:.4f} of the pixels have the table's colour for their det J"
    assert min(counts.values()) >= 10, counts


def test_folding_is_red_in_the_slice_views(any_run) -> None:
    """Pixels on folded voxels are solid red; in the default view (as ``registerVolumes`` left it:
    Jacobian, folding, propagated outlines on top) they are red unless a segment outline crosses
    them, and red appears nowhere else."""
    run = any_run
    det = voxels(run.outputs.jacobianVolumeNode)
    folded = det <= 0
    assert run.outputs.foldingPercent > 0, "the folding-prone stack must fold this pair"
    outline_colors = [255.0 * np.array(run.outputs.segmentationNode.GetSegmentation().GetNthSegment(i).GetColor())
                      for i in range(run.outputs.segmentationNode.GetSegmentation().GetNumberOfSegments())]
    run.views.jumpTo(_positions(run)["folded"])
    counts = {"folded": 0, "red alone": 0, "red": 0, "red or outline": 0, "red pixels": 0, "red elsewhere": 0}
    for name in run.views.names:
        nearest, certain = pixel_voxels(run.views, name, run.fixed)
        on_folding = certain & at(folded, nearest)
        with Shown(run.views, hidden=[run.outputs.segmentationNode]):
            alone = run.views.render(name)
        image = run.views.render(name)
        red = near(image, np.array([255.0, 0.0, 0.0]), 2)
        outline = np.zeros(red.shape, bool)
        for color in outline_colors:
            outline |= near(image, color, 2)
        counts["folded"] += int(on_folding.sum())
        counts["red alone"] += int(near(alone, np.array([255.0, 0.0, 0.0]), 2)[on_folding].sum())
        counts["red"] += int(red[on_folding].sum())
        counts["red or outline"] += int((red | outline)[on_folding].sum())
        counts["red pixels"] += int((red & certain).sum())
        counts["red elsewhere"] += int((red & certain & ~at(dilate(folded, 1), nearest)).sum())
    run.views.fit()
    assert counts["folded"] >= 100, counts
    assert counts["red alone"] / counts["folded"] > 0.99, counts
    assert counts["red or outline"] / counts["folded"] > 0.99, counts
    assert counts["red"] / counts["folded"] > 0.4, counts
    assert counts["red elsewhere"] <= 0.02 * counts["red pixels"], counts


def test_each_propagated_segment_is_drawn_in_its_colour_where_its_label_is(any_run) -> None:
    """Segments view (Jacobian layer off, Folding hidden): each propagated segment's outline, in its
    exact colour, runs along the boundary of its label on the fixed grid (the engine's warped
    labels) and leaves the inside untouched; with the fill switched on (Slicer's 50 %), the fill
    covers exactly the label's voxels."""
    from DLIRRegistrationLib import display
    from DLIRRegistrationLib.segmentations import segmentMask
    from scipy import ndimage

    run = any_run
    node = run.outputs.segmentationNode
    shown = node.GetDisplayNode()
    assert (shown.GetVisibility2DFill(), shown.GetVisibility2DOutline(), shown.GetOpacity2DOutline(),
            shown.GetSliceIntersectionThickness()) == (0, 1, 1.0, display.SEGMENT_OUTLINE_THICKNESS)
    assert not run.segmentation.GetDisplayNode().GetVisibility2D(), "the moving segmentation must not cover the fixed volume"
    labels = sitk.GetArrayFromImage(run.outputs.registration.warped_labels)
    segmentation = node.GetSegmentation()
    masks = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        mask = segmentMask(node, segment_id)
        values = np.unique(labels[mask])
        assert len(values) == 1 and np.array_equal(mask, labels == values[0]), segment_id
        masks[segment_id] = mask
    square = np.ones((3, 3), bool)
    tally = {s: dict(inside=0, untouched=0, filled=0, outline=0, stray=0) for s in masks}
    for place in ("centre", "folded"):
        run.views.jumpTo(_positions(run)[place])
        for name in run.views.names:
            with Shown(run.views, foreground=None, hidden=_hidden_segmentations(run)):
                background = run.views.render(name)
            with Shown(run.views, foreground=None, hidden=[run.outputs.foldingSegmentationNode]):
                outlined = run.views.render(name)
                shown.SetVisibility2DFill(True)
                shown.SetOpacity2DFill(0.5)
                try:
                    filled = run.views.render(name)
                finally:
                    shown.SetVisibility2DFill(False)
            nearest, certain = pixel_voxels(run.views, name, run.fixed)
            for segment_id, mask in masks.items():
                color = np.array(segmentation.GetSegment(segment_id).GetColor())
                counts = tally[segment_id]
                # the label in this view's plane, pixel by pixel; its inside and its edge (3 px either side)
                label = at(mask, nearest)
                core = ndimage.binary_erosion(label, square, iterations=3)
                interior = core & certain
                band = ndimage.binary_dilation(label, square, iterations=3) & ~core
                counts["inside"] += int(interior.sum())
                counts["untouched"] += int(near(outlined, background.astype(np.float64), 1)[interior].sum())
                counts["filled"] += int(near(filled, blend(background, color, 0.5), 3)[interior].sum())
                exact = certain & near(outlined, 255.0 * color, 2) & ~near(background, 255.0 * color, 8)
                counts["outline"] += int((exact & band).sum())
                counts["stray"] += int((exact & ~band).sum())
    run.views.fit()
    for segment_id, counts in tally.items():
        assert counts["inside"] >= 50, (segment_id, counts)
        assert counts["untouched"] / counts["inside"] > 0.95, (segment_id, counts)
        assert counts["filled"] / counts["inside"] > 0.95, (segment_id, counts)
        assert counts["outline"] >= 30 and counts["stray"] <= 0.05 * counts["outline"], (segment_id, counts)


def test_moving_volume_under_the_output_transform_lands_on_the_warped_volume(any_run) -> None:
    """With the output transform as its parent, the moving volume drawn by Slicer (resliced through
    the transform) has the edges of the warped volume; without it, it does not."""
    run = any_run
    warped, moving = run.outputs.warpedVolumeNode, run.moving
    same = warped.GetDisplayNode()
    saved = (same.GetAutoWindowLevel(), same.GetWindow(), same.GetLevel())
    same.AutoWindowLevelOff()
    same.SetWindowLevel(moving.GetDisplayNode().GetWindow(), moving.GetDisplayNode().GetLevel())
    hidden = _hidden_segmentations(run)
    scores = {"after": [], "before": []}
    # the warped volume lives on the fixed grid: its edges may sit up to half a fixed voxel away
    pixel_mm = run.views.sliceNode("Red").GetFieldOfView()[0] / run.views.size[0]
    tolerance = max(1, round(0.5 * max(run.fixed.GetSpacing()) / pixel_mm))
    try:
        for place in ("centre", "folded"):
            run.views.jumpTo(_positions(run)[place])
            for name in run.views.names:
                nearest, certain = pixel_voxels(run.views, name, run.fixed)
                with Shown(run.views, background=warped, foreground=None, hidden=hidden):
                    reference = run.views.render(name)[..., 0].astype(np.float64)
                for when, parent in (("after", run.outputs.transformNode.GetID()), ("before", None)):
                    moving.SetAndObserveTransformNodeID(parent)
                    with Shown(run.views, background=moving, foreground=None, hidden=hidden):
                        shown = run.views.render(name)[..., 0].astype(np.float64)
                    scores[when].append((_edge_agreement(reference, shown, certain, tolerance),
                                         np.abs(reference - shown)[certain].mean()))
    finally:
        moving.SetAndObserveTransformNodeID(None)
        same.SetAutoWindowLevel(saved[0])
        same.SetWindowLevel(saved[1], saved[2])
        run.views.fit()
    after, before = np.array(scores["after"]), np.array(scores["before"])
    # (edge agreement, mean |difference| in grey levels) per view and place
    assert after[:, 0].min() > 0.85 and after[:, 0].mean() > 0.9, f"edges agree only {after[:, 0]}"
    assert after[:, 1].max() < 6.0, after[:, 1]
    assert before[:, 0].mean() < after[:, 0].mean() - 0.25, (before[:, 0], after[:, 0])
    assert before[:, 1].min() > 4 * after[:, 1].max(), (before[:, 1], after[:, 1])


def _edge_agreement(a: np.ndarray, b: np.ndarray, where: np.ndarray, tolerance: int) -> float:
    """Share of the strong edges of ``a`` that have an edge of ``b`` within ``tolerance`` pixels, and the reverse (the smaller)."""
    from scipy import ndimage

    def edges(image):
        magnitude = np.hypot(ndimage.sobel(image, 0), ndimage.sobel(image, 1))
        return where & (magnitude > np.percentile(magnitude[where], 85)) & (magnitude > 20)

    ea, eb = edges(a), edges(b)
    near_a, near_b = (ndimage.binary_dilation(e, np.ones((3, 3), bool), iterations=tolerance) for e in (ea, eb))
    return float(min((ea & near_b).sum() / max(ea.sum(), 1), (eb & near_a).sum() / max(eb.sum(), 1)))
