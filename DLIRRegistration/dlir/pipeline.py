"""Running a stage stack on a pair: the preprocessing of each stage's inputs and the stage loop.

Shared by inference (:mod:`dlir.register`) and training (:mod:`dlir.training.trainer`), so both see exactly
the same inputs.  Stage ``k`` sees the fixed image and the moving image warped by
``T0 o T1 o ... o T(k-1)`` (``T0`` = initial alignment), both on the stage's network grid.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import StackError
from .geometry import Grid
from .preprocess import (
    antialiased_source,
    apply_window,
    intensity_moments,
    intensity_window,
    network_grid,
    sample_source,
)
from .losses import similarity
from .recipe import IntensitySpec, StageSpec
from .runtime import Network
from .stack import Stack
from .transforms import AffineTransform, Composite, SpatialTransform, grid_points, is_finite, map_grid, resample_parallel

log = logging.getLogger(__name__)

#: ``step(name)``: a context around one named step (progress, cancel and timing in inference)
StepHook = Callable[[str], AbstractContextManager[None]]


@dataclass
class PreparedImage:
    """A normalised image (intensities in [0, 1]) with its grid and anti-aliased copies for the network grids.

    Either ``tensor`` holds the normalised image ``[1, 1, D, H, W]`` (training, small images), or
    ``source`` holds the voxels ``[D, H, W]`` in their own type (an int16 CT stays int16) with the
    intensity ``window`` (low, high), normalised slab by slab when needed (inference: no
    full-resolution float copy is made).  :meth:`source_for` gives the copy anti-aliased for one
    spacing, on a coarser grid (:func:`~dlir.preprocess.antialiased_source`), cached.
    """

    tensor: torch.Tensor | None
    grid: Grid
    source: np.ndarray | None = None
    window: tuple[float, float] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    extremes: tuple[float, float] | None = None
    _coarse: dict[tuple[float, float, float], tuple[torch.Tensor, Grid]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.tensor is not None:
            self.device = self.tensor.device

    @classmethod
    def from_array(cls, voxels: np.ndarray, grid: Grid, intensity: IntensitySpec, device: torch.device | str = "cpu") -> "PreparedImage":
        """Keep ``voxels`` ``[D, H, W]`` (any numeric type; not copied, not modified) and their intensity window."""
        window = intensity_window(voxels, intensity)
        extremes = (float(voxels.min()), float(voxels.max()))
        return cls(None, grid, voxels, window, torch.device(device), extremes)

    def slab(self, k0: int, k1: int) -> torch.Tensor:
        """Normalised slices ``k0 .. k1-1``, float32 ``[1, 1, k1-k0, H, W]`` on the image's device."""
        if self.tensor is not None:
            return self.tensor[:, :, k0:k1]
        assert self.source is not None and self.window is not None
        part = torch.from_numpy(np.array(self.source[k0:k1], dtype=np.float32)).to(self.device)[None, None]
        return apply_window(part, *self.window, extremes=self.extremes)

    def source_for(self, spacing: tuple[float, float, float]) -> tuple[torch.Tensor, Grid]:
        """(image, grid): the image anti-aliased for resampling at ``spacing`` mm, on a coarser grid (cached)."""
        if spacing not in self._coarse:
            self._coarse[spacing] = antialiased_source(self.slab, self.grid, spacing)
        return self._coarse[spacing]

    def resampled(self, spacing: tuple[float, float, float], transform: SpatialTransform | None, grid: Grid) -> torch.Tensor:
        """The image anti-aliased for ``spacing`` and resampled onto ``grid`` through ``transform``, 0 outside."""
        image, image_grid = self.source_for(spacing)
        if transform is None:
            if image.shape[0] == 1:  # axes parallel to the network grid's (most images): separable, no gather per point
                values = resample_parallel(image[0], image_grid, grid, extent=self.grid)
                if values is not None:
                    return values[None]
            pts = grid_points(grid, image.shape[0], image.device)
        else:
            pts = map_grid(transform, grid, image.shape[0], image.device)
        return self.sampled(spacing, pts)

    def sampled(self, spacing: tuple[float, float, float], points: torch.Tensor) -> torch.Tensor:
        """The image anti-aliased for ``spacing`` and sampled at LPS ``points`` ``[N, d, h, w, 3]`` (mm), 0 outside."""
        image, image_grid = self.source_for(spacing)
        return sample_source(image, image_grid, self.grid, points)

    def centre_of_mass(self) -> np.ndarray:
        """Intensity-weighted centre (LPS mm) of the normalised image, slab by slab."""
        return self.moments()[0]

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(centre (LPS mm), covariance (mm^2, 3 x 3)) of the normalised intensities, slab by slab (:func:`~dlir.preprocess.intensity_moments`)."""
        return intensity_moments(self.slab, self.grid)


def stage_grid(spec: StageSpec, fixed_grid: Grid) -> Grid:
    """The network grid of a stage for a fixed image on ``fixed_grid``."""
    return network_grid(fixed_grid, spec.spacing_mm, spec.size_multiple, spec.min_size)


def stage_inputs(
    spec: StageSpec, fixed: PreparedImage, moving: PreparedImage, transform: SpatialTransform
) -> tuple[Grid, torch.Tensor, torch.Tensor]:
    """(grid, fixed, moving warped by ``transform``) for a stage, tensors ``[1, 1, D, H, W]``."""
    grid = stage_grid(spec, fixed.grid)
    f = fixed.resampled(spec.spacing_mm, None, grid)
    m = moving.resampled(spec.spacing_mm, transform, grid)
    return grid, f, m


def run_stages(
    stack: Stack,
    fixed: PreparedImage,
    moving: PreparedImage,
    initial: SpatialTransform,
    upto: int | None = None,
    step: StepHook | None = None,
    check_finite: bool = False,
    skip_worse: bool = False,
    networks: Sequence[Network] | None = None,
) -> list[SpatialTransform]:
    """Run stages ``0 .. upto-1`` (all by default): THE stage loop of inference and training.

    Returns the transforms ``[T0, T1, ..., Tn]`` (``T0`` = ``initial``).  Each stage runs inside ``step("stage k/n (kind)")`` when given: the hook
    through which inference reports progress, polls cancel and times the stage.  With
    ``check_finite`` (inference), a NaN or infinite value in a stage's network output or
    transform stops the run with a :class:`~dlir.errors.StackError` naming the stage.  With
    ``skip_worse`` (inference), an affine stage whose result is less similar to the fixed image
    than its input was, by the stage's own similarity on its own grid, is replaced by the identity
    (and logged): an affine network meeting images unlike its training data can be confidently
    wrong, and the later stages (or accurate mode) then start from the better of the two.  B-spline stages are always kept: on
    their coarse grids a lower global NCC is no reliable sign of a worse field.  ``networks`` (inference): what runs
    each stage's network instead of its ``predict`` (:func:`dlir.runtime.inference_networks`).
    """
    transforms: list[SpatialTransform] = [initial]
    stages = list(stack.stages)[: upto if upto is not None else len(stack.stages)]
    for k, stage in enumerate(stages):
        name = f"stage {k + 1}/{len(stack.stages)} ({stage.spec.kind})"
        with step(name) if step is not None else nullcontext():
            grid, f, m = stage_inputs(stage.spec, fixed, moving, Composite(transforms))
            raw = (stage.predict if networks is None else networks[k])(f, m)
            transforms.append(stage.transform(raw, grid))
            if check_finite:
                check_stage_output(name, stack.name, raw, transforms[-1])
            if skip_worse and stage.spec.kind == "affine" \
                    and not _improves(stage.spec, f, m, moving.resampled(stage.spec.spacing_mm, Composite(transforms), grid)):
                log.info("%s of the stack '%s' made the images less similar; skipped for this pair", name, stack.name)
                transforms[-1] = _identity_like(transforms[-1])
    return transforms


def _improves(spec: StageSpec, fixed: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether the moving image after a stage is at least as similar to the fixed one as before it (the stage's similarity)."""
    return bool(similarity(spec, fixed, after).mean() >= similarity(spec, fixed, before).mean())


def _identity_like(transform: SpatialTransform) -> AffineTransform:
    """The identity in the form of an affine ``transform`` (same batch, dtype and device)."""
    assert isinstance(transform, AffineTransform)
    eye = torch.eye(3, dtype=transform.matrix.dtype, device=transform.matrix.device).expand_as(transform.matrix)
    return AffineTransform(eye.clone(), torch.zeros_like(transform.offset))


def check_stage_output(name: str, stack_name: str, raw: torch.Tensor | None, transform: SpatialTransform) -> None:
    """Stop with one sentence when a stage's network output ``raw`` or its ``transform`` holds NaN or infinite values."""
    if raw is not None and not bool(torch.isfinite(raw).all()):
        part = "network output"
    elif not is_finite(transform):
        part = "transform"
    else:
        return
    raise StackError(f"{name} of the stack '{stack_name}' produced NaN or infinite values in its {part}; "
                     "its weights are damaged or unusable for these images")
