"""The stack chooser: the registry with a one-line manifest summary, "add stack from file", a cache
of loaded stacks (a stack stays loaded between runs), and the modality check against the manifest.

The registry is the engine's (``dlir.stack.list_stacks``): extra folders given by the caller, the
user's model folder (``$DLIR_MODELS_DIR`` or ``~/.dlir/models``) and the bundled ``Resources/Models``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dlir.errors import StackError
from dlir.stack import Stack, StackInfo, describe, install_stack, list_stacks, load_stack


def listStacks(extraDirs: tuple[Path, ...] = ()) -> list[StackInfo]:
    """Every valid stack of the registry (a name found twice is listed once)."""
    return list_stacks(tuple(Path(d) for d in extraDirs))


def stackSummary(info: StackInfo) -> str:
    """One line for the chooser: name, modality, anatomy, network grids (mm) and validation scores."""
    manifest = info.manifest
    grids = ", ".join(f"{s.kind} {'x'.join(f'{v:g}' for v in s.spacing_mm)} mm" for s in manifest.recipe.stages)
    parts = [manifest.name, f"{manifest.modality or 'any modality'}, {manifest.anatomy or 'any anatomy'}", grids]
    scores = [f"{key} {value:.3g}" for key, value in manifest.validation.items() if isinstance(value, (int, float))]
    if scores:
        parts.append("validation: " + ", ".join(scores[:4]))
    return " | ".join(parts)


def stackDetails(info: StackInfo) -> str:
    """The full manifest, as ``dlir info`` prints it (tooltip / details box)."""
    return describe(info.manifest, info.path)


def addStackFromFile(path: str | Path, modelsFolder: str | Path | None = None, overwrite: bool = False) -> StackInfo:
    """Validate a stack file and copy it into the user's model folder (``dlir.stack.install_stack``).

    Raises :class:`dlir.errors.StackError` with one sentence when the file is not a usable stack or
    a different file of that name is already there (unless ``overwrite``).
    """
    return install_stack(path, modelsFolder, overwrite)


class StackCache:
    """Loaded stacks by file, reloaded only when the file changes (so repeated runs skip loading)."""

    def __init__(self) -> None:
        self._stacks: dict[Path, tuple[float, Stack]] = {}

    def get(self, stack: str | Path, extraDirs: tuple[Path, ...] = ()) -> Stack:
        """The stack of a file path or registry name, fully validated on first load."""
        from dlir.stack import resolve_stack

        path = resolve_stack(stack, tuple(extraDirs)).resolve()
        if not path.is_file():
            raise StackError(f"the stack file {path} does not exist")
        mtime = path.stat().st_mtime
        cached = self._stacks.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, load_stack(path))
            self._stacks[path] = cached
        return cached[1]


def modalityWarning(modality: str, image: sitk.Image, what: str) -> str | None:
    """A sentence when the image's intensities do not look like the stack's modality (CT or MR), else None.

    Heuristic: a CT holds air (values <= -500 HU); an MR image has no values that low.
    """
    kind = modality.upper()
    isCT, isMR = "CT" in kind, "MR" in kind
    if isCT == isMR:
        return None
    lowest = float(np.min(sitk.GetArrayViewFromImage(image)))
    if isCT and lowest > -500:
        return f"the stack was trained on {modality}, but the {what} has no air-like values (minimum {lowest:g}); is it a CT in Hounsfield units?"
    if isMR and lowest <= -500:
        return f"the stack was trained on {modality}, but the {what} has values down to {lowest:g}, as a CT has; results may be poor"
    return None
