"""What the DLIR Training GUI asks for, checked, and turned into the trainer's ``config.toml``.

:class:`TrainingSettings` has one field per GUI control (the same names as the module's
parameter node, so the Widget passes the parameter node's values straight in).  Its units:
control-point spacings and the grid spacing in mm, the patch size in voxels of the stage grid.
:func:`build_config` makes the configuration of ``dlir train`` from it (the layout of
:mod:`dlir.train_config`, accepted by ``TrainConfig.from_dict``); the engine's
``dlir.toml_writer.dumps`` writes it.  No Qt, no Slicer.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A setting cannot be used; the message names it and says what to change."""


class DataSource(str, enum.Enum):
    FOLDER = "folder"
    CSV = "csv"
    SCENE = "scene"

    def label(self) -> str:
        return {"folder": "Folder of images", "csv": "CSV of image paths", "scene": "Volumes in the scene"}[self.value]


class Intensity(str, enum.Enum):
    MR = "mr"
    CT = "ct"

    def label(self) -> str:
        return {"mr": "MR: 0.5-99.5 percentiles", "ct": "CT: window -1000..1000 HU"}[self.value]

    def config(self) -> dict[str, Any]:
        """The stack's intensity normalisation (:class:`dlir.recipe.IntensitySpec`)."""
        if self is Intensity.CT:
            return {"kind": "window", "low": -1000.0, "high": 1000.0}
        return {"kind": "percentile", "low": 0.5, "high": 99.5}


DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainingSettings:
    """Every choice of the Training module (names match the parameter node)."""

    dataSource: DataSource = DataSource.FOLDER
    dataFolder: Path | str = ""
    dataCsv: Path | str = ""
    validationCount: int = 0
    intensity: Intensity = Intensity.MR
    affineStage: bool = True
    affineIterations: int = 2000
    bsplineSpacings: str = "32, 16"
    bsplineIterations: int = 2000
    gridSpacing: float = 4.0
    patchSize: int = 64
    batchSize: int = 1
    alpha: float = 5.0
    learningRate: float = 1e-3
    device: str = "auto"
    seed: int = 0
    checkpointEvery: int = 100
    validateEvery: int = 100
    syntheticFraction: float = 0.5
    channels: int = 32
    stackName: str = ""
    description: str = ""
    outputFolder: Path | str = ""
    jobsFolder: Path | str = ""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_object(cls, source: Any) -> "TrainingSettings":
        """Settings from any object with these attribute names (the module's parameter node)."""
        values = {name: getattr(source, name) for name in cls.field_names() if hasattr(source, name)}
        return cls(**values)

    # ------------------------------------------------------------------------------ checks
    def control_point_spacings(self) -> list[float]:
        """The B-spline stages' control-point spacings in mm, coarse to fine, from ``bsplineSpacings``."""
        text = (self.bsplineSpacings or "").strip()
        if not text:
            return []
        values = []
        for part in re.split(r"[,;\s]+", text):
            if not part:
                continue
            try:
                values.append(float(part))
            except ValueError:
                raise SettingsError(f"B-spline control points: {part!r} is not a number; give spacings in mm such as '32, 16'") from None
        return values

    def check(self) -> None:
        """Raise :class:`SettingsError` with the first problem, if any."""
        if not safe_stack_name(self.stackName):
            raise SettingsError("give the new stack a name (letters, digits, '-', '_' or '.')")
        if self.dataSource == DataSource.FOLDER:
            folder = Path(str(self.dataFolder)) if str(self.dataFolder) else None
            if folder is None or not folder.is_dir():
                raise SettingsError(f"the image folder {str(self.dataFolder) or '(none)'} does not exist; choose a folder of training images")
        elif self.dataSource == DataSource.CSV:
            csv = Path(str(self.dataCsv)) if str(self.dataCsv) else None
            if csv is None or not csv.is_file():
                raise SettingsError(f"the image CSV {str(self.dataCsv) or '(none)'} does not exist; choose a CSV of image paths")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise SettingsError(f"unknown device {self.device!r}: choose auto, cpu or cuda")
        spacings = self.control_point_spacings()
        if not self.affineStage and not spacings:
            raise SettingsError("the recipe has no stage: tick the affine stage or give B-spline control-point spacings")
        if self.gridSpacing <= 0:
            raise SettingsError("the grid spacing must be positive (mm)")
        previous = math.inf
        for mm in spacings:
            factor = mm / self.gridSpacing
            k = round(factor)
            if mm <= 0 or abs(factor - k) > 1e-6 or k < 2 or k & (k - 1):
                allowed = ", ".join(f"{self.gridSpacing * 2 ** n:g}" for n in range(1, 5))
                raise SettingsError(f"a B-spline control-point spacing of {mm:g} mm does not fit the {self.gridSpacing:g} mm grid: "
                                    f"it must be the grid spacing times a power of two ({allowed} mm)")
            if mm > previous:
                raise SettingsError("list the B-spline control-point spacings coarse to fine (largest first), e.g. '32, 16'")
            previous = mm
        for name, value, low in (("affine iterations", self.affineIterations, 1), ("B-spline iterations", self.bsplineIterations, 1),
                                 ("batch size", self.batchSize, 1), ("checkpoint interval", self.checkpointEvery, 1),
                                 ("validation interval", self.validateEvery, 1), ("patch size", self.patchSize, 8),
                                 ("number of network channels", self.channels, 1)):
            if int(value) < low:
                raise SettingsError(f"the {name} must be at least {low}")
        if spacings and self.patchSize % round(spacings[0] / self.gridSpacing):
            cp = round(spacings[0] / self.gridSpacing)
            raise SettingsError(f"the patch size ({self.patchSize} voxels) must be a multiple of the coarsest control-point "
                                f"spacing in voxels ({cp})")
        if not all(math.isfinite(float(v)) for v in (self.gridSpacing, self.alpha, self.learningRate, self.syntheticFraction)):
            raise SettingsError("the grid spacing, bending weight, learning rate and share of synthetic pairs must be finite numbers")
        if self.alpha < 0 or self.learningRate <= 0:
            raise SettingsError("the bending weight must be >= 0 and the learning rate > 0")
        if not 0 <= self.syntheticFraction <= 1:
            raise SettingsError("the share of synthetic pairs must lie between 0 and 1")

    # ------------------------------------------------------------------------------ recipe
    def stages(self) -> list[dict[str, Any]]:
        """The stage list of the recipe (:class:`dlir.recipe.StageSpec` fields), coarse to fine."""
        stages: list[dict[str, Any]] = []
        g = float(self.gridSpacing)
        if self.affineStage:
            affine_g = 2 * g
            stages.append({"kind": "affine", "spacing_mm": [affine_g] * 3, "channels": int(self.channels),
                           "iterations": int(self.affineIterations),
                           "learning_rate": float(self.learningRate), "batch_size": int(self.batchSize), "alpha": 0.0})
        for mm in self.control_point_spacings():
            stages.append({"kind": "bspline", "spacing_mm": [g] * 3, "control_point_spacing": int(round(mm / g)),
                           "channels": int(self.channels),
                           "iterations": int(self.bsplineIterations), "learning_rate": float(self.learningRate),
                           "batch_size": int(self.batchSize), "patch_size": int(self.patchSize), "alpha": float(self.alpha)})
        return stages


def safe_stack_name(name: str) -> str:
    """The stack name when it is usable as a file name, else ''."""
    name = (name or "").strip()
    return name if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) else ""


def build_config(settings: TrainingSettings, data: dict[str, Any]) -> dict[str, Any]:
    """The ``dlir train`` configuration: ``data`` is the data section (see :func:`DLIRTrainingLib.scenedata`)."""
    settings.check()
    config: dict[str, Any] = {
        "name": settings.stackName.strip(),
        "description": settings.description or f"trained in 3D Slicer (DLIR Training) as {settings.stackName.strip()}",
        "device": settings.device,
        "seed": int(settings.seed),
        "checkpoint_every": int(settings.checkpointEvery),
        "validate_every": int(settings.validateEvery),
        "data": {**data, "validation_count": int(settings.validationCount), "synthetic_fraction": float(settings.syntheticFraction)},
        "recipe": {"intensity": settings.intensity.config(), "stages": settings.stages()},
    }
    return config
