"""Two different-contrast pairs from the MNI152 template, under a known deformation (for measuring how the engine
behaves on them; issue 27 owns multi-contrast registration).

    .venv/bin/python Testing/benchmarks/intersubject/make_contrast.py [--out out/contrast]

Moving: the T1 template at 2 mm with its tissue labels.  Fixed: a contrast made from the template's tissue
probabilities under a known transform (``make_set.known_transform``: 8 % scale, 8-10 degrees, B-spline 50 mm):
``t2like`` (CSF bright, grey matter middle, white matter dark) and ``inverted`` (255 - T1 inside the head).
``ct_mrlike``: the chest CT at 2 x 2 x 5 mm as moving (lungs and tumour labelled), fixed an MR-like image made from
it (a non-monotonic map of the Hounsfield units: air and lung dark, fat brightest, muscle middle, bone dark) under the
same kind of known transform.  Writes ``OUT/pairs.csv`` for ``dlir bench``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from make_set import REPO, known_transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "contrast")
    args = parser.parse_args()
    folder = args.data / "mni152_2009a_sym"
    read = lambda name, kind=sitk.sitkFloat32: sitk.ReadImage(str(folder / name), kind)  # noqa: E731
    t1, gm, wm, brain = read("t1.nii.gz"), read("gm_prob.nii.gz"), read("wm_prob.nii.gz"), read("brain_mask.nii.gz")
    labels = sitk.ReadImage(str(folder / "labels.nii.gz"))
    size = [int(s * p / 2) for s, p in zip(t1.GetSize(), t1.GetSpacing())]
    to2mm = lambda im, how: sitk.Resample(im, size, sitk.Transform(), how, im.GetOrigin(), [2.0] * 3, im.GetDirection())  # noqa: E731
    moving, moving_labels = to2mm(t1, sitk.sitkLinear), to2mm(labels, sitk.sitkNearestNeighbor)
    csf = sitk.Clamp(brain - gm - wm, sitk.sitkFloat32, 0.0, 1.0)
    contrasts = {"t2like": to2mm(200.0 * csf + 120.0 * gm + 50.0 * wm, sitk.sitkLinear),
                 "inverted": to2mm(sitk.Mask(255.0 - t1, sitk.Cast(t1 > 5, sitk.sitkUInt8)), sitk.sitkLinear)}
    transform = known_transform(moving, seed=27, scale=(1.08, 0.95, 1.05), degrees=(8.0, -6.0, 10.0),
                                shift=(6.0, -8.0, 5.0), amplitude_mm=3.0, control_mm=50.0)
    pairs = [(name, contrast, moving, moving_labels, transform) for name, contrast in contrasts.items()]
    pairs.append(ct_pair(args.data / "chest_ct_lung1"))
    rows = []
    for name, contrast, source, source_labels, known in pairs:
        out = args.out / "pairs" / name
        out.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.Resample(contrast, source, known, sitk.sitkLinear, 0.0), str(out / "fixed.nii.gz"))
        sitk.WriteImage(sitk.Resample(source_labels, source, known, sitk.sitkNearestNeighbor, 0), str(out / "fixed_labels.nii.gz"))
        sitk.WriteImage(source, str(out / "moving.nii.gz"))
        sitk.WriteImage(source_labels, str(out / "moving_labels.nii.gz"))
        rows.append([name] + [str(out / f"{f}.nii.gz") for f in ("fixed", "moving", "fixed_labels", "moving_labels")] + ["", ""])
    with open(args.out / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "fixed", "moving", "fixed_labels", "moving_labels", "landmarks", "gt_displacement"])
        writer.writerows(rows)
    print(f"{len(rows)} pairs in {args.out / 'pairs.csv'}")


def ct_pair(folder: Path) -> tuple[str, sitk.Image, sitk.Image, sitk.Image, sitk.Transform]:
    """(name, MR-like contrast on the CT's grid, CT (2 x 2 x 5 mm), its labels, the known transform)."""
    ct, labels = sitk.ReadImage(str(folder / "ct.nii.gz"), sitk.sitkFloat32), sitk.ReadImage(str(folder / "labels.nii.gz"))
    spacing = [2.0, 2.0, 5.0]
    size = [int(n * s / t) for n, s, t in zip(ct.GetSize(), ct.GetSpacing(), spacing)]
    grid = lambda im, how, default: sitk.Resample(im, size, sitk.Transform(), how, im.GetOrigin(), spacing, im.GetDirection(), default)  # noqa: E731
    moving, moving_labels = grid(ct, sitk.sitkLinear, -1000.0), grid(labels, sitk.sitkNearestNeighbor, 0)
    hu = sitk.GetArrayFromImage(moving)
    mr = np.interp(hu, [-1000, -900, -500, -150, -60, 20, 60, 200, 400, 2000], [0, 10, 20, 220, 230, 120, 110, 60, 30, 20])
    contrast = sitk.GetImageFromArray(mr.astype(np.float32))
    contrast.CopyInformation(moving)
    transform = known_transform(moving, seed=28, scale=(1.06, 0.95, 1.04), degrees=(4.0, -5.0, 8.0),
                                shift=(8.0, -6.0, 5.0), amplitude_mm=3.0, control_mm=50.0)
    return "ct_mrlike", contrast, moving, moving_labels, transform


if __name__ == "__main__":
    main()
