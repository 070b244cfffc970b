"""The automatic choice between "same contrast" and "different contrasts" (``--similarity auto``).

1. The header: DICOM images carry their modality (tag 0008|0060, "CT", "MR", "PT", ...).  Two different modalities
   are different contrasts; two CTs are the same (Hounsfield units are calibrated).  Two MRs can be any two
   sequences, so they, and images without the tag (NIfTI, NRRD), go to the image test.
2. The image test, after the initial alignment: on an axis-aligned :data:`TEST_SPACING_MM` grid over the fixed
   image's foreground eroded by :data:`ERODE` voxels (inside the anatomy: the edge between body and air is bright
   against dark in every contrast) where the moving image is, how much of the fixed intensities' variance a *linear* function of
   the moving intensities explains (the squared correlation, ``NCC^2``, and its sign) against how much *any* function
   of them explains (the correlation ratio ``eta^2``: moving intensities in :data:`BINS` bins, the fixed image's
   variance within the bins against its total variance).  One contrast: the two agree (``NCC > 0`` and ``NCC^2``
   close to ``eta^2``); two contrasts with a non-monotonic relation (T1 against T2, CT against MR): ``NCC`` is low or
   negative while ``eta^2`` stays high.  Different when ``eta^2 >= MIN_RELATED`` and (``NCC <= 0`` or
   ``NCC^2 < LINEAR_SHARE * eta^2``); otherwise the same (NCC, the default: also when the test finds no relation
   at all, as between a blurred template and one patient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import SimpleITK as sitk
import torch

from .alignment import initial_alignment
from .capture import foreground
from .choices import SIMILARITY_CHOICES
from .errors import InputError
from .losses import ncc
from .modality import KIND_FOR, NAMES
from .preprocess import network_grid
from .transforms import AffineTransform, SpatialTransform, map_grid

if TYPE_CHECKING:
    from .pipeline import PreparedImage

Contrast = Literal["same", "different"]
#: the DICOM tag of the modality
MODALITY_TAG = "0008|0060"
#: the grid (mm) of the image test
TEST_SPACING_MM = 4.0
#: bins of the moving intensities (normalised to [0, 1]) in the correlation ratio
BINS = 32
#: the foreground is eroded by this many voxels of the test grid
ERODE = 2
#: below this correlation ratio the test sees no relation to judge (the same contrast is assumed)
MIN_RELATED = 0.2
#: one contrast when the linear fit explains at least this share of what any function of the moving intensities
#: explains (NCC^2 / eta^2); measured on the development pairs (Testing/benchmarks/RESULTS.md): same-contrast pairs
#: with eta^2 >= 0.2 0.94-1.00, different-contrast pairs 0.51-0.77 or NCC < 0
LINEAR_SHARE = 0.85


@dataclass(frozen=True)
class ContrastChoice:
    """The choice and why (a sentence for ``result.json``, the command line and Slicer)."""

    contrast: Contrast
    reason: str
    asked: str = "auto"  # what the user asked for (dlir.choices.SIMILARITY_CHOICES)

    @property
    def kind(self) -> str:
        """The similarity this choice uses (:data:`dlir.modality.KIND_FOR`)."""
        return KIND_FOR[self.contrast]

    def summary(self) -> dict[str, str]:
        """JSON-ready: asked, contrast, the similarity's name and the reason."""
        return {"asked": self.asked, "contrast": self.contrast, "measure": NAMES[self.kind], "reason": self.reason}

    def sentence(self) -> str:
        """One line: e.g. ``different contrasts (chosen automatically: ...): MIND-SSC``."""
        how = "as asked" if self.asked != "auto" else f"chosen automatically: {self.reason}"
        what = "the same contrast" if self.contrast == "same" else "different contrasts"
        return f"{what} ({how}); similarity {NAMES[self.kind]}"


def header_modality(image: sitk.Image) -> str | None:
    """The DICOM modality of ``image`` ("CT", "MR", ...), None when its header has none."""
    if not image.HasMetaDataKey(MODALITY_TAG):
        return None
    value = image.GetMetaData(MODALITY_TAG).strip().upper()
    return value or None


def header_choice(fixed: sitk.Image, moving: sitk.Image) -> ContrastChoice | None:
    """The choice from the two headers' modalities, None when they do not decide it (see the module docstring)."""
    a, b = header_modality(fixed), header_modality(moving)
    if a is None or b is None:
        return None
    if a != b:
        return ContrastChoice("different", f"the headers say {a} and {b}")
    if a == "CT":
        return ContrastChoice("same", "both headers say CT")
    return None


def linear_and_any(fixed: PreparedImage, moving: PreparedImage, transform: SpatialTransform) -> tuple[float, float]:
    """(NCC, correlation ratio eta^2 of the fixed intensities given the moving ones) over the fixed foreground where
    ``transform`` (fixed -> moving, LPS mm) lands inside the moving image, on the :data:`TEST_SPACING_MM` grid."""
    spacing = (TEST_SPACING_MM,) * 3
    grid = network_grid(fixed.grid, spacing)
    with torch.no_grad():
        f = fixed.resampled(spacing, None, grid)
        m = moving.resampled(spacing, transform, grid)
        inside = moving.grid.contains(map_grid(transform, grid, 1, f.device))[:, None]
        use = _erode(foreground(f.cpu()).to(f.device), ERODE) & inside
        correlation = float(ncc(f, m, use.to(f.dtype))[0])
        fv, mv = f[use].double(), m[use].double()
        if fv.numel() < 2 or float(fv.var()) == 0.0:
            return correlation, 0.0
        bins = (mv.clamp(0, 1) * (BINS - 1)).round().long()
        count = torch.zeros(BINS, dtype=torch.float64).index_add_(0, bins, torch.ones_like(fv))
        total = torch.zeros(BINS, dtype=torch.float64).index_add_(0, bins, fv)
        means = total / count.clamp(min=1)
        explained = float((count * (means - fv.mean()) ** 2).sum() / count.sum())
        return correlation, explained / float(fv.var(unbiased=False))


def _erode(mask: torch.Tensor, voxels: int) -> torch.Tensor:
    """``mask`` ``[1, 1, D, H, W]`` (bool) eroded by ``voxels`` (a cube)."""
    if voxels == 0:
        return mask
    return ~(torch.nn.functional.max_pool3d((~mask).float(), 2 * voxels + 1, stride=1, padding=voxels) > 0)


def image_choice(fixed: PreparedImage, moving: PreparedImage, transform: SpatialTransform) -> ContrastChoice:
    """The image test (module docstring) at the alignment ``transform`` (fixed -> moving, LPS mm)."""
    correlation, eta2 = linear_and_any(fixed, moving, transform)
    numbers = f"NCC {correlation:.2f}, correlation ratio {eta2:.2f}"
    if eta2 >= MIN_RELATED and (correlation <= 0 or correlation**2 < LINEAR_SHARE * eta2):
        return ContrastChoice("different", f"the intensities are related but not linearly ({numbers})")
    return ContrastChoice("same", f"the intensities are related linearly ({numbers})")


def initial_alignment_and_contrast(asked: str, mode: str, fixed_image: sitk.Image, moving_image: sitk.Image,
                                   fixed: PreparedImage, moving: PreparedImage) -> tuple[AffineTransform, ContrastChoice]:
    """(``T0``, the contrast choice) for ``--similarity asked`` (:data:`dlir.choices.SIMILARITY_CHOICES`) and the
    initial alignment ``mode``.

    ``same`` / ``different``: as given, the alignment searched with NCC / MIND-SSC.  ``auto``: the headers decide
    (:func:`header_choice`); else the alignment is searched with NCC and the images are tested there
    (:func:`image_choice`); when they are of different contrasts, a search (``mode`` ``search``) is run again with
    MIND-SSC.
    """
    if asked not in SIMILARITY_CHOICES:
        raise InputError(f"unknown similarity {asked!r}: use {', '.join(SIMILARITY_CHOICES)}")
    choice = ContrastChoice(asked, "as asked", asked) if asked != "auto" else header_choice(fixed_image, moving_image)  # type: ignore[arg-type]
    if choice is not None:
        return initial_alignment(mode, fixed, moving, choice.kind), choice
    initial = initial_alignment(mode, fixed, moving, "ncc")
    choice = image_choice(fixed, moving, initial)
    if choice.contrast == "different" and mode == "search":
        initial = initial_alignment(mode, fixed, moving, KIND_FOR["different"])
    return initial, choice
