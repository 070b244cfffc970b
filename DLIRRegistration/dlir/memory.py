"""Will a registration fit in memory?  An estimate from the recipe and the grids, made before anything
is allocated, against the memory available on the chosen device.

The estimate counts the float32 tensors a registration holds at its peak (see :func:`estimate`):
the images' anti-aliased copies per stage spacing (the images themselves are the caller's, read
slab by slab in their own type), each stage's network grid (resampled inputs, sampling points and
the activations of the widest layer), the refinement's pyramid levels, and the full-resolution outputs on the
fixed grid (warped image, labels, Jacobian, the displacement when it is kept) with the slabs
they are computed in.  It is an estimate, meant to refuse in a second what would
otherwise swap, be killed, or fail after minutes; it is not a bound on every allocation.

Available memory: on CUDA the GPU's free memory (``torch.cuda.mem_get_info``); on the CPU Linux's
``MemAvailable`` (``/proc/meminfo``), lowered to a cgroup's memory limit when one applies; no check
where neither is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .choices import CHUNK_VOXELS
from .errors import DeviceError
from .geometry import Grid
from .pipeline import stage_grid
from .refine import RefineSettings, base_spacing
from .stack import Stack

FLOAT = 4  # bytes of a float32 value

# float32 values held per voxel (checked against the CPU's peak RSS, VmHWM, in Testing/engine/test_fullres.py)
#: per fixed-grid voxel, all along: nothing beyond the caller's image (read slab by slab in its own type), plus
#: one anti-aliased copy per stage spacing (counted at full size: block averaging shrinks it on fine grids)
PER_FIXED_INPUT = 0
#: per moving-grid voxel, all along: as the fixed image (the label codes, when given, count one)
PER_MOVING_INPUT = 0
#: per fixed-grid voxel at the full-resolution step: warped image, labels and Jacobian, each as an array
#: and as the image made of it (at most 4 bytes each)
PER_FIXED_OUTPUT = 6
#: per fixed-grid voxel, when the full-resolution displacement is kept (``register(outputs=(..., "displacement"))``,
#: ``Registration.displacement``): the field as a float32 array and the image made of it (6), and room (12) for a
#: caller's float64 ITK displacement-field transform of it; ``transform.h5`` never needs it (it holds the compact
#: field of :mod:`dlir.export`)
PER_FIXED_DISPLACEMENT = 18
#: the slabs of the full-resolution step (:data:`dlir.choices.CHUNK_VOXELS` voxels: points, mapped points,
#: displacement, the Jacobian's derivatives and the sampling temporaries)
SLAB_BYTES = CHUNK_VOXELS * 250
#: per network-grid voxel of a stage: fixed and moving resampled, sampling points and their image
#: through the transforms so far, one sampled value (12), plus this many per channel (widest layers)
PER_STAGE_VOXEL = 12
PER_CHANNEL_VOXEL = 2.5
#: memory the process needs besides the tensors (PyTorch's workspaces, the outputs' writers)
OVERHEAD_BYTES = 100 * 2**20


class GPUMemoryError(DeviceError, torch.cuda.OutOfMemoryError):
    """A registration would not fit in the GPU's free memory.

    Also a ``torch.cuda.OutOfMemoryError``, so that code which falls back to the CPU when the GPU
    runs out of memory (``register(device="auto")``) does the same when the estimate says it would.
    """


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a registration needs at its peak, and what dominates it.

    ``total = inputs + max(largest_stage, full_resolution) + overhead``: the stages (one at a time,
    then the refinement) and the full-resolution step follow one another.
    """

    total: int  # bytes
    inputs: int  # the images and their prepared copies, held all along
    full_resolution: int  # the outputs on the fixed grid
    largest_stage: int  # the most demanding stage (or the refinement)
    largest_stage_index: int  # 1-based
    largest_stage_shape: tuple[int, int, int]  # voxels (i, j, k) of that stage's grid


def estimate(stack: Stack, fixed_grid: Grid, moving_grid: Grid, refine: bool = False,
             moving_labels: bool = False, displacement: bool = True) -> MemoryEstimate:
    """The peak memory (bytes) of registering an image on ``moving_grid`` onto one on ``fixed_grid``.

    Pure arithmetic on grid sizes: nothing is allocated, so it is safe for any grid.
    """
    fixed_voxels, moving_voxels = _voxels(fixed_grid), _voxels(moving_grid)
    spacings = {stage.spec.spacing_mm for stage in stack.stages}
    if refine:  # the refinement's pyramid levels (its random samples and displacement grids are small besides)
        settings = RefineSettings()
        base = base_spacing(fixed_grid, settings)
        spacings |= {(base * f,) * 3 for f in settings.level_spacings_mm}
    copies = len(spacings)  # anti-aliased copies, cached per spacing
    inputs = FLOAT * (fixed_voxels * (PER_FIXED_INPUT + copies) + moving_voxels * (PER_MOVING_INPUT + copies + moving_labels))
    full = FLOAT * fixed_voxels * (PER_FIXED_OUTPUT + PER_FIXED_DISPLACEMENT * displacement) + SLAB_BYTES
    largest, index, shape = 0, 1, (1, 1, 1)
    for k, stage in enumerate(stack.stages, 1):
        grid = stage_grid(stage.spec, fixed_grid)
        need = int(FLOAT * _voxels(grid) * (PER_STAGE_VOXEL + PER_CHANNEL_VOXEL * stage.spec.channels))
        if need > largest:
            largest, index, shape = need, k, grid.size
    return MemoryEstimate(inputs + max(full, largest) + OVERHEAD_BYTES, inputs, full, largest, index, shape)


def _voxels(grid: Grid) -> int:
    return math.prod(int(n) for n in grid.size)


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for a registration on ``device``; None when it cannot be known here."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError):
            return None
        return int(free)
    if device.type == "cpu":
        return host_available_memory()
    return None


def host_available_memory() -> int | None:
    """Linux: ``MemAvailable`` of ``/proc/meminfo``, or less when a cgroup limits this process; else None."""
    available = _meminfo_available(Path("/proc/meminfo"))
    if available is None:
        return None
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left below this process's cgroup v2 memory limit, or None when there is none."""
    try:
        relative = ""
        for line in Path("/proc/self/cgroup").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("0::"):
                relative = line[3:].strip().lstrip("/")
        folder = root / relative
        limit_text = (folder / "memory.max").read_text(encoding="ascii").strip()
        if limit_text == "max":
            return None
        used = int((folder / "memory.current").read_text(encoding="ascii").strip())
        return max(0, int(limit_text) - used)
    except (OSError, ValueError):
        return None


def check_memory(stack: Stack, fixed_grid: Grid, moving_grid: Grid, device: torch.device | str,
                 refine: bool = False, moving_labels: bool = False, available: int | None = None,
                 displacement: bool = True) -> MemoryEstimate:
    """Refuse, with one sentence, a registration that would not fit in the memory available on ``device``.

    ``available`` (bytes) overrides what :func:`available_memory` finds (for tests).  Raises
    :class:`GPUMemoryError` on a GPU (also a ``torch.cuda.OutOfMemoryError``: ``auto`` falls back
    to the CPU) and :class:`~dlir.errors.DeviceError` on the CPU; returns the estimate otherwise.
    """
    device = torch.device(device)
    need = estimate(stack, fixed_grid, moving_grid, refine, moving_labels, displacement)
    room = available if available is not None else available_memory(device)
    if room is None or need.total <= room:
        return need
    sizes = "x".join(str(n) for n in fixed_grid.size)
    stage = "x".join(str(n) for n in need.largest_stage_shape)
    what = (f"registering this pair needs about {_gb(need.total)} of memory (fixed image {sizes} voxels, "
            f"stage {need.largest_stage_index}'s network grid {stage} voxels)")
    if need.largest_stage > need.full_resolution:
        remedy = "use a stack with a coarser network grid (larger spacing_mm) or crop the images"
    else:
        remedy = "crop or resample the fixed image to fewer voxels"
    if device.type == "cuda":
        raise GPUMemoryError(f"{what} but the GPU has only {_gb(room)} free; {remedy}, free GPU memory, "
                             "or register on the CPU (device 'cpu')")
    gpu = " or register on the GPU (device 'cuda')" if _gpu_would_fit(need.total) else ""
    raise DeviceError(f"{what} but only {_gb(room)} is available; {remedy}, close other programs{gpu}")


def _gpu_would_fit(total: int) -> bool:
    if not torch.cuda.is_available():
        return False
    room = available_memory(torch.device("cuda"))
    return room is not None and total <= room


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"
