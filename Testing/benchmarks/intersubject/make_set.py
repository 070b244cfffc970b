"""The inter-subject development set (issue 25): pairs of different subjects and CT capture cases.

    .venv/bin/python Testing/benchmarks/intersubject/make_set.py [--data ../shared/data] [--out out/intersubject]

Writes ``OUT/pairs.csv`` (the format of ``dlir evaluate`` / ``dlir bench``) and, for the pairs it has to make,
``OUT/pairs/NAME/{fixed,moving,fixed_labels,moving_labels}.nii.gz``:

- ``brain_2to1``, ``brain_1to2``: the two real tumour-patient T1 MRs (0.78 x 0.78 x 6.5 mm, different fields of
  view), head masks as labels (the shipped derived masks).
- ``mni_to_brain1``, ``mni_to_brain2``, ``brain1_to_mni``, ``brain2_to_mni``: the MNI152 template (1 mm, whole
  head) against each patient (162 / 150 mm of slices); the template's head mask is derived here as the patients'
  were (Otsu on the Gaussian-smoothed image, largest component, holes filled per slice).
- ``ct_capture_cut``: the chest CT under a strong known transform (10-13 % scale, 10-12 degree rotations, a
  B-spline with control points 50 mm apart), the moving scan's top third (lung apices) cut away and its origin
  moved by 417 mm: the lungs do not overlap before registration and the grids' centres are 40 mm apart.
- ``ct_capture_fixedcut``: the same with the roles turned: the fixed scan lacks its lower quarter, the moving one
  is whole, 12 % larger, origin 300-500 mm away.

Fixed image ``fixed(x) = moving(T(x) + d)`` for the CT cases (``T`` the known transform, ``d`` the moved origin):
LPS mm, ITK's direction (fixed point -> moving point).  Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[3]


def head_mask(image: sitk.Image) -> sitk.Image:
    """Otsu on the Gaussian-smoothed image, largest connected component, holes filled slice by slice (uint8)."""
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), 2.0)
    mask = sitk.OtsuThreshold(smooth, 0, 1)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    largest = sitk.BinaryThreshold(components, 1, 1, 1, 0)
    slices = [sitk.BinaryFillhole(largest[:, :, k]) for k in range(largest.GetDepth())]
    filled = sitk.JoinSeries(slices)
    filled.CopyInformation(largest)
    return sitk.Cast(filled, sitk.sitkUInt8)


def rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    """R = Rz @ Ry @ Rx for rotations (degrees) about the LPS x, y and z axes."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def known_transform(ref: sitk.Image, seed: int, scale: tuple[float, float, float], degrees: tuple[float, float, float],
                    shift: tuple[float, float, float], amplitude_mm: float, control_mm: float) -> sitk.CompositeTransform:
    """``T = A o B`` (fixed point -> source point, LPS mm): a cubic B-spline ``B`` (control points ``control_mm`` apart,
    Gaussian coefficients of ``amplitude_mm``), then the affine ``A`` about the grid's centre."""
    rng = np.random.default_rng(seed)
    extent = np.array(ref.GetSize()) * np.array(ref.GetSpacing())
    bspline = sitk.BSplineTransformInitializer(ref, [max(1, int(round(e / control_mm))) for e in extent], 3)
    bspline.SetParameters(rng.normal(0.0, amplitude_mm, len(bspline.GetParameters())).tolist())
    centre = np.array(ref.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ref.GetSize()]))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((rotation(degrees) @ np.diag(scale)).ravel().tolist())
    affine.SetCenter(centre.tolist())
    affine.SetTranslation(list(shift))
    return sitk.CompositeTransform([affine, bspline])


def crop_k(image: sitk.Image, start: int, stop: int) -> sitk.Image:
    """Slices ``start .. stop-1`` along k (the origin follows)."""
    return image[:, :, start:stop]


def moved(image: sitk.Image, offset: tuple[float, float, float]) -> sitk.Image:
    """The same voxels with the origin moved by ``offset`` mm (LPS)."""
    out = sitk.Image(image)
    out.SetOrigin(tuple(float(o + d) for o, d in zip(image.GetOrigin(), offset)))
    return out


def ct_case(data: Path, out: Path, name: str, transform_args: dict, fixed_slices: tuple[float, float],
            moving_slices: tuple[float, float], offset: tuple[float, float, float]) -> tuple[Path, Path, Path, Path]:
    """A CT capture case: the fixed scan is the CT under the known transform on (part of) its own grid, the moving scan
    (part of) the CT with its origin moved by ``offset``; ``*_slices`` are the kept shares (from, to) along k."""
    ct = sitk.ReadImage(str(data / "chest_ct_lung1" / "ct.nii.gz"))
    labels = sitk.Threshold(sitk.ReadImage(str(data / "chest_ct_lung1" / "labels.nii.gz")), 0, 2, 0)  # the lungs
    depth = ct.GetDepth()
    fk = (int(round(fixed_slices[0] * depth)), int(round(fixed_slices[1] * depth)))
    mk = (int(round(moving_slices[0] * depth)), int(round(moving_slices[1] * depth)))
    ref = crop_k(ct, *fk)
    transform = known_transform(ref, **transform_args)
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                              ref.GetSpacing(), ref.GetDirection())
    det = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    if det.min() <= 0.05:
        raise SystemExit(f"{name}: the known transform folds (min det J {det.min():.3f}); lower the amplitude")
    warp = sitk.DisplacementFieldTransform(sitk.Image(field))
    fixed = sitk.Cast(sitk.Resample(ct, ref, warp, sitk.sitkLinear, -1024.0, sitk.sitkFloat32), sitk.sitkInt16)
    fixed_labels = sitk.Resample(labels, ref, warp, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    moving = moved(crop_k(ct, *mk), offset)
    moving_labels = moved(crop_k(labels, *mk), offset)
    folder = out / "pairs" / name
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for image, file in ((fixed, "fixed"), (moving, "moving"), (fixed_labels, "fixed_labels"), (moving_labels, "moving_labels")):
        sitk.WriteImage(image, str(folder / f"{file}.nii.gz"), useCompression=True)
        files.append(folder / f"{file}.nii.gz")
    return files[0], files[1], files[2], files[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "intersubject")
    args = parser.parse_args()
    data, out = args.data.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    mni = data / "mni152_2009a_sym" / "t1.nii.gz"
    mni_mask = out / "mni_head_mask.nii.gz"
    if not mni_mask.exists():
        sitk.WriteImage(head_mask(sitk.ReadImage(str(mni))), str(mni_mask), useCompression=True)
    brain = {k: (data / f"brain_mr_tumor{k}" / "t1.nii.gz", data / f"brain_mr_tumor{k}" / "head_mask.nii.gz") for k in (1, 2)}
    subjects = {"brain1": brain[1], "brain2": brain[2], "mni": (mni, mni_mask)}
    rows = []
    for fixed, moving in (("brain1", "brain2"), ("brain2", "brain1"), ("brain1", "mni"), ("brain2", "mni"),
                          ("mni", "brain1"), ("mni", "brain2")):
        name = f"{moving}_to_{fixed}".replace("brain2_to_brain1", "brain_2to1").replace("brain1_to_brain2", "brain_1to2")
        (f, fl), (m, ml) = subjects[fixed], subjects[moving]
        rows.append((name, f, m, fl, ml))
    cases = {
        "ct_capture_cut": dict(transform_args=dict(seed=25, scale=(0.88, 0.90, 0.87), degrees=(10.0, -6.0, 12.0),
                                                   shift=(15.0, -20.0, 10.0), amplitude_mm=4.0, control_mm=50.0),
                               fixed_slices=(0.0, 1.0), moving_slices=(0.0, 0.67), offset=(120.0, -80.0, 417.0)),
        "ct_capture_fixedcut": dict(transform_args=dict(seed=26, scale=(1.12, 1.12, 1.10), degrees=(-8.0, 5.0, -11.0),
                                                        shift=(-10.0, 12.0, -8.0), amplitude_mm=4.0, control_mm=50.0),
                                    fixed_slices=(0.25, 1.0), moving_slices=(0.0, 1.0), offset=(-300.0, 350.0, -500.0)),
    }
    for name, case in cases.items():
        files = out / "pairs" / name
        if (files / "moving_labels.nii.gz").exists():
            f, m, fl, ml = (files / f"{n}.nii.gz" for n in ("fixed", "moving", "fixed_labels", "moving_labels"))
        else:
            f, m, fl, ml = ct_case(data, out, name, **case)
        rows.append((name, f, m, fl, ml))
    with open(out / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "fixed", "moving", "fixed_labels", "moving_labels", "landmarks", "gt_displacement"])
        for name, f, m, fl, ml in rows:
            writer.writerow([name, f, m, fl, ml, "", ""])
    print(f"{len(rows)} pairs in {out / 'pairs.csv'}")


if __name__ == "__main__":
    main()
