"""Clinical-size CT benchmark (issue 16): lung1 resampled to 512 x 512 x 200 at 0.57 x 0.57 x 1.2 mm.

    python Testing/benchmarks/fullres_ct.py make DIR        # writes DIR/{fixed,moving,moving_labels,fixed_labels}.nii.gz
    python Testing/benchmarks/fullres_ct.py run DIR OUT [--outputs ...]   # dlir register, prints result.json timings and peak RSS

Peak RSS is the child's ``ru_maxrss``, CPU time its user + system time; run when the machine is otherwise
idle (``OMP_NUM_THREADS=1`` gives steadier numbers on a shared machine).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import SimpleITK as sitk

PAIR = Path("/work/shared/data/pairs/lung1_aniso")
SIZE, SPACING = (512, 512, 200), (0.57, 0.57, 1.2)


def make(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, interp in (("fixed", sitk.sitkLinear), ("moving", sitk.sitkLinear),
                         ("fixed_labels", sitk.sitkNearestNeighbor), ("moving_labels", sitk.sitkNearestNeighbor)):
        image = sitk.ReadImage(str(PAIR / f"{name}.nii.gz"))
        centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
        origin = [c - (n - 1) * s / 2 for c, n, s in zip(centre, SIZE, SPACING)]
        out = sitk.Resample(image, SIZE, sitk.Transform(), interp, origin, SPACING, image.GetDirection(),
                            -1024 if name in ("fixed", "moving") else 0, image.GetPixelID())
        sitk.WriteImage(out, str(folder / f"{name}.nii.gz"), useCompression=True)


def run(folder: Path, out: Path, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "dlir", "register", str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz"),
           "--stack", "chest-ct", "--out", str(out), "--overwrite", "--device", "cpu",
           "--moving-labels", str(folder / "moving_labels.nii.gz"), "--fixed-labels", str(folder / "fixed_labels.nii.gz"), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss / 2**20
    result = json.loads((out / "result.json").read_text())
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(out.iterdir())}
    print(json.dumps({"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_gb": round(peak, 2), "timings_s": result["timings_s"],
                      "total_s": result["total_s"], "dice": result.get("dice"), "folding": result["folding_fraction"],
                      "files_mb": sizes}, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    else:
        run(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
