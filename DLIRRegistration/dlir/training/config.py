"""The configuration of a training job: a TOML file, every key also a command-line flag.

Layout of ``CONFIG.toml`` (every key optional except ``data.images``; defaults below)::

    name = "chest-ct"                 # the stack's name (file JOB_DIR/NAME.safetensors)
    description = ""                  # modality, anatomy: shown by `dlir info` and in Slicer
    modality = "CT"
    anatomy = "chest"
    device = "auto"                   # auto | cpu | cuda | cuda:K
    seed = 0
    checkpoint_every = 100            # iterations between checkpoints
    validate_every = 100              # iterations between validations (0: only at stage ends)
    log_every = 10                    # iterations between iteration events
    start_from = ""                   # a stack file to fine-tune (its networks must match the recipe's)
    start_from_stages = []            # the stages (1-based) taken from it; empty: all it has

    [data]
    images = "images/"                # a folder, a glob or a CSV (image, labels, mask, pair)
    validation_count = 0              # labelled images held out for validation (0: validate on
                                      # fixed synthetic pairs of the labelled training images)
    synthetic_fraction = 0.5          # share of synthetic pairs; the rest are listed pairs when
                                      # the CSV has a pair column, else random inter-image pairs
    validation_pairs_per_image = 2
    validation_inter_subject = 0      # validation pairs of two different images, scored by their folding
    shapes_fraction = 0.0             # share of synthetic-shape pairs ([shapes], dlir.training.shapes)
    crop_probability = 0.0            # inter-subject augmentation (dlir.training.intersubject), off at 0:
    crop_min = 0.1                    #   the chance that the fixed or the moving image loses one end along
    crop_max = 0.35                   #   a random axis (this share of its extent): partial fields of view
    misalign_rotation_deg = 0.0       #   a random affine (per axis: degrees, relative scale, mm) added to
    misalign_scale = 0.0              #   the initial alignment of every pair of two images (inter-subject
    misalign_translation_mm = 0.0     #   and listed pairs), so the affine stage learns to capture offsets
    contrast_probability = 0.0        # the chance that one image of a pair of real images (the fixed or the moving)
    contrast_knots = 6                #   gets a random contrast: a random piecewise-linear map of its intensities
                                      #   with up to this many inner knots (dlir.training.augment.random_contrast)

    [synthetic]                       # random deformations of one image (see dlir.training.synthetic)
    control_point_spacing_mm = 40.0
    displacement_mm = 4.0
    rotation_deg = 6.0
    scale = 0.05
    shear = 0.03
    translation_mm = 5.0
    intensity = 0.1
    noise = 0.01

    [shapes]                          # synthetic shapes (dlir.training.config.ShapeSpec), e.g.
    size = 96
    same_contrast = 0.0
    two_draws = 0.0                   # share of pairs of two label maps (two subjects) instead of one
    two_draws_difference = 0.5        # the share of the second map's noise variance drawn anew

    [recipe]                          # dlir.recipe.Recipe: saved into the stack's manifest
    initial_alignment = "centre"      # search: inference's capture, cached per pair of training images
    [recipe.intensity]
    kind = "window"                   # CT: HU window; MR: kind = "percentile"
    low = -1000.0
    high = 1000.0
    [[recipe.stages]]                 # dlir.recipe.StageSpec, coarse to fine
    kind = "affine"
    spacing_mm = [8.0, 8.0, 8.0]
    depth = 1                         # pooling levels before the keypoint heatmaps
    keypoints = 32                    # 0: the paper's 12-parameter head
    iterations = 1000
    learning_rate = 0.001
    ...

Every key is also a flag of ``dlir train``: ``--KEY`` for the top level and ``[data]`` (``--crop-probability``,
``--misalign-rotation-deg``), ``--synthetic-KEY`` and ``--shapes-KEY`` (``--shapes-two-draws``) for their sections.
Relative paths are relative to the configuration file.  The job folder keeps the configuration
as run (``config.toml``, absolute paths), which ``--resume`` reads back.
"""

from __future__ import annotations

import argparse
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import InputError, StackError
from ..recipe import DEFAULT_BENDING_WEIGHT, INTENSITY_PRESETS, Recipe, StageSpec
from ..stackname import name_problem
from .toml_writer import dumps

#: stage settings that can be given per stage on the command line (one value, or a comma list)
STAGE_FLAGS = ("iterations", "learning_rate", "batch_size", "patch_size", "alpha", "channels", "dice_weight", "fold_weight")


@dataclass(frozen=True)
class SyntheticSpec:
    """Random pairs from one image: a cubic B-spline displacement then a small affine about the centre.

    ``control_point_spacing_mm`` (mm) and ``displacement_mm`` (standard deviation of each control
    point's displacement, mm) make the smooth part; ``rotation_deg`` (per axis), ``scale``
    (relative, per axis), ``shear`` and ``translation_mm`` bound the affine part (uniform);
    ``intensity`` bounds a random gamma / contrast change and ``noise`` the Gaussian noise
    (fractions of the [0, 1] intensity range).  Realistic scanner variation, each off at 0 (so a
    configuration without them draws exactly the pairs it drew before): ``bias`` the largest
    amplitude of a smooth multiplicative log bias field, ``blur_mm`` the largest Gaussian blur
    (sigma, mm), ``thick_slice_probability`` the chance of thick-slice partial volume (up to
    ``thick_slice_max`` voxels averaged along a random axis).
    """

    control_point_spacing_mm: float = 40.0
    displacement_mm: float = 4.0
    rotation_deg: float = 6.0
    scale: float = 0.05
    shear: float = 0.03
    translation_mm: float = 5.0
    intensity: float = 0.1
    noise: float = 0.01
    bias: float = 0.0
    blur_mm: float = 0.0
    thick_slice_probability: float = 0.0
    thick_slice_max: float = 4.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if not math.isfinite(getattr(self, f.name)) or getattr(self, f.name) < 0:
                raise InputError(f"synthetic.{f.name} must be a finite number >= 0, got {getattr(self, f.name)}")
        if self.control_point_spacing_mm <= 0:
            raise InputError("synthetic.control_point_spacing_mm must be positive")
        if self.thick_slice_probability > 1:
            raise InputError(f"synthetic.thick_slice_probability must lie between 0 and 1, got {self.thick_slice_probability}")


@dataclass(frozen=True)
class ShapeSpec:
    """Synthetic-shape pairs (:mod:`dlir.training.shapes`): how label maps and their images are drawn.

    Lengths in mm, intensities as fractions of [0, 1]; the shapes fill ``size``^3 voxels of ``spacing_mm``.
    """

    size: int = 96
    spacing_mm: float = 2.0
    labels_min: int = 8
    labels_max: int = 32
    blob_mm_min: float = 8.0
    blob_mm_max: float = 32.0
    spread: float = 0.1  # the largest standard deviation of intensities within a label
    blur_mm: float = 2.0  # the largest Gaussian blur (sigma)
    bias: float = 0.3  # the largest amplitude of the log bias field
    gamma: float = 0.25  # the largest |log gamma|
    noise: float = 0.05  # the largest noise standard deviation
    thick_slice_probability: float = 0.3
    thick_slice_max: int = 4  # the largest number of voxels averaged into one thick slice
    #: share of pairs whose two images share one contrast (same-modality pairs, from which a network learns
    #: far faster); 0: the two contrasts are always independent (SynthMorph)
    same_contrast: float = 0.0
    #: share of pairs drawn from two label maps instead of one (two subjects of one random anatomy): the fixed
    #: image's map shares all but ``two_draws_difference`` of its noise variance with the moving image's
    two_draws: float = 0.0
    two_draws_difference: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise InputError(f"shapes.{f.name} must be a finite number >= 0, got {value}")
        if self.size < 8:
            raise InputError(f"shapes.size must be at least 8 voxels, got {self.size}")
        if self.spacing_mm <= 0:
            raise InputError(f"shapes.spacing_mm must be positive, got {self.spacing_mm}")
        if not 2 <= self.labels_min <= self.labels_max:
            raise InputError(f"shapes.labels_min and shapes.labels_max need 2 <= min <= max, got {self.labels_min} and {self.labels_max}")
        if not 0 < self.blob_mm_min <= self.blob_mm_max:
            raise InputError(f"shapes.blob_mm_min and shapes.blob_mm_max need 0 < min <= max, got {self.blob_mm_min} and {self.blob_mm_max}")
        for key in ("thick_slice_probability", "same_contrast", "two_draws", "two_draws_difference"):
            if getattr(self, key) > 1:
                raise InputError(f"shapes.{key} must lie between 0 and 1, got {getattr(self, key)}")
        if self.thick_slice_max < 1:
            raise InputError(f"shapes.thick_slice_max must be at least 1, got {self.thick_slice_max}")


@dataclass(frozen=True)
class DataSpec:
    """Where the training images are and how pairs are drawn from them."""

    images: str = ""
    validation_count: int = 0
    synthetic_fraction: float = 0.5
    validation_pairs_per_image: int = 2
    shapes_fraction: float = 0.0  # share of synthetic-shape pairs; 1: shapes only (no images needed)
    #: inter-subject augmentation (:mod:`dlir.training.intersubject`), each off at 0 (so a configuration without
    #: it draws exactly the pairs it drew before): the chance that a training pair's fixed or moving image loses
    #: one end along a random axis (a partial field of view), ``crop_min``..``crop_max`` of its extent
    crop_probability: float = 0.0
    crop_min: float = 0.10
    crop_max: float = 0.35
    #: the bounds (uniform, per axis) of a random affine about the fixed image's centre that starts every pair of
    #: two images (inter-subject and listed) away from its initial alignment: degrees, relative scale, mm
    misalign_rotation_deg: float = 0.0
    misalign_scale: float = 0.0
    misalign_translation_mm: float = 0.0
    #: validation pairs of two different training images (ordered pairs, up to this many), scored by their folding
    #: (they have no known correspondence): a stage that folds on pairs of two subjects is not kept
    validation_inter_subject: int = 0
    #: different contrasts (issue 27), off at 0: the chance that a pair of real images (synthetic, inter-subject or
    #: listed; shapes draw their own contrasts) has its fixed or its moving image (even odds) remapped by a random,
    #: in general non-monotonic, piecewise-linear intensity map with 1 to ``contrast_knots`` inner knots
    #: (:func:`dlir.training.augment.random_contrast`); validation pairs of images are remapped with the same chance
    contrast_probability: float = 0.0
    contrast_knots: int = 6

    def __post_init__(self) -> None:
        for key in ("synthetic_fraction", "shapes_fraction", "crop_probability", "contrast_probability"):
            if not 0 <= getattr(self, key) <= 1:
                raise InputError(f"data.{key} must lie between 0 and 1")
        if not 0 <= self.crop_min <= self.crop_max < 1:
            raise InputError(f"data.crop_min and data.crop_max need 0 <= min <= max < 1, got {self.crop_min} and {self.crop_max}")
        for key in ("misalign_rotation_deg", "misalign_scale", "misalign_translation_mm"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise InputError(f"data.{key} must be a finite number >= 0, got {getattr(self, key)}")
        if self.misalign_scale >= 1:
            raise InputError(f"data.misalign_scale must be below 1, got {self.misalign_scale}")
        if isinstance(self.contrast_knots, bool) or not isinstance(self.contrast_knots, int) or not 1 <= self.contrast_knots <= 64:
            raise InputError(f"data.contrast_knots must be a whole number from 1 to 64, got {self.contrast_knots!r}")
        if self.validation_count < 0 or self.validation_pairs_per_image < 0 or self.validation_inter_subject < 0:
            raise InputError("data.validation_count, data.validation_pairs_per_image and data.validation_inter_subject "
                             "must not be negative")


@dataclass(frozen=True)
class Outline:
    """A stack's recipe from the few choices a user makes: THE defaults of ``dlir train`` and of
    the DLIR Training module (which builds its configuration through this class).

    An affine stage (``affine``) on a grid of twice ``grid_spacing_mm`` (``affine_keypoints`` keypoints
    found after one pooling level, see :class:`~dlir.nets.KeypointAffineNet`; 0 for the paper's
    12-parameter network), then one B-spline stage
    per entry of ``control_points_mm`` (control-point spacings in mm, coarse to fine), all on a
    ``grid_spacing_mm`` (mm) grid, so each must be the grid spacing times a power of two (>= 2).
    ``channels`` kernels per convolution; iterations per affine and per B-spline stage; the
    learning rate, batch size and patch size (voxels of the stage grid) of every stage; the bending
    weight ``alpha`` of the B-spline stages (per mm^2); ``intensity`` a name of
    :data:`dlir.recipe.INTENSITY_PRESETS`; ``dice_weight`` the share of soft Dice in every stage's
    similarity on pairs with known labels (synthetic shapes, labelled images).
    """

    affine: bool = True
    affine_keypoints: int = 32
    control_points_mm: tuple[float, ...] = (32.0, 16.0)
    grid_spacing_mm: float = 4.0
    channels: int = StageSpec.channels
    affine_iterations: int = StageSpec.iterations
    bspline_iterations: int = StageSpec.iterations
    learning_rate: float = StageSpec.learning_rate
    batch_size: int = StageSpec.batch_size
    patch_size: int = StageSpec.patch_size
    alpha: float = DEFAULT_BENDING_WEIGHT
    intensity: str = "mr"
    dice_weight: float = StageSpec.dice_weight

    def recipe(self) -> Recipe:
        """The recipe; raises :class:`InputError` with one sentence naming the first unusable choice."""
        g = float(self.grid_spacing_mm)
        if not (math.isfinite(g) and g > 0):
            raise InputError("the grid spacing must be a positive number of mm")
        if not self.affine and not self.control_points_mm:
            raise InputError("the recipe has no stage: keep the affine stage or give B-spline control-point spacings")
        if self.intensity not in INTENSITY_PRESETS:
            raise InputError(f"unknown intensity normalisation {self.intensity!r}: choose {' or '.join(INTENSITY_PRESETS)}")
        previous = math.inf
        for mm in self.control_points_mm:
            factor = mm / g
            if not math.isfinite(factor) or mm <= 0 or abs(factor - round(factor)) > 1e-6 or round(factor) < 2 \
                    or round(factor) & (round(factor) - 1):
                allowed = ", ".join(f"{g * 2 ** n:g}" for n in range(1, 5))
                raise InputError(f"a B-spline control-point spacing of {mm:g} mm does not fit the {g:g} mm grid: "
                                 f"it must be the grid spacing times a power of two ({allowed} mm)")
            if mm > previous:
                raise InputError("list the B-spline control-point spacings coarse to fine (largest first), e.g. '32, 16'")
            previous = mm
        common = dict(channels=int(self.channels), learning_rate=float(self.learning_rate),
                      batch_size=int(self.batch_size), patch_size=int(self.patch_size), dice_weight=float(self.dice_weight))
        head = dict(depth=1, keypoints=int(self.affine_keypoints)) if self.affine_keypoints else {}
        try:
            stages = [StageSpec("affine", spacing_mm=(2 * g,) * 3, iterations=int(self.affine_iterations), **head, **common)] if self.affine else []
            stages += [StageSpec("bspline", spacing_mm=(g,) * 3, control_point_spacing=int(round(mm / g)), alpha=float(self.alpha),
                                 iterations=int(self.bspline_iterations), **common) for mm in self.control_points_mm]
            return Recipe(stages=tuple(stages), intensity=INTENSITY_PRESETS[self.intensity])
        except StackError as exc:
            raise InputError(str(exc)) from exc


def default_recipe() -> Recipe:
    """The recipe of the default :class:`Outline`: affine (8 mm grid), B-splines every 32 and 16 mm (4 mm grid), MR scaling."""
    return Outline().recipe()


@dataclass(frozen=True)
class TrainConfig:
    """A whole training job (see the module docstring for the TOML layout)."""

    name: str = ""
    description: str = ""
    modality: str = ""
    anatomy: str = ""
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 100
    validate_every: int = 100
    log_every: int = 10
    #: a stack file whose stages' weights start this job's stages (fine-tuning): its networks must have the
    #: recipe's shapes; "" starts from seeded initial weights
    start_from: str = ""
    #: the stages (1-based) that take their weights from ``start_from``; empty: every stage the file has (the others
    #: start from their seeded initial weights: an affine stage of the paper's head from the identity)
    start_from_stages: tuple[int, ...] = ()
    data: DataSpec = field(default_factory=DataSpec)
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    shapes: ShapeSpec = field(default_factory=ShapeSpec)
    recipe: Recipe = field(default_factory=default_recipe)

    def check(self) -> None:
        """Raise :class:`InputError` naming the first unusable setting."""
        problem = name_problem(self.name)
        if problem:
            raise InputError(f"give the stack a name usable as a file name: {problem}")
        if not self.data.images and self.data.shapes_fraction < 1:
            raise InputError("no training images: choose a folder, a glob or a CSV of images (or train on synthetic shapes only)")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InputError(f"unknown device {self.device!r}: choose auto, cpu, cuda or cuda:K")
        for key in ("checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise InputError(f"{key} must be at least 1")
        if self.validate_every < 0:
            raise InputError("validate_every must not be negative")
        if any(not 1 <= k <= len(self.recipe.stages) for k in self.start_from_stages):
            raise InputError(f"start_from_stages must name stages from 1 to {len(self.recipe.stages)}, got {list(self.start_from_stages)}")
        if self.start_from_stages and not self.start_from:
            raise InputError("start_from_stages needs start_from: the stack file whose stages start this job")
        for k, spec in enumerate(self.recipe.stages, 1):
            if not (math.isfinite(spec.learning_rate) and math.isfinite(spec.alpha)):
                raise InputError(f"stage {k}: learning_rate and alpha must be finite numbers")
            if spec.iterations < 1 or spec.batch_size < 1 or spec.learning_rate <= 0 or spec.alpha < 0:
                raise InputError(f"stage {k}: iterations and batch_size must be at least 1, learning_rate > 0 and alpha >= 0")
            if spec.kind == "bspline" and (spec.patch_size < spec.control_point_spacing or spec.patch_size % spec.control_point_spacing):
                raise InputError(f"stage {k}: patch_size {spec.patch_size} must be a multiple of the control-point spacing "
                                 f"({spec.control_point_spacing} voxels)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "modality": self.modality, "anatomy": self.anatomy,
            "device": self.device, "seed": self.seed, "checkpoint_every": self.checkpoint_every,
            "validate_every": self.validate_every, "log_every": self.log_every, "start_from": self.start_from,
            "start_from_stages": list(self.start_from_stages),
            "data": asdict(self.data), "synthetic": asdict(self.synthetic), "shapes": asdict(self.shapes),
            "recipe": self.recipe.to_dict(),
        }

    def to_toml(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> "TrainConfig":
        """A configuration from parsed TOML; relative data paths are taken from ``base``."""
        top = {f.name for f in fields(cls)}
        unknown = set(data) - top
        if unknown:
            raise InputError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        try:
            values = {k: v for k, v in data.items() if k not in ("data", "synthetic", "shapes", "recipe")}
            if "start_from_stages" in values:
                values["start_from_stages"] = tuple(int(k) for k in values["start_from_stages"])
            data_section = dict(data.get("data", {}))
            if data_section.get("images") and base is not None:
                data_section["images"] = _absolute(str(data_section["images"]), base)
            if values.get("start_from") and base is not None:
                values["start_from"] = _absolute(str(values["start_from"]), base)
            config = cls(**values, data=_section(DataSpec, data_section, "data"),
                         synthetic=_section(SyntheticSpec, data.get("synthetic", {}), "synthetic"),
                         shapes=_section(ShapeSpec, data.get("shapes", {}), "shapes"),
                         recipe=Recipe.from_dict(data["recipe"]) if "recipe" in data else default_recipe())
        except StackError as exc:
            raise InputError(f"the recipe in the configuration: {exc}") from exc
        except TypeError as exc:
            raise InputError(f"the configuration is malformed ({exc})") from exc
        return config

    @classmethod
    def read(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"the configuration file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"the configuration file {path} is not valid TOML ({exc})") from exc
        return cls.from_dict(data, path.resolve().parent)


def _section(kind: type, data: Any, name: str) -> Any:
    if not isinstance(data, dict):
        raise InputError(f"[{name}] in the configuration must be a table")
    known = {f.name for f in fields(kind)}
    unknown = set(data) - known
    if unknown:
        raise InputError(f"unknown keys in [{name}]: {', '.join(sorted(unknown))}")
    return kind(**data)


def _absolute(path: str, base: Path) -> str:
    """``path`` made absolute against ``base`` (globs keep their pattern)."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


# ----------------------------------------------------------------------------------- flags
def _stage_numbers(text: str) -> tuple[int, ...]:
    """``"2,3"`` -> ``(2, 3)``: stage numbers (1-based) on the command line."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"give stage numbers separated by commas, e.g. 2,3 (got {text!r})") from None


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per configuration key (they override the config file)."""
    g = parser.add_argument_group("configuration (each overrides the config file)")
    for f in fields(TrainConfig):
        if f.name in ("data", "synthetic", "shapes", "recipe"):
            continue
        kind = _stage_numbers if f.name == "start_from_stages" else type(f.default) if f.default != "" else str
        g.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None)
    for f in fields(DataSpec):
        g.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.name != "images" else str, default=None,
                       help="data: a folder, a glob or a CSV of images" if f.name == "images" else None)
    for f in fields(SyntheticSpec):
        g.add_argument(f"--synthetic-{f.name.replace('_', '-')}", type=float, default=None)
    for f in fields(ShapeSpec):
        g.add_argument(f"--shapes-{f.name.replace('_', '-')}", type=type(f.default), default=None)
    g.add_argument("--intensity", choices=tuple(INTENSITY_PRESETS), default=None,
                   help="intensity normalisation: " + ", ".join(f"{k} = {v.describe()}" for k, v in INTENSITY_PRESETS.items()))
    g.add_argument("--control-points-mm", default=None, metavar="MM[,MM...]",
                   help="a new recipe (dlir.training.config.Outline): one B-spline stage per control-point spacing (mm), "
                        f"coarse to fine (default {','.join(f'{v:g}' for v in Outline.control_points_mm)})")
    g.add_argument("--grid-spacing-mm", type=float, default=None,
                   help=f"a new recipe: the B-spline stages' grid spacing in mm (default {Outline.grid_spacing_mm:g}; the affine stage's is twice it)")
    g.add_argument("--no-affine", action="store_true", help="a new recipe without the affine stage")
    for name in STAGE_FLAGS:
        g.add_argument(f"--{name.replace('_', '-')}", default=None, metavar="V[,V...]",
                       help=f"stage {name}: one value for every stage or a comma list, one per stage")


def apply_flags(config: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``config`` with every flag given on the command line applied."""
    top = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
           if f.name not in ("data", "synthetic", "shapes", "recipe") and getattr(args, f.name, None) is not None}
    if top.get("start_from"):
        top["start_from"] = _absolute(top["start_from"], Path.cwd())
    data = {f.name: getattr(args, f.name) for f in fields(DataSpec) if getattr(args, f.name, None) is not None}
    if data.get("images"):
        data["images"] = _absolute(data["images"], Path.cwd())
    synthetic = {f.name: getattr(args, f"synthetic_{f.name}") for f in fields(SyntheticSpec)
                 if getattr(args, f"synthetic_{f.name}", None) is not None}
    shapes = {f.name: getattr(args, f"shapes_{f.name}") for f in fields(ShapeSpec) if getattr(args, f"shapes_{f.name}", None) is not None}
    recipe = config.recipe
    if getattr(args, "control_points_mm", None) is not None or getattr(args, "grid_spacing_mm", None) is not None \
            or getattr(args, "no_affine", False):
        recipe = replace(_outline_from_flags(args).recipe(), intensity=recipe.intensity)
    if getattr(args, "intensity", None):
        recipe = replace(recipe, intensity=INTENSITY_PRESETS[args.intensity])
    stages = list(recipe.stages)
    for name in STAGE_FLAGS:
        text = getattr(args, name, None)
        if text is None:
            continue
        values = [v.strip() for v in str(text).split(",") if v.strip()]
        if len(values) not in (1, len(stages)):
            raise InputError(f"--{name.replace('_', '-')} takes one value or {len(stages)} (one per stage), got {len(values)}")
        kind = float if name in ("learning_rate", "alpha", "dice_weight", "fold_weight") else int
        try:
            parsed = [kind(v) for v in values]
        except ValueError:
            raise InputError(f"--{name.replace('_', '-')}: {text!r} is not a list of numbers") from None
        stages = [replace(s, **{name: parsed[0] if len(parsed) == 1 else parsed[k]}) for k, s in enumerate(stages)]
    try:
        return replace(config, **top, data=replace(config.data, **data), synthetic=replace(config.synthetic, **synthetic),
                       shapes=replace(config.shapes, **shapes),
                       recipe=replace(recipe, stages=tuple(stages)))
    except StackError as exc:
        raise InputError(str(exc)) from exc


def _outline_from_flags(args: argparse.Namespace) -> Outline:
    """The :class:`Outline` of ``--control-points-mm``, ``--grid-spacing-mm`` and ``--no-affine`` (other choices default)."""
    choices: dict[str, Any] = {"affine": not getattr(args, "no_affine", False)}
    if getattr(args, "grid_spacing_mm", None) is not None:
        choices["grid_spacing_mm"] = args.grid_spacing_mm
    text = getattr(args, "control_points_mm", None)
    if text is not None:
        try:
            choices["control_points_mm"] = tuple(float(v) for v in str(text).replace(";", ",").split(",") if v.strip())
        except ValueError:
            raise InputError(f"--control-points-mm: {text!r} is not a list of spacings in mm such as '32,16'") from None
    return Outline(**choices)
