"""The rule for a stack's name, which becomes its file name ``NAME.safetensors``.

One rule for every place that takes a name: a stack's manifest when it is read, a stack when it is
saved, and a training job's configuration before it trains (so a job is never refused only when it
saves its stack).  Imports nothing heavy: the Slicer modules check names without PyTorch.
"""

from __future__ import annotations

#: the longest stack name, in characters
MAX_NAME_LENGTH = 100


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a stack's name (it becomes ``NAME.safetensors``), or None when it can."""
    if not isinstance(name, str) or not name.strip():
        return "the name must be a non-empty string"
    if len(name) > MAX_NAME_LENGTH:
        return f"the name is longer than {MAX_NAME_LENGTH} characters"
    if name.startswith(".") or any(c in name for c in "/\\:") or not name.isprintable():
        return f"{name!r} cannot be a file name (no '/', '\\', ':', leading '.' or control characters)"
    return None
