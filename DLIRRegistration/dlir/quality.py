"""How far a result can be trusted: the similarity of the registered images inside the fixed image's foreground,
and the warnings of a run whose result folds, leaves the images less alike than its start, or maps the fixed
image out of the moving one.

A network meeting images unlike its training data can be confidently wrong: a fold, or a field that makes the
images less alike than the initial alignment alone did.  A run then says so (in ``result.json``, on the command
line and in Slicer) and, in fast mode, suggests accurate mode; nothing fails silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .capture import foreground
from .modality import compare, features
from .preprocess import network_grid
from .transforms import SpatialTransform, map_grid

if TYPE_CHECKING:
    from .pipeline import PreparedImage

#: the grid (mm) on which :func:`foreground_similarities` compares the images
SIMILARITY_SPACING_MM = 4.0
#: a result folding more than this share of the fixed voxels (inside the mask when given) gets a warning
FOLDING_WARNING_ABOVE = 0.001
#: a result whose foreground similarity is below its initial alignment's by more than this gets a warning
SIMILARITY_LOSS_WARNING_ABOVE = 0.01
#: a result whose transform keeps less than this share of the initial alignment's overlap (fixed voxels that land
#: inside the moving image) gets a warning: most of what it warps would be empty
OVERLAP_KEPT_WARNING_BELOW = 0.5


def foreground_similarities(fixed: PreparedImage, moving: PreparedImage,
                            transforms: Sequence[SpatialTransform], kind: str = "ncc") -> list[float]:
    """The similarity ``kind`` (NCC, or MIND-SSC for different contrasts: :mod:`dlir.modality`) of the fixed image
    and the moving image warped by each of ``transforms`` (fixed -> moving, LPS mm), on an
    axis-aligned :data:`SIMILARITY_SPACING_MM` grid over the fixed image, over the fixed image's foreground
    (:func:`dlir.capture.foreground`) where the transform lands inside the moving image."""
    spacing = (SIMILARITY_SPACING_MM,) * 3
    grid = network_grid(fixed.grid, spacing)
    out = []
    with torch.no_grad():
        f = fixed.resampled(spacing, None, grid)
        body = foreground(f.cpu()).to(f.device)
        for transform in transforms:
            points = map_grid(transform, grid, 1, f.device)
            m = moving.sampled(spacing, points)
            inside = moving.grid.contains(points)[:, None]
            out.append(float(compare(kind, features(kind, f, spacing[0]), features(kind, m, spacing[0]), (body & inside).to(f.dtype))[0]))
    return out


def result_warnings(accurate: bool, folding_fraction: float, initial_similarity: float, similarity: float,
                    measure: str = "NCC") -> list[str]:
    """The sentences of a result that folds (more than :data:`FOLDING_WARNING_ABOVE` of the fixed voxels) or whose
    foreground similarity fell below the initial alignment's (by more than :data:`SIMILARITY_LOSS_WARNING_ABOVE`)."""
    advice = ("check the result before use" if accurate else
              "the stack may not fit these images: use accurate mode (--refine auto; 'Accurate' in Slicer), which never folds")
    out = []
    if folding_fraction > FOLDING_WARNING_ABOVE:
        out.append(f"the transform folds {100 * folding_fraction:.2f} % of the fixed image's voxels (det J <= 0: "
                   f"tissue turned inside out); {advice}")
    if similarity < initial_similarity - SIMILARITY_LOSS_WARNING_ABOVE:
        out.append(f"the registered images are less alike than after the initial alignment alone ({measure} {similarity:.3f} "
                   f"against {initial_similarity:.3f} in the fixed image's foreground); {advice}")
    return out


def overlap_warnings(initial_overlap: float, registered_overlap: float, no_overlap_below: float) -> list[str]:
    """The sentence of a result whose transform maps much of the fixed image out of the moving image.

    ``initial_overlap`` and ``registered_overlap``: the share (0-1) of fixed voxels that land inside the moving image
    under the initial alignment and under the registered transform (fixed -> moving).  Warned when the registered
    share is below :data:`OVERLAP_KEPT_WARNING_BELOW` times the initial one; nothing when the initial share is below
    ``no_overlap_below`` (the run has already said that the images do not overlap).
    """
    if initial_overlap < no_overlap_below or registered_overlap >= OVERLAP_KEPT_WARNING_BELOW * initial_overlap:
        return []
    return [f"the registered transform maps only {100 * registered_overlap:.1f} % of the fixed image inside the moving "
            f"image ({100 * initial_overlap:.1f} % after the initial alignment), so most of the warped image is empty; "
            "check the images' voxel sizes and the warped image before use"]
