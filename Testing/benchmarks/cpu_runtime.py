#!/usr/bin/env python3
"""The bundled stacks' networks on the CPU: PyTorch eager, channels-last and bf16, ONNX Runtime fp32 and int8,
OpenVINO fp32 and bf16 (issue 28, item 1).

For each development pair and one stack: every stage's network inputs as ``register`` makes them (with eager's
networks), then each network timed in one process, the variants interleaved (eager, ort, ov, ..., eager, ort, ov,
... best of ``--repeats``, one untimed call of each first: OpenVINO compiles on its first call per input shape) at 1
and 2 threads, and each variant's output against eager's as the stage's displacement (mm, on the stage's grid; the
affine network's raw parameters).  Then the whole registration with every stage's network run by each variant
(``--threads-register`` threads, interleaved, best of ``--register-repeats``): the stages' seconds, the displacement
on the fixed grid against eager's (mm) and the labels' mean Dice.  Absolute times depend on the machine's load:
compare the ratios of one run, and read the load average printed at the start and end.

Variants (those whose runtime is not importable are left out, with a note):

* ``eager``: the stage's own ``predict`` (PyTorch's CPU kernels, the first block slab by slab);
* ``eager-cl``: the same with the weights and inputs in ``channels_last_3d`` memory format;
* ``eager-bf16``: the same under ``torch.autocast("cpu", torch.bfloat16)``;
* ``ort``: ONNX Runtime fp32 (:class:`dlir.runtime.OnnxNetwork`, today's engine on the CPU);
* ``ort-int8``: ONNX Runtime on the model quantised by ``onnxruntime.quantization.quantize_dynamic`` (uint8 weights
  and activations, no calibration);
* ``ov`` / ``ov-bf16``: OpenVINO's CPU plugin on the exported ONNX model, compiled per input shape with
  ``INFERENCE_PRECISION_HINT`` f32 / bf16; ``ov-dyn``: f32 compiled once with the model's dynamic spatial axes.

    PYTHONPATH=DLIRRegistration:.ov python Testing/benchmarks/cpu_runtime.py ../shared/data/pairs/mni_iso2mm \\
        --stack brain-mri [--repeats 5] [--variants eager ort ov]
(``.ov``: ``pip install --target .ov openvino==2026.4.1``; ONNX Runtime from the ``cpu`` extra)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

import dlir.runtime
from dlir.metrics import dice
from dlir.register import register
from dlir.runtime import OnnxNetwork, export
from dlir.stack import Stack, load_stack

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
VARIANTS = ("eager", "eager-cl", "eager-bf16", "ort", "ort-int8", "ov", "ov-bf16", "ov-dyn")


class _OpenVino:
    """An exported network run by OpenVINO's CPU plugin, compiled once per input shape (static shapes), or once for
    all shapes (``dynamic``)."""

    def __init__(self, model: bytes, threads: int, precision: str, dynamic: bool = False) -> None:
        import openvino as ov

        self.core, self.threads, self.precision, self.dynamic = ov.Core(), threads, precision, dynamic
        folder = tempfile.mkdtemp(prefix="dlir-ov-")
        self.path = os.path.join(folder, "net.onnx")
        Path(self.path).write_bytes(model)
        self.compiled: dict[tuple[int, ...], object] = {}
        self.compile_s = 0.0

    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        shape = () if self.dynamic else tuple(fixed.shape)
        if shape not in self.compiled:
            t = time.perf_counter()
            model = self.core.read_model(self.path)
            if shape:
                model.reshape({"fixed": list(shape), "moving": list(shape)})
            self.compiled[shape] = self.core.compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": self.precision,
                "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
            self.compile_s += time.perf_counter() - t
        feed = {"fixed": fixed.detach().float().contiguous().numpy(), "moving": moving.detach().float().contiguous().numpy()}
        result = self.compiled[shape](feed)  # type: ignore[operator]
        return torch.from_numpy(np.asarray(next(iter(result.values()))).copy())


def _quantised(model: bytes) -> bytes:
    """``model`` with its weights and activations quantised to uint8 by ONNX Runtime's dynamic quantisation."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(model)
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8)
        return target.read_bytes()


def _eager(stage: torch.nn.Module, how: str) -> Network:
    """The stage's PyTorch network: as it is, in channels-last layout, or under bf16 autocast."""
    if how == "cl":
        net = copy.deepcopy(stage).to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]

        def channels_last(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            layout = torch.channels_last_3d
            with torch.no_grad():
                return net.predict(f.contiguous(memory_format=layout), m.contiguous(memory_format=layout)).contiguous()
        return channels_last
    if how == "bf16":
        def bf16(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return stage.predict(f, m).float()  # type: ignore[operator]
        return bf16

    def plain(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return stage.predict(f, m)  # type: ignore[operator]
    return plain


def available(variants: list[str]) -> list[str]:
    """The variants whose runtime imports here (a note for each left out)."""
    found = {"ort": importlib.util.find_spec("onnxruntime") is not None,
             "ov": importlib.util.find_spec("openvino") is not None}
    kept = [v for v in variants if found.get(v.split("-")[0], True)]
    for v in sorted(set(variants) - set(kept)):
        print(f"note: {v} left out (its runtime is not installed)")
    return kept


def networks(stack: Stack, models: list[bytes], int8: list[bytes] | None, variant: str, threads: int) -> list[Network]:
    """One network per stage of ``stack`` for ``variant`` with ``threads`` threads."""
    out: list[Network] = []
    for k, stage in enumerate(stack.stages):
        if variant.startswith("eager"):
            out.append(_eager(stage, variant[6:]))
        elif variant == "ort":
            out.append(OnnxNetwork(models[k], threads))
        elif variant == "ort-int8":
            assert int8 is not None
            out.append(OnnxNetwork(int8[k], threads))
        else:
            out.append(_OpenVino(models[k], threads, "bf16" if variant.endswith("bf16") else "f32", variant == "ov-dyn"))
    return out


def _displacement_gap(stage: torch.nn.Module, raw: torch.Tensor, reference: torch.Tensor) -> float:
    """max |difference| of a stage's output: mm of its dense field (B-spline), raw parameters (affine)."""
    if stage.spec.kind == "bspline":  # type: ignore[union-attr]
        scale = torch.tensor(stage.spec.spacing_mm).view(1, 3, 1, 1, 1)  # type: ignore[union-attr]
        return float(((stage.upsample(raw.float()) - stage.upsample(reference)) * scale).abs().max())  # type: ignore[operator]
    return float((raw.float() - reference).abs().max())


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _register(pair: Path, stack: Stack, nets: list[Network] | None, labels: sitk.Image, images: tuple[sitk.Image, sitk.Image]):
    """``register`` with ``nets`` running the stages' networks (None: the engine's own choice)."""
    original = dlir.runtime.inference_networks
    if nets is not None:
        dlir.runtime.inference_networks = lambda *_: list(nets)  # type: ignore[assignment]
    try:
        return register(*images, stack, device="cpu", moving_labels=labels, outputs=("labels", "displacement"))
    finally:
        dlir.runtime.inference_networks = original


def bench_pair(pair: Path, stack: Stack, variants: list[str], repeats: int, register_repeats: int,
               register_threads: int, models: list[bytes], int8: list[bytes] | None) -> None:
    images = tuple(sitk.ReadImage(str(pair / f"{n}.nii.gz")) for n in ("fixed", "moving"))
    labels, reference = (sitk.ReadImage(str(pair / f"{n}_labels.nii.gz")) for n in ("moving", "fixed"))
    torch.set_num_threads(register_threads)
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    eager = networks(stack, models, int8, "eager", register_threads)
    recording = [lambda f, m, net=net: inputs.append((f, m)) or net(f, m) for net in eager]
    eager_reg = _register(pair, stack, recording, labels, images)  # type: ignore[arg-type]
    print(f"\n## {pair.name} ({stack.name}), load {_load()}")
    print("| stage | grid | threads | " + " | ".join(f"{v} (s)" for v in variants) + " | "
          + " | ".join(f"{v} - eager (mm)" for v in variants if v != "eager") + " |")
    print("| --- " * (3 + 2 * len(variants) - 1) + "|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runners = {v: networks(stack, models, int8, v, threads) for v in variants}
        for k, (stage, (f, m)) in enumerate(zip(stack.stages, inputs)):
            with torch.no_grad():
                reference_out = eager[k](f, m)
            outs = {v: runners[v][k](f, m) for v in variants}  # the untimed first call (OpenVINO compiles)
            best = dict.fromkeys(variants, np.inf)
            for _ in range(repeats):
                for v in variants:
                    t = time.perf_counter()
                    runners[v][k](f, m)
                    best[v] = min(best[v], time.perf_counter() - t)
            gaps = [f"{_displacement_gap(stage, outs[v], reference_out):.1e}" for v in variants if v != "eager"]
            shape = "x".join(str(s) for s in f.shape[2:])
            print(f"| {k + 1}/{len(stack.stages)} {stage.spec.kind} | {shape} | {threads} | "
                  + " | ".join(f"{best[v]:.3f}" for v in variants) + " | " + " | ".join(gaps) + " |")
    # the whole registration per variant, interleaved
    torch.set_num_threads(register_threads)
    runners = {v: networks(stack, models, int8, v, register_threads) for v in variants}
    best_reg: dict[str, tuple[float, object]] = {}
    for _ in range(register_repeats):
        for v in variants:
            reg = _register(pair, stack, runners[v], labels, images)
            seconds = sum(s for name, s in reg.timings.items() if name.startswith("stage"))
            if v not in best_reg or seconds < best_reg[v][0]:
                best_reg[v] = (seconds, reg)
    print(f"\nwhole registration, {register_threads} threads, load {_load()}: the stages' networks (s, best of "
          f"{register_repeats}), against eager's: displacement max / mean (mm), mean Dice, compilation (s)")
    d_eager = float(np.mean(list(dice(reference, eager_reg.warped_labels).values())))
    for v in variants:
        seconds, reg = best_reg[v]
        gap = np.abs(sitk.GetArrayViewFromImage(reg.displacement) - sitk.GetArrayViewFromImage(eager_reg.displacement))  # type: ignore[attr-defined]
        d = float(np.mean(list(dice(reference, reg.warped_labels).values())))  # type: ignore[attr-defined]
        compile_s = sum(getattr(net, "compile_s", 0.0) for net in runners[v])  # OpenVINO: once per shape, not in best
        print(f"| {v} | {seconds:.3f} | {gap.max():.2e} / {gap.mean():.2e} | {d:.4f} ({d - d_eager:+.4f}) | "
              f"{compile_s:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", type=Path, nargs="+")
    parser.add_argument("--stack", default="brain-mri")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--register-repeats", type=int, default=1)
    parser.add_argument("--threads-register", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    variants = available(args.variants)
    stack = load_stack(args.stack).eval()
    t = time.perf_counter()
    models = [export(stage.net) for stage in stack.stages]
    print(f"load {_load()}; export {time.perf_counter() - t:.2f} s")
    int8 = None
    if "ort-int8" in variants:
        t = time.perf_counter()
        int8 = [_quantised(model) for model in models]
        print(f"int8 quantisation {time.perf_counter() - t:.2f} s")
    for pair in args.pairs:
        bench_pair(pair, stack, variants, args.repeats, args.register_repeats, args.threads_register, models, int8)
    print(f"\nload at the end {_load()}")


if __name__ == "__main__":
    main()
