"""Stage-stack files: exact round trip, and every kind of bad file refused with a clear message."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from dlir.errors import StackError
from dlir.recipe import Recipe, StageSpec
from dlir.register import register
from dlir.stack import Manifest, build_stack, list_stacks, load_stack, read_manifest, resolve_stack, save_stack


def small_manifest(name: str = "small") -> Manifest:
    recipe = Recipe(stages=(
        StageSpec("affine", spacing_mm=(4.0, 4.0, 4.0), depth=2, channels=8),
        StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=4, channels=8, alpha=1.0),
    ))
    return Manifest(name, recipe, description="test stack", modality="MR", anatomy="phantom",
                    validation={"dice": {"1": 0.9}})


def random_pair() -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(2):
        arr = sitk.GetImageFromArray(rng.random((12, 16, 14)).astype(np.float32))
        arr.SetSpacing((2.0, 2.0, 2.5))
        images.append(sitk.SmoothingRecursiveGaussian(arr, 2.0))
    return images[0], images[1]


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    stack = build_stack(small_manifest(), seed=1)
    with torch.no_grad():  # non-trivial outputs, so the round trip is tested on real warping
        stack.stages[0].net.head[-1].bias.copy_(torch.linspace(-0.2, 0.2, 12))
        stack.stages[1].net.output.bias.copy_(torch.tensor([0.5, -0.3, 0.2]))
    return save_stack(stack, tmp_path / "small.safetensors")


def test_round_trip_is_exact(saved: Path) -> None:
    original = build_stack(small_manifest(), seed=1)
    with torch.no_grad():
        original.stages[0].net.head[-1].bias.copy_(torch.linspace(-0.2, 0.2, 12))
        original.stages[1].net.output.bias.copy_(torch.tensor([0.5, -0.3, 0.2]))
    loaded = load_stack(saved)
    assert loaded.manifest.to_dict() == original.manifest.to_dict()
    for name, tensor in original.weights().items():
        assert torch.equal(tensor, loaded.weights()[name])
    fixed, moving = random_pair()
    a = register(fixed, moving, original, device="cpu")
    b = register(fixed, moving, loaded, device="cpu")
    for x, y in ((a.warped, b.warped), (a.displacement, b.displacement), (a.jacobian, b.jacobian)):
        assert np.array_equal(sitk.GetArrayFromImage(x), sitk.GetArrayFromImage(y))
    assert np.abs(sitk.GetArrayFromImage(a.displacement)).max() > 0.1


def rewrite(path: Path, out: Path, manifest_change=None, tensor_change=None) -> Path:
    tensors = load_file(str(path))
    manifest = read_manifest(path).to_dict()
    if manifest_change:
        manifest_change(manifest)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(out), metadata={"dlir": json.dumps(manifest)})
    return out


@pytest.mark.parametrize(
    "what, make, message",
    [
        ("random bytes", lambda p, o: o.write_bytes(np.random.default_rng(0).bytes(4096)) and o, "not a valid safetensors"),
        ("truncated", lambda p, o: o.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]) and o, "not a valid safetensors"),
        ("empty", lambda p, o: o.write_bytes(b"") or o, "empty or truncated"),
        ("newer format", lambda p, o: rewrite(p, o, lambda m: m.update(format_version=99)), "format version 99"),
        ("2D stack", lambda p, o: rewrite(p, o, lambda m: m.update(dimension=2)), "2D images"),
        ("not a stack", lambda p, o: rewrite(p, o, lambda m: m.update(format="other")), "not a DLIR stage stack"),
        ("missing tensor", lambda p, o: rewrite(p, o, tensor_change=lambda t: t.pop("stage1.net.output.weight")), "lacks 1 weight tensor"),
        ("misshaped tensor", lambda p, o: rewrite(p, o, tensor_change=lambda t: t.update({"stage1.net.output.bias": torch.zeros(4)})), r"has shape \(4,\), expected \(3,\)"),
        ("unknown stage kind", lambda p, o: rewrite(p, o, lambda m: m["recipe"]["stages"][0].update(kind="rigid")), "unknown stage kind"),
    ],
)
def test_bad_files_are_refused_with_a_clear_message(saved: Path, tmp_path: Path, what: str, make, message: str) -> None:
    bad = make(saved, tmp_path / "bad.safetensors")
    with pytest.raises(StackError, match=message):
        load_stack(bad)


def test_no_manifest_and_invalid_json(saved: Path, tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(StackError, match="not a DLIR stack"):
        load_stack(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "json.safetensors"), metadata={"dlir": "{not json"})
    with pytest.raises(StackError, match="not valid JSON"):
        load_stack(tmp_path / "json.safetensors")


class _Marker:
    """Unpickling this object would create a file: proof that a loader executed pickle code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickle_renamed_to_safetensors_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pickle-was-executed"
    bad = tmp_path / "model.safetensors"
    with bad.open("wb") as f:
        pickle.dump({"state": _Marker(str(marker))}, f)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "torch.safetensors")
    for path in (bad, tmp_path / "torch.safetensors"):
        with pytest.raises(StackError, match="not a valid safetensors"):
            load_stack(path)
    assert not marker.exists()


def test_registry_finds_stacks_by_name(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLIR_MODELS_DIR", str(saved.parent))
    (saved.parent / "broken.safetensors").write_bytes(b"junk" * 10)
    names = [info.name for info in list_stacks()]
    assert "small" in names and "broken" not in names
    assert resolve_stack("small") == saved
    with pytest.raises(StackError, match="no stack named 'nothing'"):
        resolve_stack("nothing")


def test_dlir_info(saved: Path, tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "dlir", "info", str(saved)], capture_output=True, text=True)
    assert ok.returncode == 0
    assert "name:        small" in ok.stdout and "bspline" in ok.stdout and "control points every 16x16x16 mm" in ok.stdout
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    bad = subprocess.run([sys.executable, "-m", "dlir", "info", str(tmp_path / "junk.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
