"""The initial alignment ``T0`` (fixed point -> moving point, LPS mm) that the stages start from: the one place
that turns an alignment mode (:data:`dlir.choices.ALIGNMENT_MODES`) into a transform, for inference and training.

- ``search`` (inference's default): the affine capture of :mod:`dlir.capture`, for two subjects, different fields
  of view and any starting position;
- ``centre``: the centres of the image grids put on each other (a translation);
- ``com``: the centres of mass of the normalised intensities (a translation);
- ``moments``: the centres of mass and the principal axes (a rigid transform);
- ``none``: the identity (the images as placed in physical space).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .capture import Capture, CaptureSettings, CoarseImage, capture, foreground, principal_rotation
from .choices import ALIGNMENT_MODES, AlignmentMode
from .errors import InputError
from .preprocess import network_grid
from .transforms import AffineTransform

if TYPE_CHECKING:
    from .pipeline import PreparedImage

#: the alignment :func:`dlir.register.register` uses when none is named
DEFAULT_ALIGNMENT: AlignmentMode = "search"


def initial_alignment(mode: AlignmentMode, fixed: PreparedImage, moving: PreparedImage,
                      similarity: str = "ncc") -> AffineTransform:
    """``T0`` for ``mode`` on the device of ``fixed``; images normalised (:class:`~dlir.pipeline.PreparedImage`).

    ``similarity``: what the search compares, ``"ncc"`` (one contrast) or ``"mind"`` (any two contrasts).
    """
    device = fixed.device
    if mode == "search":
        return search(fixed, moving, similarity=similarity).transform.to(device)
    if mode == "moments":
        return principal_axes_alignment(*fixed.moments(), *moving.moments(), device=device)
    if mode == "centre":
        shift = moving.grid.centre() - fixed.grid.centre()
    elif mode == "com":
        shift = moving.centre_of_mass() - fixed.centre_of_mass()
    elif mode == "none":
        shift = np.zeros(3)
    else:
        raise InputError(f"unknown initial alignment {mode!r}: use {', '.join(ALIGNMENT_MODES)}")
    return AffineTransform.translation(torch.as_tensor(shift, dtype=torch.float32, device=device)[None])


def principal_axes_alignment(fixed_centre: np.ndarray, fixed_covariance: np.ndarray, moving_centre: np.ndarray,
                             moving_covariance: np.ndarray, device: torch.device | str = "cpu") -> AffineTransform:
    """The rigid transform (fixed -> moving, LPS mm) that puts the fixed image's centre of mass and principal axes on
    the moving image's: ``T(x) = R (x - c_f) + c_m`` with ``R`` from :func:`~dlir.capture.principal_rotation`."""
    rotation = principal_rotation(fixed_covariance, moving_covariance)
    offset = moving_centre - rotation @ fixed_centre
    return AffineTransform(torch.as_tensor(rotation, dtype=torch.float32, device=device)[None],
                           torch.as_tensor(offset, dtype=torch.float32, device=device)[None])


def search(fixed: PreparedImage, moving: PreparedImage, settings: CaptureSettings = CaptureSettings(),
           similarity: str = "ncc") -> Capture:
    """The capture search (:func:`dlir.capture.capture`) on the pyramid of ``settings.levels_mm``: each image
    anti-aliased and resampled onto an axis-aligned grid over its own extent, with its foreground; on the CPU.
    ``similarity``: ``"ncc"`` or ``"mind"`` (:mod:`dlir.modality`)."""
    pyramid = []
    for spacing in settings.levels_mm:
        level = []
        for image in (fixed, moving):
            grid = network_grid(image.grid, (spacing,) * 3)
            values = image.resampled((spacing,) * 3, None, grid).float().cpu()
            level.append(CoarseImage(values, grid, foreground(values), similarity))
        pyramid.append((level[0], level[1]))
    return capture(pyramid, fixed.grid, moving.grid, settings)
