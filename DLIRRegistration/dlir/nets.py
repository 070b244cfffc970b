"""The DLIR ConvNets (de Vos et al., Medical Image Analysis 52, 2019) and the fixed cubic B-spline
upsampler.

* :class:`AffineNet` (paper Fig. 2): two weight-shared pipelines (fixed, moving) of
  3x3x3 convolution + 2x2x2 average pooling blocks, global average pooling, concatenation and
  fully connected layers to 12 affine parameters.
* :class:`KeypointAffineNet` (not in the paper): the same weight-shared pipeline, but pooled by a
  spatial soft-argmax into K keypoints per image instead of by global average pooling; the affine
  transform is the least-squares fit between the two keypoint sets (see
  :func:`dlir.transforms.affine_from_keypoints`).  Global average pooling discards where features
  are, so the paper's head can infer translation and rotation only indirectly; a keypoint's
  position is where, and the fit is exact for any affine, which is why it generalises to subjects
  outside training (the idea of KeyMorph, Yu et al., MIDL 2022).
* :class:`BSplineNet` (paper Fig. 3): fixed and moving concatenated, convolution + pooling down to
  the control-point spacing, two 3x3x3 convolutions, two 1x1x1 convolutions and a 3-channel
  1x1x1 output: control-point displacements (in voxels of the stage grid).
* :class:`BSplineUpsample`: control points -> dense displacement by a transposed convolution
  with a fixed cubic B-spline kernel (paper section 2.2).

ReLU activations, 32 kernels and Glorot-uniform initialisation as in the paper; the output
layers start at zero so that an untrained stage is the identity transform.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _glorot(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _zero(layer: nn.Module) -> None:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


class AffineNet(nn.Module):
    """Predicts 12 unconstrained affine parameters from a fixed and a moving image.

    Inputs ``[N, 1, D, H, W]`` each (may differ in size); output ``[N, 12]`` in the order
    rotation, shear, scale, translation (see :func:`dlir.transforms.affine_from_parameters`).
    """

    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1
        for _ in range(depth):
            layers += [nn.Conv3d(in_ch, channels, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool3d(2, ceil_mode=True)]
            in_ch = channels
        self.pipeline = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, 12))
        _glorot(self)
        _zero(self.head[-1])

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        f = self.pipeline(fixed).mean(dim=(2, 3, 4))
        m = self.pipeline(moving).mean(dim=(2, 3, 4))
        return self.head(torch.cat([f, m], dim=1))


class KeypointAffineNet(nn.Module):
    """Finds ``keypoints`` matching points in a fixed and a moving image (same grid).

    Pipeline (shared by both images): ``levels`` blocks of 3x3x3 convolution + ReLU + 2x2x2 average
    pooling, three 3x3x3 convolutions + ReLU, and a 1x1x1 convolution to one heatmap per keypoint;
    each keypoint is the softmax-weighted mean position of its heatmap.  Output ``[N, 2, K, 3]``:
    (fixed, moving) keypoints as continuous voxel indices (i, j, k) of the input grid (cell ``c`` of
    the pooled map is centred on voxel ``c * 2**levels + (2**levels - 1) / 2``).
    """

    def __init__(self, levels: int, channels: int, keypoints: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1
        for _ in range(levels):
            layers += [nn.Conv3d(in_ch, channels, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool3d(2)]
            in_ch = channels
        for _ in range(3):
            layers += [nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.pipeline = nn.Sequential(*layers)
        self.heatmaps = nn.Conv3d(channels, keypoints, 1)
        self.cell = 2**levels
        _glorot(self)  # random (not zero) heatmap weights: identical keypoints would never separate

    def locate(self, image: torch.Tensor) -> torch.Tensor:
        """Keypoints ``[N, K, 3]`` (voxel index i, j, k) of one image ``[N, 1, D, H, W]``."""
        logits = self.heatmaps(self.pipeline(image))
        n, k, d, h, w = logits.shape
        weights = torch.softmax(logits.reshape(n, k, -1).float(), dim=-1).reshape(n, k, d, h, w)
        centre = (self.cell - 1) / 2

        def along(dims: tuple[int, int], size: int) -> torch.Tensor:
            position = torch.arange(size, device=image.device, dtype=weights.dtype) * self.cell + centre
            return (weights.sum(dim=dims) * position).sum(dim=-1)

        return torch.stack([along((2, 3), w), along((2, 4), h), along((3, 4), d)], dim=-1)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.locate(fixed), self.locate(moving)], dim=1)


class BSplineNet(nn.Module):
    """Predicts B-spline control-point displacements (voxels of the input grid) for a patch.

    Input: fixed and moving ``[N, 1, D, H, W]`` on the same grid, each side a multiple of
    ``2 ** levels``.  Output ``[N, 3, D/f, H/f, W/f]`` with ``f = 2 ** levels`` (the control-point
    spacing in voxels); channels are the (x, y, z) displacement of each control point.
    """

    def __init__(self, levels: int, channels: int) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError("a B-spline network needs at least one downsampling level")
        layers: list[nn.Module] = []
        in_ch = 2
        for _ in range(levels):
            layers += [nn.Conv3d(in_ch, channels, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool3d(2)]
            in_ch = channels
        layers += [nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.Conv3d(channels, channels, 1), nn.ReLU(inplace=True)]
        layers += [nn.Conv3d(channels, channels, 1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.output = nn.Conv3d(channels, 3, 1)
        _glorot(self)
        _zero(self.output)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fixed, moving], dim=1)
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            conv, _, pool = self.features[:3]
            return self.output(self.features[3:](_first_block_by_slices(conv, pool, x)))
        return self.output(self.features(x))


def _first_block_by_slices(conv: nn.Conv3d, pool: nn.AvgPool3d, x: torch.Tensor) -> torch.Tensor:
    """``pool(relu(conv(x)))`` for a 3x3x3 convolution (padding 1) and 2x2x2 pooling, two slices (along D) at a time.

    The same numbers as the layers applied to the whole input, faster on a CPU for the first block of a network on a
    fine grid: its 2-channel convolution is bound by memory traffic, and a 32-channel output two slices thick stays in
    cache for the ReLU and the pooling (timings in Testing/benchmarks/RESULTS.md).
    """
    padded = F.pad(x, (0, 0, 0, 0, 1, 1))
    depth = x.shape[2]
    stop = depth if pool.ceil_mode else depth - depth % 2  # a last odd slice is pooled only with ceil_mode
    parts = [
        pool(F.conv3d(padded[:, :, k:min(depth, k + 2) + 2], conv.weight, conv.bias, padding=(0, 1, 1)).relu_())
        for k in range(0, stop, 2)
    ]
    return torch.cat(parts, dim=2)


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The centred cubic B-spline basis function B3(t), support (-2, 2)."""
    a = t.abs()
    inner = (4 - 6 * a**2 + 3 * a**3) / 6
    outer = (2 - a).clamp(min=0) ** 3 / 6
    return torch.where(a < 1, inner, outer)


class BSplineUpsample(nn.Module):
    """Dense field from control points by transposed convolution with a fixed cubic B-spline kernel.

    The separable 3D kernel is applied as three 1D transposed convolutions (the same operator).

    Control point ``c`` sits at the centre of pooling cell ``c``: voxel ``c * f + (f - 1) / 2`` of
    the dense grid, ``f`` = control-point spacing in voxels (a power of two >= 2).  The control
    grid is first extended by two points on each side by linear extrapolation, so every voxel has
    full B-spline support; constant and linear control-point fields are reproduced exactly.
    Input ``[N, C, d, h, w]`` -> output ``[N, C, d*f, h*f, w*f]``.
    """

    def __init__(self, factor: int) -> None:
        super().__init__()
        if factor < 2 or factor & (factor - 1):
            raise ValueError(f"control-point spacing must be a power of two >= 2 voxels, got {factor}")
        self.factor = factor
        # on the CPU whatever the default device: built on the meta device (a stack file's table checked without
        # memory), an arange there would import torch's decompositions, a second of start-up
        m = torch.arange(4 * factor, dtype=torch.float64, device="cpu")
        kernel = cubic_bspline((m - (4 * factor - 1) / 2) / factor)
        self.register_buffer("kernel", kernel.float(), persistent=False)

    @staticmethod
    def _extrapolate(cp: torch.Tensor, dim: int) -> torch.Tensor:
        n = cp.shape[dim]
        first, last = cp.narrow(dim, 0, 1), cp.narrow(dim, n - 1, 1)
        if n == 1:
            lo_step = hi_step = torch.zeros_like(first)
        else:
            lo_step = first - cp.narrow(dim, 1, 1)
            hi_step = last - cp.narrow(dim, n - 2, 1)
        return torch.cat([first + 2 * lo_step, first + lo_step, cp, last + hi_step, last + 2 * hi_step], dim=dim)

    def forward(self, control_points: torch.Tensor) -> torch.Tensor:
        f = self.factor
        cp = control_points
        for dim in (2, 3, 4):
            cp = self._extrapolate(cp, dim)
        channels = cp.shape[1]
        start = 7 * f // 2
        # the 3D kernel is the outer product of three 1D kernels: one transposed convolution per
        # axis gives exactly the 3D transposed convolution at a fraction of the cost
        for dim, n in zip((2, 3, 4), control_points.shape[2:]):
            shape = [1, 1, 1, 1, 1]
            shape[dim] = self.kernel.numel()
            weight = self.kernel.to(cp.dtype).view(shape).expand(channels, -1, -1, -1, -1)
            stride = [1, 1, 1]
            stride[dim - 2] = f
            cp = F.conv_transpose3d(cp, weight, stride=stride, groups=channels)
            cp = cp.narrow(dim, start, n * f)
        return cp
