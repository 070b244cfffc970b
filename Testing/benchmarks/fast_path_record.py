"""Record what one version of the engine makes on the development pairs (issue 16: fast path vs before).

    PYTHONPATH=<checkout>/DLIRRegistration python fast_path_record.py OUT.npz
    python fast_path_record.py --compare BEFORE.npz AFTER.npz

Per pair (``../shared/data/pairs/*``; ``brain-mri`` for mni*/brain*, ``chest-ct`` for lung*): each
stage's network inputs, the displacement, warped image, labels, Jacobian and the Dice per label.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PAIRS = Path(__file__).resolve().parents[3] / "shared" / "data" / "pairs"  # ../shared/data beside the repository


def record(out: str) -> None:
    import SimpleITK as sitk
    import torch

    from dlir.metrics import dice
    from dlir.register import register
    from dlir.stack import load_stack, resolve_stack
    from dlir.stages import AffineStage, BSplineStage

    torch.set_num_threads(2)
    inputs: list[tuple[np.ndarray, np.ndarray]] = []
    for cls in (AffineStage, BSplineStage):
        def predict(self, f, m, original=cls.predict):
            inputs.append((f.detach().cpu().numpy(), m.detach().cpu().numpy()))
            return original(self, f, m)

        cls.predict = predict
    data = {}
    for pair in sorted(PAIRS.iterdir()):
        stack = load_stack(resolve_stack("chest-ct" if pair.name.startswith("lung") else "brain-mri"))

        def read(name: str, pair: Path = pair) -> sitk.Image:
            return sitk.ReadImage(str(pair / f"{name}.nii.gz"))

        inputs.clear()
        reg = register(read("fixed"), read("moving"), stack, moving_labels=read("moving_labels"), device="cpu")
        for k, (f, m) in enumerate(inputs):
            data[f"{pair.name}/stage{k}/fixed"], data[f"{pair.name}/stage{k}/moving"] = f, m
        data[f"{pair.name}/displacement"] = sitk.GetArrayFromImage(reg.displacement)
        data[f"{pair.name}/warped"] = sitk.GetArrayFromImage(reg.warped)
        data[f"{pair.name}/labels"] = sitk.GetArrayFromImage(reg.warped_labels)
        data[f"{pair.name}/jacobian"] = sitk.GetArrayFromImage(reg.jacobian)
        d = dice(read("fixed_labels"), reg.warped_labels)
        data[f"{pair.name}/dice"] = np.array([d[k] for k in sorted(d)])
        print(pair.name, {k: round(v, 4) for k, v in sorted(d.items())}, flush=True)
    np.savez_compressed(out, **data)


def compare(before: str, after: str) -> None:
    a, b = np.load(before), np.load(after)
    for key in a.files:
        x, y = a[key].astype(np.float64), b[key].astype(np.float64)
        if key.endswith("dice"):
            print(f"{key:45s} before {np.round(x, 4)} after {np.round(y, 4)} drop max {np.max(x - y):+.4f}")
        elif key.endswith("labels"):
            print(f"{key:45s} labels differing {np.mean(x != y) * 100:.3f} %")
        else:
            print(f"{key:45s} max |diff| {np.abs(x - y).max():.4g}  mean |diff| {np.abs(x - y).mean():.4g}  (range {x.min():.3g}..{x.max():.3g})")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        record(sys.argv[1])
