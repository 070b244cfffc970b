"""Write a freshly initialised (untrained) stage stack for benchmarking before trained stacks exist.

Its networks output the identity (their output layers start at zero), so DLIR without refinement
is the initial centre alignment only and DLIR with ``--refine N`` is pure test-time optimisation
on the stack's loss.  Replace it by a trained stack (``Resources/Models/*.safetensors``) for the
published numbers.

    .venv/bin/python Testing/benchmarks/make_dev_stack.py out/bench/dev-untrained.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

from dlir.recipe import Recipe, StageSpec
from dlir.stack import Manifest, build_stack, save_stack

#: paper-like coarse to fine: affine, then B-splines with control points every 32 mm and 16 mm
STAGES = (
    StageSpec("affine", spacing_mm=(4.0, 4.0, 4.0), depth=4, channels=16),
    StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=8, channels=16, alpha=0.05),
    StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=4, channels=16, alpha=0.05),
)


def main(path: str) -> Path:
    manifest = Manifest("dev-untrained", Recipe(stages=STAGES),
                        description="untrained (identity) stack for benchmark development")
    return save_stack(build_stack(manifest, seed=0), path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_dev_stack.py OUT.safetensors")
    print(main(sys.argv[1]))
