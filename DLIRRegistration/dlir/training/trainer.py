"""Training a stage stack the DLIR way: one stage at a time, coarse to fine, earlier stages frozen.

Each iteration draws ``batch_size`` pairs (synthetic, listed, random inter-image or synthetic shapes, see
:mod:`dlir.training.config`; with the inter-subject augmentation of :mod:`dlir.training.intersubject`:
partial fields of view and a random initial misalignment; with ``data.contrast_probability``, pairs of real
images whose fixed or moving image gets a random contrast, :func:`dlir.training.augment.random_contrast`), starts each from the recipe's initial
alignment (the capture search is computed once per pair of training images and kept), runs the frozen
earlier stages exactly as inference does (:mod:`dlir.pipeline`, an affine stage that makes a pair less alike skipped), and minimises ``-similarity(fixed, warped) + alpha * bending energy`` for
the current stage with Adam.  B-spline stages train on random patches of the stage grid (cut at
control-point boundaries, so the control-point lattice is the one inference uses); the affine
stage sees the whole stage grid.  Gradients are averaged over the batch.  The pairs drawn are
counted by kind (:data:`PAIR_KINDS`) in the ``iteration`` and ``stage_done`` events.

Robust jobs: a checkpoint (``checkpoints/last.pt``: weights, optimiser, best weights, position;
read back with ``torch.load(weights_only=True)``) every ``checkpoint_every`` iterations, at
every stage end and on SIGINT/SIGTERM.  All randomness of iteration ``i`` of stage ``k`` comes
from a generator seeded with ``(seed, rank, k, i)``, so a resumed job draws exactly the pairs an
uninterrupted one would, and on the CPU finishes with the same weights.  A finer stage can be
added to a job, finished or not: append it to the job's ``config.toml`` (earlier stages left as
they are) and resume; it starts from the initial weights a job with that recipe from the start
would have given it, so the stack is that job's.

Scale out: under ``torchrun`` (``WORLD_SIZE`` > 1) the stage's network is wrapped in
DistributedDataParallel (NCCL on GPUs, gloo on CPUs), every rank draws its own pairs, and only
rank 0 writes files and events.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import __version__
from ..atomic import atomic_write
from ..device import resolve_device
from ..errors import CancelledError, DLIRError, InputError
from ..geometry import Grid, sample
from ..losses import Objective, ncc, one_hot, stage_loss
from ..metrics import dice, folding_fraction
from ..alignment import initial_alignment
from ..pipeline import PreparedImage, run_stages, stage_inputs
from ..recipe import StageSpec
from ..stack import Manifest, Stack, build_stack, load_stack, save_stack
from ..transforms import AffineTransform, Composite, DisplacementField, SpatialTransform, displacement_on_grid, grid_points, jacobian_determinant
from .augment import random_contrast
from .config import TrainConfig
from .data import TrainingImage, find_images, load_image, pair_groups
from .events import EventLog
from .intersubject import misaligns, random_crop, random_misalignment
from .jobfolder import CHECKPOINT, CONFIG_FILE, EVENTS_FILE, LOG_FILE, has_checkpoint, stack_file
from .shapes import shape_pair
from .synthetic import synthetic_pair

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dlir-checkpoint"
#: exit code of a job stopped by a signal after writing its checkpoint (as shells report SIGINT)
EXIT_STOPPED = 130
#: the counts of drawn training pairs in the events: one kind per pair (a synthetic deformation of one image, two
#: different images drawn at random, a listed pair, synthetic shapes of one label map or of two), and how many of
#: them were cropped (a partial field of view), misaligned (pairs of two images only) or given a random contrast (pairs
#: of real images only)
PAIR_KINDS = ("synthetic", "inter_subject", "listed", "shapes", "shapes_two_draws", "cropped", "misaligned", "contrast")


@dataclass
class TrainingPair:
    """One training or validation pair on training grids; labels ``[1, 1, D, H, W]`` when known; ``initial`` the
    stages' start ``T0`` (fixed -> moving, LPS mm), or None for the recipe's initial alignment of the pair as it is;
    ``known_affine`` the affine part of a synthetic pair's known transform (fixed -> moving, LPS mm)."""

    fixed: PreparedImage
    moving: PreparedImage
    fixed_labels: torch.Tensor | None = None
    moving_labels: torch.Tensor | None = None
    initial: AffineTransform | None = None
    known_affine: AffineTransform | None = None


def _inside_moving(fixed_labels: torch.Tensor, moving_labels: torch.Tensor, grid: Grid,
                   points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fixed, warped moving) label probabilities for the soft-Dice term, both zero where ``points`` leave the moving
    grid, and the warped ones zero where the fixed voxel has no label of the moving map.

    ``fixed_labels`` has one channel per label value of the MOVING map (:meth:`Trainer.stage_labels`), so its
    channels sum to the share of each fixed voxel that the moving map can match: below 1 outside the fixed
    image and where the fixed map holds a value the moving one lacks (the 0 a synthetic shape pair's fixed
    labels get where its transform leaves the moving grid).  Counted, such voxels would reward pushing
    points out of the moving grid there; without the ``points`` mask, a transform that keeps every point
    inside the moving image (e.g. a uniform shrink) would gain Dice at the borders.
    """
    warped = sample(moving_labels, grid, points)
    inside = sample(torch.ones_like(moving_labels[:, :1]), grid, points)
    known = fixed_labels.sum(1, keepdim=True).clamp(max=1)
    return fixed_labels * inside, warped * inside * known


def label_shares(labels: torch.Tensor, image_grid: Grid, transform: SpatialTransform | None, grid: Grid,
                 values: list[int]) -> torch.Tensor:
    """Label probabilities ``[1, len(values), D, H, W]`` on ``grid``: per voxel, the share of its box (one voxel of
    ``grid``, mapped through ``transform`` into ``image_grid``) that each label value covers; 0 outside the image.

    ``labels`` ``[1, 1, ...]`` on ``image_grid``; the box is sampled by nearest neighbour at ``n^3`` points,
    ``n`` = the ratio of the two grids' spacings (1 to 4), centred in ``n`` equal parts along each axis:
    an area average (anti-aliasing) computed on the coarse grid alone.
    """
    n = max(1, min(4, round(min(g / s for g, s in zip(grid.spacing, image_grid.spacing)))))
    steps = [(a + 0.5) / n - 0.5 for a in range(n)]  # voxel fractions of ``grid``
    linear = torch.as_tensor(grid.index_to_physical()[:3, :3], dtype=torch.float32, device=labels.device)
    centres = grid_points(grid, 1, labels.device)
    inside_labels = labels.float() + 1  # 0 = outside the image after sampling
    shares = torch.zeros((1, len(values), *grid.shape), device=labels.device)
    for di in steps:
        for dj in steps:
            for dk in steps:
                points = centres + linear @ torch.tensor([di, dj, dk], device=labels.device)
                if transform is not None:
                    points = transform(points)
                sampled = sample(inside_labels, image_grid, points, mode="nearest")
                shares += one_hot(sampled, [v + 1 for v in values])
    return shares / n ** 3


@dataclass
class StageRecord:
    """Bookkeeping of one stage: its best validation and the time spent (survives resume)."""

    seconds: float = 0.0
    best_score: float = -math.inf
    best_iteration: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)
    best_weights: dict[str, torch.Tensor] | None = None
    pairs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PAIR_KINDS, 0))  # drawn in the stage, by kind


# ----------------------------------------------------------------------------------- helpers
def iteration_generator(seed: int, rank: int, stage: int, iteration: int) -> torch.Generator:
    """The generator of all random draws of one iteration (so a resumed job repeats them exactly)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_009 + stage) * 10_000_019 + iteration)


def _randint(generator: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def patch_grid(grid: Grid, offset: tuple[int, int, int], size: tuple[int, int, int]) -> Grid:
    """The sub-grid of an axis-aligned ``grid`` starting at voxel ``offset`` (i, j, k) with ``size`` voxels."""
    origin = tuple(o + i * s for o, i, s in zip(grid.origin, offset, grid.spacing))
    return Grid(size, grid.spacing, origin, grid.direction)


@torch.no_grad()
def _network_of(spec: StageSpec) -> tuple[object, ...]:
    """What makes two stages' networks interchangeable: kind, grid spacing (mm), control-point spacing, kernels, head."""
    return (spec.kind, tuple(spec.spacing_mm), spec.control_point_spacing if spec.kind == "bspline" else None,
            spec.channels, spec.depth, spec.keypoints)


def _sha256(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validation_scores(pair: TrainingPair, transform: SpatialTransform) -> tuple[float, float, dict[int, float]]:
    """(NCC, folding fraction, Dice per label of the fixed labels) of ``transform`` (fixed -> moving, LPS mm) on a pair.

    Everything on the fixed image's grid, with the one implementation of the metrics
    (:mod:`dlir.metrics`) that inference and evaluation use; labels are warped by nearest neighbour.
    """
    grid, device = pair.fixed.grid, pair.fixed.tensor.device
    points = transform(grid_points(grid, 1, device))
    warped = sample(pair.moving.tensor, pair.moving.grid, points)
    det = jacobian_determinant(displacement_on_grid(transform, grid, 1, device), grid)
    scores: dict[int, float] = {}
    if pair.fixed_labels is not None and pair.moving_labels is not None:
        warped_labels = sample(pair.moving_labels.to(device), pair.moving.grid, points, mode="nearest")
        reference = pair.fixed_labels[0, 0].cpu().numpy()
        present = [int(v) for v in torch.unique(pair.fixed_labels).tolist() if v != 0]  # the fixed image's labels
        scores = dice(reference, warped_labels[0, 0].cpu().numpy(), present)
    return float(ncc(pair.fixed.tensor, warped)), folding_fraction(det), scores


# ----------------------------------------------------------------------------------- trainer
class Trainer:
    """A training job in ``job_dir``; :meth:`run` trains every remaining stage and writes the stack."""

    def __init__(self, config: TrainConfig, job_dir: Path, resume: bool = False, events: EventLog | None = None,
                 tensorboard: bool = False, show_bar: bool = False) -> None:
        self.config = config
        self.job_dir = job_dir
        self.resume = resume
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.main = self.rank == 0
        self.events = events if self.main else None
        self.show_bar = show_bar and self.main
        self.device = self._device()
        self.stack: Stack = build_stack(self._manifest(), seed=config.seed).to(self.device)
        if config.start_from:
            self._start_from(Path(config.start_from))
        self.records = [StageRecord() for _ in config.recipe.stages]
        self.position = (0, 0)  # (stage index, iterations done in it)
        self.optimiser_state: dict[str, Any] | None = None
        self.stop_signal: str | None = None
        self.writer = self._tensorboard() if tensorboard and self.main else None
        self.train_images: list[TrainingImage] = []
        self.held_out: list[TrainingImage] = []  # labelled images only ever used for validation
        self.validation: list[TrainingPair] = []
        self.listed: list[tuple[TrainingImage, TrainingImage]] = []
        self.baseline: dict[str, Any] = {}
        self.drawn: dict[str, int] = dict.fromkeys(PAIR_KINDS, 0)  # the current stage's counts (its record's)
        self.searched: dict[tuple[Path, Path], AffineTransform] = {}  # the capture of (fixed, moving) training images

    # ------------------------------------------------------------------------------- setup
    def _device(self) -> torch.device:
        device = resolve_device(self.config.device)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return device

    def _start_from(self, path: Path) -> None:
        """Start the stages from the weights of the stack file ``path`` (fine-tuning): its stage ``k`` must have the
        network of this recipe's stage ``k`` (kind, grid, control points, kernels, keypoints); stages the file lacks, or
        left out of ``start_from_stages``, keep their seeded initial weights."""
        if not path.is_file():
            raise InputError(f"start_from: the stack file {path} does not exist")
        try:
            source = load_stack(path)
        except DLIRError as exc:
            raise InputError(f"start_from: {exc}") from exc
        mine = self.config.recipe.stages
        if len(source.stages) > len(mine):
            raise InputError(f"start_from: {path.name} has {len(source.stages)} stages and this recipe {len(mine)}")
        for k, (theirs, ours) in enumerate(zip(source.manifest.recipe.stages, mine), 1):
            if _network_of(theirs) != _network_of(ours):
                raise InputError(f"start_from: stage {k} of {path.name} is not the network of this recipe's stage {k} "
                                 f"({_network_of(theirs)} against {_network_of(ours)})")
        chosen = set(self.config.start_from_stages) or set(range(1, len(source.stages) + 1))
        missing = sorted(chosen - set(range(1, len(source.stages) + 1)))
        if missing:
            raise InputError(f"start_from: {path.name} has no stage {missing[0]}")
        weights = {n: t.detach().clone() for n, t in self.stack.weights().items()}
        weights.update({n: t.to(self.device) for n, t in source.weights().items()
                        if int(n.split(".", 1)[0].removeprefix("stage")) + 1 in chosen})
        self.stack.load_weights(weights, str(path))

    def _manifest(self) -> Manifest:
        c = self.config
        return Manifest(c.name, c.recipe, description=c.description, modality=c.modality, anatomy=c.anatomy)

    def _tensorboard(self) -> Any:
        """A TensorBoard writer into ``JOB_DIR/tensorboard`` (scalars per logged iteration, image snapshots per validation)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.job_dir / "tensorboard"))

    def _emit(self, event_type: str, /, **data: Any) -> None:
        if self.events is not None:
            self.events.emit(event_type, **data)

    def load_data(self) -> None:
        """Read every image once onto its training grid; make the fixed validation pairs."""
        c = self.config
        if c.data.shapes_fraction >= 1 and not c.data.images:  # shapes only: validate on fixed shape pairs
            generator = torch.Generator().manual_seed(c.seed + 7_777_777)
            self.validation = [self.shape_pair(generator) for _ in range(max(1, 4 * c.data.validation_pairs_per_image))]
            return
        spacing = tuple(min(s.spacing_mm[a] for s in c.recipe.stages) for a in range(3))
        min_size = max(s.min_size for s in c.recipe.stages)
        entries = find_images(c.data.images)
        images = [load_image(e, c.recipe.intensity, spacing, 1) for e in entries]
        labelled = [im for im in images if im.labels is not None]
        held_out = labelled[len(labelled) - c.data.validation_count:] if c.data.validation_count else []
        if c.data.validation_count > len(labelled):
            raise InputError(f"data.validation_count is {c.data.validation_count} but only {len(labelled)} images have labels")
        self.held_out = held_out
        self.train_images = [im for im in images if all(im is not h for h in held_out)]
        if not self.train_images:
            raise InputError("every image is held out for validation: lower data.validation_count")
        for im in images:
            if min(im.prepared.grid.size) < 2:
                raise InputError(f"the image {im.entry.image} is too small for the recipe: {im.prepared.grid.size} voxels "
                                 f"at {spacing} mm")
        too_small = [im for im in self.train_images if max(im.prepared.grid.size) < min_size // 2]
        if too_small:
            raise InputError(f"the image {too_small[0].entry.image} is too small for the recipe ({too_small[0].prepared.grid.size} "
                             f"voxels at {spacing} mm; the coarsest network needs about {min_size})")
        self.listed = pair_groups(self.train_images)
        generator = torch.Generator().manual_seed(c.seed + 7_777_777)
        for im in held_out or labelled:
            for _ in range(c.data.validation_pairs_per_image):
                fixed, moving, _, fixed_labels = synthetic_pair(im.prepared.tensor, im.prepared.grid, replace(c.synthetic, noise=0.0, intensity=0.0),
                                                                generator, im.labels)
                self.validation.append(TrainingPair(PreparedImage(fixed, im.prepared.grid), PreparedImage(moving, im.prepared.grid),
                                            fixed_labels, im.labels))
        for a, b in list(itertools.permutations(self.train_images, 2))[:c.data.validation_inter_subject]:
            both = a.labels is not None and b.labels is not None
            self.validation.append(TrainingPair(a.prepared, b.prepared, a.labels if both else None, b.labels if both else None))
        mode = c.recipe.initial_alignment
        for pair in self.validation:  # the start of every validation pair, once (the capture search costs ~0.5 s)
            pair.initial = initial_alignment(mode, pair.fixed, pair.moving)
        if c.data.contrast_probability > 0:  # validate on the contrasts training meets (same chance, fixed draws); the
            # starts above, found on the images' own contrast, stand for what the search with MIND-SSC finds at inference
            generator = torch.Generator().manual_seed(c.seed + 8_888_888)
            self.validation = [self.recontrasted(pair, generator) if float(torch.rand(1, generator=generator)) < c.data.contrast_probability
                               else pair for pair in self.validation]

    # ------------------------------------------------------------------------------- pairs
    def draw_pair(self, generator: torch.Generator) -> TrainingPair:
        """A synthetic, listed, random inter-image or shape pair (see ``data.synthetic_fraction`` and
        ``data.shapes_fraction``), with labels where known, its initial alignment and the inter-subject
        augmentation of ``[data]``; counted in :attr:`drawn`.

        Labels travel with a synthetic pair of a labelled image (carried to the fixed image by the same
        transform) and with an inter-image pair whose two images both have them; the soft-Dice term of a
        stage with ``dice_weight`` > 0 uses them, other pairs train on the similarity alone.
        """
        c = self.config
        if c.data.shapes_fraction >= 1 or (c.data.shapes_fraction > 0 and float(torch.rand(1, generator=generator)) < c.data.shapes_fraction):
            two = c.shapes.two_draws > 0 and float(torch.rand(1, generator=generator)) < c.shapes.two_draws
            kind, pair, images = "shapes_two_draws" if two else "shapes", self.shape_pair(generator, two), None
        else:
            synthetic = len(self.train_images) == 1 and not self.listed or float(torch.rand(1, generator=generator)) < c.data.synthetic_fraction
            kind, pair, images = ("synthetic", self.synthetic_pair(generator), None) if synthetic else self.image_pair(generator)
        self.drawn[kind] += 1
        if c.data.crop_probability > 0 and float(torch.rand(1, generator=generator)) < c.data.crop_probability:
            pair = self.cropped(pair, generator)
            self.drawn["cropped"] += 1
        if kind in ("synthetic", "inter_subject", "listed") and c.data.contrast_probability > 0 \
                and float(torch.rand(1, generator=generator)) < c.data.contrast_probability:
            pair = self.recontrasted(pair, generator)
            self.drawn["contrast"] += 1
        pair.initial = self.start(pair, images)
        if images is not None and misaligns(c.data):
            pair.initial = pair.initial @ random_misalignment(c.data, pair.fixed.grid, generator).to(self.device)
            self.drawn["misaligned"] += 1
        return pair

    def synthetic_pair(self, generator: torch.Generator) -> TrainingPair:
        """A random deformation of one random training image (:func:`~dlir.training.synthetic.synthetic_pair`)."""
        images = self.train_images
        im = images[_randint(generator, len(images))]
        fixed, moving, transform, fixed_labels = synthetic_pair(im.prepared.tensor, im.prepared.grid, self.config.synthetic,
                                                                generator, im.labels)
        return TrainingPair(PreparedImage(fixed.to(self.device), im.prepared.grid), PreparedImage(moving.to(self.device), im.prepared.grid),
                            fixed_labels, im.labels, known_affine=transform.split_leading_affine()[0])

    def image_pair(self, generator: torch.Generator) -> tuple[str, TrainingPair, tuple[TrainingImage, TrainingImage]]:
        """(kind, pair, (fixed, moving) training images): a random listed pair, or else two different random images."""
        images = self.train_images
        if self.listed:
            kind, (a, b) = "listed", self.listed[_randint(generator, len(self.listed))]
        else:
            i = _randint(generator, len(images))
            j = (i + 1 + _randint(generator, len(images) - 1)) % len(images)
            kind, a, b = "inter_subject", images[i], images[j]
        both = a.labels is not None and b.labels is not None  # label values mean the same in every image of a job
        return kind, TrainingPair(PreparedImage(a.prepared.tensor.to(self.device), a.prepared.grid),
                                  PreparedImage(b.prepared.tensor.to(self.device), b.prepared.grid),
                                  a.labels if both else None, b.labels if both else None), (a, b)

    def shape_pair(self, generator: torch.Generator, two_draws: bool = False) -> TrainingPair:
        """A synthetic-shape pair with its labels (:mod:`dlir.training.shapes`; intensities already in [0, 1])."""
        fixed, moving, transform, fixed_labels, moving_labels, grid = shape_pair(self.config.shapes, self.config.synthetic,
                                                                                 generator, two_draws)
        return TrainingPair(PreparedImage(fixed.to(self.device), grid), PreparedImage(moving.to(self.device), grid),
                            fixed_labels.float().to(self.device), moving_labels.float().to(self.device),
                            known_affine=transform.split_leading_affine()[0])

    def cropped(self, pair: TrainingPair, generator: torch.Generator) -> TrainingPair:
        """``pair`` with one end of its fixed or its moving image (even odds) cut away (:func:`~dlir.training.intersubject.random_crop`)."""
        spec = self.config.data
        if bool(torch.randint(2, (1,), generator=generator)):
            image, grid, labels = random_crop(pair.fixed.tensor, pair.fixed.grid, spec, generator, pair.fixed_labels)
            return replace(pair, fixed=PreparedImage(image, grid), fixed_labels=labels)
        image, grid, labels = random_crop(pair.moving.tensor, pair.moving.grid, spec, generator, pair.moving_labels)
        return replace(pair, moving=PreparedImage(image, grid), moving_labels=labels)

    def recontrasted(self, pair: TrainingPair, generator: torch.Generator) -> TrainingPair:
        """``pair`` with its fixed or its moving image (even odds) given a random contrast
        (:func:`~dlir.training.augment.random_contrast`, up to ``data.contrast_knots`` inner knots); labels, grids and the
        initial alignment stay."""
        knots = self.config.data.contrast_knots
        if bool(torch.randint(2, (1,), generator=generator)):
            return replace(pair, fixed=PreparedImage(random_contrast(pair.fixed.tensor, knots, generator), pair.fixed.grid))
        return replace(pair, moving=PreparedImage(random_contrast(pair.moving.tensor, knots, generator), pair.moving.grid))

    def start(self, pair: TrainingPair, images: tuple[TrainingImage, TrainingImage] | None) -> AffineTransform:
        """``T0`` of a drawn pair: the recipe's initial alignment of the pair as drawn (crops included).

        Under ``search`` (the capture of :mod:`dlir.capture`, inference's default) it is computed once per (fixed,
        moving) pair of training ``images`` and kept (a crop moves no anatomy, so the capture of the whole images
        holds for the cropped pair too); a pair drawn from one image or one label map (``images`` None) starts from
        the affine part of its known deformation, which is what the search captures (at the cost of a search per
        drawn pair), so the stages learn what is left after the capture, as at inference.
        """
        mode = self.stack.manifest.recipe.initial_alignment
        if mode != "search":
            return initial_alignment(mode, pair.fixed, pair.moving)
        if images is None:
            known = pair.known_affine
            return known.to(self.device) if known is not None else AffineTransform.translation(torch.zeros((1, 3), device=self.device))
        a, b = images
        key = (a.entry.image, b.entry.image)
        if key not in self.searched:
            self.searched[key] = initial_alignment("search", a.prepared, b.prepared)
        return self.searched[key].to(self.device)

    def frozen_transforms(self, k: int, pair: TrainingPair) -> list[SpatialTransform]:
        """``[T0, T1, ..., Tk]``: the initial alignment and the trained stages before stage ``k``."""
        with torch.no_grad():
            initial = pair.initial if pair.initial is not None else \
                initial_alignment(self.stack.manifest.recipe.initial_alignment, pair.fixed, pair.moving)
            transforms = run_stages(self.stack, pair.fixed, pair.moving, initial, upto=k, skip_worse=True)
        return transforms

    # ------------------------------------------------------------------------------- loss
    @torch.no_grad()
    def stage_labels(self, dice_weight: float, pair: TrainingPair, earlier: SpatialTransform,
                     grid: Grid) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Label probabilities on a stage grid, (fixed, moving through the earlier stages), for the soft-Dice term; (None, None) without.

        One channel per label: the share of the stage voxel's box covered by that label, from
        nearest-neighbour samples of the label map at up to 4 x 4 x 4 points spread over the box
        (:func:`label_shares`).  Sampled at the voxel centres alone, 2 mm labels on an 8 mm grid would
        be point samples of thin structures (aliased), whose overlap jumps as the field moves.
        """
        if dice_weight <= 0 or pair.fixed_labels is None or pair.moving_labels is None:
            return None, None
        values = torch.unique(pair.moving_labels).long().tolist()  # a fixed value the moving map lacks cannot be matched
        return (label_shares(pair.fixed_labels.to(self.device), pair.fixed.grid, None, grid, values),
                label_shares(pair.moving_labels.to(self.device), pair.moving.grid, earlier, grid, values))

    def pair_loss(self, k: int, net: torch.nn.Module, pair: TrainingPair, generator: torch.Generator) -> Objective:
        """Stage ``k``'s loss and its terms (:func:`~dlir.losses.stage_loss`) on one pair (a random patch for B-spline
        stages)."""
        stage = self.stack.stages[k]
        spec = stage.spec
        earlier = Composite(self.frozen_transforms(k, pair))
        grid, f, m = stage_inputs(spec, pair.fixed, pair.moving, earlier)
        f_labels, m_labels = self.stage_labels(spec.dice_weight, pair, earlier, grid)
        if spec.kind == "bspline":
            cp = spec.control_point_spacing
            size = tuple(min(max(spec.patch_size, spec.min_size), n) for n in grid.size)
            offset = tuple(cp * _randint(generator, (n - p) // cp + 1) for n, p in zip(grid.size, size))
            region = patch_grid(grid, offset, size)
            (i, j, kk), (sx, sy, sz) = offset, size
            f_patch = f[..., kk:kk + sz, j:j + sy, i:i + sx]
            m_patch = m[..., kk:kk + sz, j:j + sy, i:i + sx]
            transform = stage.transform(net(f_patch, m_patch), region)
            assert isinstance(transform, DisplacementField)
            points = grid_points(region, 1, f.device) + transform.field.movedim(1, -1)
            warped = sample(m, grid, points)
            labels = None if f_labels is None else _inside_moving(f_labels[..., kk:kk + sz, j:j + sy, i:i + sx], m_labels, grid, points)
            return stage_loss(spec, f_patch, warped, transform.field, region.spacing, labels)
        transform = stage.transform(net(f, m), grid)
        points = transform(grid_points(grid, 1, f.device))
        warped = sample(m, grid, points)
        labels = None if f_labels is None else _inside_moving(f_labels, m_labels, grid, points)
        return stage_loss(spec, f, warped, labels=labels)

    # ------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, k: int) -> dict[str, Any]:
        """Stages ``0..k`` on the validation pairs: mean Dice per label, folding fraction, similarity.

        ``k = -1``: the initial alignment alone (the numbers before registration).
        """
        self.stack.eval()
        dice_scores: dict[str, list[float]] = {}
        folding, sims = [], []
        for pair in self.validation:
            initial = pair.initial.to(self.device) if pair.initial is not None else \
                initial_alignment(self.stack.manifest.recipe.initial_alignment, pair.fixed, pair.moving)
            pair = TrainingPair(PreparedImage(pair.fixed.tensor.to(self.device), pair.fixed.grid),
                                PreparedImage(pair.moving.tensor.to(self.device), pair.moving.grid), pair.fixed_labels, pair.moving_labels)
            transforms = run_stages(self.stack, pair.fixed, pair.moving, initial, upto=k + 1, skip_worse=True)
            similarity, pair_folding, pair_dice = validation_scores(pair, Composite(transforms))
            sims.append(similarity)
            folding.append(pair_folding)
            for label, value in pair_dice.items():
                dice_scores.setdefault(str(label), []).append(value)
        self.stack.train()
        metrics: dict[str, Any] = {"ncc": sum(sims) / len(sims), "folding": sum(folding) / len(folding)}
        if dice_scores:
            metrics["dice"] = {label: sum(v) / len(v) for label, v in sorted(dice_scores.items(), key=lambda kv: int(kv[0]))}
            metrics["dice_mean"] = sum(metrics["dice"].values()) / len(metrics["dice"])
        return metrics

    def _score(self, metrics: dict[str, Any]) -> float:
        """Higher is better: mean Dice when labels exist, else NCC; folding above 0.1 % is penalised."""
        base = metrics.get("dice_mean", metrics["ncc"])
        return base - max(0.0, metrics["folding"] - 0.001) * 10

    # ------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, k: int, done: int, optimiser: torch.optim.Optimizer | None, reason: str) -> None:
        """Write the position ``(stage index k, iterations done in it)``; a finished stage k-1 is ``(k, 0)``."""
        if not self.main:
            return
        path = self.job_dir / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": CHECKPOINT_FORMAT, "engine_version": __version__, "name": self.config.name,
            "stage": k, "iteration": done,
            "weights": {n: t.detach().cpu() for n, t in self.stack.weights().items()},
            "optimiser": optimiser.state_dict() if optimiser is not None else {},
            "records": [{"seconds": r.seconds, "best_score": r.best_score, "best_iteration": r.best_iteration,
                         "best_metrics": r.best_metrics, "pairs": r.pairs,
                         "best_weights": {n: t.detach().cpu() for n, t in r.best_weights.items()} if r.best_weights else {}}
                        for r in self.records],
        }
        with atomic_write(path) as temp:
            torch.save(state, temp)
        if reason == "stage_done":  # report the stage just finished, at its last iteration
            self._emit("checkpoint", stage=k, iteration=self.config.recipe.stages[k - 1].iterations, path=str(path), reason=reason)
        else:
            self._emit("checkpoint", stage=k + 1, iteration=done, path=str(path), reason=reason)

    def load_checkpoint(self) -> None:
        path = self.job_dir / CHECKPOINT
        if not has_checkpoint(self.job_dir):
            raise InputError(f"the job {self.job_dir} has no checkpoint ({CHECKPOINT}) to resume from; start it again")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: any unpickling or format error
            raise InputError(f"the checkpoint {path} cannot be read ({exc}); start the job again") from exc
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("name") != self.config.name:
            raise InputError(f"{path} is not a checkpoint of the job {self.config.name}")
        weights = dict(state["weights"])
        saved_stages = len(state["records"])
        if saved_stages > len(self.records):
            raise InputError(f"the checkpoint {path} holds {saved_stages} stages and the job's config.toml {len(self.records)}: "
                             "stages can be appended to a job's recipe, not removed")
        if saved_stages < len(self.records):  # stages appended to config.toml since: they start from their seeded initial weights
            log.info("%d stage(s) appended to the job since its checkpoint; training them after the %d before",
                     len(self.records) - saved_stages, saved_stages)
            for name, tensor in self.stack.weights().items():
                if int(name.split(".", 1)[0].removeprefix("stage")) >= saved_stages:
                    weights.setdefault(name, tensor.detach().cpu())
        self.stack.load_weights({n: t.to(self.device) for n, t in weights.items()}, str(path))
        self.position = (int(state["stage"]), int(state["iteration"]))
        self.optimiser_state = state["optimiser"] or None
        for record, saved in zip(self.records, state["records"]):
            record.seconds = float(saved["seconds"])
            record.best_score = float(saved["best_score"])
            record.best_iteration = int(saved["best_iteration"])
            record.best_metrics = dict(saved["best_metrics"])
            record.best_weights = dict(saved["best_weights"]) or None
            record.pairs.update(saved.get("pairs", {}))  # a checkpoint of an older engine has no counts

    # ------------------------------------------------------------------------------- main loop
    def run(self) -> Path:
        """Train the remaining stages, write ``JOB_DIR/NAME.safetensors`` and return its path."""
        started = time.monotonic()
        self.load_data()
        if self.resume:
            self.load_checkpoint()
        c = self.config
        k0, done0 = self.position
        baseline = self.validate(-1) if self.main and self.validation else {}
        self._emit("start", name=c.name, job=str(self.job_dir), resumed=self.resume, stage=k0 + 1, iteration=done0,
                   stages=[{"kind": s.kind, "iterations": s.iterations, "spacing_mm": list(s.spacing_mm),
                            **({"control_point_spacing": s.control_point_spacing} if s.kind == "bspline" else {})}
                           for s in c.recipe.stages],
                   images=[im.name for im in self.train_images], validation_images=[im.name for im in self.held_out],
                   validation_pairs=len(self.validation), shapes_fraction=c.data.shapes_fraction,
                   device=str(self.device), world_size=self.world, baseline=baseline)
        self.baseline = baseline
        bar = self._bar(sum(s.iterations for s in c.recipe.stages), sum(s.iterations for s in c.recipe.stages[:k0]) + done0)
        try:
            for k in range(k0, len(c.recipe.stages)):
                self.train_stage(k, done0 if k == k0 else 0, bar)
        finally:
            if bar is not None:
                bar.close()
        path = stack_file(self.job_dir, c.name)
        if self.main:
            self.stack.manifest = self._final_manifest(time.monotonic() - started)
            save_stack(self.stack, path)
            self._emit("done", stack=str(path), seconds=round(sum(r.seconds for r in self.records), 1),
                       validation=self.stack.manifest.validation)
        if self.world > 1:
            dist.barrier()  # every rank leaves together: no rank tears the group down under another
        return path

    def _bar(self, total: int, initial: int) -> Any:
        if not self.show_bar:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="it", desc="training", dynamic_ncols=True)

    def train_stage(self, k: int, done: int, bar: Any) -> None:
        """Train stage ``k`` (0-based) from iteration ``done`` to the end of its recipe, then keep its best weights."""
        spec = self.config.recipe.stages[k]
        net, optimiser = self._stage_optimiser(k, done)
        record = self.records[k]
        self.drawn = record.pairs
        window = (time.monotonic(), done)  # (when, iterations done) at the last logged iteration
        stage_start = time.monotonic() - record.seconds
        if done == 0:  # the untrained stage is the identity (zero output layer): training must beat it to be kept
            self._validate(k, 0)
        for it in range(done + 1, spec.iterations + 1):
            loss, sim, bend = self._iteration(k, it, net, optimiser)
            record.seconds = time.monotonic() - stage_start
            if bar is not None:
                bar.update(1)
            if it % self.config.log_every == 0 or it in (1, spec.iterations):
                window = self._log_iteration(k, it, window, loss, sim, bend)
            self._after_iteration(k, it, optimiser)
        if self.world > 1:  # drop the DDP wrapper (and its reducer's hooks and threads) before the next stage
            del net
            gc.collect()
        self._finish_stage(k)

    def _stage_optimiser(self, k: int, done: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """(stage ``k``'s network, wrapped for DDP when distributed; its Adam, with the checkpoint's state when
        resuming after ``done`` > 0 iterations); only stage ``k`` requires gradients."""
        stage = self.stack.stages[k]
        for j, other in enumerate(self.stack.stages):
            other.requires_grad_(j == k)
        net: torch.nn.Module = stage.net
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(stage.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        optimiser = torch.optim.Adam(stage.net.parameters(), lr=self.config.recipe.stages[k].learning_rate)
        if self.optimiser_state is not None and done > 0:
            optimiser.load_state_dict(self.optimiser_state)
        self.optimiser_state = None
        return net, optimiser

    def _iteration(self, k: int, it: int, net: torch.nn.Module, optimiser: torch.optim.Optimizer) -> tuple[float, float, float]:
        """One optimiser step of stage ``k`` on ``batch_size`` drawn pairs (gradients averaged); returns the batch
        means of (loss, similarity, bending energy mm^-2)."""
        spec = self.config.recipe.stages[k]
        generator = iteration_generator(self.config.seed, self.rank, k, it)
        optimiser.zero_grad(set_to_none=True)
        losses, sims, bends = [], [], []
        for _ in range(spec.batch_size):
            terms = self.pair_loss(k, net, self.draw_pair(generator), generator)
            (terms.loss / spec.batch_size).backward()
            losses.append(terms.loss.item())
            sims.append(terms.similarity.item())
            bends.append(terms.bending.item())
        if not math.isfinite(losses[-1]):
            raise InputError(f"stage {k + 1} diverged at iteration {it} (loss {losses[-1]}); lower its learning_rate")
        optimiser.step()
        return sum(losses) / len(losses), sum(sims) / len(sims), sum(bends) / len(bends)

    def _log_iteration(self, k: int, it: int, window: tuple[float, int], loss: float, sim: float,
                       bend: float) -> tuple[float, int]:
        """The ``iteration`` event (and TensorBoard scalars) of stage ``k`` after iteration ``it``: the batch means,
        the speed since ``window`` (when, iterations done) and the time left; returns the new window."""
        c = self.config
        spec = c.recipe.stages[k]
        now = time.monotonic()
        rate = (it - window[1]) / max(now - window[0], 1e-9)
        eta = (spec.iterations - it) / rate
        remaining_after = sum(s.iterations for s in c.recipe.stages[k + 1:])
        self._emit("iteration", stage=k + 1, iteration=it, iterations=spec.iterations, loss=loss,
                   ncc=sim, bending=bend, it_per_s=round(rate, 3), eta_s=round(eta, 1),
                   total_eta_s=round(eta + remaining_after / rate, 1), lr=spec.learning_rate, pairs=dict(self.drawn))
        if self.writer is not None:
            step = sum(s.iterations for s in c.recipe.stages[:k]) + it
            self.writer.add_scalar(f"stage{k + 1}/loss", loss, step)
            self.writer.add_scalar(f"stage{k + 1}/ncc", sim, step)
            self.writer.add_scalar(f"stage{k + 1}/bending", bend, step)
        return now, it

    def _after_iteration(self, k: int, it: int, optimiser: torch.optim.Optimizer) -> None:
        """Validation, a stop on a signal (checkpoint, then :class:`CancelledError`) and interval checkpoints after
        iteration ``it`` of stage ``k``."""
        c = self.config
        last = it == c.recipe.stages[k].iterations
        if c.validate_every and (it % c.validate_every == 0) or last:
            self._validate(k, it)
        if self._should_stop():
            self.save_checkpoint(k, it, optimiser, "signal")
            self._emit("stopped", stage=k + 1, iteration=it, signal=self.stop_signal)
            raise CancelledError(f"stopped by {self.stop_signal} at stage {k + 1}, iteration {it}; "
                                 f"`dlir train --resume {self.job_dir}` continues")
        if it % c.checkpoint_every == 0 and not last:
            self.save_checkpoint(k, it, optimiser, "interval")

    def _finish_stage(self, k: int) -> None:
        """Stage ``k`` done: its best weights kept (the same on every rank), frozen, reported and checkpointed."""
        spec, stage, record = self.config.recipe.stages[k], self.stack.stages[k], self.records[k]
        if record.best_weights is not None:
            stage.load_state_dict({n: t.to(self.device) for n, t in record.best_weights.items()})
        self._broadcast_stage(k)
        stage.requires_grad_(False)
        self._emit("stage_done", stage=k + 1, kind=spec.kind, iterations=spec.iterations, seconds=round(record.seconds, 1),
                   best={"iteration": record.best_iteration, **record.best_metrics}, pairs=dict(record.pairs))
        self.save_checkpoint(k + 1, 0, None, "stage_done")

    def _validate(self, k: int, it: int) -> None:
        """Validate stages ``0..k`` after ``it`` iterations of stage ``k``; keep the stage's best weights."""
        if not self.main or not self.validation:
            if self.main and it == self.config.recipe.stages[k].iterations:
                record = self.records[k]
                record.best_iteration, record.best_weights = it, None
            return
        metrics = self.validate(k)
        record = self.records[k]
        score = self._score(metrics)
        best = score > record.best_score
        if best:
            record.best_score, record.best_iteration, record.best_metrics = score, it, metrics
            record.best_weights = {n: t.detach().cpu().clone() for n, t in self.stack.stages[k].state_dict().items()}
        self._emit("validation", stage=k + 1, iteration=it, best=best, **metrics)
        if self.writer is not None:
            step = sum(s.iterations for s in self.config.recipe.stages[:k]) + it
            if "dice_mean" in metrics:
                self.writer.add_scalar(f"stage{k + 1}/validation_dice", metrics["dice_mean"], step)
            self.writer.add_scalar(f"stage{k + 1}/validation_folding", metrics["folding"], step)
            self.writer.add_image(f"stage{k + 1}/fixed_moving_warped", self.snapshot(k), step, dataformats="HW")

    @torch.no_grad()
    def snapshot(self, k: int) -> torch.Tensor:
        """The central axial slices of the first validation pair side by side: fixed, moving, moving warped by stages 0..k."""
        pair = self.validation[0]
        fixed = PreparedImage(pair.fixed.tensor.to(self.device), pair.fixed.grid)
        moving = PreparedImage(pair.moving.tensor.to(self.device), pair.moving.grid)
        transforms = run_stages(self.stack, fixed, moving, initial_alignment(self.stack.manifest.recipe.initial_alignment, fixed, moving), upto=k + 1, skip_worse=True)
        warped = sample(moving.tensor, moving.grid, Composite(transforms)(grid_points(fixed.grid, 1, self.device)))
        middle = fixed.tensor.shape[2] // 2
        return torch.cat([fixed.tensor[0, 0, middle], moving.tensor[0, 0, middle], warped[0, 0, middle]], dim=1).cpu()

    def _broadcast_stage(self, k: int) -> None:
        """Every rank continues with rank 0's chosen (best) weights of stage ``k``."""
        if self.world > 1:
            for tensor in self.stack.stages[k].state_dict().values():
                dist.broadcast(tensor, src=0)

    def _should_stop(self) -> bool:
        flag = self.stop_signal is not None
        if self.world > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t)
            if t.item() > 0 and self.stop_signal is None:
                self.stop_signal = "a stop on another rank"
            return bool(t.item() > 0)
        return flag

    def _final_manifest(self, seconds: float) -> Manifest:
        c = self.config
        validation = {
            "pairs": len(self.validation),
            "kind": ("synthetic deformations of held-out labelled images" if c.data.validation_count
                     else "synthetic deformations of the labelled training images (fixed seeds, not used for training)")
            + (f"; {c.data.validation_inter_subject} pairs of two training images, scored by their folding"
               if c.data.validation_inter_subject else ""),
            "before": self.baseline,
            "stages": [{"stage": k + 1, "iteration": r.best_iteration, **r.best_metrics} for k, r in enumerate(self.records)],
        }
        if self.records and self.records[-1].best_metrics:
            validation.update({key: self.records[-1].best_metrics[key] for key in ("dice", "dice_mean", "folding", "ncc")
                               if key in self.records[-1].best_metrics})
        training = {
            "engine_version": __version__,
            "images": [f"{im.entry.image.parent.name}/{im.entry.image.name}" for im in self.train_images],  # no local paths
            "data": {**c.to_dict()["data"], "images": Path(c.data.images).name}, "synthetic": c.to_dict()["synthetic"], "seed": c.seed,
            "iterations": [s.iterations for s in c.recipe.stages],
            "seconds_per_stage": [round(r.seconds, 1) for r in self.records],
            "device": str(self.device), "world_size": self.world, "torch": torch.__version__,
        }
        if c.start_from:  # fine-tuned: which stack's weights it started from (the file's name and hash)
            training["start_from"] = {"file": Path(c.start_from).name, "sha256": _sha256(Path(c.start_from)),
                                      "stages": list(c.start_from_stages) or "all"}
        return replace(self.stack.manifest, training=training, validation=validation)


# ----------------------------------------------------------------------------------- entry point
def _install_signal_handlers(trainer: Trainer) -> None:
    def handler(signum: int, _frame: Any) -> None:
        trainer.stop_signal = signal.Signals(signum).name

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def train(config: TrainConfig, job_dir: str | Path, resume: bool = False, progress: str = "auto", tensorboard: bool = False) -> Path:
    """Run (or resume) the training job in ``job_dir``; returns the stack file.

    ``progress``: ``auto`` (a bar on a terminal), ``bar``, ``jsonl`` (events also on stdout) or
    ``none``.  Raises :class:`DLIRError` subclasses with one sentence; every failure is also an
    ``error`` event.  A stop by SIGINT/SIGTERM writes a checkpoint and raises
    :class:`CancelledError`.
    """
    from .events import stdout_echo

    job = Path(job_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo")
    events = None
    handler: logging.Handler | None = None
    try:
        config.check()
        if rank == 0:
            job.mkdir(parents=True, exist_ok=True)
            if not resume:
                if has_checkpoint(job) or stack_file(job, config.name).exists():
                    raise InputError(f"the job folder {job} already holds a job; resume it with --resume or choose another --out")
                (job / CONFIG_FILE).write_text(config.to_toml(), encoding="utf-8")
            handler = logging.FileHandler(job / LOG_FILE, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger("dlir").addHandler(handler)
            logging.getLogger("dlir").setLevel(logging.INFO)
        events = EventLog(job / EVENTS_FILE if rank == 0 else None, stdout_echo(progress) if rank == 0 else None)
        show_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        trainer = Trainer(config, job, resume, events, tensorboard, show_bar)
        _install_signal_handlers(trainer)
        log.info("training %s in %s (resume: %s) on %s", config.name, job, resume, trainer.device)
        path = trainer.run()
        log.info("finished: %s", path)
        return path
    except CancelledError:
        raise
    except DLIRError as exc:
        if events is not None:
            events.emit("error", message=str(exc), kind=type(exc).__name__)
        log.error("%s", exc)
        raise
    except Exception as exc:
        message = f"training failed unexpectedly: {type(exc).__name__}: {exc}"
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            message = "the GPU ran out of memory: lower batch_size or patch_size, or train on the CPU (--device cpu)"
        if events is not None:
            events.emit("error", message=message, kind=type(exc).__name__)
        log.exception("training failed")
        raise
    finally:
        if events is not None:
            events.close()
        if handler is not None:
            logging.getLogger("dlir").removeHandler(handler)
            handler.close()
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
