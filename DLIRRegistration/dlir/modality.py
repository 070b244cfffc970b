"""Similarities that do not assume one contrast: MIND-SSC descriptors (and normalised gradient fields).

Two images of different contrasts (MR and CT, T1 and T2) need not have correlated intensities, but the same
anatomy has the same *structure*: edges in the same places, the same pattern of which neighbourhoods look alike.

- **MIND-SSC** (Heinrich et al., MICCAI 2013: the modality independent neighbourhood descriptor, self-similarity
  context): per voxel, 12 numbers in (0, 1], one per pair of the 6 face neighbours at ``dilation`` voxels that are
  not opposite each other: ``exp(-SSD / V)``, the sum of squared differences of the two neighbours' patches (cubes of
  ``2 radius + 1`` voxels) over a local variance ``V`` (the mean of the 12 SSDs), scaled so that the largest of the 12
  is 1.  A non-monotonic intensity map of an image changes the patches' SSDs but hardly which neighbours are alike,
  so the descriptors of two contrasts of the same anatomy agree where the anatomy is aligned.  Two descriptor images
  are compared by the mean squared difference (as in ConvexAdam).
- **NGF** (Haber and Modersitzki 2006): the gradient divided by ``sqrt(|g|^2 + eps^2)``; similarity = the mean squared
  cosine of the two images' gradients.  Kept for comparison (``--similarity`` does not offer it: MIND-SSC reached
  better accuracy per second on the development pairs, Testing/benchmarks/RESULTS.md).

Images are tensors ``[N, 1, D, H, W]`` on a grid with the same spacing along every axis (mm); offsets are in voxels of
that grid, so call these on an isotropic resampling (:func:`dlir.preprocess.network_grid`) for descriptors that mean
the same thing in both images.  Features come back ``[N, C, D, H, W]`` on the same grid.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

#: MIND-SSC's 12 pairs of face neighbours that are not opposite each other come as 6 pairs {a, b} (offsets (dk, dj, di)
#: in units of the dilation) and their mirror images {-a, -b}, whose squared difference is the same image moved by
#: -(a + b): computed once, taken twice
_PAIRS = tuple(((sa if p == 0 else 0, sa if p == 1 else 0, sa if p == 2 else 0), (sb if q == 0 else 0, sb if q == 1 else 0, sb if q == 2 else 0))
               for p, q in itertools.combinations(range(3), 2) for sa, sb in ((1, 1), (1, -1)))
#: the descriptors' mean squared difference is divided by this in :func:`mind_similarity`: two unrelated images'
#: descriptors differ by about this much, so the similarity's range (and so its weight against the bending energy
#: and folding penalty of accurate mode) is comparable to NCC's
MIND_SCALE = 0.1


def ncc(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Global normalised cross-correlation per pair, ``[N]``, in [-1, 1] (1 = identical up to a linear intensity map).

    ``mask`` ``[N, 1, D, H, W]`` (0/1 or weights) restricts the voxels taken into account.
    """
    if mask is None:
        mask = torch.ones_like(fixed[:, :1])
    w = mask.flatten(1).to(fixed.dtype)
    f = fixed.flatten(1)
    m = warped.flatten(1)
    n = w.sum(1).clamp(min=1)
    f = f - (w * f).sum(1, keepdim=True) / n[:, None]
    m = m - (w * m).sum(1, keepdim=True) / n[:, None]
    cross = (w * f * m).sum(1)
    return cross / torch.sqrt((w * f * f).sum(1) * (w * m * m).sum(1) + eps)


def _window(image: torch.Tensor, margin: int, offset: tuple[int, ...], keep: int) -> torch.Tensor:
    """The part of ``image`` (padded by ``margin`` voxels on every side) moved by ``offset`` voxels (dk, dj, di), still
    padded by ``keep``: value at x is the image at x + offset."""
    d, h, w = (image.shape[2 + a] - 2 * margin for a in range(3))
    k, j, i = (margin - keep + o for o in offset)
    return image[:, :, k:k + d + 2 * keep, j:j + h + 2 * keep, i:i + w + 2 * keep]


def _box(image: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over cubes of ``2 radius + 1`` voxels, separably, without padding (each axis shrinks by ``2 radius``)."""
    n = 2 * radius + 1
    for dim in (2, 3, 4):
        size = image.shape[dim] - n + 1
        image = sum(image.narrow(dim, s, size) for s in range(n)) / n
    return image


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors ``[N, 12, D, H, W]`` in (0, 1] of ``image`` ``[N, 1, D, H, W]`` (isotropic grid).

    ``radius``: half-width of the patches compared (voxels); ``dilation``: distance of the neighbours from the voxel
    (voxels).  Borders are replicated.
    """
    d = dilation
    margin = 2 * d + radius
    padded = F.pad(image, (margin,) * 6, mode="replicate")
    base = torch.cat([(_window(padded, margin, tuple(d * c for c in a), d + radius)
                       - _window(padded, margin, tuple(d * c for c in b), d + radius)).pow(2) for a, b in _PAIRS], dim=1)
    base = _box(base, radius)  # patch SSDs of the 6 pairs, padded by d
    mirrored = [_window(base[:, c:c + 1], d, tuple(-d * (x + y) for x, y in zip(a, b)), 0) for c, (a, b) in enumerate(_PAIRS)]
    ssd = torch.cat([_window(base, d, (0, 0, 0), 0), *mirrored], dim=1)
    variance = ssd.mean(1, keepdim=True)
    level = variance.mean((2, 3, 4), keepdim=True)
    variance = torch.maximum(torch.minimum(variance, 1000 * level), 0.001 * level).clamp(min=1e-12)
    descriptor = torch.exp(-ssd / variance)
    return descriptor / descriptor.amax(1, keepdim=True)


def mind_similarity(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - MSD / MIND_SCALE`` per pair ``[N]`` of two descriptor images (or point sets) ``[N, C, ...]``: the mean
    over points and channels of the squared difference, 1 = identical descriptors.

    ``mask`` ``[N, 1, ...]`` (0/1 or weights) restricts the points taken into account.
    """
    squared = (fixed - warped).pow(2).mean(1, keepdim=True)
    if mask is None:
        mask = torch.ones_like(squared)
    w = mask.to(squared.dtype).flatten(1)
    msd = (w * squared.flatten(1)).sum(1) / w.sum(1).clamp(min=1e-6)
    return 1 - msd / MIND_SCALE


def ngf(image: torch.Tensor, spacing: float, eps: float | None = None) -> torch.Tensor:
    """Normalised gradient field ``[N, 3, D, H, W]`` (x, y, z components, per mm) of ``image`` on an isotropic grid of
    ``spacing`` mm: central differences over ``sqrt(|g|^2 + eps^2)``; ``eps`` defaults to the mean gradient magnitude
    (edges weaker than the typical one count less)."""
    padded = F.pad(image, (1,) * 6, mode="replicate")
    gz = (padded[:, :, 2:, 1:-1, 1:-1] - padded[:, :, :-2, 1:-1, 1:-1]) / (2 * spacing)
    gy = (padded[:, :, 1:-1, 2:, 1:-1] - padded[:, :, 1:-1, :-2, 1:-1]) / (2 * spacing)
    gx = (padded[:, :, 1:-1, 1:-1, 2:] - padded[:, :, 1:-1, 1:-1, :-2]) / (2 * spacing)
    gradient = torch.cat([gx, gy, gz], dim=1)
    magnitude2 = gradient.pow(2).sum(1, keepdim=True)
    if eps is None:
        eps = float(magnitude2.sqrt().mean())
    return gradient / torch.sqrt(magnitude2 + eps * eps + 1e-12)


def ngf_similarity(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared cosine ``(n_f . n_m)^2`` per pair ``[N]`` of two normalised gradient fields ``[N, 3, ...]``
    (in [0, 1); 1 = parallel edges everywhere, whichever side is brighter).  ``mask`` as in :func:`mind_similarity`."""
    cosine2 = (fixed * warped).sum(1, keepdim=True).pow(2)
    if mask is None:
        mask = torch.ones_like(cosine2)
    w = mask.to(cosine2.dtype).flatten(1)
    return (w * cosine2.flatten(1)).sum(1) / w.sum(1).clamp(min=1e-6)


#: the similarity kinds of :func:`features` / :func:`compare`: global NCC of the intensities, MIND-SSC, NGF
KINDS = ("ncc", "mind", "ngf")
#: the kind used for images of the same contrast and of different contrasts (``--similarity same|different``)
KIND_FOR = {"same": "ncc", "different": "mind"}
#: the kinds' names in sentences
NAMES = {"ncc": "NCC", "mind": "MIND-SSC", "ngf": "NGF"}


def features(kind: str, image: torch.Tensor, spacing: float) -> torch.Tensor:
    """What ``kind`` compares of ``image`` ``[N, 1, D, H, W]`` on an isotropic grid of ``spacing`` mm: the intensities
    themselves (``ncc``, ``[N, 1, ...]``), MIND-SSC descriptors (``mind``, ``[N, 12, ...]``) or the NGF (``[N, 3, ...]``)."""
    if kind == "ncc":
        return image
    if kind == "mind":
        return mind_ssc(image)
    if kind == "ngf":
        return ngf(image, spacing)
    raise ValueError(f"unknown similarity {kind!r}: use {', '.join(KINDS)}")


def compare(kind: str, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The similarity per pair ``[N]`` (higher = more alike; 1 = identical) of two :func:`features` ``[N, C, ...]``."""
    if kind == "ncc":
        return ncc(fixed, warped, mask)
    if kind == "mind":
        return mind_similarity(fixed, warped, mask)
    if kind == "ngf":
        return ngf_similarity(fixed, warped, mask)
    raise ValueError(f"unknown similarity {kind!r}: use {', '.join(KINDS)}")
