"""How DLIR's outputs look: the Jacobian colour map centred at 1, the red folding segment, the overlay.

The Jacobian determinant ``det(I + du/dx)`` (1: volume kept, < 1: compression, > 1: expansion,
<= 0: folding) is shown with a diverging table, blue (compression) - white (1) - orange
(expansion), windowed to [0, 2] so that 1 sits in the middle; folding voxels are a red segment on
top.  The table is our own colour node (Slicer's file-based tables such as DivergingBlueRed are
absent from the slicer-core wheel, and orange keeps red free for folding).  Views are set through
``vtkMRMLSliceCompositeNode`` (fixed volume as background, Jacobian as foreground): this works in
the application and in slicer-core, where a scene without views has no composite node to set.
"""

from __future__ import annotations

import numpy as np

#: attribute marking the Jacobian colour table, so repeated runs reuse one node
COLOR_ATTRIBUTE = "DLIR.ColorTable"
COLOR_NAME = "DLIR Jacobian (blue-white-orange, centred at 1)"
#: window of the Jacobian map: [0, 2] puts det = 1 at the centre of the table
JACOBIAN_RANGE = (0.0, 2.0)
FOLDING_COLOR = (1.0, 0.0, 0.0)
FOREGROUND_OPACITY = 0.5

_BLUE = np.array([0.13, 0.40, 0.75])
_WHITE = np.array([1.0, 1.0, 1.0])
_ORANGE = np.array([0.85, 0.45, 0.05])


def jacobianColorNode(scene):
    """The scene's DLIR Jacobian colour table (256 colours), created on first use."""
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if node.GetAttribute(COLOR_ATTRIBUTE) == "Jacobian":
            return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_NAME)
    node.SetAttribute(COLOR_ATTRIBUTE, "Jacobian")
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for index in range(256):
        t = index / 255.0
        rgb = _BLUE + (_WHITE - _BLUE) * (2 * t) if t <= 0.5 else _WHITE + (_ORANGE - _WHITE) * (2 * t - 1)
        node.SetColor(index, f"{JACOBIAN_RANGE[0] + t * (JACOBIAN_RANGE[1] - JACOBIAN_RANGE[0]):.3f}", *rgb, 1.0)
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


def showInSliceViews(scene, fixedVolumeNode, foregroundVolumeNode=None, segmentationNodes=()) -> None:
    """Fixed volume in the background, ``foregroundVolumeNode`` (the Jacobian) at 50 % on top, segmentations visible."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        composite.SetBackgroundVolumeID(fixedVolumeNode.GetID())
        if foregroundVolumeNode is not None:
            composite.SetForegroundVolumeID(foregroundVolumeNode.GetID())
            composite.SetForegroundOpacity(FOREGROUND_OPACITY)
    for segmentationNode in segmentationNodes:
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.GetDisplayNode().SetVisibility(True)
