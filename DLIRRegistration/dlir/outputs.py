"""One registration from files to files: read the pair, register it, write the outputs and ``result.json``.

The engine side of ``dlir register`` (one pair or a cohort) and of ``dlir bench``'s measured runs.
Outputs in the folder ``out``: ``warped.nii.gz`` (moving on the fixed grid, linear),
``jacobian.nii.gz`` (det J per fixed voxel), ``transform.h5`` (the fixed -> moving displacement,
LPS mm, ITK's resampling direction), ``labels.nii.gz`` (with moving labels) and ``result.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import SimpleITK as sitk
from tqdm import tqdm

from .io import read_image, write_image, write_transform
from .metrics import dice
from .register import register
from .stack import Stack

#: the files a registration writes into its output folder
WARPED_FILE = "warped.nii.gz"
JACOBIAN_FILE = "jacobian.nii.gz"
TRANSFORM_FILE = "transform.h5"
LABELS_FILE = "labels.nii.gz"
RESULT_FILE = "result.json"


def register_pair(
    stack: Stack,
    fixed_path: str | Path,
    moving_path: str | Path,
    out: Path,
    *,
    moving_labels: str | Path | None = None,
    fixed_mask: str | Path | None = None,
    fixed_labels: str | Path | None = None,
    device: str = "auto",
    refine_steps: int = 0,
    initial_alignment: str | None = None,
    label_interpolation: str = "nearest",
    show_progress: bool = True,
) -> dict[str, object]:
    """Read, register and write one pair into ``out``; returns the contents of ``result.json``."""
    t0 = time.perf_counter()
    fixed = read_image(fixed_path, "fixed image")
    moving = read_image(moving_path, "moving image")
    labels = None if moving_labels is None else read_image(moving_labels, "moving label map")
    mask = None if fixed_mask is None else read_image(fixed_mask, "fixed mask")
    reference = None if fixed_labels is None else read_image(fixed_labels, "fixed label map")
    read_s = time.perf_counter() - t0

    with tqdm(total=100, desc="register", unit="%", disable=not show_progress, leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}") as bar:
        def progress(step: str, fraction: float) -> None:
            bar.set_postfix_str(step)
            bar.update(round(100 * fraction) - bar.n)

        reg = register(fixed, moving, stack, moving_labels=labels, fixed_mask=mask, device=device,
                       refine_steps=refine_steps, initial_alignment=initial_alignment,
                       label_interpolation=label_interpolation, progress=progress)

    t1 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    write_image(reg.warped, out / WARPED_FILE)
    write_image(reg.jacobian, out / JACOBIAN_FILE)
    write_transform(reg.itk_transform(), out / TRANSFORM_FILE)
    if reg.warped_labels is not None:
        write_image(reg.warped_labels, out / LABELS_FILE)
    timings = {"read": read_s, **reg.timings, "write": time.perf_counter() - t1}
    result: dict[str, object] = {
        **reg.summary(),
        "fixed": str(fixed_path),
        "moving": str(moving_path),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "total_s": round(sum(timings.values()), 4),
    }
    if reference is not None and labels is not None and reg.warped_labels is not None:
        result["dice"] = _dice_before_after(reference, labels, reg.warped_labels)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _dice_before_after(reference: sitk.Image, moving_labels: sitk.Image, warped_labels: sitk.Image) -> dict[str, dict[str, float]]:
    """Dice per label of the fixed labels against the moving labels (resampled as is) and the warped ones."""
    identity = sitk.Resample(moving_labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    before, after = dice(reference, identity), dice(reference, warped_labels)
    return {str(k): {"before": before[k], "after": after[k]} for k in sorted(after)}
