"""Running a stage stack on a pair: the preprocessing of each stage's inputs and the stage loop.

Shared by inference (:mod:`dlir.register`) and training (:mod:`dlir.training.trainer`), so both see exactly
the same inputs.  Stage ``k`` sees the fixed image and the moving image warped by
``T0 o T1 o ... o T(k-1)`` (``T0`` = initial alignment), both on the stage's network grid.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import StackError
from .geometry import Grid
from .preprocess import initial_alignment, network_grid, normalise_intensity, smooth_for_spacing, to_grid
from .recipe import IntensitySpec, StageSpec
from .stack import Stack
from .transforms import Composite, SpatialTransform, is_finite

#: ``step(name)``: a context around one named step (progress, cancel and timing in inference)
StepHook = Callable[[str], AbstractContextManager[None]]


@dataclass
class PreparedImage:
    """A normalised image ``[1, 1, D, H, W]`` (intensities in [0, 1]) with its grid and anti-aliased copies."""

    tensor: torch.Tensor
    grid: Grid
    _smoothed: dict[tuple[float, float, float], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_tensor(cls, raw: torch.Tensor, grid: Grid, intensity: IntensitySpec) -> "PreparedImage":
        return cls(normalise_intensity(raw, intensity), grid)

    def smoothed(self, spacing: tuple[float, float, float]) -> torch.Tensor:
        """The image anti-aliased for resampling at ``spacing`` mm (cached)."""
        if spacing not in self._smoothed:
            self._smoothed[spacing] = smooth_for_spacing(self.tensor, self.grid, spacing)
        return self._smoothed[spacing]


def stage_grid(spec: StageSpec, fixed_grid: Grid) -> Grid:
    """The network grid of a stage for a fixed image on ``fixed_grid``."""
    return network_grid(fixed_grid, spec.spacing_mm, spec.size_multiple, spec.min_size)


def stage_inputs(
    spec: StageSpec, fixed: PreparedImage, moving: PreparedImage, transform: SpatialTransform
) -> tuple[Grid, torch.Tensor, torch.Tensor]:
    """(grid, fixed, moving warped by ``transform``) for a stage, tensors ``[1, 1, D, H, W]``."""
    grid = stage_grid(spec, fixed.grid)
    f = to_grid(fixed.smoothed(spec.spacing_mm), fixed.grid, None, grid)
    m = to_grid(moving.smoothed(spec.spacing_mm), moving.grid, transform, grid)
    return grid, f, m


def alignment(stack: Stack, fixed: PreparedImage, moving: PreparedImage, mode: str | None = None) -> SpatialTransform:
    """The initial alignment ``T0`` (``mode`` overrides the stack's recipe)."""
    mode = mode or stack.manifest.recipe.initial_alignment
    return initial_alignment(mode, fixed.tensor, fixed.grid, moving.tensor, moving.grid)


def run_stages(
    stack: Stack,
    fixed: PreparedImage,
    moving: PreparedImage,
    initial: SpatialTransform,
    upto: int | None = None,
    step: StepHook | None = None,
    check_finite: bool = False,
) -> tuple[list[SpatialTransform], list[torch.Tensor]]:
    """Run stages ``0 .. upto-1`` (all by default): THE stage loop of inference and training.

    Returns the transforms ``[T0, T1, ..., Tn]`` (``T0`` = ``initial``) and each stage's raw
    network output.  Each stage runs inside ``step("stage k/n (kind)")`` when given: the hook
    through which inference reports progress, polls cancel and times the stage.  With
    ``check_finite`` (inference), a NaN or infinite value in a stage's network output or
    transform stops the run with a :class:`~dlir.errors.StackError` naming the stage.
    """
    transforms: list[SpatialTransform] = [initial]
    raws: list[torch.Tensor] = []
    stages = list(stack.stages)[: upto if upto is not None else len(stack.stages)]
    for k, stage in enumerate(stages):
        name = f"stage {k + 1}/{len(stack.stages)} ({stage.spec.kind})"
        with step(name) if step is not None else nullcontext():
            grid, f, m = stage_inputs(stage.spec, fixed, moving, Composite(transforms))
            raw = stage.predict(f, m)
            raws.append(raw)
            transforms.append(stage.transform(raw, grid))
            if check_finite:
                check_stage_output(name, stack.name, raw, transforms[-1])
    return transforms, raws


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
