#!/usr/bin/env python3
"""The bundled stacks' networks on the CPU: PyTorch eager against ONNX Runtime (issue 28, item 1).

For one development pair and one stack: every stage's network inputs as ``register`` makes them,
then each network timed in one process, interleaved (eager, ORT, eager, ORT, ... best of
``--repeats``) at 1 and 2 threads, and ORT's output against eager's as the stage's displacement
(mm, on the stage's grid).  Then the whole registration with every stage's network run by ORT
against eager: the displacement on the fixed grid (mm) and the labels' Dice.  Absolute times depend
on the machine's load: compare the ratios of one run.

    PYTHONPATH=DLIRRegistration:.rt python Testing/benchmarks/cpu_runtime.py ../shared/data/pairs/mni_iso2mm \\
        --stack brain-mri [--repeats 5]
(``.rt``: ``pip install --target .rt onnxruntime==1.31.1 onnx==1.23.2``)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from dlir.metrics import dice
from dlir.runtime import OnnxNetwork, export
from dlir.register import register
from dlir.stack import load_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pair", type=Path)
    parser.add_argument("--stack", default="brain-mri")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    fixed, moving = (sitk.ReadImage(str(args.pair / f"{n}.nii.gz")) for n in ("fixed", "moving"))
    labels, reference = (sitk.ReadImage(str(args.pair / f"{n}_labels.nii.gz")) for n in ("moving", "fixed"))
    stack = load_stack(args.stack).eval()
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    eager_predict = [stage.predict for stage in stack.stages]
    for stage, predict in zip(stack.stages, eager_predict):
        stage.predict = lambda f, m, predict=predict: inputs.append((f, m)) or predict(f, m)  # type: ignore[method-assign]
    torch.set_num_threads(2)
    eager = register(fixed, moving, stack, device="cpu", moving_labels=labels, outputs=("labels", "displacement"))
    print(f"eager registration: {eager.timings}")
    models = [export(stage.net) for stage in stack.stages]
    print(f"{'stage':22s} {'grid':>14s} {'threads':>7s} {'eager (s)':>9s} {'ORT (s)':>8s} {'ratio':>6s} {'max |du| (mm)':>13s}")
    for k, (stage, (f, m), model) in enumerate(zip(stack.stages, inputs, models)):
        with torch.no_grad():
            reference_out = eager_predict[k](f, m)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runner = OnnxNetwork(model, threads)
            best = {"eager": np.inf, "ort": np.inf}
            out = None
            for _ in range(args.repeats):
                t = time.perf_counter()
                with torch.no_grad():
                    eager_predict[k](f, m)
                best["eager"] = min(best["eager"], time.perf_counter() - t)
                t = time.perf_counter()
                out = runner(f, m)
                best["ort"] = min(best["ort"], time.perf_counter() - t)
            raw = out
            if stage.spec.kind == "bspline":
                scale = torch.tensor(stage.spec.spacing_mm).view(1, 3, 1, 1, 1)
                du = float(((stage.upsample(raw) - stage.upsample(reference_out)) * scale).abs().max())
            else:
                du = float((raw - reference_out).abs().max())
            shape = "x".join(str(s) for s in f.shape[2:])
            print(f"{k + 1}/{len(stack.stages)} {stage.spec.kind:18s} {shape:>14s} {threads:7d} {best['eager']:9.3f} "
                  f"{best['ort']:8.3f} {best['eager'] / best['ort']:5.2f}x {du:13.2e}")
    # the whole registration with ORT's networks
    torch.set_num_threads(2)
    for stage, model in zip(stack.stages, models):
        stage.predict = OnnxNetwork(model, 2)  # type: ignore[method-assign]
    with_ort = register(fixed, moving, stack, device="cpu", moving_labels=labels, outputs=("labels", "displacement"))
    gap = np.abs(sitk.GetArrayViewFromImage(with_ort.displacement) - sitk.GetArrayViewFromImage(eager.displacement))
    d_eager, d_ort = dice(reference, eager.warped_labels), dice(reference, with_ort.warped_labels)
    print(f"whole registration, ORT against eager: displacement max {gap.max():.2e} mm, mean {gap.mean():.2e} mm; "
          f"Dice {np.mean(list(d_eager.values())):.4f} / {np.mean(list(d_ort.values())):.4f}")
    print(f"ORT registration: {with_ort.timings}")


if __name__ == "__main__":
    main()
