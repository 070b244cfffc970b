"""A stack's networks on the CPU through ONNX Runtime, for inference (PyTorch stays the path for training and GPUs).

Each stage's network is exported to ONNX (spatial axes dynamic: any network grid) from the weights
loaded from the stack file, which stays safetensors + JSON; the exported models are cached in
``cache/<digest>/stage<k>.onnx``, ``<digest>`` the SHA-256 of the stack's manifest and weights, so
an edited or retrained stack is exported anew.  ONNX Runtime runs them with
:data:`THREADS` threads (default: torch's).  Its output equals PyTorch's within float rounding
(measured on the development pairs: displacement within 2e-5 mm, Dice unchanged; test in
``Testing/engine/test_runtime.py``); its speed in ``Testing/benchmarks/RESULTS.md``.

Used by :func:`dlir.register.register` on the CPU when ``onnxruntime`` is installed (``pip install
-e ".[cpu]"``); without it, or on a GPU, PyTorch runs the networks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn

from .atomic import atomic_write
from .nets import BSplineNet

if TYPE_CHECKING:
    from .stack import Stack

log = logging.getLogger(__name__)

#: the exported models' cache: beside the user's models (``~/.dlir``), or ``DLIR_CACHE`` when set
DEFAULT_CACHE = Path.home() / ".dlir" / "cache" / "onnx"
#: ONNX opset of the exported models
OPSET = 17
#: how to install the runtime (an error's or a skipped test's hint)
INSTALL_HINT = 'pip install -e ".[cpu]" (onnxruntime==1.31.1, onnx==1.23.2)'


def available() -> bool:
    """True when ONNX Runtime (and ONNX, which the export writes with) can be imported."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def cache_folder() -> Path:
    """Where exported models are kept (:data:`DEFAULT_CACHE`, or the environment's ``DLIR_CACHE``)."""
    return Path(os.environ["DLIR_CACHE"]) if os.environ.get("DLIR_CACHE") else DEFAULT_CACHE


def stack_digest(stack: "Stack") -> str:
    """SHA-256 (hex) of the stack's manifest and weights: what an exported model is keyed by."""
    digest = hashlib.sha256(json.dumps(stack.manifest.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(stack.weights().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Plain(nn.Module):
    """A B-spline network's layers applied to the whole input (the export must not trace the CPU's slab-by-slab
    first block, :func:`dlir.nets._first_block_by_slices`, whose loop depends on the input's depth)."""

    def __init__(self, net: BSplineNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.net.output(self.net.features(torch.cat([fixed, moving], dim=1)))


def export(net: nn.Module) -> bytes:
    """``net`` (inputs fixed, moving ``[N, 1, D, H, W]``) as an ONNX model with dynamic batch and spatial axes."""
    model = _Plain(net) if isinstance(net, BSplineNet) else net
    example = torch.zeros((1, 1, 32, 32, 32))
    axes = {0: "n", 2: "d", 3: "h", 4: "w"}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes: the axes are declared dynamic
        torch.onnx.export(model.cpu().eval(), (example, example), buffer, input_names=["fixed", "moving"],
                          output_names=["out"], dynamic_axes={"fixed": axes, "moving": axes}, opset_version=OPSET,
                          dynamo=False)
    return buffer.getvalue()


class OnnxNetwork:
    """One exported network run by ONNX Runtime on the CPU: ``(fixed, moving) -> output`` as the PyTorch network."""

    def __init__(self, model: bytes, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        feed = {"fixed": _array(fixed), "moving": _array(moving)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


#: a stage's network for inference: ``(fixed, moving) -> output``, as ``stage.predict``
Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def inference_networks(stack: "Stack", device: torch.device) -> list[Network] | None:
    """The networks that run ``stack``'s stages for inference on ``device``: ONNX Runtime's on the CPU when it is
    installed (made once per stack content and thread count, kept on the stack object), else None (PyTorch's)."""
    if device.type != "cpu" or not available():
        return None
    key = (stack_digest(stack), torch.get_num_threads())
    held = getattr(stack, "_onnx_networks", None)
    if held is None or held[0] != key:
        held = (key, networks(stack, key[0], key[1]))
        stack._onnx_networks = held  # type: ignore[attr-defined]  # the sessions live as long as the loaded stack
    return list(held[1])


def networks(stack: "Stack", digest: str, threads: int, cache: Path | None = None) -> list[OnnxNetwork]:
    """Every stage's network of ``stack`` (whose :func:`stack_digest` is ``digest``) as an :class:`OnnxNetwork` with
    ``threads`` threads, exported once per stack content (cached in ``cache``, default :func:`cache_folder`)."""
    folder = (cache or cache_folder()) / digest
    runners = []
    for k, stage in enumerate(stack.stages):
        path = folder / f"stage{k}.onnx"
        if path.is_file():
            model = path.read_bytes()
        else:
            log.info("exporting stage %d of the stack '%s' for ONNX Runtime (once)", k + 1, stack.name)
            model = export(stage.net)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(path) as temp:
                    temp.write_bytes(model)
            except OSError as exc:  # a read-only home: exported again next time
                log.info("cannot cache the exported network in %s (%s)", path, exc)
        runners.append(OnnxNetwork(model, threads))
    return runners
