"""The compute device: ``auto`` (a CUDA GPU when PyTorch sees one, else the CPU), ``cpu``, ``cuda``,
``cuda:K`` (the K-th GPU) or ``mps`` (Apple GPUs, where PyTorch offers it).

Shared by inference (:mod:`dlir.register`), training (:mod:`dlir.training.trainer`) and evaluation.
Every other value, and a device this machine does not have, is refused with one sentence
(:class:`~dlir.errors.DeviceError`).
"""

from __future__ import annotations

import re

import torch

from .errors import DeviceError

#: what a user may ask for (``K``: a GPU's number, 0 for the first)
DEVICE_CHOICES = "auto, cpu, cuda, cuda:K (K the GPU's number) or mps"

_CUDA_INDEX = re.compile(r"cuda:([0-9]{1,4})")


def resolve_device(device: str) -> torch.device:
    """The torch device for ``device``; raises :class:`DeviceError` with one sentence when it is unknown or absent.

    ``auto`` -> CUDA when available, else the CPU.  ``cuda`` / ``cuda:K`` need a CUDA GPU (and K
    below the number of GPUs); ``mps`` needs Apple's Metal backend.
    """
    if not isinstance(device, str):
        raise DeviceError(f"the device must be a name ({DEVICE_CHOICES}), got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    index = _CUDA_INDEX.fullmatch(device)
    if device == "cuda" or index:
        if not torch.cuda.is_available():
            raise DeviceError(f"no CUDA GPU is available to PyTorch here, so device {device!r} cannot be used; "
                              "choose the CPU (device 'cpu') or 'auto'")
        count = torch.cuda.device_count()
        if index and int(index.group(1)) >= count:
            raise DeviceError(f"there is no GPU {device}: PyTorch sees {count} GPU(s) here, "
                              f"cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}")
        return torch.device(f"cuda:{int(index.group(1))}" if index else "cuda")
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError("Apple's MPS GPU backend is not available to PyTorch here; choose the CPU (device 'cpu') or 'auto'")
        return torch.device("mps")
    shown = device if len(device) <= 40 else device[:37] + "..."
    raise DeviceError(f"unknown device {shown!r}: use {DEVICE_CHOICES}")
