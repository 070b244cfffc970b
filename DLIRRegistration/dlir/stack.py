"""Stage stacks: the model file format, its validation and the registry of available stacks.

A stack is one ``NAME.safetensors`` file.  Its tensors are the weights of every stage, named
``stage{k}.{parameter}``; its safetensors metadata holds one key, ``dlir``, whose value is the
JSON manifest (:class:`Manifest`): format version, name, description, modality, anatomy, the
recipe (stages, network grids, intensity normalisation, initial alignment), training provenance
and validation scores.  Model files are data: they are never unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import StackError
from .recipe import Recipe
from .stages import build_stage

FORMAT = "dlir-stack"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"


@dataclass
class Manifest:
    """What a stack is, how to rebuild it and how well it did (JSON in the file's metadata)."""

    name: str
    recipe: Recipe
    description: str = ""
    modality: str = ""
    anatomy: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    engine_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dimension": 3,
            "name": self.name,
            "description": self.description,
            "modality": self.modality,
            "anatomy": self.anatomy,
            "recipe": self.recipe.to_dict(),
            "training": self.training,
            "validation": self.validation,
            "engine_version": self.engine_version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the stack") -> "Manifest":
        if data.get("format") != FORMAT:
            raise StackError(f"{source} is not a DLIR stage stack (its manifest has no 'format: {FORMAT}')")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise StackError(f"{source} has an invalid format version {version!r}")
        if version > FORMAT_VERSION:
            raise StackError(
                f"{source} uses stack format version {version}, but this DLIR reads up to version {FORMAT_VERSION}; update DLIR"
            )
        dimension = data.get("dimension", 3)
        if dimension != 3:
            made_for = f"{dimension}D" if isinstance(dimension, int) else f"{dimension!r}-dimensional"
            raise StackError(f"{source} was made for {made_for} images; DLIR registers 3D images")
        if not data.get("name"):
            raise StackError(f"{source} has no name in its manifest")
        for key in ("recipe", "training", "validation"):
            if not isinstance(data.get(key, {}), dict):
                raise StackError(f"{source} has a malformed manifest: '{key}' must be a JSON object")
        try:
            recipe = Recipe.from_dict(data.get("recipe", {}))
        except StackError as exc:
            raise StackError(f"{source}: {exc}") from exc
        return cls(
            name=str(data["name"]),
            recipe=recipe,
            description=str(data.get("description", "")),
            modality=str(data.get("modality", "")),
            anatomy=str(data.get("anatomy", "")),
            training=dict(data.get("training", {})),
            validation=dict(data.get("validation", {})),
            engine_version=str(data.get("engine_version", "")),
        )


class Stack(nn.Module):
    """A trained (or freshly initialised) stage stack: manifest plus one module per stage."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__()
        self.manifest = manifest
        self.stages = nn.ModuleList([build_stage(spec) for spec in manifest.recipe.stages])

    @property
    def name(self) -> str:
        return self.manifest.name

    def weights(self) -> dict[str, torch.Tensor]:
        """All weights as ``stage{k}.{parameter}`` -> tensor (the file's tensor names)."""
        return {
            f"stage{k}.{name}": tensor
            for k, stage in enumerate(self.stages)
            for name, tensor in stage.state_dict().items()
        }

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str = "the stack") -> None:
        """Load ``stage{k}.{parameter}`` tensors, refusing missing, extra or misshaped ones."""
        expected = self.weights()
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise StackError(f"{source} lacks {len(missing)} weight tensor(s), first {missing[0]}; the file is incomplete or for another recipe")
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise StackError(f"{source} has unexpected tensor {extra[0]}; it does not match its own recipe")
        for name, ref in expected.items():
            if tuple(tensors[name].shape) != tuple(ref.shape):
                raise StackError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(ref.shape)}")
        for k, stage in enumerate(self.stages):
            prefix = f"stage{k}."
            stage.load_state_dict({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})


def build_stack(manifest: Manifest, seed: int | None = None) -> Stack:
    """A stack with freshly initialised (Glorot) weights; ``seed`` makes them reproducible."""
    if seed is None:
        return Stack(manifest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Stack(manifest)


def save_stack(stack: Stack, path: str | Path) -> Path:
    """Write ``stack`` to ``path`` (``.safetensors``), atomically (a temporary file, then rename)."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise StackError(f"a stack file must end in {SUFFIX}, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in stack.weights().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"dlir": json.dumps(stack.manifest.to_dict())})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # an ordinary data file (the writer makes it private)
    os.replace(tmp, path)
    return path


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of a stack file, without loading its weights."""
    path = Path(path)
    with _open(path) as f:
        return _manifest_of(f, path)


def load_stack(stack: str | Path, extra_dirs: tuple[Path, ...] = ()) -> Stack:
    """Load a stack from a file path or a registry name (see :func:`resolve_stack`), fully validated."""
    path = resolve_stack(stack, extra_dirs)
    with _open(path) as f:
        manifest = _manifest_of(f, path)
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    result = Stack(manifest)
    result.load_weights(tensors, source=f"the stack {path.name}")
    return result.eval()


def _open(path: Path):
    if not path.is_file():
        raise StackError(f"the stack file {path} does not exist")
    if path.stat().st_size < 8:
        raise StackError(f"the stack file {path} is empty or truncated")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise StackError(
            f"{path.name} is not a valid safetensors stack file (corrupt, truncated, or another format such as a pickle): {exc}"
        ) from exc


def _manifest_of(f: Any, path: Path) -> Manifest:
    metadata = f.metadata() or {}
    if "dlir" not in metadata:
        raise StackError(f"{path.name} is a safetensors file but not a DLIR stack (no 'dlir' manifest in its metadata)")
    try:
        data = json.loads(metadata["dlir"])
    except json.JSONDecodeError as exc:
        raise StackError(f"the manifest of {path.name} is not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise StackError(f"the manifest of {path.name} is not a JSON object")
    return Manifest.from_dict(data, source=f"the stack {path.name}")


# ------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class StackInfo:
    """A stack found by the registry: its name, file and manifest."""

    name: str
    path: Path
    manifest: Manifest


def bundled_models_dir() -> Path:
    """``Resources/Models`` of the extension (the stacks shipped with DLIR)."""
    return Path(__file__).resolve().parents[2] / "Resources" / "Models"


def user_models_dir() -> Path:
    """The user's model folder: ``$DLIR_MODELS_DIR`` if set, else ``~/.dlir/models``."""
    return Path(os.environ.get("DLIR_MODELS_DIR", Path.home() / ".dlir" / "models"))


def model_dirs(extra_dirs: tuple[Path, ...] = ()) -> list[Path]:
    """Where the registry looks, in order: extra folders (e.g. Slicer's setting), user, bundled."""
    return [Path(d) for d in extra_dirs] + [user_models_dir(), bundled_models_dir()]


def list_stacks(extra_dirs: tuple[Path, ...] = ()) -> list[StackInfo]:
    """Every valid stack in the registry folders; a name found twice is listed once (first folder wins).

    Unreadable files are skipped (``dlir info FILE`` says why).
    """
    found: dict[str, StackInfo] = {}
    for folder in model_dirs(extra_dirs):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(f"*{SUFFIX}")):
            try:
                manifest = read_manifest(path)
            except StackError:
                continue
            found.setdefault(manifest.name, StackInfo(manifest.name, path, manifest))
    return list(found.values())


def resolve_stack(stack: str | Path, extra_dirs: tuple[Path, ...] = ()) -> Path:
    """A stack's file: ``stack`` itself when it is an existing path, else the registry entry of that name."""
    path = Path(stack)
    if path.exists() or path.suffix == SUFFIX or os.sep in str(stack):
        return path
    for info in list_stacks(extra_dirs):
        if info.name == str(stack) or info.path.stem == str(stack):
            return info.path
    names = ", ".join(i.name for i in list_stacks(extra_dirs)) or "none"
    raise StackError(f"no stack named {stack!r} in the registry (available: {names}); give a path to a .safetensors file")


def install_stack(source: str | Path, folder: str | Path | None = None, overwrite: bool = False) -> StackInfo:
    """Validate a stack file (fully loaded) and copy it into ``folder`` as ``NAME.safetensors``, atomically.

    ``folder`` defaults to the user's model folder (:func:`user_models_dir`), where the registry
    finds it.  Installing a file onto itself does nothing.  Raises :class:`StackError` with one
    sentence when the file is not a usable stack, or when another file of that name is already
    there (unless ``overwrite``).
    """
    source = Path(source)
    load_stack(source)
    manifest = read_manifest(source)
    folder = Path(folder) if folder else user_models_dir()
    target = folder / f"{manifest.name}{SUFFIX}"
    if target.exists() and target.resolve() == source.resolve():
        return StackInfo(manifest.name, target, manifest)
    if target.exists() and not overwrite:
        raise StackError(f"a stack named {manifest.name} already exists in {folder} ({target.name}); rename or remove it first")
    folder.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)
    return StackInfo(manifest.name, target, manifest)


def describe(manifest: Manifest, path: Path | None = None) -> str:
    """A human-readable summary of a manifest (``dlir info``)."""
    r = manifest.recipe
    lines = [f"name:        {manifest.name}"]
    if path is not None:
        lines.append(f"file:        {path}")
    lines += [
        f"description: {manifest.description or '-'}",
        f"modality:    {manifest.modality or '-'}    anatomy: {manifest.anatomy or '-'}",
        f"intensity:   {r.intensity.kind} [{r.intensity.low}, {r.intensity.high}]    initial alignment: {r.initial_alignment}",
        f"engine:      {manifest.engine_version or '-'}",
        "stages:",
    ]
    for k, s in enumerate(r.stages):
        spacing = "x".join(f"{v:g}" for v in s.spacing_mm)
        if s.kind == "bspline":
            cp = "x".join(f"{v * s.control_point_spacing:g}" for v in s.spacing_mm)
            detail = f"control points every {cp} mm, alpha {s.alpha:g}"
        else:
            detail = f"{s.depth} levels"
        lines.append(f"  {k + 1}. {s.kind:<7} grid {spacing} mm, {detail}, {s.similarity}, {s.channels} kernels")
    if manifest.training:
        lines.append("training:    " + json.dumps(manifest.training, sort_keys=True))
    if manifest.validation:
        lines.append("validation:  " + json.dumps(manifest.validation, sort_keys=True))
    return "\n".join(lines)
