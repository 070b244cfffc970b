"""Finished stacks into the model registry that DLIR Registration lists (``dlir.stack``).

The registry (``dlir.stack.list_stacks``) looks in the user's model folder
(``dlir.stack.user_models_dir()``: ``$DLIR_MODELS_DIR`` or ``~/.dlir/models``) and the bundled
``Resources/Models``.  A finished job's ``NAME.safetensors`` is validated (fully loaded) and
copied into the chosen models folder; :func:`registryStack` makes sure DLIR Registration's
chooser lists it (copying it into the user's model folder when it was put elsewhere).
"""

from __future__ import annotations

from pathlib import Path

from .job import JobError


def modelsDir(chosen: str | Path | None = None, default: Path | None = None) -> Path:
    """The folder new stacks go to: ``chosen``, else ``default``, else the user model folder of the registry."""
    if chosen and str(chosen) not in ("", "."):
        return Path(str(chosen)).expanduser()
    if default is not None:
        return Path(default)
    from dlir.stack import user_models_dir

    return user_models_dir()


def stackNameTaken(name: str, folder: Path) -> Path | None:
    """The file of a stack already called ``name`` (in ``folder`` or anywhere the registry looks), else None."""
    from dlir.choices import stack_file_name
    from dlir.stack import list_stacks

    candidate = folder / stack_file_name(name)
    if candidate.exists():
        return candidate
    for info in list_stacks((folder,)):
        if info.name == name:
            return info.path
    return None


def installStack(stackPath: Path, folder: Path, overwrite: bool = False) -> Path:
    """Validate ``stackPath`` and copy it into ``folder`` as ``NAME.safetensors`` (``dlir.stack.install_stack``); the new file."""
    from dlir.errors import StackError
    from dlir.stack import install_stack as install

    try:
        return install(stackPath, folder, overwrite).path
    except StackError as exc:
        raise JobError(f"the trained stack cannot be used: {exc}; it stays in its job folder {stackPath.parent}") from exc


def registryStack(stackPath: Path) -> Path:
    """The file under which the registry (and so DLIR Registration's chooser) lists the stack ``stackPath``.

    A stack installed outside the registry's folders is copied into the user's model folder first.
    Raises :class:`JobError` when the registry lists a different stack under the same name.
    """
    from dlir.errors import StackError
    from dlir.stack import list_stacks, read_manifest, user_models_dir

    try:
        name = read_manifest(stackPath).name
    except StackError as exc:
        raise JobError(f"the trained stack cannot be used: {exc}") from exc
    for info in list_stacks():
        if info.name != name:
            continue
        if info.path.resolve() == stackPath.resolve() or info.path.read_bytes() == stackPath.read_bytes():
            return info.path
        raise JobError(f"DLIR Registration already lists another stack named {name} ({info.path}); "
                       f"rename or remove it to use the new one ({stackPath})")
    return installStack(stackPath, user_models_dir())
