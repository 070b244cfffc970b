"""The declarative recipe of a stage stack: what each stage is, on which grid it works, what it
minimises and how it is trained.  Saved with the weights in the stack's manifest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import StackError

StageKind = Literal["affine", "bspline"]

#: the bending-energy weight (per mm^2) of a B-spline stage whose recipe does not set one
DEFAULT_BENDING_WEIGHT = 5.0


@dataclass(frozen=True)
class StageSpec:
    """One stage of a stack.

    ``spacing_mm``: voxel spacing (x, y, z mm) of the stage's network grid, an axis-aligned LPS
    grid around the fixed image.  ``control_point_spacing``: B-spline control-point spacing in
    voxels of that grid (a power of two; in mm it is ``control_point_spacing * spacing_mm``).
    Loss: ``-similarity + alpha * bending energy`` (bending energy of the displacement in mm,
    derivatives per mm).  ``similarity`` is ``"ncc"`` (global) or ``"lncc"`` (local, window of
    ``ncc_window`` voxels); for training pairs whose labels are known it is mixed with the soft
    Dice of the warped labels: ``(1 - dice_weight) * NCC + dice_weight * soft Dice``.  The training fields (iterations, learning rate, batch and patch
    size in voxels) are used by ``dlir train`` and recorded for provenance.
    """

    kind: StageKind
    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    control_point_spacing: int = 8
    channels: int = 32
    depth: int = 4
    max_rotation: float = math.pi
    max_shear: float = math.pi
    min_scale: float = 0.5
    max_scale: float = 1.5
    similarity: Literal["ncc", "lncc"] = "ncc"
    ncc_window: int = 9
    dice_weight: float = 0.0
    alpha: float | None = None  # None: 0 for an affine stage, DEFAULT_BENDING_WEIGHT for a B-spline stage
    iterations: int = 1000
    learning_rate: float = 1e-3
    batch_size: int = 1
    patch_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        if self.kind not in ("affine", "bspline"):
            raise StackError(f"unknown stage kind {self.kind!r}: expected 'affine' or 'bspline'")
        if self.alpha is None:
            object.__setattr__(self, "alpha", DEFAULT_BENDING_WEIGHT if self.kind == "bspline" else 0.0)
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise StackError(f"a stage's spacing_mm must be three positive numbers, got {self.spacing_mm}")
        f = self.control_point_spacing
        if self.kind == "bspline" and (f < 2 or f & (f - 1)):
            raise StackError(f"control_point_spacing must be a power of two >= 2 voxels, got {f}")
        if self.similarity not in ("ncc", "lncc"):
            raise StackError(f"unknown similarity {self.similarity!r}: expected 'ncc' or 'lncc'")
        if not 0 <= self.dice_weight <= 1:
            raise StackError(f"a stage's dice_weight must lie between 0 and 1, got {self.dice_weight}")
        if self.channels < 1 or self.depth < 1:
            raise StackError("a stage needs at least one channel and one level")
        if not 0 < self.min_scale <= 1 <= self.max_scale:
            raise StackError(f"the scale range [{self.min_scale}, {self.max_scale}] must contain 1")

    @property
    def levels(self) -> int:
        """Downsampling levels of a B-spline network (log2 of the control-point spacing)."""
        return int(round(math.log2(self.control_point_spacing)))

    @property
    def size_multiple(self) -> int:
        """The stage grid's size must be a multiple of this (B-spline: the control-point spacing)."""
        return self.control_point_spacing if self.kind == "bspline" else 1

    @property
    def min_size(self) -> int:
        """The smallest stage grid (voxels per axis) the network can take: one cell per downsampling."""
        return self.control_point_spacing if self.kind == "bspline" else 2**self.depth

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing_mm"] = list(self.spacing_mm)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise StackError(f"unknown stage settings: {', '.join(sorted(unknown))}")
        if "kind" not in data:
            raise StackError("a stage needs a 'kind' ('affine' or 'bspline')")
        return cls(**data)


@dataclass(frozen=True)
class IntensitySpec:
    """How image intensities are scaled to [0, 1] before the networks see them.

    ``window``: clip to ``[low, high]`` in image units (e.g. CT Hounsfield units) and rescale.
    ``percentile``: map the ``low``-th .. ``high``-th percentile of the image to [0, 1] and clip
    (MR, whose units are arbitrary).
    """

    kind: Literal["window", "percentile"] = "percentile"
    low: float = 0.5
    high: float = 99.5

    def __post_init__(self) -> None:
        if self.kind not in ("window", "percentile"):
            raise StackError(f"unknown intensity normalisation {self.kind!r}: expected 'window' or 'percentile'")
        if not self.low < self.high:
            raise StackError(f"intensity normalisation needs low < high, got {self.low} and {self.high}")
        if self.kind == "percentile" and not (0 <= self.low and self.high <= 100):
            raise StackError("percentiles must lie between 0 and 100")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IntensitySpec":
        return cls(**data)


    def describe(self) -> str:
        """One line for people: ``window -1000..1000`` or ``percentiles 0.5..99.5``."""
        what = "window" if self.kind == "window" else "percentiles"
        return f"{what} {self.low:g}..{self.high:g}"


#: the intensity normalisations offered by name: ``dlir train --intensity``, the DLIR Training module
INTENSITY_PRESETS: dict[str, IntensitySpec] = {
    "ct": IntensitySpec("window", -1000.0, 1000.0),  # Hounsfield units
    "mr": IntensitySpec("percentile", 0.5, 99.5),
}


@dataclass(frozen=True)
class Recipe:
    """Everything needed to rebuild a stack's networks and repeat its preprocessing exactly."""

    stages: tuple[StageSpec, ...]
    intensity: IntensitySpec = field(default_factory=IntensitySpec)
    initial_alignment: Literal["centre", "com", "none"] = "centre"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise StackError("a stack needs at least one stage")
        if self.initial_alignment not in ("centre", "com", "none"):
            raise StackError(f"unknown initial alignment {self.initial_alignment!r}: expected centre, com or none")

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [s.to_dict() for s in self.stages],
            "intensity": self.intensity.to_dict(),
            "initial_alignment": self.initial_alignment,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        try:
            return cls(
                stages=tuple(StageSpec.from_dict(s) for s in data["stages"]),
                intensity=IntensitySpec.from_dict(data.get("intensity", {})),
                initial_alignment=data.get("initial_alignment", "centre"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StackError(f"the stack recipe is incomplete or malformed ({exc})") from exc
