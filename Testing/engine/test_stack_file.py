"""Stage-stack files (DESIGN.md section 4): exact round trip, every kind of bad file refused with one
clear sentence (and never unpickled), the registry and ``dlir info``."""

from __future__ import annotations

import json
import pickle
import pickletools
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy import ndimage

from dlir.errors import StackError
from dlir.recipe import Recipe, StageSpec
from dlir.register import Registration, register
from dlir.stack import (
    FORMAT_VERSION,
    Manifest,
    build_stack,
    list_stacks,
    load_stack,
    read_manifest,
    resolve_stack,
    save_stack,
    scan_registry,
)

RunDlir = Callable[..., subprocess.CompletedProcess]


def manifest(name: str = "tiny") -> Manifest:
    recipe = Recipe(stages=(
        StageSpec("affine", spacing_mm=(4.0, 4.0, 4.0), depth=2, channels=8),
        StageSpec("bspline", spacing_mm=(2.0, 2.0, 2.0), control_point_spacing=4, depth=2, channels=8, alpha=0.05),
    ))
    return Manifest(name, recipe, description="round-trip test stack", modality="MR", anatomy="phantom",
                    training={"iterations": 0}, validation={"dice": {"1": 0.5}})


def visible(stack, seed: int = 7):
    """Give the (zero-initialised) output layers non-zero weights, so every hidden weight changes the result.

    A fresh stack is the identity whatever its hidden weights are; a round trip tested on it would
    pass even if the file lost them.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = stack.stages[0].net.head[-1]
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.05)
        head.bias.copy_(torch.tensor([0.05, -0.03, 0.04, 0.02, -0.01, 0.0, 0.05, -0.04, 0.03, 0.04, -0.05, 0.03]))
        out = stack.stages[1].net.output
        out.weight.copy_(torch.randn(out.weight.shape, generator=g) * 0.5)
        out.bias.copy_(torch.tensor([0.4, -0.3, 0.2]))
    return stack


def tiny_pair() -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """A smooth fixed / moving pair (anisotropic, non-zero origin) and moving labels, 16 x 14 x 12 voxels."""
    rng = np.random.default_rng(3)
    images = []
    for _ in range(2):
        image = sitk.GetImageFromArray(ndimage.gaussian_filter(rng.random((12, 14, 16)), 1.5).astype(np.float32))
        image.SetSpacing((2.0, 2.2, 2.6))
        image.SetOrigin((-15.0, -14.0, 12.0))
        images.append(image)
    labels = sitk.Cast(images[1] > float(np.median(sitk.GetArrayViewFromImage(images[1]))), sitk.sitkUInt8)
    return images[0], images[1], labels


def outputs(result: Registration) -> dict[str, np.ndarray]:
    names = ("displacement", "warped", "jacobian", "warped_labels")
    arrays = {name: sitk.GetArrayFromImage(getattr(result, name)) for name in names}
    arrays["numbers"] = np.array([result.folding_fraction, result.jacobian_std])
    return arrays


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_stack(visible(build_stack(manifest(), seed=5)), tmp_path_factory.mktemp("stack") / "tiny.safetensors")


# ----------------------------------------------------------------------------------- round trip
def test_seed_makes_weights_reproducible() -> None:
    a, b, c = (build_stack(manifest(), seed=s).weights() for s in (5, 5, 6))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    conv = "stage0.net.pipeline.0.weight"
    assert not torch.equal(a[conv], c[conv]) and float(a[conv].abs().max()) > 0


def test_file_layout(saved: Path) -> None:
    """Tensors named ``stage{k}.{parameter}``; the metadata holds exactly one key, ``dlir``, a JSON manifest."""
    with safe_open(str(saved), framework="pt") as f:
        metadata, names = f.metadata(), set(f.keys())
    assert set(metadata) == {"dlir"}
    data = json.loads(metadata["dlir"])
    assert data["format"] == "dlir-stack" and data["format_version"] == FORMAT_VERSION and data["dimension"] == 3
    assert data["name"] == "tiny" and [s["kind"] for s in data["recipe"]["stages"]] == ["affine", "bspline"]
    assert names == set(visible(build_stack(manifest(), seed=5)).weights())
    assert all(n.split(".")[0] in ("stage0", "stage1") for n in names)
    assert not list(saved.parent.glob("*.tmp")), "save_stack left its temporary file behind"


def test_round_trip_is_exact(saved: Path) -> None:
    original = visible(build_stack(manifest(), seed=5)).eval()
    loaded = load_stack(saved)
    assert not loaded.training
    assert loaded.manifest.to_dict() == original.manifest.to_dict()
    assert read_manifest(saved).to_dict() == original.manifest.to_dict()
    want, got = original.weights(), loaded.weights()
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name

    fixed, moving, labels = tiny_pair()
    a = outputs(register(fixed, moving, original, moving_labels=labels, device="cpu"))
    b = outputs(register(fixed, moving, loaded, moving_labels=labels, device="cpu"))
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs after save/load"

    # the comparison is meaningful: the transform is far from the identity, and a stack that
    # differs only in its hidden weights (another seed) gives another result
    assert np.abs(a["displacement"]).max() > 1.0
    assert a["jacobian"].std() > 1e-3
    other = outputs(register(fixed, moving, visible(build_stack(manifest(), seed=6)), moving_labels=labels, device="cpu"))
    assert not np.array_equal(a["displacement"], other["displacement"])


def test_save_refuses_another_suffix(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"must end in \.safetensors"):
        save_stack(build_stack(manifest(), seed=0), tmp_path / "tiny.pt")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- bad files
def rewrite(source: Path, target: Path, change_manifest=None, change_tensors=None) -> Path:
    """A copy of ``source`` written with safetensors' own ``save_file``, manifest or tensors edited."""
    tensors = load_file(str(source))
    with safe_open(str(source), framework="pt") as f:
        data = json.loads(f.metadata()["dlir"])
    if change_manifest is not None:
        change_manifest(data)
    if change_tensors is not None:
        change_tensors(tensors)
    save_file(tensors, str(target), metadata={"dlir": json.dumps(data)})
    return target


def _bytes(data: Callable[[bytes], bytes]):
    def make(source: Path, target: Path) -> Path:
        target.write_bytes(data(source.read_bytes()))
        return target

    return make


BAD_FILES = [
    # id, how to make it from a good file, words of the message
    ("random bytes", _bytes(lambda b: np.random.default_rng(0).bytes(4096)), ["not a valid safetensors stack file"]),
    ("truncated to half", _bytes(lambda b: b[: len(b) // 2]), ["not a valid safetensors stack file", "truncated"]),
    ("last byte missing", _bytes(lambda b: b[:-1]), ["not a valid safetensors stack file", "truncated"]),
    ("header cut", _bytes(lambda b: b[:40]), ["not a valid safetensors stack file"]),
    ("empty", _bytes(lambda b: b""), ["empty or truncated"]),
    ("four bytes", _bytes(lambda b: b[:4]), ["empty or truncated"]),
    ("format version 99", lambda s, t: rewrite(s, t, lambda m: m.update(format_version=99)),
     ["format version 99", "reads up to version 1", "update DLIR"]),
    ("format version 0", lambda s, t: rewrite(s, t, lambda m: m.update(format_version=0)), ["invalid format version 0"]),
    ("2D stack", lambda s, t: rewrite(s, t, lambda m: m.update(dimension=2)), ["2D images", "registers 3D images"]),
    ("other format", lambda s, t: rewrite(s, t, lambda m: m.update(format="other-tool")), ["not a DLIR stage stack"]),
    ("no name", lambda s, t: rewrite(s, t, lambda m: m.update(name="")), ["no name"]),
    ("missing tensor", lambda s, t: rewrite(s, t, change_tensors=lambda w: w.pop("stage1.net.output.weight")),
     ["lacks 1 weight tensor", "stage1.net.output.weight"]),
    ("all tensors missing", lambda s, t: rewrite(s, t, change_tensors=lambda w: w.clear()), ["lacks", "weight tensor"]),
    ("misshaped tensor",
     lambda s, t: rewrite(s, t, change_tensors=lambda w: w.update({"stage0.net.head.2.bias": torch.zeros(6)})),
     ["stage0.net.head.2.bias", "shape (6,)", "expected (12,)"]),
    ("extra tensor", lambda s, t: rewrite(s, t, change_tensors=lambda w: w.update({"stage2.net.output.bias": torch.zeros(3)})),
     ["unexpected tensor stage2.net.output.bias"]),
    ("recipe for other networks", lambda s, t: rewrite(s, t, lambda m: m["recipe"]["stages"][1].update(channels=16)),
     ["shape", "expected"]),
    ("unknown stage kind", lambda s, t: rewrite(s, t, lambda m: m["recipe"]["stages"][0].update(kind="rigid")),
     ["unknown stage kind 'rigid'"]),
    ("no stages", lambda s, t: rewrite(s, t, lambda m: m["recipe"].update(stages=[])), ["at least one stage"]),
]


@pytest.mark.parametrize("make, words", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_refused_with_a_clear_sentence(saved: Path, tmp_path: Path, make, words: list[str]) -> None:
    bad = make(saved, tmp_path / "bad.safetensors")
    with pytest.raises(StackError) as refused:
        load_stack(bad)
    message = str(refused.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "\n" not in message


def test_safetensors_without_dlir_manifest(tmp_path: Path) -> None:
    plain = tmp_path / "weights.safetensors"
    save_file({"stage0.w": torch.zeros(2)}, str(plain))
    other = tmp_path / "other.safetensors"
    save_file({"stage0.w": torch.zeros(2)}, str(other), metadata={"framework": "something else"})
    for path in (plain, other):
        for load in (load_stack, read_manifest):
            with pytest.raises(StackError, match=r"is a safetensors file but not a DLIR stack \(no 'dlir' manifest"):
                load(path)


@pytest.mark.parametrize("text, words", [
    ("{not json", ["manifest of bad.safetensors", "not valid JSON"]),
    ('["a", "list"]', ["manifest of bad.safetensors", "not a JSON object"]),
    ("", ["not valid JSON"]),
])
def test_invalid_json_manifest(saved: Path, tmp_path: Path, text: str, words: list[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(saved)), str(bad), metadata={"dlir": text})
    with pytest.raises(StackError) as refused:
        load_stack(bad)
    for word in words:
        assert word in str(refused.value)


@pytest.mark.parametrize("change", [
    pytest.param(lambda m: m["recipe"]["stages"][0].update(spacing_mm="abc"), id="spacing not numbers"),
    pytest.param(lambda m: m["recipe"]["stages"][1].update(spacing_mm=[2, 2, "two"]), id="spacing with text"),
    pytest.param(lambda m: m.update(training="trained on my laptop"), id="training not an object"),
    pytest.param(lambda m: m.update(validation=None), id="validation null"),
    pytest.param(lambda m: m["recipe"]["stages"][0].update(channels="8"), id="channels text"),
])
def test_malformed_manifest_is_a_stack_error(saved: Path, tmp_path: Path, change) -> None:
    """DESIGN.md 4: loading validates everything and fails with one clear sentence, never another exception."""
    bad = rewrite(saved, tmp_path / "bad.safetensors", change)
    for load in (load_stack, read_manifest):
        with pytest.raises(StackError):
            load(bad)


# ----------------------------------------------------------------------------------- pickles
class Marker:
    """Unpickling this object creates a file: the proof that a loader ran code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_pickle_renamed_to_safetensors_is_refused_and_never_unpickled(tmp_path: Path, saved: Path, run_dlir: RunDlir) -> None:
    marker = tmp_path / "pickle-code-ran"
    models = tmp_path / "models"
    models.mkdir()
    plain = models / "plain-pickle.safetensors"
    plain.write_bytes(pickle.dumps({"stage0.net.head.2.bias": Marker(marker)}))
    state = models / "torch-save.safetensors"
    # what a PyTorch user would have: torch.save of a state dict (a zip of pickles), with a payload
    torch.save({**visible(build_stack(manifest(), seed=5)).state_dict(), "payload": Marker(marker)}, state)
    protocol0 = models / "protocol0.safetensors"
    protocol0.write_bytes(pickle.dumps(Marker(marker), protocol=0))

    for path in (plain, state, protocol0):
        for load in (load_stack, read_manifest):
            with pytest.raises(StackError) as refused:
                load(path)
            assert "not a valid safetensors stack file" in str(refused.value)
            assert path.name in str(refused.value)
    (models / "good.safetensors").write_bytes(saved.read_bytes())
    assert [info.name for info in list_stacks((models,)) if info.path.parent == models] == ["tiny"]
    assert {u.path for u in scan_registry((models,)).unusable} >= {plain, state, protocol0}  # listed as unusable, never loaded
    info = run_dlir("info", state)
    assert info.returncode == 2 and info.stderr.startswith("error: ") and "Traceback" not in info.stderr
    assert not marker.exists(), "a stack loader executed code from a pickle"

    # the control, read without unpickling: these files really carry a call to Path.touch
    for path in (plain, protocol0):
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(path.read_bytes())]
        assert any(name == "REDUCE" for name, _ in ops)
        assert any(isinstance(arg, str) and "touch" in arg for _, arg in ops)


# ----------------------------------------------------------------------------------- registry
def test_registry_lists_and_resolves_stacks(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user-models"
    user.mkdir()
    monkeypatch.setenv("DLIR_MODELS_DIR", str(user))
    first = save_stack(build_stack(manifest("brain-mr"), seed=1), user / "brain_v1.safetensors")
    second = save_stack(build_stack(manifest("lung-ct"), seed=2), user / "lung.safetensors")
    (user / "junk.safetensors").write_bytes(b"\x00" * 100)  # unreadable files are skipped
    (user / "notes.txt").write_text("not a stack", encoding="utf-8")
    found = {info.name: info for info in list_stacks()}
    assert {"brain-mr", "lung-ct"} <= set(found) and "junk" not in found
    assert found["brain-mr"].path == first and found["lung-ct"].manifest.description == "round-trip test stack"

    assert resolve_stack("brain-mr") == first  # by manifest name
    assert resolve_stack("brain_v1") == first  # by file stem
    assert resolve_stack(str(saved)) == saved  # a path is a path
    assert load_stack("lung-ct").name == "lung-ct"
    loaded = load_stack("lung-ct").weights()
    assert all(torch.equal(loaded[k], v) for k, v in build_stack(manifest("lung-ct"), seed=2).weights().items())
    assert second.is_file()

    with pytest.raises(StackError) as refused:
        resolve_stack("heart-mr")
    assert "no stack named 'heart-mr'" in str(refused.value)
    assert "brain-mr" in str(refused.value) and "lung-ct" in str(refused.value)  # it says what there is

    # an extra folder (e.g. Slicer's setting) comes first: a name found twice is listed once
    extra = tmp_path / "slicer-models"
    override = save_stack(build_stack(manifest("brain-mr"), seed=9), extra / "brain_v2.safetensors")
    names = [info.name for info in list_stacks((extra,))]
    assert names.count("brain-mr") == 1
    assert resolve_stack("brain-mr", (extra,)) == override


def test_registry_survives_a_malformed_manifest(saved: Path, tmp_path: Path) -> None:
    """One bad file in a model folder must not hide the good stacks (nor crash the list)."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "good.safetensors").write_bytes(saved.read_bytes())
    rewrite(saved, folder / "bad.safetensors", lambda m: m.update(training="trained on my laptop"))
    assert [info.name for info in list_stacks((folder,)) if info.path.parent == folder] == ["tiny"]
    [bad] = [u for u in scan_registry((folder,)).unusable if u.path.parent == folder]
    assert bad.path.name == "bad.safetensors" and "'training' must be a JSON object" in bad.reason


# ----------------------------------------------------------------------------------- dlir info
def test_dlir_info_prints_the_manifest(saved: Path, run_dlir: RunDlir) -> None:
    text = run_dlir("info", saved)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    for words in ("name:        tiny", str(saved), "round-trip test stack", "modality:    MR", "anatomy: phantom",
                  "percentile [0.5, 99.5]", "initial alignment: centre", "1. affine", "2. bspline",
                  "control points every 8x8x8 mm", '"dice": {"1": 0.5}', '"iterations": 0'):
        assert words in out, f"{words!r} not in:\n{out}"
    as_json = run_dlir("info", "--json", saved, env={"DLIR_MODELS_DIR": str(saved.parent)})
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == read_manifest(saved).to_dict()
    by_name = run_dlir("info", "tiny", env={"DLIR_MODELS_DIR": str(saved.parent)})
    assert by_name.returncode == 0 and "name:        tiny" in by_name.stdout


@pytest.mark.parametrize("make", [
    pytest.param(lambda saved, p: _bytes(lambda b: np.random.default_rng(1).bytes(1000))(saved, p), id="corrupt"),
    pytest.param(lambda saved, p: _bytes(lambda b: b[:-100])(saved, p), id="truncated"),
    pytest.param(lambda saved, p: rewrite(saved, p, lambda m: m.update(format_version=99)), id="newer format"),
    pytest.param(lambda saved, p: rewrite(saved, p, lambda m: m["recipe"]["stages"][0].update(spacing_mm="abc")),
                 id="malformed manifest"),
])
def test_dlir_info_on_a_bad_file_is_one_error_line(saved: Path, tmp_path: Path, run_dlir: RunDlir, make) -> None:
    bad = make(saved, tmp_path / "broken.safetensors")
    before = bad.read_bytes()
    result = run_dlir("info", bad)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "broken.safetensors" in lines[0], lines[0]
    assert result.stdout == ""
    assert bad.read_bytes() == before
