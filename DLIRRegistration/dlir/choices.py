"""The enumerations of DLIR, named once: the engine, the ``dlir`` command and both Slicer modules
import them from here.

Imports nothing heavy (no PyTorch, SimpleITK or NumPy), so the Slicer modules can read it before
their dependencies are installed and ``dlir --help`` starts fast.
"""

from __future__ import annotations

from typing import Literal, get_args

AlignmentMode = Literal["search", "centre", "com", "moments", "none"]
#: the initial alignments (fixed -> moving, before the stages): an affine search from several starts on a coarse
#: pyramid inside the images' foregrounds (two subjects, any starting position), the centres of the image grids put on each
#: other, the centres of mass of the normalised intensities, the centres of mass and the principal axes
#: (for images rotated against each other), or none (the images as placed in physical space)
ALIGNMENT_MODES: tuple[AlignmentMode, ...] = get_args(AlignmentMode)

SimilarityChoice = Literal["auto", "same", "different"]
#: how the two images are compared (the capture search and accurate mode): decided from the images (``auto``: the
#: header's modality, else how the intensities relate after the initial alignment, :mod:`dlir.contrast`), the same
#: contrast (normalised cross-correlation), or different contrasts (MIND-SSC descriptors, :mod:`dlir.modality`)
SIMILARITY_CHOICES: tuple[SimilarityChoice, ...] = get_args(SimilarityChoice)

LabelInterpolation = Literal["nearest", "one-hot-linear"]
#: how moving label maps are warped: nearest neighbour, or linear interpolation of each label's
#: one-hot image followed by the argmax
LABEL_INTERPOLATIONS: tuple[LabelInterpolation, ...] = get_args(LabelInterpolation)

#: the full-resolution results ``dlir.register.register`` can make on the fixed grid (its ``outputs``)
ENGINE_OUTPUTS = ("warped", "labels", "jacobian", "displacement")
#: those it makes when ``outputs`` is not given
DEFAULT_OUTPUTS = ("warped", "labels", "jacobian")
#: the files ``dlir register --outputs`` (and ``dlir.outputs``) can write, in this order; all by default
FILE_OUTPUTS = ("warped", "labels", "jacobian", "transform")

#: the file-name suffix of a stage stack
STACK_SUFFIX = ".safetensors"

#: fixed-grid voxels per slab when the transform is evaluated at full resolution
CHUNK_VOXELS = 1_000_000


def stack_file_name(name: str) -> str:
    """The file name of the stack called ``name``: ``NAME.safetensors``."""
    return f"{name}{STACK_SUFFIX}"
