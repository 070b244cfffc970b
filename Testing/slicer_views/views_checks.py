"""Helpers of the view tests: the folding-prone stack, pixel <-> voxel maps, the colours Slicer must draw."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import vtk

for folder in ("", "slicer_registration"):  # Testing/ (testdata) and the registration test helpers
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / folder))
from dlir_registration_helpers import read_volume, segmentation_from_labels, voxels  # noqa: E402,F401

#: view size of the checks (pixels); a voxel of the 2 mm sample is about 1.4 pixels
VIEW_SIZE = (320, 320)
#: distinct segment colours that are none of the overlay's (blue, orange) nor folding red
SEGMENT_COLORS = ((0.20, 0.80, 0.20), (0.00, 0.85, 0.85), (0.85, 0.30, 0.85), (0.95, 0.95, 0.25),
                  (0.55, 0.35, 0.15), (0.60, 0.60, 1.00))
#: a strength of the B-spline stage's output layer that folds the sample pair (det J from about -0.4 to 3.9)
FOLDING_WEIGHT_SCALE = 150.0


@lru_cache(maxsize=1)
def folding_stack():
    """A small stack (affine 8 mm, B-spline 4 mm with control points every 16 mm) whose B-spline output
    layer has seeded random weights 150 times the usual size: control-point displacements of tens of
    mm between neighbours 16 mm apart, a deformation that compresses, expands past det J = 2 and
    folds (det J <= 0) in places.  Deterministic (seed 0)."""
    import torch

    from testdata import small_stack

    stack = small_stack("folding-prone", description="test stack that folds on purpose")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        output = stack.stages[-1].net.output
        output.weight.copy_(torch.randn(output.weight.shape, generator=generator) * FOLDING_WEIGHT_SCALE)
    return stack


def terminology(index: int, name: str) -> str:
    """A distinct terminology entry per segment (private coding scheme 99DLIR for the type)."""
    return ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~"
            f"99DLIR^{index + 1}^{name}~^^~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^")


def label_segments(segmentationNode) -> None:
    """Give the moving segments fixed, distinct colours and terminology (the sample's import colours are random)."""
    segmentation = segmentationNode.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        segment.SetColor(*SEGMENT_COLORS[index % len(SEGMENT_COLORS)])
        segment.SetTerminology(terminology(index, segment.GetName()))


def matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ras_to_ijk(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(m)
    return matrix(m)


def pixel_voxels(views, name: str, node, margin: float = 0.06) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel of view ``name``: the nearest voxel (i, j, k) of volume ``node`` (no parent
    transform), and whether that voxel is certain (inside the volume and the pixel at least
    ``margin`` voxel away from a rounding boundary, so Slicer's nearest-neighbour reslice picks it too)."""
    ras = views.pixelRAS(name)
    ijk = np.concatenate([ras, np.ones(ras.shape[:2] + (1,))], -1) @ ras_to_ijk(node).T
    ijk = ijk[..., :3]
    nearest = np.floor(ijk + 0.5).astype(int)
    dims = np.array(node.GetImageData().GetDimensions())
    inside = np.all((nearest >= 0) & (nearest < dims), -1)
    certain = inside & np.all(np.abs(np.abs(ijk - np.floor(ijk)) - 0.5) > margin, -1)
    return np.clip(nearest, 0, dims - 1), certain


def at(array: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """Values of a (K, J, I) array at (i, j, k) voxel indices of shape (..., 3)."""
    return array[nearest[..., 2], nearest[..., 1], nearest[..., 0]]


def table(colorNode) -> np.ndarray:
    """The colour table's entries as (N, 4) RGBA in 0..1."""
    rgba = np.zeros((colorNode.GetNumberOfColors(), 4))
    for index in range(len(rgba)):
        value = [0.0] * 4
        colorNode.GetColor(index, value)
        rgba[index] = value
    return rgba


def blend(background: np.ndarray, rgb, opacity) -> np.ndarray:
    """``(1 - opacity) * background + opacity * colour`` in 0..255 (what Slicer's layer and segment blends draw)."""
    opacity = np.asarray(opacity, dtype=np.float64)[..., None] if np.ndim(opacity) else float(opacity)
    return (1.0 - opacity) * background.astype(np.float64) + opacity * 255.0 * np.asarray(rgb, dtype=np.float64)


def near(image: np.ndarray, expected: np.ndarray, tolerance: float) -> np.ndarray:
    """Per pixel: every channel within ``tolerance`` grey levels of ``expected``."""
    return np.all(np.abs(image.astype(np.float64) - expected) <= tolerance, -1)


def erode(mask: np.ndarray, voxels_: int = 1) -> np.ndarray:
    """Voxels whose whole (2r+1)^3 neighbourhood is in ``mask``."""
    from scipy import ndimage

    return ndimage.binary_erosion(mask, np.ones((3, 3, 3), bool), iterations=voxels_, border_value=0)


def dilate(mask: np.ndarray, voxels_: int = 1) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, np.ones((3, 3, 3), bool), iterations=voxels_)


class Shown:
    """Change what the views show for a ``with`` block, and put it back afterwards.

    ``Shown(views, foreground=None)`` removes the foreground layer; ``hidden=[node, ...]`` hides
    segmentation nodes; ``background=node`` replaces the background layer.
    """

    _KEEP = object()

    def __init__(self, views, background=_KEEP, foreground=_KEEP, hidden=()) -> None:
        self.views, self.background, self.foreground, self.hidden = views, background, foreground, list(hidden)

    def __enter__(self):
        self.saved = [(c, c.GetBackgroundVolumeID(), c.GetForegroundVolumeID())
                      for c in (self.views.compositeNode(n) for n in self.views.names)]
        self.visibility = [(node.GetDisplayNode(), node.GetDisplayNode().GetVisibility()) for node in self.hidden]
        for composite, _, _ in self.saved:
            if self.background is not self._KEEP:
                composite.SetBackgroundVolumeID(self.background.GetID() if self.background is not None else None)
            if self.foreground is not self._KEEP:
                composite.SetForegroundVolumeID(self.foreground.GetID() if self.foreground is not None else None)
        for display, _ in self.visibility:
            display.SetVisibility(False)
        return self.views

    def __exit__(self, *exc) -> None:
        for composite, background, foreground in self.saved:
            composite.SetBackgroundVolumeID(background)
            composite.SetForegroundVolumeID(foreground)
        for display, visible in self.visibility:
            display.SetVisibility(visible)
