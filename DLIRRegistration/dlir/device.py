"""The compute device: ``auto`` (a CUDA GPU when PyTorch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:K``.

Shared by inference (:mod:`dlir.register`) and training (:mod:`dlir.training.trainer`).
"""

from __future__ import annotations

import torch

from .errors import DeviceError


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("no CUDA GPU is available to PyTorch here; choose the CPU (device 'cpu') or 'auto'")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DeviceError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)
