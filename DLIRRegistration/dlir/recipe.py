"""The declarative recipe of a stage stack: what each stage is, on which grid it works, what it
minimises and how it is trained.  Saved with the weights in the stack's manifest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .choices import ALIGNMENT_MODES, AlignmentMode
from .errors import StackError

StageKind = Literal["affine", "bspline"]

#: the bending-energy weight (per mm^2) of a B-spline stage whose recipe does not set one
DEFAULT_BENDING_WEIGHT = 5.0

# The bounds of every recipe value, checked before anything is allocated: a manifest outside them
# is refused with one sentence (a hostile or corrupt file must not make DLIR allocate terabytes).
MAX_STAGES = 16
CHANNELS = (1, 512)
DEPTH = (1, 8)
SPACING_MM = (0.05, 100.0)
CONTROL_POINT_SPACING = (2, 64)  # voxels, a power of two
NCC_WINDOW = (3, 31)  # voxels, odd
KEYPOINTS = (0, 256)  # an affine stage's keypoints (0: the paper's 12-parameter head)
MAX_ANGLE = math.pi  # radians: the rotation and shear bounds lie in [0, pi]
SCALE = (0.01, 100.0)
MAX_ALPHA = 1e6
ITERATIONS = (1, 100_000_000)
MAX_LEARNING_RATE = 10.0
BATCH_SIZE = (1, 1024)
PATCH_SIZE = (2, 512)  # voxels per side
MAX_INTENSITY = 1e12  # |window bound| in image units
#: the most weights (all stages together) a stack may have: 50 million, 200 MB in float32
MAX_WEIGHTS = 50_000_000


def _show(value: Any) -> str:
    """``repr(value)``, shortened: a hostile value must not make a message long."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _names(names: set[str]) -> str:
    """Unknown keys for a message: sorted, comma-separated, shortened."""
    text = " ".join(", ".join(sorted(names)).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value: Any, key: str, bounds: tuple[int, int]) -> int:
    """``value`` as an int within ``bounds`` (inclusive), else a :class:`StackError` naming ``key``."""
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StackError(f"{key} must be a whole number from {low} to {high}, got {_show(value)}")
    return value


def _number(value: Any, key: str, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` when ``low_open``), else a :class:`StackError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low < value if low_open else low <= value) or not value <= high:
        interval = f"{'above' if low_open else 'from'} {low:g} {'and at most' if low_open else 'to'} {high:g}"
        raise StackError(f"{key} must be a finite number {interval}, got {_show(value)}")
    return float(value)


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise StackError(f"unknown {key} {_show(value)}: expected {' or '.join(repr(c) for c in choices)}")
    return value


def _conv_weights(inputs: int, outputs: int, kernel: int) -> int:
    return inputs * outputs * kernel**3 + outputs


@dataclass(frozen=True)
class StageSpec:
    """One stage of a stack.

    ``spacing_mm``: voxel spacing (x, y, z mm) of the stage's network grid, an axis-aligned LPS
    grid around the fixed image.  ``control_point_spacing``: B-spline control-point spacing in
    voxels of that grid (a power of two; in mm it is ``control_point_spacing * spacing_mm``).
    Loss: ``-similarity + alpha * bending energy`` (bending energy of the displacement in mm,
    derivatives per mm).  ``similarity`` is ``"ncc"`` (global), ``"lncc"`` (local, window of
    ``ncc_window`` voxels) or ``"mind"`` (MIND-SSC descriptors, for pairs of different contrasts:
    :mod:`dlir.modality`); for training pairs whose labels are known it is mixed with the soft
    Dice of the warped labels: ``(1 - dice_weight) * NCC + dice_weight * soft Dice``.  A B-spline stage with ``fold_weight`` > 0 adds that
    times the folding penalty of its field (:func:`dlir.losses.folding_penalty`: det J below ``MIN_JACOBIAN`` at
    any cell corner) to its training loss, so that it learns fields that do not fold.  An affine stage
    with ``keypoints`` > 0 finds that many keypoints per image and fits the affine to them (``depth``
    pooling levels; :class:`~dlir.nets.KeypointAffineNet`); with 0 it is the paper's 12-parameter network
    (``depth`` convolution blocks, constrained by the rotation, shear and scale bounds).  The training fields (iterations, learning rate, batch and patch
    size in voxels) are used by ``dlir train`` and recorded for provenance.
    """

    kind: StageKind
    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    control_point_spacing: int = 8
    channels: int = 32
    depth: int = 4
    keypoints: int = 0
    max_rotation: float = math.pi
    max_shear: float = math.pi
    min_scale: float = 0.5
    max_scale: float = 1.5
    similarity: Literal["ncc", "lncc", "mind"] = "ncc"
    ncc_window: int = 9
    dice_weight: float = 0.0
    fold_weight: float = 0.0
    alpha: float | None = None  # None: 0 for an affine stage, DEFAULT_BENDING_WEIGHT for a B-spline stage
    iterations: int = 1000
    learning_rate: float = 1e-3
    batch_size: int = 1
    patch_size: int = 64

    def __post_init__(self) -> None:
        _check_stage(self)

    @property
    def weight_count(self) -> int:
        """How many weights the stage's network has (:mod:`dlir.nets`), computed without building it."""
        c = self.channels
        if self.kind == "affine" and self.keypoints:  # KeypointAffineNet: depth + 3 conv blocks, a 1x1x1 heatmap layer
            return _conv_weights(1, c, 3) + (self.depth - 1 + 3) * _conv_weights(c, c, 3) + _conv_weights(c, self.keypoints, 1)
        if self.kind == "affine":  # AffineNet: depth conv blocks, then two linear layers
            return (_conv_weights(1, c, 3) + (self.depth - 1) * _conv_weights(c, c, 3)
                    + (2 * c * c + c) + (c * 12 + 12))
        # BSplineNet: one conv per level, two 3x3x3 and two 1x1x1 convs, a 3-channel output
        return (_conv_weights(2, c, 3) + (self.levels - 1 + 2) * _conv_weights(c, c, 3)
                + 2 * _conv_weights(c, c, 1) + _conv_weights(c, 3, 1))

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
        if not isinstance(data, dict):
            raise StackError("a stage must be a JSON object of settings")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise StackError(f"unknown stage settings: {_names(unknown)}")
        if "kind" not in data:
            raise StackError("a stage needs a 'kind' ('affine' or 'bspline')")
        return cls(**data)


def _check_stage(spec: StageSpec) -> None:
    """Bound every value of a stage (raising :class:`StackError` naming the key); normalise number types."""
    def put(key: str, value: Any) -> None:
        object.__setattr__(spec, key, value)

    kind = _choice(spec.kind, "stage kind", ("affine", "bspline"))
    spacing = spec.spacing_mm
    if isinstance(spacing, (str, bytes)) or not isinstance(spacing, (list, tuple)) or len(spacing) != 3:
        raise StackError(f"spacing_mm must be three numbers (x, y, z mm), got {_show(spacing)}")
    put("spacing_mm", tuple(_number(v, "spacing_mm", *SPACING_MM) for v in spacing))
    f = _whole(spec.control_point_spacing, "control_point_spacing", CONTROL_POINT_SPACING)
    if f & (f - 1):
        raise StackError(f"control_point_spacing must be a power of two from {CONTROL_POINT_SPACING[0]} "
                         f"to {CONTROL_POINT_SPACING[1]} voxels, got {f}")
    _whole(spec.channels, "channels", CHANNELS)
    _whole(spec.depth, "depth", DEPTH)
    keypoints = _whole(spec.keypoints, "keypoints", KEYPOINTS)
    if keypoints and (kind != "affine" or keypoints < 4):
        raise StackError(f"keypoints must be 0 (the paper's affine head) or at least 4, and only an affine stage has them; got {keypoints}")
    put("max_rotation", _number(spec.max_rotation, "max_rotation (radians)", 0.0, MAX_ANGLE))
    put("max_shear", _number(spec.max_shear, "max_shear", 0.0, MAX_ANGLE))
    put("min_scale", _number(spec.min_scale, "min_scale", SCALE[0], 1.0))
    put("max_scale", _number(spec.max_scale, "max_scale", 1.0, SCALE[1]))
    _choice(spec.similarity, "similarity", ("ncc", "lncc", "mind"))
    window = _whole(spec.ncc_window, "ncc_window", NCC_WINDOW)
    if window % 2 == 0:
        raise StackError(f"ncc_window must be an odd number of voxels from {NCC_WINDOW[0]} to {NCC_WINDOW[1]}, got {window}")
    if spec.alpha is None:
        put("alpha", DEFAULT_BENDING_WEIGHT if kind == "bspline" else 0.0)
    put("alpha", _number(spec.alpha, "alpha (bending weight)", 0.0, MAX_ALPHA))
    put("dice_weight", _number(spec.dice_weight, "dice_weight", 0.0, 1.0))
    put("fold_weight", _number(spec.fold_weight, "fold_weight", 0.0, MAX_ALPHA))
    _whole(spec.iterations, "iterations", ITERATIONS)
    put("learning_rate", _number(spec.learning_rate, "learning_rate", 0.0, MAX_LEARNING_RATE, low_open=True))
    _whole(spec.batch_size, "batch_size", BATCH_SIZE)
    _whole(spec.patch_size, "patch_size", PATCH_SIZE)


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
        kind = _choice(self.kind, "intensity normalisation", ("window", "percentile"))
        bound = 100.0 if kind == "percentile" else MAX_INTENSITY
        low = -bound if kind == "window" else 0.0
        what = "percentile" if kind == "percentile" else "window bound"
        object.__setattr__(self, "low", _number(self.low, f"the intensity {what} low", low, bound))
        object.__setattr__(self, "high", _number(self.high, f"the intensity {what} high", low, bound))
        if not self.low < self.high:
            raise StackError(f"intensity normalisation needs low < high, got {self.low:g} and {self.high:g}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IntensitySpec":
        if not isinstance(data, dict):
            raise StackError("the intensity normalisation must be a JSON object (kind, low, high)")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise StackError(f"unknown intensity settings: {_names(unknown)}")
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
    initial_alignment: AlignmentMode = "centre"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise StackError("a stack needs at least one stage")
        if len(self.stages) > MAX_STAGES:
            raise StackError(f"a stack has at most {MAX_STAGES} stages, this recipe has {len(self.stages)}")
        if not all(isinstance(s, StageSpec) for s in self.stages) or not isinstance(self.intensity, IntensitySpec):
            raise StackError("a recipe is made of StageSpec stages and an IntensitySpec")
        _choice(self.initial_alignment, "initial alignment", ALIGNMENT_MODES)
        weights = [s.weight_count for s in self.stages]
        if sum(weights) > MAX_WEIGHTS:
            k = max(range(len(weights)), key=weights.__getitem__)
            raise StackError(f"the networks would have {sum(weights) / 1e6:.0f} million weights (stage {k + 1} alone "
                             f"{weights[k] / 1e6:.0f} million), more than the {MAX_WEIGHTS // 1_000_000} million DLIR loads; "
                             "use fewer channels, levels or stages")

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [s.to_dict() for s in self.stages],
            "intensity": self.intensity.to_dict(),
            "initial_alignment": self.initial_alignment,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """A recipe from its JSON form, every value bounded (:class:`StackError` naming stage and key)."""
        if not isinstance(data, dict) or "stages" not in data:
            raise StackError("the stack recipe is incomplete: it has no list of stages")
        stages = data["stages"]
        if not isinstance(stages, list):
            raise StackError("the stack recipe is malformed: 'stages' must be a list")
        if len(stages) > MAX_STAGES:
            raise StackError(f"a stack has at most {MAX_STAGES} stages, this recipe has {len(stages)}")
        try:
            specs = []
            for k, stage in enumerate(stages, 1):
                try:
                    specs.append(StageSpec.from_dict(stage))
                except StackError as exc:
                    raise StackError(f"stage {k}: {exc}") from exc
            return cls(
                stages=tuple(specs),
                intensity=IntensitySpec.from_dict(data.get("intensity", {})),
                initial_alignment=data.get("initial_alignment", "centre"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StackError(f"the stack recipe is incomplete or malformed ({_show(str(exc))})") from exc
