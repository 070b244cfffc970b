"""The second conventional baseline: ANTs SyN (``antspyx``), run the way an ANTs user runs it.

``ants.registration(fixed, moving, "SyN")`` with ANTsPy's defaults, which call ``antsRegistration`` with:

* initial transform: the centres of mass aligned (``-r [fixed,moving,1]``);
* ``Affine[0.25]``: Mattes mutual information (32 bins, regular sampling of 20 % of the voxels),
  2100 x 1200 x 1200 x 0 iterations at shrink factors 4 x 2 x 2 x 1 with Gaussian smoothing
  sigmas 3 x 2 x 1 x 0 voxels (ANTs' convergence test: 1e-6 over 10 iterations);
* ``SyN[0.2,3,0]`` (gradient step 0.2, update field smoothed with sigma 3 voxels, total field not
  smoothed): Mattes mutual information (32 bins, every voxel), ``iterations`` per level (default
  40 x 20 x 0) at shrink factors 4 x 2 x 1 with sigmas 2 x 1 x 0 voxels (so with ANTsPy's default
  the full resolution gets no SyN iteration), convergence 1e-7 over 8 iterations;
* single precision, the stages collapsed into one affine and one displacement field (``-z 1``),
  no histogram matching, no masks.

The warped image is ``antsRegistration``'s own (linear interpolation); the labels are warped by
``antsApplyTransforms`` with nearest-neighbour interpolation, like elastix's.

The result is expressed like elastix's (:mod:`dlir.evaluation.elastix`): a displacement field
``u`` on the FULL-resolution fixed grid, 3-vector float32 in LPS mm, with ``T(x) = x + u(x)``
mapping fixed points to moving points, sampled from ANTs' forward composite transform
(``fwdtransforms``: what warps the moving image onto the fixed grid, so a map of fixed points to
moving points).  That composite holds the affine and the SyN displacement field (ITK order: the
field, on the fixed grid, applies first, then the affine); :attr:`AntsResult.transform` is it as
SimpleITK reads it, and resampling the moving image through it reproduces ANTs' warped image.

``antspyx`` is optional (``pip install "dlir[bench]"``); :func:`require_ants` raises an
:class:`AntsMissingError` that says how to install it.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import SimpleITK as sitk

from ..errors import DLIRError

ANTS_REQUIREMENT = "antspyx==0.6.3"
INSTALL_HINT = (
    f"the ANTs SyN baseline needs the optional package {ANTS_REQUIREMENT}: install it with "
    f"`pip install {ANTS_REQUIREMENT}` (or `pip install -e \".[bench]\"` in the DLIR source folder)"
)
#: the environment variable ANTs' ITK reads its number of threads from (once, at its first multi-threaded filter)
THREADS_VARIABLE = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"


class AntsMissingError(DLIRError):
    """``antspyx`` is not installed (the message says how to install it)."""


def require_ants() -> ModuleType:
    """Import ``ants`` (about a second).  Raises :class:`AntsMissingError` when ``antspyx`` is not installed."""
    try:
        import ants
    except ImportError as exc:
        raise AntsMissingError(INSTALL_HINT) from exc
    return ants


def ants_available() -> bool:
    """True when ``ants`` (the ``antspyx`` package) can be imported (without importing it)."""
    from importlib.util import find_spec

    return find_spec("ants") is not None


@dataclass(frozen=True)
class AntsSettings:
    """Settings of the ANTs SyN baseline (defaults: ANTsPy's ``"SyN"``, see the module docstring).

    ``iterations``: SyN iterations per level, coarse to fine; level ``k`` of ``n`` is shrunk by
    ``2**(n-1-k)`` and smoothed with sigma ``n-1-k`` voxels.  ``threads``: CPU threads ANTs may use
    (set through ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, which ITK reads once per process).
    """

    iterations: tuple[int, ...] = (40, 20, 0)
    threads: int = 2

    @classmethod
    def quick(cls, threads: int = 2) -> "AntsSettings":
        """A few SyN iterations (the affine stage is ANTsPy's, fixed): for smoke tests, not for numbers."""
        return cls(iterations=(4, 2, 0), threads=threads)

    def describe(self) -> str:
        """One line for reports."""
        levels = len(self.iterations)
        shrink = "x".join(str(2 ** (levels - 1 - k)) for k in range(levels))
        return (f"ANTsPy registration type SyN: centre-of-mass initialisation, Affine (Mattes MI, 2100x1200x1200x0 "
                f"iterations) then SyN[0.2,3,0] (Mattes MI, {'x'.join(map(str, self.iterations))} iterations at shrink "
                f"factors {shrink}), labels by nearest neighbour, {self.threads} threads")


@dataclass
class AntsResult:
    """ANTs' registration expressed on the full-resolution fixed grid (LPS mm, fixed -> moving)."""

    displacement: sitk.Image  # 3-vector float32, T(x) = x + u(x)
    warped: sitk.Image  # antsRegistration's warped moving image (linear interpolation), float32
    warped_labels: sitk.Image | None  # nearest neighbour, pixel type of the moving labels
    transform: sitk.Transform  # ANTs' forward composite: the SyN field (applied first), then the affine
    timings: dict[str, float] = field(default_factory=dict)


def _on_fixed(image: sitk.Image, fixed: sitk.Image, what: str) -> sitk.Image:
    """``image`` (an ANTs output on the fixed grid) with exactly the fixed image's geometry."""
    if image.GetSize() != fixed.GetSize():
        raise DLIRError(f"ANTs returned {what} of size {image.GetSize()} for a fixed image of size {fixed.GetSize()}")
    image.CopyInformation(fixed)
    return image


def register_ants(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    moving_labels: sitk.Image | None = None,
    settings: AntsSettings = AntsSettings(),
) -> AntsResult:
    """Register ``moving`` onto ``fixed`` with ANTs SyN; inputs are never modified.

    Sets ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` in this process's environment to
    ``settings.threads``; ITK reads it once, so the first ANTs call of a process fixes its threads.
    Timings (s): ``convert`` (SimpleITK -> ANTs), ``register`` (antsRegistration: affine + SyN,
    warped image), ``labels`` (antsApplyTransforms, nearest neighbour; 0 without labels),
    ``collect`` (reading the composite transform, sampling the displacement on the fixed grid).
    """
    os.environ[THREADS_VARIABLE] = str(settings.threads)
    ants = require_ants()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    fixed_ants = ants.from_sitk(sitk.Cast(fixed, sitk.sitkFloat32))
    moving_ants = ants.from_sitk(sitk.Cast(moving, sitk.sitkFloat32))
    timings["convert"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory(prefix="dlir-ants-") as scratch:
        t = time.perf_counter()
        reg = ants.registration(fixed_ants, moving_ants, "SyN", reg_iterations=tuple(settings.iterations),
                                outprefix=str(Path(scratch) / "ants_"), write_composite_transform=True)
        timings["register"] = time.perf_counter() - t

        t = time.perf_counter()
        warped_labels = None
        if moving_labels is not None:
            source = ants.from_sitk(sitk.Cast(moving_labels, sitk.sitkFloat32))
            labels = ants.apply_transforms(fixed_ants, source, reg["fwdtransforms"], interpolator="nearestNeighbor")
            rounded = sitk.GetImageFromArray(np.rint(sitk.GetArrayFromImage(ants.to_sitk(labels))).astype(np.float32))
            warped_labels = sitk.Cast(_on_fixed(rounded, fixed, "labels"), moving_labels.GetPixelID())
        timings["labels"] = time.perf_counter() - t

        t = time.perf_counter()
        transform = sitk.ReadTransform(reg["fwdtransforms"])  # Composite.h5: with write_composite_transform a path
    warped = _on_fixed(sitk.Cast(ants.to_sitk(reg["warpedmovout"]), sitk.sitkFloat32), fixed, "a warped image")
    displacement = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat32, fixed.GetSize(), fixed.GetOrigin(),
                                                     fixed.GetSpacing(), fixed.GetDirection())
    timings["collect"] = time.perf_counter() - t
    return AntsResult(displacement, warped, warped_labels, transform, timings)
