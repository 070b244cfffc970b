"""Image augmentation primitives shared by the synthetic pairs of real images (:mod:`.synthetic`)
and the synthetic shapes (:mod:`.shapes`): smooth random noise, a smooth multiplicative bias field
and thick-slice partial volume (Gaussian blur is :func:`dlir.preprocess.gaussian_smooth`, the one
inference uses), and a random contrast for pairs of real images (:func:`random_contrast`).  Images are
``[1, C, D, H, W]``; lengths in voxels; all randomness from the given ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..preprocess import gaussian_smooth


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """A number drawn uniformly from ``[low, high)``."""
    return low + (high - low) * float(torch.rand(1, generator=generator, dtype=torch.float64))


def smooth_noise(channels: int, shape: tuple[int, int, int], cells: int, generator: torch.Generator) -> torch.Tensor:
    """``[1, channels, D, H, W]`` smooth random noise with a correlation length of about ``max(shape) / cells`` voxels.

    A ``cells``^3 lattice of white noise is upsampled 4x, blurred there by half a lattice cell (which
    removes the kinks of linear interpolation, so argmax boundaries are smooth surfaces), then
    upsampled linearly to ``shape``; the work at full size is one interpolation.
    """
    lattice = torch.randn((1, channels, cells, cells, cells), generator=generator)
    middle = min(max(shape), 4 * cells)
    smooth = gaussian_smooth(F.interpolate(lattice, size=(middle,) * 3, mode="trilinear", align_corners=True), [0.5 * middle / cells] * 3)
    return F.interpolate(smooth, size=tuple(shape), mode="trilinear", align_corners=True)


def bias_field(image: torch.Tensor, amplitude: float, generator: torch.Generator) -> torch.Tensor:
    """``image`` times ``exp(b)``, ``b`` a smooth random field (about four cells across) of amplitude up to ``amplitude``."""
    log_bias = smooth_noise(1, tuple(image.shape[2:]), 4, generator) * uniform(generator, 0.0, amplitude)
    return image * torch.exp(log_bias)


def thick_slices(image: torch.Tensor, generator: torch.Generator, most: int) -> torch.Tensor:
    """Partial volume of thick slices: blocks of 2..``most`` voxels along a random axis averaged and repeated."""
    if most < 2:
        return image
    k = int(torch.randint(2, most + 1, (1,), generator=generator))
    dim = 2 + int(torch.randint(0, 3, (1,), generator=generator))
    n = image.shape[dim]
    blocks = math.ceil(n / k)
    pad = [0] * 6
    pad[2 * (4 - dim) + 1] = blocks * k - n
    padded = F.pad(image, pad, mode="replicate")
    shape = list(padded.shape)
    shape[dim:dim + 1] = [blocks, k]
    averaged = padded.reshape(shape).mean(dim=dim + 1, keepdim=True).expand(shape).reshape(padded.shape)
    return averaged.narrow(dim, 0, n)


def piecewise_linear(image: torch.Tensor, knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``image`` (intensities in [0, 1]) through the piecewise-linear map through the points (``knots[i]``,
    ``values[i]``): ``knots`` increasing from 0 to 1 (1-D, at least two), ``values`` of the same length; a new tensor."""
    inner = knots[1:-1].contiguous()
    x = image.clamp(0, 1)
    index = torch.bucketize(x, inner)  # the piece of each voxel: knots[index] <= x <= knots[index + 1]
    x0, x1, y0, y1 = knots[index], knots[index + 1], values[index], values[index + 1]
    return y0 + (x - x0) / (x1 - x0).clamp(min=1e-6) * (y1 - y0)


def random_contrast(image: torch.Tensor, most_knots: int, generator: torch.Generator) -> torch.Tensor:
    """``image`` (intensities in [0, 1]) with a random contrast: a random piecewise-linear, in general non-monotonic,
    map of [0, 1] onto [0, 1] (a new tensor).

    The map passes through (0, 0) (air and background stay dark, as in every MR and CT contrast), through a value
    drawn uniformly in [0, 1] at 1, and through 1 to ``most_knots`` inner points (how many: uniform) at positions and
    values drawn uniformly in (0, 1); its values are then divided by their largest, so the image fills [0, 1] again as
    the intensity normalisation of inference would make it.  Knots close together make a contrast that changes
    within a narrow band of intensities (fat against muscle in an MR of a CT's soft tissue).
    """
    n = int(torch.randint(1, most_knots + 1, (1,), generator=generator))
    inner = torch.sort(torch.rand(n, generator=generator)).values
    knots = torch.cat([torch.zeros(1), inner, torch.ones(1)]).to(image.device)
    values = torch.cat([torch.zeros(1), torch.rand(n + 1, generator=generator)])
    values = (values / values.amax().clamp(min=1e-3)).to(image.device)
    return piecewise_linear(image, knots, values)
