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
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_write
from .choices import STACK_SUFFIX as SUFFIX
from .choices import stack_file_name
from .errors import DLIRError, StackError
from .recipe import Recipe
from .stackname import name_problem
from .stages import build_stage

FORMAT = "dlir-stack"
FORMAT_VERSION = 1

#: the manifest's JSON is refused above this size (bytes) or nesting depth, before it is parsed
MAX_MANIFEST_BYTES = 1_000_000
MAX_JSON_DEPTH = 32
#: the tensor types a stack's weights may have (safetensors' names -> PyTorch's)
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
#: the names of the other safetensors types, for messages
OTHER_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
                "I32": "int32", "U64": "uint64", "I64": "int64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


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
        problem = name_problem(data["name"])
        if problem:
            raise StackError(f"{source} has an unusable name: {problem}")
        for key in ("description", "modality", "anatomy", "engine_version"):
            if not isinstance(data.get(key, ""), str):
                raise StackError(f"{source} has a malformed manifest: '{key}' must be a string")
        for key in ("recipe", "training", "validation"):
            if not isinstance(data.get(key, {}), dict):
                raise StackError(f"{source} has a malformed manifest: '{key}' must be a JSON object")
        try:
            recipe = Recipe.from_dict(data.get("recipe", {}))
        except StackError as exc:
            raise StackError(f"{source}: {exc}") from exc
        return cls(
            name=data["name"],
            recipe=recipe,
            description=data.get("description", ""),
            modality=data.get("modality", ""),
            anatomy=data.get("anatomy", ""),
            training=dict(data.get("training", {})),
            validation=dict(data.get("validation", {})),
            engine_version=data.get("engine_version", ""),
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

    def check_layout(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], source: str = "the stack") -> None:
        """Refuse tensors (names -> shape, names -> safetensors dtype such as ``F32``) that are missing,
        extra, misshaped or not floating point, before any of them is read."""
        expected = self.weights()
        missing = sorted(set(expected) - set(shapes))
        if missing:
            raise StackError(f"{source} lacks {len(missing)} weight tensor(s), first {missing[0]}; the file is incomplete or for another recipe")
        extra = sorted(set(shapes) - set(expected))
        if extra:
            raise StackError(f"{source} has unexpected tensor {_short(extra[0])}; it does not match its own recipe")
        for name, ref in expected.items():
            if tuple(shapes[name]) != tuple(ref.shape):
                raise StackError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, expected {tuple(ref.shape)}")
            if dtypes[name] not in FLOAT_DTYPES:
                shown = OTHER_DTYPES.get(dtypes[name], _short(dtypes[name], 20))
                raise StackError(f"{source}: tensor {name} holds {shown} values, but weights must be float32, float16, "
                                 "bfloat16 or float64")

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str = "the stack") -> None:
        """Load ``stage{k}.{parameter}`` tensors, refusing missing, extra, misshaped, non-float or non-finite ones."""
        self.check_layout({n: tuple(t.shape) for n, t in tensors.items()},
                          {n: _DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()},
                          source)
        for name, tensor in tensors.items():
            check_finite(name, tensor, source)
        for k, stage in enumerate(self.stages):
            prefix = f"stage{k}."
            stage.load_state_dict({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _short(text: str, limit: int = 60) -> str:
    """``text`` on one line and at most ``limit`` characters (messages quote file contents and other errors)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_finite(name: str, tensor: torch.Tensor, source: str = "the stack") -> None:
    """Refuse a weight tensor holding NaN or infinite values (one sentence naming it)."""
    if not bool(torch.isfinite(tensor).all()):
        raise StackError(f"{source}: tensor {name} holds NaN or infinite values; the file is corrupt or its training diverged")


def build_stack(manifest: Manifest, seed: int | None = None) -> Stack:
    """A stack with freshly initialised (Glorot) weights; ``seed`` makes them reproducible."""
    if seed is None:
        return Stack(manifest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Stack(manifest)


def save_stack(stack: Stack, path: str | Path) -> Path:
    """Write ``stack`` to ``path`` (``.safetensors``) atomically (:func:`dlir.atomic.atomic_write`); creates the folder."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise StackError(f"a stack file must end in {SUFFIX}, got {path.name}")
    problem = name_problem(stack.manifest.name)
    if problem:
        raise StackError(f"the stack cannot be saved under its name: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in stack.weights().items()}
    with atomic_write(path) as temp:
        save_file(tensors, str(temp), metadata={"dlir": json.dumps(stack.manifest.to_dict())})
    return path


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of a stack file, without loading its weights."""
    path = Path(path)
    with _open(path) as f:
        return _manifest_of(f, path)


def load_stack(stack: str | Path, extra_dirs: tuple[Path, ...] = ()) -> Stack:
    """Load a stack from a file path or a registry name (see :func:`resolve_stack`), fully validated.

    In this order, so that a hostile file is refused before it costs memory or time: the manifest
    (size, nesting, every value bounded: :mod:`dlir.recipe`, at most
    :data:`dlir.recipe.MAX_WEIGHTS` weights), the tensors' names, shapes and types from the file's
    header against the networks it describes (built on the ``meta`` device, no memory), and only
    then the networks and the weights themselves, each checked to be finite.
    """
    path = resolve_stack(stack, extra_dirs)
    source = f"the stack {path.name}"
    with _open(path) as f:
        manifest = _manifest_of(f, path)
        _check_table(f, manifest, path)
        result = Stack(manifest)
        tensors: dict[str, torch.Tensor] = {}
        for name in f.keys():
            try:
                tensors[name] = f.get_tensor(name)
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise StackError(f"{path.name}: tensor {name} cannot be read ({_short(str(exc))}); the file is corrupt") from exc
    result.load_weights(tensors, source=source)  # checks each tensor is finite
    return result.eval()


def _open(path: Path):
    if path.is_dir():
        raise StackError(f"{path} is a folder, not a stack file; give a {SUFFIX} file or a stack name (see dlir info --list)")
    if not path.is_file():
        raise StackError(f"the stack file {path} does not exist")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise StackError(f"the stack file {path} cannot be read ({exc.strerror or exc})") from exc
    if size < 8:
        raise StackError(f"the stack file {path} is empty or truncated")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise StackError(
            f"{path.name} is not a valid safetensors stack file (corrupt, truncated, or another format such as a pickle): "
            f"{_short(str(exc), 200)}"
        ) from exc


def _manifest_of(f: Any, path: Path) -> Manifest:
    metadata = f.metadata() or {}
    if "dlir" not in metadata:
        raise StackError(f"{path.name} is a safetensors file but not a DLIR stack (no 'dlir' manifest in its metadata)")
    data = parse_manifest_json(metadata["dlir"], f"the manifest of {path.name}")
    return Manifest.from_dict(data, source=f"the stack {path.name}")


def parse_manifest_json(text: str, what: str = "the manifest") -> dict[str, Any]:
    """A manifest's JSON object; refused with one sentence when it is too large, too deeply nested
    or not a JSON object, checked before :func:`json.loads` runs (which recurses on nesting)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_MANIFEST_BYTES:
        raise StackError(f"{what} is {size / 1e6:.1f} MB of JSON, more than the {MAX_MANIFEST_BYTES / 1e6:g} MB "
                         "a stack manifest may have")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise StackError(f"{what} nests JSON {depth} levels deep, more than the {MAX_JSON_DEPTH} a stack manifest may have")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StackError(f"{what} is not valid JSON ({exc.msg})") from exc
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more digits than Python converts
        raise StackError(f"{what} is not usable JSON ({_short(str(exc))})") from exc
    if not isinstance(data, dict):
        raise StackError(f"{what} is not a JSON object")
    return data


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub('""', text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


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


@dataclass(frozen=True)
class Unusable:
    """A file in a registry folder that is not a usable stack, and why (one sentence)."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Registry:
    """What the registry folders hold: the usable stacks (a name found twice listed once, first
    folder wins) and the files (or folders) that cannot be used, with their reasons."""

    stacks: list[StackInfo]
    unusable: list[Unusable]


def scan_registry(extra_dirs: tuple[Path, ...] = ()) -> Registry:
    """Read the manifest and tensor table (not the weights) of every ``*.safetensors`` in the registry folders.

    A file that cannot be used, whatever is wrong with it, is recorded in ``unusable`` and never
    stops the scan; so one bad file in a model folder never hides the others.
    """
    found: dict[str, StackInfo] = {}
    unusable: list[Unusable] = []
    for folder in model_dirs(extra_dirs):
        try:
            if not folder.is_dir():
                continue
            paths = sorted(folder.glob(f"*{SUFFIX}"))
        except (OSError, ValueError) as exc:
            unusable.append(Unusable(folder, f"the model folder cannot be read ({_reason(exc)})"))
            continue
        for path in paths:
            try:
                manifest = inspect_stack(path)
            except DLIRError as exc:
                unusable.append(Unusable(path, " ".join(str(exc).split())))
                continue
            except Exception as exc:  # noqa: BLE001 - whatever a file does, the registry lists the others
                unusable.append(Unusable(path, f"the file cannot be read ({_reason(exc)})"))
                continue
            found.setdefault(manifest.name, StackInfo(manifest.name, path, manifest))
    return Registry(list(found.values()), unusable)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _short(f"{type(exc).__name__}: {exc}", 120)


def list_stacks(extra_dirs: tuple[Path, ...] = ()) -> list[StackInfo]:
    """Every usable stack in the registry folders; a name found twice is listed once (first folder wins).

    Unusable files are left out (:func:`scan_registry` says which and why).
    """
    return scan_registry(extra_dirs).stacks


def inspect_stack(path: str | Path) -> Manifest:
    """A stack file's manifest, after checking it and the file's tensor table (names, shapes, types)
    against the networks it describes; the weights themselves are not read (:func:`load_stack` does)."""
    path = Path(path)
    with _open(path) as f:
        manifest = _manifest_of(f, path)
        _check_table(f, manifest, path)
    return manifest


def _check_table(f: Any, manifest: Manifest, path: Path) -> None:
    """The tensor table of an open file checked against ``manifest``'s networks, built without memory."""
    try:
        names = list(f.keys())
        slices = {name: f.get_slice(name) for name in names}
        shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
        dtypes = {name: str(s.get_dtype()) for name, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise StackError(f"{path.name} is not a valid safetensors stack file "
                         f"(its tensor table is unreadable: {_short(str(exc))})") from exc
    with torch.device("meta"):  # the networks' shapes without allocating their weights
        expected = Stack(manifest)
    expected.check_layout(shapes, dtypes, f"the stack {path.name}")


def resolve_stack(stack: str | Path, extra_dirs: tuple[Path, ...] = ()) -> Path:
    """A stack's file: ``stack`` itself when it is an existing path, else the registry entry of that name.

    Unusable files in the registry folders never stop the look-up of another name; asking for an
    unusable one by its file name says why it cannot be used.
    """
    path = Path(stack)
    if path.exists() or path.suffix == SUFFIX or os.sep in str(stack):
        return path
    registry = scan_registry(extra_dirs)
    for info in registry.stacks:
        if info.name == str(stack) or info.path.stem == str(stack):
            return info.path
    for bad in registry.unusable:
        if bad.path.stem == str(stack):
            raise StackError(f"the stack file {bad.path} is unusable: {bad.reason}")
    names = ", ".join(i.name for i in registry.stacks) or "none"
    unusable = f"; {len(registry.unusable)} unusable file(s), see dlir info --list" if registry.unusable else ""
    raise StackError(f"no stack named {_short(repr(str(stack)))} in the registry (available: {names}{unusable}); "
                     "give a path to a .safetensors file")


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
    target = folder / stack_file_name(manifest.name)
    if target.exists() and target.resolve() == source.resolve():
        return StackInfo(manifest.name, target, manifest)
    if target.exists() and not overwrite:
        raise StackError(f"a stack named {manifest.name} already exists in {folder} ({target.name}); rename or remove it first")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as temp:
        shutil.copyfile(source, temp)
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
        elif s.keypoints:
            detail = f"{s.keypoints} keypoints after {s.depth} pooling level{'s' if s.depth > 1 else ''}"
        else:
            detail = f"{s.depth} levels"
        loss = (s.similarity if s.dice_weight <= 0 else "soft Dice of labels" if s.dice_weight >= 1
                else f"{1 - s.dice_weight:g} {s.similarity} + {s.dice_weight:g} soft Dice of labels")
        lines.append(f"  {k + 1}. {s.kind:<7} grid {spacing} mm, {detail}, {loss}, {s.channels} kernels")
    if manifest.training:
        lines.append("training:    " + json.dumps(manifest.training, sort_keys=True))
    if manifest.validation:
        lines.append("validation:  " + json.dumps(manifest.validation, sort_keys=True))
    return "\n".join(lines)
