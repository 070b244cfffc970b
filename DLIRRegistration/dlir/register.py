"""``register(fixed, moving, stack)``: the one entry point for inference.

Flow: check inputs -> normalise intensities -> initial alignment (the capture search by default) -> stage
1..n on their network grids -> optional test-time refinement -> the composed transform
``T = T0 o T1 o ... o Tn`` evaluated once per voxel of the FULL-resolution fixed grid, slab by slab
(:func:`dlir.fullres.full_resolution`) -> warped moving image (linear, in the moving image's pixel type),
warped labels (nearest neighbour, or linear on one-hot then argmax), det-Jacobian map, folding
fraction and std of the Jacobian.  All in LPS mm; T maps fixed points to moving points.

Memory grows with the outputs only: the images are read in their own types (network inputs come
from one anti-aliased, block-averaged copy per stage spacing, see :class:`~dlir.pipeline.PreparedImage`),
each slab converts only what it needs to float32, and only the outputs asked for (``outputs``)
are kept at full resolution; the displacement field and the Jacobian map are computed on demand
from the kept transform when they were not asked for.

Coordinates: the whole computation runs in LPS mm relative to the fixed image's centre (both
grids are translated by minus that centre, in double precision), so images far from the origin
(scanner coordinates of 1e9 mm) register exactly like the same images near it; a translation of
space changes no displacement.  The outputs are put back on the original fixed grid.

Guarantees beyond the input checks of :mod:`dlir.io`: a NaN or infinite value in any stage's
output, the refinement or the composed transform stops the run with one sentence naming it;
label values come back exactly (any integer type, negative or above 2^24: labels are gathered as
integers, never interpolated as floats); a warning (and ``no_overlap`` in :meth:`Registration.summary`)
when fixed and moving hardly overlap after the initial alignment, and one when the registered transform maps
much of the fixed image out of the moving one (:func:`dlir.quality.overlap_warnings`).  Refused before any
work: an empty fixed mask, and an image narrower than one network voxel of a stage (the stage cannot see it).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator

import numpy as np
import SimpleITK as sitk
import torch

from .choices import DEFAULT_OUTPUTS, ENGINE_OUTPUTS, LABEL_INTERPOLATIONS, SIMILARITY_CHOICES, LabelInterpolation, SimilarityChoice
from .device import resolve_device
from .errors import CancelledError, DeviceError, InputError
from .export import itk_transform
from .fullres import FullResolution, full_resolution
from .geometry import Grid
from .io import check_image, check_label_map
from . import alignment, runtime
from .contrast import ContrastChoice, initial_alignment_and_contrast
from .memory import check_memory
from .modality import NAMES
from .pipeline import PreparedImage, check_stage_output, run_stages, stage_grid
from .quality import foreground_similarities, overlap_warnings, result_warnings
from .refine import Refinement, RefineResult, check_refinement, refine
from .stack import Stack
from .transforms import Composite, SpatialTransform

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
Cancel = Callable[[], bool]

#: below this share of fixed voxels inside the moving image after the initial alignment, the
#: images count as not overlapping (a warning, and ``no_overlap`` in the summary)
NO_OVERLAP_BELOW = 0.01
#: at most about this many fixed voxels (a regular subset) are used to measure the overlap
_OVERLAP_POINTS = 32**3
#: the merged field of a stack's B-spline stages (what full resolution evaluates and ``transform.h5`` holds) is
#: on a grid no finer than this (mm): a 2 mm last stage (control points 8 mm apart) is smooth at 4 mm, and a
#: 2 mm field of a head or chest with its margin made a 50-118 MB transform; measured deviation from the
#: stages' own composition in ``Testing/engine/test_export.py``
MERGED_SPACING_MM = 4.0


@dataclass
class Registration:
    """The result of one registration, everything on the full-resolution fixed grid (LPS mm).

    ``warped``, ``warped_labels`` and the Jacobian image are made when asked for (``outputs`` of
    :func:`register`); ``displacement`` and ``jacobian`` are also computed on demand from the
    composed ``transform`` (by slabs; cached once computed) when the run did not make them.
    """

    warped: sitk.Image | None  # moving resampled on the fixed grid (linear): the moving image's pixel type (integers rounded) or float32
    warped_labels: sitk.Image | None
    folding_fraction: float  # share of voxels (in the mask when given) with det <= 0
    jacobian_std: float
    device: str
    stack_name: str
    timings: dict[str, float] = field(default_factory=dict)
    overlap_fraction: float = 1.0  # share of fixed voxels inside the moving image after the initial alignment
    registered_overlap_fraction: float = 1.0  # the same under the registered transform
    initial_similarity: float = float("nan")  # the similarity (contrast.kind) in the fixed foreground after the initial alignment (dlir.quality)
    similarity: float = float("nan")  # the same after registration
    warnings: list[str] = field(default_factory=list)  # sentences also logged as warnings
    transform: SpatialTransform | None = None  # T, fixed -> moving, in the coordinates of ``grid``
    grid: Grid | None = None  # the fixed grid as the computation saw it (translated by minus its centre)
    output_grid: Grid | None = None  # the fixed image's own grid
    refinement: dict[str, list[float] | bool] | None = None  # per refinement level: spacing (mm), steps, final loss, seconds
    networks_skipped: str | None = None  # why the stack's networks did not run (dlir.register.networks_skipped)
    contrast: ContrastChoice | None = None  # same or different contrasts, and why (dlir.contrast)
    _displacement: sitk.Image | None = field(default=None, repr=False)
    _jacobian: sitk.Image | None = field(default=None, repr=False)

    @property
    def displacement(self) -> sitk.Image:
        """u(x) with T(x) = x + u(x) (fixed -> moving), 3-vector float32 on the fixed grid."""
        if self._displacement is None:
            self._displacement = self._evaluate(displacement=True).displacement
        return self._displacement

    @property
    def jacobian(self) -> sitk.Image:
        """det(I + du/dx) per fixed voxel, float32."""
        if self._jacobian is None:
            self._jacobian = self._evaluate(jacobian=True).jacobian
        return self._jacobian

    def _evaluate(self, **wanted: bool) -> "FullResolution":
        if self.transform is None or self.grid is None or self.output_grid is None:
            raise ValueError("this registration holds no transform to evaluate")
        device = torch.device(self.device)
        with torch.no_grad():
            return full_resolution(self.transform, self.grid, self.output_grid, device, **wanted)

    def itk_transform(self) -> sitk.CompositeTransform:
        """A new, compact ITK transform equal to ``T`` (fixed -> moving, resampling direction; see :mod:`dlir.export`).

        Its size follows the stages' network grids, not the fixed image.
        """
        if self.transform is None or self.grid is None or self.output_grid is None:
            raise ValueError("this registration holds no transform to export")
        shift = np.asarray(self.grid.origin, dtype=np.float64) - np.asarray(self.output_grid.origin, dtype=np.float64)
        return itk_transform([self.transform], shift)

    def summary(self) -> dict[str, object]:
        """JSON-ready numbers of the run."""
        return {
            "stack": self.stack_name,
            "device": self.device,
            "folding_fraction": self.folding_fraction,
            "jacobian_std": self.jacobian_std,
            "overlap_fraction": round(self.overlap_fraction, 4),
            "no_overlap": self.overlap_fraction < NO_OVERLAP_BELOW,
            "registered_overlap_fraction": round(self.registered_overlap_fraction, 4),
            "similarity": {"initial": round(self.initial_similarity, 4), "registered": round(self.similarity, 4)},
            "warnings": list(self.warnings),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            **({"refinement": self.refinement} if self.refinement is not None else {}),
            **({"contrast": self.contrast.summary()} if self.contrast is not None else {}),
            **({"networks_skipped": self.networks_skipped} if self.networks_skipped is not None else {}),
        }


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    stack: Stack,
    *,
    moving_labels: sitk.Image | None = None,
    fixed_mask: sitk.Image | None = None,
    device: str = "auto",
    refine: Refinement = 0,
    initial_alignment: str | None = None,
    label_interpolation: LabelInterpolation = "nearest",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    outputs: Collection[str] | None = None,
    float_warped: bool = False,
    similarity: SimilarityChoice = "auto",
) -> Registration:
    """Register ``moving`` onto ``fixed`` with ``stack``; inputs are never modified.

    ``outputs``: which full-resolution results to make, a subset of :data:`ENGINE_OUTPUTS`
    (default: warped, labels and jacobian).  ``displacement`` keeps the full-resolution field from
    the same pass (else :attr:`Registration.displacement` computes it when first read, as
    :attr:`Registration.jacobian` does when ``jacobian`` is not asked for).  Folding fraction and
    std of the Jacobian are always computed (slab by slab, nothing kept): they are the run's
    quality numbers.  ``float_warped``: the warped image as float32 instead of the moving image's
    pixel type (integer types are rounded to the nearest value and clipped to the type's range).

    ``initial_alignment``: one of :data:`dlir.choices.ALIGNMENT_MODES` (default ``search``: :mod:`dlir.alignment`).
    ``similarity``: how the images are compared in the search and accurate mode, one of
    :data:`dlir.choices.SIMILARITY_CHOICES`: ``same`` (NCC), ``different`` (MIND-SSC) or ``auto`` (decided from the
    headers or the images, :mod:`dlir.contrast`; the choice is in :attr:`Registration.contrast`).
    ``refine``: ``"auto"`` is accurate mode (instance optimisation of the whole transform, coarse to
    fine, to convergence, never folding: :mod:`dlir.refine`); a number N > 0 runs N optimiser
    steps at the finest level only (for experiments); 0 is the networks' one-shot result.  ``progress(step, fraction)`` is called between steps (and between chunks
    of the full-resolution warp); ``cancel()`` is polled there too and raises
    :class:`~dlir.errors.CancelledError` when it returns True.
    On ``device="auto"`` a GPU out-of-memory error falls back to the CPU.
    """
    fixed_f = check_image(fixed, "fixed image", as_float32=False)  # read in their own types, never copied whole
    moving_f = check_image(moving, "moving image", as_float32=False)
    if moving_labels is not None:
        check_label_map(moving_labels, moving, "moving label map", "moving image", allow_negative=True)
    if fixed_mask is not None:
        check_label_map(fixed_mask, fixed, "fixed mask", "fixed image")
        if not sitk.GetArrayViewFromImage(fixed_mask).any():
            raise InputError("the fixed mask is empty (every voxel is 0); give a mask that marks the region to register, "
                             "or leave it out")
    for image, what in ((fixed, "fixed image"), (moving, "moving image")):
        check_visible(stack, Grid.from_image(image), what)
    check_refinement(refine)
    if similarity not in SIMILARITY_CHOICES:
        raise InputError(f"unknown similarity {similarity!r}: use {', '.join(SIMILARITY_CHOICES)}")
    if label_interpolation not in LABEL_INTERPOLATIONS:
        raise InputError(f"unknown label interpolation {label_interpolation!r}: use {' or '.join(LABEL_INTERPOLATIONS)}")
    wanted = frozenset(DEFAULT_OUTPUTS if outputs is None else outputs)
    if not wanted <= set(ENGINE_OUTPUTS):
        raise InputError(f"unknown outputs {', '.join(sorted(wanted - set(ENGINE_OUTPUTS)))}: choose from {', '.join(ENGINE_OUTPUTS)}")
    request = _Request(fixed_f, moving_f, stack, moving_labels, fixed_mask, refine, initial_alignment,
                       label_interpolation, progress, cancel, wanted, float_warped, similarity)
    try:
        return _register(request, resolve_device(device))
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        if device != "auto" and isinstance(exc, DeviceError):  # our own estimate: its sentence says what to do
            raise
        if device != "auto":
            raise DeviceError("the GPU ran out of memory for this pair; choose the CPU (device 'cpu') or free GPU memory") from exc
        log.warning("GPU out of memory; registering on the CPU instead")
        return _register(request, torch.device("cpu"))


@dataclass(frozen=True)
class _Request:
    """One call of :func:`register`, its inputs checked (the images as read, in their own types)."""

    fixed: sitk.Image
    moving: sitk.Image
    stack: Stack
    moving_labels: sitk.Image | None
    fixed_mask: sitk.Image | None
    refinement: Refinement
    initial_mode: str | None
    label_interpolation: LabelInterpolation
    progress: Progress | None
    cancel: Cancel | None
    wanted: frozenset[str]
    float_warped: bool
    similarity: SimilarityChoice


class _Steps:
    """Progress reports, cancellation checks and timings of the named steps of one run."""

    def __init__(self, total: int, progress: Progress | None, cancel: Cancel | None, device: torch.device) -> None:
        self.total, self.done = total, 0
        self.progress, self.cancel, self.device = progress, cancel, device
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.cancel is not None and self.cancel():
            raise CancelledError("the registration was cancelled")
        if self.progress is not None:
            self.progress(name, self.done / self.total)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = time.perf_counter() - start
        self.done += 1
        if self.progress is not None:
            self.progress(name, self.done / self.total)

    def within(self, name: str, fraction: float) -> None:
        """Progress inside the running step ``name`` (``fraction`` of it done); polls cancel."""
        if self.cancel is not None and self.cancel():
            raise CancelledError("the registration was cancelled")
        if self.progress is not None:
            self.progress(name, (self.done + fraction) / self.total)

    def record(self, name: str, seconds: float) -> None:
        """A step done as part of another one (timed there): its time and progress."""
        self.timings[name] = seconds
        self.done += 1
        if self.progress is not None:
            self.progress(name, self.done / self.total)


def _register(request: _Request, device: torch.device) -> Registration:
    steps = _Steps(len(request.stack.stages) + 3 + (request.refinement != 0), request.progress, request.cancel, device)
    stack = request.stack.to(device).eval()
    # the computation runs relative to the fixed image's centre (see the module docstring)
    output_grid = Grid.from_image(request.fixed)
    offset = -output_grid.centre()
    fixed_grid, moving_grid = output_grid.translated(offset), Grid.from_image(request.moving).translated(offset)
    for stage in stack.stages:  # refuses network grids an absurd header would blow up, before anything is allocated
        stage_grid(stage.spec, fixed_grid)
    check_memory(stack, fixed_grid, moving_grid, device, refine=request.refinement != 0,
                 moving_labels=request.moving_labels is not None, displacement="displacement" in request.wanted)

    moving_voxels = sitk.GetArrayViewFromImage(request.moving)  # views in the images' own types: no full-resolution copy
    intensity = stack.manifest.recipe.intensity
    with steps.step("preprocess"):
        fixed_p = PreparedImage.from_array(sitk.GetArrayViewFromImage(request.fixed), fixed_grid, intensity, device)
        moving_p = PreparedImage.from_array(moving_voxels, moving_grid, intensity, device)
        initial, contrast = initial_alignment_and_contrast(request.similarity, request.initial_mode or alignment.DEFAULT_ALIGNMENT,
                                                          request.fixed, request.moving, fixed_p, moving_p)
        overlap = overlap_fraction(initial, fixed_grid, moving_grid, device)
    warnings = _overlap_warnings(overlap)
    skipped = networks_skipped(stack, contrast)
    if skipped is not None:
        if request.refinement == 0:
            warnings.append(f"{skipped}: the result is the initial alignment (affine) alone; use accurate mode "
                            "(--refine auto; 'Accurate' in Slicer) for a deformable registration")
            log.warning(warnings[-1])
        else:
            log.info("accurate mode starts from the initial alignment: %s", skipped)
        steps.done += len(stack.stages)
        transforms: list[SpatialTransform] = [initial]
    else:
        with torch.no_grad():
            transforms = run_stages(stack, fixed_p, moving_p, initial, step=steps.step, check_finite=True, skip_worse=True,
                                    networks=runtime.inference_networks(stack, device))
    mask = _mask_voxels(request.fixed_mask)
    refined = None
    if request.refinement != 0:
        refined = _refine(transforms, fixed_p, moving_p, request.refinement, mask, steps, stack.name, contrast.kind)
        transforms = refined.transforms
    # the stages' fields as one at the finest stage spacing (not finer than MERGED_SPACING_MM), parallel to the
    # fixed grid: evaluated separably per voxel, and the transform that is exported (and judged)
    transform = Composite(transforms).merged_fields(along=fixed_grid, min_spacing=MERGED_SPACING_MM)
    similarity = foreground_similarities(fixed_p, moving_p, [initial, transform], contrast.kind)
    del fixed_p, moving_p  # their anti-aliased copies
    wanted = request.wanted
    with torch.no_grad():
        with steps.step("warp"):
            result = full_resolution(
                transform, fixed_grid, output_grid, device,
                moving=moving_voxels if "warped" in wanted else None, moving_grid=moving_grid,
                moving_labels=request.moving_labels if "labels" in wanted else None,
                label_interpolation=request.label_interpolation, jacobian="jacobian" in wanted, statistics=True,
                displacement="displacement" in wanted, mask=mask, float_warped=request.float_warped,
                report=lambda fraction: steps.within("warp", fraction), stack_name=stack.name,
            )
        steps.timings["warp"] -= result.jacobian_s
        steps.record("jacobian", result.jacobian_s)
    registered_overlap = overlap_fraction(transform, fixed_grid, moving_grid, device)
    for warning in [*result_warnings(request.refinement != 0, result.folding_fraction, *similarity, NAMES[contrast.kind]),
                    *overlap_warnings(overlap, registered_overlap, NO_OVERLAP_BELOW)]:
        log.warning(warning)
        warnings.append(warning)

    return Registration(
        warped=result.warped,
        warped_labels=result.labels,
        folding_fraction=result.folding_fraction,
        jacobian_std=result.jacobian_std,
        device=str(device),
        stack_name=stack.name,
        timings=steps.timings,
        overlap_fraction=overlap,
        registered_overlap_fraction=registered_overlap,
        initial_similarity=similarity[0],
        similarity=similarity[1],
        warnings=warnings,
        transform=transform,
        grid=fixed_grid,
        output_grid=output_grid,
        refinement=None if refined is None else refined.summary(),
        networks_skipped=skipped,
        contrast=contrast,
        _displacement=result.displacement,
        _jacobian=result.jacobian,
    )


def networks_skipped(stack: Stack, contrast: ContrastChoice) -> str | None:
    """Why ``stack``'s networks do not run on this pair, None when they run.

    A stack made for one modality (its manifest names one, as ``brain-mri`` and ``chest-ct``) was trained on images
    of one contrast; on a pair of different contrasts its networks make the capture's alignment worse (contrast
    development pairs, one shot: 0.737 / 0.593 / 0.537 Dice against the capture's 0.825 / 0.807 / 0.922), so the
    registration starts from the initial alignment (the capture, searched with MIND-SSC) instead: fast mode's
    result is that affine alignment, with a warning that says so; accurate mode refines it (as accurate as from the
    networks, and their time faster; Testing/benchmarks/RESULTS.md).  A stack made for any modality (none named,
    as ``universal``, trained on random contrasts) runs.
    """
    if contrast.contrast == "same" or not stack.manifest.modality:
        return None
    return (f"the networks of the stack '{stack.name}' were trained on {stack.manifest.modality} images of one contrast, "
            "and these images have different contrasts")


def _overlap_warnings(overlap: float) -> list[str]:
    """The warning (logged, and kept in the result) when fixed and moving hardly overlap after the initial alignment."""
    if overlap >= NO_OVERLAP_BELOW:
        return []
    warning = (f"the fixed and moving images do not overlap after the initial alignment ({100 * overlap:.2f} % of the "
               "fixed image falls inside the moving image), so the result is meaningless; check the images' origins "
               "or align their centres (initial alignment 'centre')")
    log.warning(warning)
    return [warning]


def _mask_voxels(fixed_mask: sitk.Image | None) -> np.ndarray | None:
    """The fixed mask's voxels ``[D, H, W]`` (a view), None without a mask (an empty one is refused by :func:`register`)."""
    return None if fixed_mask is None else sitk.GetArrayViewFromImage(fixed_mask)


#: the LPS axes, as a sentence names them
_AXIS_NAMES = ("left to right (x)", "front to back (y)", "foot to head (z)")


def check_visible(stack: Stack, grid: Grid, what: str) -> None:
    """Refuse an image narrower than one network voxel of a stage of ``stack`` along an LPS axis: the stage would
    see it as less than one voxel, and its transform would move points by millimetres out of it.

    Width along LPS axis a (mm): the extent of the image's voxels, edge to edge, ``sum_b |D[a, b]| size_b spacing_b``;
    compared with the stage's network spacing along that axis (mm).  ``what`` names the image in the sentence.
    """
    direction = np.abs(np.asarray(grid.direction, dtype=np.float64).reshape(3, 3))
    widths = direction @ (np.asarray(grid.size, dtype=np.float64) * np.abs(np.asarray(grid.spacing, dtype=np.float64)))
    for k, stage in enumerate(stack.stages, start=1):
        voxel = np.asarray(stage.spec.spacing_mm, dtype=np.float64)
        narrow = np.flatnonzero(widths < voxel)
        if narrow.size:
            axis = int(narrow[0])
            raise InputError(
                f"the {what} is only {widths[axis]:.3g} mm wide from {_AXIS_NAMES[axis]}, less than one {voxel[axis]:g} mm "
                f"voxel of stage {k}/{len(stack.stages)} ({stage.spec.kind}) of the stack '{stack.name}', which cannot "
                "see it; check the voxel size in the image's header (mm), or use a stack whose stages work on "
                f"voxels smaller than {widths[axis]:.3g} mm"
            )


def _refine(transforms: list[SpatialTransform], fixed: PreparedImage, moving: PreparedImage, refinement: Refinement,
            mask: np.ndarray | None, steps: _Steps, stack_name: str, similarity: str) -> RefineResult:
    """The refinement step (:func:`dlir.refine.refine`), reporting each optimiser step; its transform checked finite."""
    name = "refine (accurate)" if refinement == "auto" else f"refine ({refinement} steps)"

    def report(level: int, levels: int, step: int, limit: int, loss: float) -> None:
        steps.within(f"{name}: level {level}/{levels}, step {step}, loss {loss:.4f}", (level - 1 + step / limit) / levels)

    with steps.step(name):
        refined = refine(transforms, fixed, moving, refinement, mask, report, similarity=similarity)
        check_stage_output("the refinement of the stack's transform", stack_name, None, Composite(refined.transforms))
    return refined


def overlap_fraction(initial: SpatialTransform, fixed_grid: Grid, moving_grid: Grid, device: torch.device | str = "cpu") -> float:
    """Share of fixed voxels (a regular subset of about 32^3) whose point ``initial(x)`` lies inside the moving image.

    Inside = continuous moving index in ``[-0.5, size - 0.5]`` along every axis (as :func:`dlir.geometry.sample`);
    computed in double precision.
    """
    axes = [torch.arange(0, n, max(1, math.ceil(n / round(_OVERLAP_POINTS ** (1 / 3)))), dtype=torch.float64)
            for n in fixed_grid.size]
    k, j, i = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    index = torch.stack([i, j, k], dim=-1).reshape(-1, 3)
    points = fixed_grid.physical_from_index(index)[None]
    mapped = initial(points.to(device)).cpu()[0]
    return float(moving_grid.contains(mapped).double().mean())


