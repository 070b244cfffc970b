"""Label maps warped exactly: label values coded as small integers, codes gathered at continuous indices.

Warping moves codes, never label values, so every value comes back exactly (any integer type,
negative or above 2^24).  Codes are gathered by nearest neighbour, or by linear interpolation of
the one-hot images followed by argmax; outside the moving image (continuous index beyond
``[-0.5, size - 0.5]``, ITK's inside test) the code is the background 0.  Arrays are ``[D, H, W]``
(k, j, i); indices are (i, j, k) of the label map's :class:`~dlir.geometry.Grid`.
"""

from __future__ import annotations


import numpy as np
import SimpleITK as sitk
import torch

from .choices import LabelInterpolation
from .geometry import Grid

#: one-hot-linear with at most this many labels (background included) sums each label's weight
#: directly; beyond, the weights of the 8 neighbours' own labels (the same sums, any label count)
_FEW_LABELS = 16


def label_codes(labels: np.ndarray, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """(table, codes): ``table[codes] == labels`` exactly, ``codes`` an integer tensor ``[D, H, W]`` on ``device``.

    ``table[0]`` is the background 0 (also where no voxel holds 0), then every other label value in
    ascending order, in the label map's own type: warping moves codes, never label values.  Codes
    are the smallest integer type that holds them; label maps of 8- and 16-bit integers are coded
    slab by slab through a lookup table (no full-size 64-bit copy).
    """
    if labels.dtype.kind in "iub" and labels.dtype.itemsize <= 2:
        lowest = int(labels.min())
        counts = np.zeros(int(labels.max()) - lowest + 1, dtype=np.int64)
        step = max(1, 4_000_000 // max(1, labels[0].size))
        for k0 in range(0, labels.shape[0], step):
            counts += np.bincount((labels[k0 : k0 + step].astype(np.int32) - lowest).ravel(), minlength=counts.size)
        values = (np.flatnonzero(counts) + lowest).astype(labels.dtype)
    else:
        values = np.unique(labels)
    nonzero = values != 0
    table = np.concatenate([np.zeros(1, dtype=values.dtype), values[nonzero]])
    kind = np.uint8 if table.size <= 256 else np.int16 if table.size <= 2**15 else np.int32 if table.size < 2**31 else np.int64
    if labels.dtype.kind in "iub" and labels.dtype.itemsize <= 2:
        lut = np.zeros(counts.size, dtype=kind)
        lut[values[nonzero].astype(np.int64) - lowest] = np.arange(1, table.size, dtype=kind)
        codes = np.empty(labels.shape, dtype=kind)
        for k0 in range(0, labels.shape[0], step):
            codes[k0 : k0 + step] = lut[labels[k0 : k0 + step].astype(np.int32) - lowest]
    else:
        place = np.where(nonzero, np.cumsum(nonzero), 0)  # 0 for the label 0, else the value's place in ``table``
        codes = place[np.searchsorted(values, labels)].astype(kind)
    return table, torch.from_numpy(codes).to(device=device)


def warp_label_codes(codes: torch.Tensor, count: int, grid: Grid, index: torch.Tensor, mode: LabelInterpolation) -> torch.Tensor:
    """Label codes ``[D, H, W]`` (``0 .. count - 1``, on ``grid``) at continuous indices ``[d, h, w, 3]`` (i, j, k of
    ``grid``, the images of LPS points): nearest neighbour, or linear one-hot + argmax.

    Outside the moving image (continuous index beyond ``[-0.5, size - 0.5]``) the code is 0
    (background), as ITK's default pixel value.  ``one-hot-linear``: each label's weight is the
    sum of the trilinear weights of the 8 neighbouring voxels that hold it (the linear
    interpolation of its one-hot image, with clamped borders); the heaviest label wins, ties going
    to the background, then to the smaller label.  60,000 labels cost about what 16 do.
    """
    shape = index.shape[:-1]
    idx = index.reshape(-1, 3)
    size = torch.as_tensor(grid.size, dtype=idx.dtype, device=idx.device)
    inside = grid.contains_index(idx)
    depth, height, width = codes.shape
    flat = codes.reshape(-1)
    top = (size - 1).to(torch.int64)

    if mode == "nearest":
        r = torch.round(idx).to(torch.int64).clamp(min=torch.zeros_like(top), max=top)
        out = flat[(r[:, 2] * height + r[:, 1]) * width + r[:, 0]].to(torch.int64)
    else:
        c = idx.clamp(min=torch.zeros_like(size), max=size - 1)
        lower = torch.floor(c).to(torch.int64).clamp(max=top)
        upper = (lower + 1).clamp(max=top)
        frac = c - lower.to(c.dtype)
        kind = torch.int32 if flat.numel() < 2**31 else torch.int64
        ends = [torch.stack([lower[:, a], upper[:, a]], dim=1).to(kind) for a in range(3)]  # (i, j, k): [M, 2] each
        shares = [torch.stack([1 - frac[:, a], frac[:, a]], dim=1) for a in range(3)]
        rows = ((ends[2] * height)[:, :, None] + ends[1][:, None, :]).reshape(-1, 4) * width
        index = (rows[:, :, None] + ends[0][:, None, :]).reshape(-1, 8)  # the 8 neighbours, k slowest, i fastest
        weight = ((shares[2][:, :, None] * shares[1][:, None, :]).reshape(-1, 4)[:, :, None] * shares[0][:, None, :]).reshape(-1, 8)
        label = flat[index]  # the codes of the 8 neighbours, [M, 8]
        if count <= _FEW_LABELS:  # each label's weight, heaviest first (argmax: ties to the smaller code)
            zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
            out = torch.stack([torch.where(label == code, weight, zero).sum(dim=1) for code in range(count)], dim=1).argmax(dim=1)
        else:  # the weight of each neighbour's label, summed over the neighbours holding it
            score = torch.zeros_like(weight)
            for other in range(8):
                score += weight[:, other : other + 1] * (label == label[:, other : other + 1])
            best = score.max(dim=1, keepdim=True).values
            candidates = torch.where(score == best, label, torch.full_like(label, torch.iinfo(label.dtype).max))
            out = candidates.min(dim=1).values.to(torch.int64)
    out = torch.where(inside, out, torch.zeros_like(out))
    return out.reshape(shape)


def as_label_image(labels: np.ndarray, grid: Grid, like: sitk.Image | None) -> sitk.Image:
    """Warped label values (already of the moving label map's type) as an image on ``grid``."""
    image = grid.apply_to(sitk.GetImageFromArray(labels))
    if like is not None and image.GetPixelID() != like.GetPixelID():
        image = sitk.Cast(image, like.GetPixelID())
    return image
