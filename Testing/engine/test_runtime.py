"""The stacks' networks on the CPU through ONNX Runtime (issue 28, :mod:`dlir.runtime`).

* On a development pair ONNX Runtime's registration equals PyTorch eager's within the stated bound
  (displacement 0.05 mm, Dice 0.002): the adopted runtime's acceptance test.
* The exported models are cached by the stack's content: a second use reads them, a changed weight exports anew.

Skipped with the install hint where ``onnxruntime`` is not installed (the ``test`` extra pins it, so CI runs them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dlir import runtime
from dlir.metrics import dice
from dlir.register import register
from dlir.stack import load_stack

pytestmark = pytest.mark.skipif(not runtime.available(), reason=f"ONNX Runtime is not installed: {runtime.INSTALL_HINT}")

#: the adoption bound of issue 28 (measured on this pair: displacement within 2e-5 mm, Dice equal)
DISPLACEMENT_BOUND_MM, DICE_BOUND = 0.05, 0.002
PAIR = "pairs/brain1_aniso_oblique"


def test_onnx_runtime_gives_eagers_registration_within_the_bound(shared_data: Path, monkeypatch) -> None:
    pair = shared_data / PAIR
    fixed, moving, labels, reference = (sitk.ReadImage(str(pair / f"{name}.nii.gz"))
                                        for name in ("fixed", "moving", "moving_labels", "fixed_labels"))
    stack = load_stack("brain-mri")
    options = dict(device="cpu", moving_labels=labels, outputs=("labels", "displacement"))
    used = runtime.inference_networks(stack, torch.device("cpu"))
    assert used is not None and all(isinstance(n, runtime.OnnxNetwork) for n in used)
    with_runtime = register(fixed, moving, stack, **options)
    monkeypatch.setattr(runtime, "available", lambda: False)  # PyTorch eager, as on a machine without the runtime
    eager = register(fixed, moving, stack, **options)
    gap = np.abs(sitk.GetArrayViewFromImage(with_runtime.displacement) - sitk.GetArrayViewFromImage(eager.displacement))
    assert gap.max() < DISPLACEMENT_BOUND_MM
    scores = [dice(reference, r.warped_labels) for r in (with_runtime, eager)]
    assert all(abs(scores[0][k] - scores[1][k]) < DICE_BOUND for k in scores[1])


def test_exported_networks_are_cached_by_the_stacks_content(fresh_stack_file: Path, tmp_path: Path) -> None:
    stack = load_stack(fresh_stack_file)
    digest = runtime.stack_digest(stack)
    first = runtime.networks(stack, digest, 1, cache=tmp_path)
    files = sorted((tmp_path / digest).glob("stage*.onnx"))
    assert len(files) == len(stack.stages) == len(first)
    stamps = [f.stat().st_mtime_ns for f in files]
    runtime.networks(stack, digest, 1, cache=tmp_path)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not exported again
    with torch.no_grad():
        next(stack.stages[-1].parameters()).add_(0.01)
    assert runtime.stack_digest(stack) != digest
    f, m = torch.rand((1, 1, 16, 16, 16)), torch.rand((1, 1, 16, 16, 16))
    with torch.no_grad():
        expected = stack.stages[0].predict(f, m)
    assert torch.allclose(first[0](f, m), expected, atol=1e-5)
