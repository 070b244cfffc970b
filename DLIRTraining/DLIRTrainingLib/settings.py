"""What the DLIR Training GUI asks for, turned into the trainer's configuration BY THE ENGINE.

:class:`TrainingSettings` has one field per GUI control (the same names as the module's
parameter node, so the Widget passes the parameter node's values straight in).  Its units:
control-point spacings and the grid spacing in mm, the patch size in voxels of the stage grid.

There is one set of defaults and one validation, the engine's: every default here is read from
``dlir.training.config`` (:class:`~dlir.training.config.Outline`, ``TrainConfig``, ``DataSpec``),
and :func:`buildConfig` makes the configuration through them (``Outline(...).recipe()``, then
``TrainConfig(...).check()``), so a bad value raises the engine's :class:`dlir.errors.InputError`
with the very sentence ``dlir train`` prints for the equivalent flags.  What is left here is
GUI-specific: reading the ``bsplineSpacings`` text, the data source choice and its path.  The
intensity choices are :data:`dlir.recipe.INTENSITY_PRESETS`.  No Qt, no Slicer, no torch.

The GUI's recipe choices and the equivalent ``dlir train`` flags::

    affineStage=False        --no-affine
    bsplineSpacings="32, 16" --control-points-mm 32,16
    gridSpacing=4            --grid-spacing-mm 4
    affineIterations=A, bsplineIterations=B   --iterations A,B,B (one per stage)
    alpha=X                  --alpha 0,X,X (the affine stage has none)
    learningRate, batchSize, patchSize, channels   --learning-rate, --batch-size, --patch-size, --channels
    diceWeight=W             --dice-weight W
    shapesFraction=S         --shapes-fraction S (1: synthetic shapes only, no images needed)
    intensity=CT / MR        --intensity ct / mr
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dlir.errors import InputError
from dlir.recipe import INTENSITY_PRESETS
from dlir.training.config import DataSpec, Outline, TrainConfig

_OUTLINE = Outline()
_CONFIG = TrainConfig()
_DATA = DataSpec()


class DataSource(str, enum.Enum):
    FOLDER = "folder"
    CSV = "csv"
    SCENE = "scene"

    def label(self) -> str:
        return {"folder": "Folder of images", "csv": "CSV of image paths", "scene": "Volumes in the scene"}[self.value]


class _IntensityPreset(str, enum.Enum):
    """A name of :data:`dlir.recipe.INTENSITY_PRESETS` (the members are made from it below)."""

    def label(self) -> str:
        """The combo box text, e.g. ``CT: window -1000..1000``."""
        return f"{self.name}: {self.spec().describe()}"

    def spec(self) -> Any:
        """The engine's :class:`dlir.recipe.IntensitySpec` of this preset."""
        return INTENSITY_PRESETS[self.value]


#: the intensity normalisations offered: one member per engine preset (``Intensity.CT.value == "ct"``)
Intensity = _IntensityPreset("Intensity", {name.upper(): name for name in INTENSITY_PRESETS}, module=__name__)


def formatSpacings(spacings: tuple[float, ...]) -> str:
    """Control-point spacings (mm) as the GUI writes them: ``32, 16``."""
    return ", ".join(f"{mm:g}" for mm in spacings)


@dataclass
class TrainingSettings:
    """Every choice of the Training module (names match the parameter node); defaults are the engine's."""

    dataSource: DataSource = DataSource.FOLDER
    dataFolder: Path | str = ""
    dataCsv: Path | str = ""
    validationCount: int = _DATA.validation_count
    intensity: Intensity = Intensity(_OUTLINE.intensity)  # type: ignore[valid-type]
    affineStage: bool = _OUTLINE.affine
    affineIterations: int = _OUTLINE.affine_iterations
    bsplineSpacings: str = formatSpacings(_OUTLINE.control_points_mm)
    bsplineIterations: int = _OUTLINE.bspline_iterations
    gridSpacing: float = _OUTLINE.grid_spacing_mm
    patchSize: int = _OUTLINE.patch_size
    batchSize: int = _OUTLINE.batch_size
    alpha: float = _OUTLINE.alpha
    learningRate: float = _OUTLINE.learning_rate
    device: str = _CONFIG.device
    seed: int = _CONFIG.seed
    checkpointEvery: int = _CONFIG.checkpoint_every
    validateEvery: int = _CONFIG.validate_every
    syntheticFraction: float = _DATA.synthetic_fraction
    shapesFraction: float = _DATA.shapes_fraction
    diceWeight: float = _OUTLINE.dice_weight
    channels: int = _OUTLINE.channels
    stackName: str = _CONFIG.name
    description: str = _CONFIG.description
    outputFolder: Path | str = ""
    jobsFolder: Path | str = ""

    @classmethod
    def fieldNames(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def fromObject(cls, source: Any) -> "TrainingSettings":
        """Settings from any object with these attribute names (the module's parameter node)."""
        values = {name: getattr(source, name) for name in cls.fieldNames() if hasattr(source, name)}
        return cls(**values)

    # ------------------------------------------------------------------------------ GUI-specific
    def controlPointSpacings(self) -> tuple[float, ...]:
        """The B-spline stages' control-point spacings in mm, coarse to fine, read from the ``bsplineSpacings`` text."""
        values = []
        for part in re.split(r"[,;\s]+", (self.bsplineSpacings or "").strip()):
            if not part:
                continue
            try:
                values.append(float(part))
            except ValueError:
                raise InputError(f"B-spline control points: {part!r} is not a number; "
                                 "give spacings in mm such as '32, 16'") from None
        return tuple(values)

    def imagesSource(self) -> str:
        """The chosen folder or CSV (absolute), '' when none is chosen or the data are scene volumes."""
        source = DataSource(self.dataSource)
        chosen = {DataSource.FOLDER: self.dataFolder, DataSource.CSV: self.dataCsv}.get(source, "")
        return str(Path(str(chosen)).expanduser().resolve()) if chosen and str(chosen) not in ("", ".") else ""

    # ------------------------------------------------------------------------------ the engine's
    def outline(self) -> Outline:
        """The engine's recipe outline of these choices (``Outline.recipe()`` checks them)."""
        return Outline(affine=bool(self.affineStage), control_points_mm=self.controlPointSpacings(),
                       grid_spacing_mm=float(self.gridSpacing), channels=int(self.channels),
                       affine_iterations=int(self.affineIterations), bspline_iterations=int(self.bsplineIterations),
                       learning_rate=float(self.learningRate), batch_size=int(self.batchSize), patch_size=int(self.patchSize),
                       alpha=float(self.alpha), intensity=Intensity(self.intensity).value,
                       dice_weight=float(self.diceWeight))


def buildConfig(settings: TrainingSettings, images: str | None = None) -> TrainConfig:
    """The checked ``dlir train`` configuration of ``settings``; ``images``: the data (default: the chosen folder or CSV).

    Raises the engine's :class:`dlir.errors.InputError` (or ``StackError``) with the sentence the
    command line prints for the equivalent flags.  Whether the folder or CSV holds images is
    :func:`checkImages`'s business (the trainer's own ``find_images``).
    """
    recipe = settings.outline().recipe()
    data = DataSpec(images=settings.imagesSource() if images is None else str(images),
                    validation_count=int(settings.validationCount), synthetic_fraction=float(settings.syntheticFraction),
                    shapes_fraction=float(settings.shapesFraction))
    config = TrainConfig(name=(settings.stackName or "").strip(), description=settings.description or "",
                         device=str(settings.device), seed=int(settings.seed), checkpoint_every=int(settings.checkpointEvery),
                         validate_every=int(settings.validateEvery), data=data, recipe=recipe)
    config.check()
    return config


def checkImages(images: str) -> None:
    """Refuse a folder or CSV the trainer would refuse (``dlir.training.data.find_images``: its sentence)."""
    from dlir.training.data import find_images  # imports torch: only when a job is started

    find_images(images)
