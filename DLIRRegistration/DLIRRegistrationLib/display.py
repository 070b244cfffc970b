"""How DLIR's outputs look in Slicer's views: the Jacobian overlay, the red folding segment, the segment outlines.

The Jacobian determinant ``det(I + du/dx)`` (1: volume kept, < 1: compression, > 1: expansion,
<= 0: folding) is the foreground layer over the fixed volume, windowed to [0, 2] so that 1 sits
in the middle of our own colour table (Slicer's file-based tables such as DivergingBlueRed are
absent from the slicer-core wheel, and red is kept for folding).  The table is transparent where
the volume is kept within 10 % (the fixed volume shows unchanged there), then goes from pale to
saturated blue towards det = 0 (compression) and orange towards det = 2 (expansion); Slicer's
volume display uses a table's alpha as a mask (0 or 1), so the layer opacity (50 %) is the blend.
Folding voxels are a solid red segment; propagated segments are drawn as 2 px outlines without
fill, so that the anatomy, the Jacobian colours, the folding and the label boundaries stay
readable together.  This look was chosen, and is checked pixel by pixel, on Slicer's own
rendering of the outputs (``Testing/slicer_views``).

Views are set through ``vtkMRMLSliceCompositeNode`` (fixed volume as background, Jacobian as
foreground): this works in the application and in slicer-core, where a scene without views has no
composite node to set.
"""

from __future__ import annotations

import numpy as np

#: attribute marking the Jacobian colour table, so repeated runs reuse one node
COLOR_ATTRIBUTE = "DLIR.ColorTable"
COLOR_NAME = "DLIR Jacobian (blue-clear-orange, centred at 1)"
#: version of the table's colours (a table made by an older DLIR in a saved scene is refreshed)
COLOR_VERSION = "2"
#: window of the Jacobian map: [0, 2] puts det = 1 at the centre of the table
JACOBIAN_RANGE = (0.0, 2.0)
#: |det - 1| below which the overlay is transparent (volume kept within 10 %: the fixed volume shows unchanged)
CLEAR_WITHIN = 0.1
FOLDING_COLOR = (1.0, 0.0, 0.0)
#: opacity of the Jacobian layer where it is not transparent (Slicer's volume display turns the table's
#: alpha into a mask, 0 or 1: the layer opacity is the only blend)
FOREGROUND_OPACITY = 0.5
#: the Folding segment: solid red (fill and outline) on top of everything
FOLDING_FILL_OPACITY = 1.0
#: propagated segments: outlines (px) in their colours, no fill (the Segmentations module's fill toggle brings it back)
SEGMENT_OUTLINE_THICKNESS = 2

COMPRESSION_COLOR = np.array([0.10, 0.35, 1.00])
EXPANSION_COLOR = np.array([1.00, 0.62, 0.00])
_PALE = 0.6  # share of white mixed into the colour at the edge of the transparent band


def jacobianColor(det: float) -> tuple[float, float, float, float]:
    """RGBA (0..1) of the Jacobian table for a determinant ``det`` (clamped to the [0, 2] window).

    Transparent for ``|det - 1| < CLEAR_WITHIN``; beyond, pale to fully saturated blue towards 0
    (compression) and orange towards 2 (expansion).
    """
    deviation = float(np.clip(det, *JACOBIAN_RANGE)) - 1.0
    size = abs(deviation)
    if size < CLEAR_WITHIN:
        return (1.0, 1.0, 1.0, 0.0)
    end = COMPRESSION_COLOR if deviation < 0 else EXPANSION_COLOR
    rgb = end + (1.0 - end) * _PALE * (1.0 - size) / (1.0 - CLEAR_WITHIN)
    return (*map(float, rgb), 1.0)


def jacobianColorNode(scene):
    """The scene's DLIR Jacobian colour table (256 colours), created on first use."""
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    node = None
    for index in range(nodes.GetNumberOfItems()):
        candidate = nodes.GetItemAsObject(index)
        if candidate.GetAttribute(COLOR_ATTRIBUTE) == "Jacobian":
            node = candidate
            break
    if node is not None and node.GetAttribute(COLOR_ATTRIBUTE + ".Version") == COLOR_VERSION:
        return node
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_NAME)
    node.SetName(COLOR_NAME)
    node.SetAttribute(COLOR_ATTRIBUTE, "Jacobian")
    node.SetAttribute(COLOR_ATTRIBUTE + ".Version", COLOR_VERSION)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    low, high = JACOBIAN_RANGE
    for index in range(256):
        # a voxel of value v takes entry floor((v - low) / (high - low) * 256): the entry's centre value
        det = low + (index + 0.5) / 256 * (high - low)
        node.SetColor(index, f"{det:.3f}", *jacobianColor(det))
    return node


def styleJacobian(jacobianVolumeNode, colorNode) -> None:
    """Diverging colours, window [0, 2] (centre 1), no interpolation between voxels."""
    if jacobianVolumeNode.GetDisplayNode() is None:
        jacobianVolumeNode.CreateDefaultDisplayNodes()
    display = jacobianVolumeNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(colorNode.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*JACOBIAN_RANGE)
    display.SetInterpolate(False)


def showInSliceViews(scene, fixedVolumeNode, foregroundVolumeNode=None, segmentationNodes=(),
                     sourceSegmentationNode=None) -> None:
    """Fixed volume in the background, ``foregroundVolumeNode`` (the Jacobian) on top, segmentations styled and visible.

    Without a foreground, a DLIR Jacobian left in the foreground by an earlier run is removed
    (it belongs to another registration); any other foreground the user chose stays.  A
    segmentation holding the ``Folding`` segment is drawn solid red; any other as outlines.
    ``sourceSegmentationNode`` (the moving segmentation that was propagated) is hidden in the
    slice views: drawn over the fixed volume where it lies in the moving image, in the same
    colours as its propagated copy, it would hide whether the labels landed.  Only its display
    node's 2D visibility changes (its data, and its 3D display, stay as they were).
    """
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        composite.SetBackgroundVolumeID(fixedVolumeNode.GetID())
        if foregroundVolumeNode is not None:
            composite.SetForegroundVolumeID(foregroundVolumeNode.GetID())
            composite.SetForegroundOpacity(FOREGROUND_OPACITY)
        elif _isJacobian(scene.GetNodeByID(composite.GetForegroundVolumeID() or "")):
            composite.SetForegroundVolumeID(None)
    for segmentationNode in segmentationNodes:
        styleSegmentation(segmentationNode)
    if sourceSegmentationNode is not None and sourceSegmentationNode.GetDisplayNode() is not None:
        sourceSegmentationNode.GetDisplayNode().SetVisibility2D(False)


def styleSegmentation(segmentationNode) -> None:
    """Folding (a segmentation with the red ``Folding`` segment): solid red; propagated segments: 2 px outlines, no fill.

    Slicer draws the segmentations in the order they were added, so the propagated segments lie
    on top of the Folding segment: a fill would tint the folding and the Jacobian colours, the
    outlines alone leave both readable.
    """
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()
    display = segmentationNode.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DOutline(True)
    display.SetOpacity2DOutline(1.0)
    display.SetSliceIntersectionThickness(SEGMENT_OUTLINE_THICKNESS)
    folding = segmentationNode.GetSegmentation().GetSegment("Folding")
    if folding is not None and tuple(folding.GetColor()) == FOLDING_COLOR:
        display.SetVisibility2DFill(True)
        display.SetOpacity2DFill(FOLDING_FILL_OPACITY)
    else:
        display.SetVisibility2DFill(False)


def _isJacobian(volumeNode) -> bool:
    display = volumeNode.GetDisplayNode() if volumeNode is not None and volumeNode.IsA("vtkMRMLVolumeNode") else None
    color = display.GetColorNode() if display is not None else None
    return color is not None and color.GetAttribute(COLOR_ATTRIBUTE) == "Jacobian"
