"""Hostile stacks, model folders and devices (issue 14, "validated stacks" and the device option).

The contract, as assertions: every manifest value is bounded before anything is allocated (a
hostile manifest is refused in a StackError of one sentence naming the stage and key, never
another exception, never a network built); the manifest's JSON is bounded in size and nesting
before it is parsed; weights are finite floating point; one unusable file in a model folder never
breaks the listing or another look-up and is reported with its reason; ``--stack FOLDER`` says it
is a folder; every ``--device`` value is checked; a registration that would not fit in memory is
refused before it starts.  Through ``python -m dlir`` (a subprocess, as a user runs it) for the
representative cases and through ``dlir.cli.main`` (what ``python -m dlir`` runs) for the matrix:
exit 2, one line on stderr starting ``error: ``, inputs byte-identical, nothing written.

Property-based parts use hypothesis (pinned) with ``derandomize=True`` and the recorded hostile
cases as ``@example``s, so CI runs the same cases every time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dlir.memory
import dlir.stack
import testdata
from dlir.cli import main
from dlir.device import resolve_device
from dlir.errors import DeviceError, StackError
from dlir.geometry import Grid
from dlir.memory import GPUMemoryError, available_memory, check_memory, estimate
from dlir.recipe import MAX_STAGES, MAX_WEIGHTS, Recipe, StageSpec
from dlir.stack import (
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    Manifest,
    inspect_stack,
    json_depth,
    list_stacks,
    load_stack,
    parse_manifest_json,
    resolve_stack,
    save_stack,
    scan_registry,
)

RunDlir = Callable[..., subprocess.CompletedProcess]
SETTINGS = settings(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid small stack (affine + B-spline) that the hostile files are forged from; read only."""
    stack = testdata.small_stack("hostile-base", description="the base of the hostile stacks")
    return save_stack(stack, tmp_path_factory.mktemp("good") / "hostile-base.safetensors")


def manifest_of(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["dlir"])


def forge(good: Path, target: Path, change: Callable[[dict], Any] | None = None, tensors: Callable[[dict], Any] | None = None,
          text: str | None = None) -> Path:
    """A stack file written with safetensors' own ``save_file``: ``good`` with its manifest, tensors or JSON text changed."""
    weights = load_file(str(good))
    data = manifest_of(good)
    if change is not None:
        change(data)
    if tensors is not None:
        tensors(weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(target), metadata={"dlir": json.dumps(data) if text is None else text})
    return target


def stage(k: int, **values: Any) -> Callable[[dict], None]:
    """Set ``values`` in stage ``k`` (0-based) of a manifest's recipe."""
    return lambda m: m["recipe"]["stages"][k].update(values)


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture()
def no_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building any network is a test failure: a hostile manifest must be refused before."""
    def refuse(spec: StageSpec):
        raise AssertionError(f"a network was built for the hostile manifest ({spec})")

    monkeypatch.setattr(dlir.stack, "build_stage", refuse)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small fixed / moving pair on disk (NIfTI) for ``dlir register``."""
    folder = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    paths = []
    for name in ("fixed", "moving"):
        image = sitk.GetImageFromArray(rng.random((12, 14, 16)).astype(np.float32))
        image.SetSpacing((2.0, 2.0, 2.0))
        paths.append(folder / f"{name}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    return paths[0], paths[1]


def digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


# ----------------------------------------------------------------------------------- manifest values
#: recorded hostile manifests: id, change, words the sentence must hold (stage and key)
HOSTILE_MANIFESTS = [
    ("channels 100000 (a terabyte)", stage(1, channels=100000), ["stage 2", "channels", "100000"]),
    ("channels 4000 (1.7 GB)", stage(1, channels=4000), ["stage 2", "channels"]),
    ("channels 2000 (seconds, 400 MB)", stage(0, channels=2000), ["stage 1", "channels"]),
    ("channels 0", stage(0, channels=0), ["stage 1", "channels"]),
    ("channels text", stage(0, channels="8"), ["stage 1", "channels", "'8'"]),
    ("channels 8.0", stage(0, channels=8.0), ["stage 1", "channels", "whole number"]),
    ("channels true", stage(0, channels=True), ["stage 1", "channels"]),
    ("depth 40", stage(0, depth=40), ["stage 1", "depth"]),
    ("depth 0", stage(0, depth=0), ["stage 1", "depth"]),
    ("control points every 2^28 voxels (8 GB kernel)", stage(1, control_point_spacing=2**28),
     ["stage 2", "control_point_spacing"]),
    ("control points every 3 voxels", stage(1, control_point_spacing=3), ["stage 2", "control_point_spacing", "power of two"]),
    ("control points every 128 voxels", stage(1, control_point_spacing=128), ["stage 2", "control_point_spacing"]),
    ("spacing 1e-9 mm", stage(1, spacing_mm=[1e-9, 1e-9, 1e-9]), ["stage 2", "spacing_mm"]),
    ("spacing NaN", stage(1, spacing_mm=[float("nan"), 4, 4]), ["stage 2", "spacing_mm", "finite"]),
    ("spacing infinite", stage(0, spacing_mm=[float("inf"), 4, 4]), ["stage 1", "spacing_mm"]),
    ("spacing 1e9 mm", stage(0, spacing_mm=[1e9, 8, 8]), ["stage 1", "spacing_mm"]),
    ("spacing negative", stage(0, spacing_mm=[-8, 8, 8]), ["stage 1", "spacing_mm"]),
    ("spacing two values", stage(0, spacing_mm=[8, 8]), ["stage 1", "spacing_mm", "three numbers"]),
    ("spacing text", stage(0, spacing_mm="abc"), ["stage 1", "spacing_mm"]),
    ("spacing booleans", stage(0, spacing_mm=[True, 8, 8]), ["stage 1", "spacing_mm"]),
    ("ncc window 10^12", stage(1, ncc_window=10**12), ["stage 2", "ncc_window"]),
    ("ncc window even", stage(1, ncc_window=8), ["stage 2", "ncc_window", "odd"]),
    ("ncc window 1", stage(1, ncc_window=1), ["stage 2", "ncc_window"]),
    ("patch size 10^9", stage(1, patch_size=10**9), ["stage 2", "patch_size"]),
    ("batch size 0", stage(1, batch_size=0), ["stage 2", "batch_size"]),
    ("iterations negative", stage(0, iterations=-1), ["stage 1", "iterations"]),
    ("learning rate NaN", stage(0, learning_rate=float("nan")), ["stage 1", "learning_rate"]),
    ("learning rate 0", stage(0, learning_rate=0), ["stage 1", "learning_rate"]),
    ("learning rate 1e300", stage(0, learning_rate=1e300), ["stage 1", "learning_rate"]),
    ("rotation bound infinite", stage(0, max_rotation=float("inf")), ["stage 1", "max_rotation"]),
    ("shear bound negative", stage(0, max_shear=-1), ["stage 1", "max_shear"]),
    ("scale 0", stage(0, min_scale=0), ["stage 1", "min_scale"]),
    ("scale 1e300", stage(0, max_scale=1e300), ["stage 1", "max_scale"]),
    ("scale range without 1", stage(0, min_scale=1.2, max_scale=1.5), ["stage 1", "min_scale"]),
    ("alpha NaN", stage(1, alpha=float("nan")), ["stage 2", "alpha"]),
    ("alpha negative", stage(1, alpha=-1), ["stage 2", "alpha"]),
    ("similarity unknown", stage(1, similarity="mutual-information"), ["stage 2", "similarity"]),
    ("stage kind unknown", stage(0, kind="rigid"), ["stage 1", "stage kind 'rigid'"]),
    ("stage kind a list", stage(0, kind=["affine"]), ["stage 1", "stage kind"]),
    ("unknown stage setting", stage(0, dropout=0.5), ["stage 1", "unknown stage settings: dropout"]),
    ("stage not an object", lambda m: m["recipe"]["stages"].append(5), ["stage 3", "JSON object"]),
    ("17 stages", lambda m: m["recipe"].update(stages=(m["recipe"]["stages"] * 9)[:17]), [f"at most {MAX_STAGES} stages", "17"]),
    ("stages an object", lambda m: m["recipe"].update(stages={"0": {}}), ["'stages' must be a list"]),
    ("no stages", lambda m: m["recipe"].update(stages=[]), ["at least one stage"]),
    ("no recipe stages key", lambda m: m.update(recipe={}), ["no list of stages"]),
    ("16 stages of 512 channels, depth 8 (3.6 GB of weights)",
     lambda m: m["recipe"].update(stages=[dict(m["recipe"]["stages"][0], channels=512, depth=8)] * 16),
     ["million weights", f"{MAX_WEIGHTS // 1_000_000} million"]),
    ("window bound infinite", lambda m: m["recipe"].update(intensity={"kind": "window", "low": float("-inf"), "high": 100.0}),
     ["intensity", "low"]),
    ("window low above high", lambda m: m["recipe"].update(intensity={"kind": "window", "low": 100.0, "high": -100.0}),
     ["low < high"]),
    ("window 1e300 wide", lambda m: m["recipe"].update(intensity={"kind": "window", "low": -1e300, "high": 1e300}),
     ["intensity", "low"]),
    ("percentile 150", lambda m: m["recipe"].update(intensity={"kind": "percentile", "low": 1.0, "high": 150.0}),
     ["percentile", "high"]),
    ("percentile NaN", lambda m: m["recipe"].update(intensity={"kind": "percentile", "low": float("nan"), "high": 99.0}),
     ["percentile", "low"]),
    ("intensity kind unknown", lambda m: m["recipe"].update(intensity={"kind": "zscore"}), ["intensity normalisation 'zscore'"]),
    ("intensity setting unknown", lambda m: m["recipe"].update(intensity={"kind": "window", "low": 0, "high": 1, "gamma": 2}),
     ["unknown intensity settings: gamma"]),
    ("intensity a list", lambda m: m["recipe"].update(intensity=[0, 1]), ["intensity", "JSON object"]),
    ("initial alignment unknown", lambda m: m["recipe"].update(initial_alignment="magic"), ["initial alignment 'magic'"]),
    ("name a path", lambda m: m.update(name="../../outside"), ["unusable name", "file name"]),
    ("name with a slash", lambda m: m.update(name="a/b"), ["unusable name"]),
    ("name hidden", lambda m: m.update(name=".hidden"), ["unusable name"]),
    ("name a number", lambda m: m.update(name=5), ["unusable name"]),
    ("name 1000 characters", lambda m: m.update(name="x" * 1000), ["unusable name", "longer than"]),
    ("name with a newline", lambda m: m.update(name="a\nb"), ["unusable name"]),
    ("description an object", lambda m: m.update(description={"a": 1}), ["'description' must be a string"]),
    ("format version huge", lambda m: m.update(format_version=10**30), ["format version", "update DLIR"]),
    ("format version a float", lambda m: m.update(format_version=1.0), ["invalid format version"]),
]


@pytest.mark.parametrize("change, words", [c[1:] for c in HOSTILE_MANIFESTS], ids=[c[0] for c in HOSTILE_MANIFESTS])
def test_hostile_manifest_is_refused_before_any_network_is_built(good: Path, tmp_path: Path, no_networks: None,
                                                                  change, words: list[str]) -> None:
    bad = forge(good, tmp_path / "bad.safetensors", change)
    for load in (load_stack, inspect_stack):
        with pytest.raises(StackError) as refused:
            load(bad)
        message = str(refused.value)
        assert "\n" not in message and len(message) < 400, message
        for word in words:
            assert word in message, f"{word!r} not in {message!r}"


def test_every_bound_accepts_the_values_dlir_itself_uses(good: Path) -> None:
    """The bounds refuse nothing DLIR makes: the default recipe, the bundled stacks, the limits themselves."""
    from dlir.training.config import default_recipe

    Recipe.from_dict(default_recipe().to_dict())
    for path in sorted(dlir.stack.bundled_models_dir().glob("*.safetensors")):
        inspect_stack(path)
    at_the_limits = StageSpec("bspline", spacing_mm=(0.05, 100, 1), control_point_spacing=64, channels=64, depth=8,
                              max_rotation=math.pi, max_shear=0, min_scale=0.01, max_scale=100, ncc_window=31,
                              alpha=1e6, iterations=1, learning_rate=10, batch_size=1024, patch_size=512)
    assert StageSpec.from_dict(at_the_limits.to_dict()) == at_the_limits


# property: any manifest either loads or is refused in one sentence
STAGE_KEYS = ["kind", "spacing_mm", "control_point_spacing", "channels", "depth", "max_rotation", "max_shear", "min_scale",
              "max_scale", "similarity", "ncc_window", "alpha", "iterations", "learning_rate", "batch_size", "patch_size"]
EDGES = [0, 1, 2, 3, 4, 7, 8, 9, 16, 31, 32, 33, 63, 64, 65, 128, 511, 512, 513, 2**20, 2**31, 2**40, 2**63, -1, -(2**63)]
json_leaf = (st.none() | st.booleans() | st.sampled_from(EDGES) | st.integers()
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
             | st.sampled_from(["affine", "bspline", "ncc", "lncc", "window", "percentile", "centre", "com", "none"]))
json_value = st.recursive(json_leaf,
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                          max_leaves=8)
where = st.one_of(
    st.tuples(st.just("stage"), st.sampled_from([0, 1]), st.sampled_from(STAGE_KEYS + ["unknown"])),
    st.tuples(st.just("intensity"), st.just(0), st.sampled_from(["kind", "low", "high"])),
    st.tuples(st.just("recipe"), st.just(0), st.sampled_from(["stages", "intensity", "initial_alignment"])),
    st.tuples(st.just("top"), st.just(0), st.sampled_from(["name", "format_version", "dimension", "description", "training",
                                                           "recipe", "format"])),
)


def _apply(data: dict, place: tuple[str, int, str], value: Any) -> dict:
    data = json.loads(json.dumps(data))
    kind, k, key = place
    target = {"stage": lambda: data["recipe"]["stages"][k], "intensity": lambda: data["recipe"].setdefault("intensity", {}),
              "recipe": lambda: data["recipe"], "top": lambda: data}[kind]()
    target[key] = value
    return data


@pytest.fixture(scope="module")
def base_manifest(good: Path) -> dict:
    return manifest_of(good)


@settings(SETTINGS, max_examples=400)
@given(place=where, value=json_value)
@example(place=("stage", 1, "channels"), value=100000)
@example(place=("stage", 1, "control_point_spacing"), value=2**28)
@example(place=("stage", 0, "depth"), value=1000)
@example(place=("stage", 1, "spacing_mm"), value=[1e-300, 1e-300, 1e-300])
@example(place=("stage", 1, "ncc_window"), value=10**12)
@example(place=("stage", 0, "channels"), value=512)  # the largest accepted
@example(place=("stage", 1, "control_point_spacing"), value=64)
@example(place=("recipe", 0, "stages"), value=[{"kind": "bspline", "channels": 512, "control_point_spacing": 64}] * 16)
@example(place=("intensity", 0, "low"), value=float("nan"))
@example(place=("top", 0, "name"), value="../x")
def test_any_manifest_loads_or_is_refused_in_one_sentence(base_manifest: dict, place, value) -> None:
    data = _apply(base_manifest, place, value)
    try:
        manifest = Manifest.from_dict(json.loads(json.dumps(data)), source="the stack x.safetensors")
    except StackError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 400, message
        return
    # accepted: bounded, buildable, and the file format round-trips
    weights = sum(s.weight_count for s in manifest.recipe.stages)
    assert weights <= MAX_WEIGHTS
    with torch.device("meta"):
        networks = dlir.stack.Stack(manifest)
    assert sum(p.numel() for p in networks.parameters()) == weights
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))).to_dict() == manifest.to_dict()


def _rlimited_dlir(limit_bytes: int, *args: str) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "dlir", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit, env={**os.environ, "DLIR_MODELS_DIR": str(Path(args[-1]).parent / "none")})


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is the Linux address-space limit")
def test_dlir_info_refuses_a_terabyte_stack_within_a_small_address_space(good: Path, tmp_path: Path) -> None:
    """``dlir info`` in a process that may map only 2.5 GB: the control loads, the terabyte stack
    (and the one that took 4 GB and half a minute) are refused with one line, not an allocation."""
    limit = int(2.5 * 2**30)
    control = _rlimited_dlir(limit, "info", str(good))
    if control.returncode != 0:
        pytest.skip(f"this PyTorch does not start within {limit >> 20} MB of address space: {control.stderr[-200:]}")
    terabyte = forge(good, tmp_path / "terabyte.safetensors", stage(1, channels=100000))
    slow = forge(good, tmp_path / "slow.safetensors", stage(1, control_point_spacing=2**28))
    for bad, words in ((terabyte, "stage 2: channels"), (slow, "stage 2: control_point_spacing")):
        result = _rlimited_dlir(limit, "info", str(bad))
        assert result.returncode == 2 and result.stdout == ""
        assert words in one_line_error(result.stderr) and bad.name in result.stderr


# ----------------------------------------------------------------------------------- JSON bounds
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("text, words", [
    pytest.param(None, [f"nests JSON {MAX_JSON_DEPTH + 3} levels", f"more than the {MAX_JSON_DEPTH}"], id="depth 35"),
    pytest.param('{"training": ' + _nested(100_000) + "}", ["nests JSON 100001 levels"],
                 id="depth 100000 (RecursionError in json)"),
    pytest.param('{"a": ' + "[" * 200_000, ["nests JSON"], id="unterminated deep"),
    pytest.param('{"name": "' + "x" * (MAX_MANIFEST_BYTES + 10) + '"}', ["MB of JSON", "1 MB"], id="over 1 MB"),
    pytest.param('{"format": "dlir-stack", "format_version": 1, "channels": ' + "9" * 5000 + "}", ["not usable JSON"],
                 id="5000-digit integer"),
    pytest.param('{"format": "dlir-stack", "format_version": 1e999}', ["invalid format version"], id="1e999"),
])
def test_manifest_json_is_bounded_before_it_is_parsed(good: Path, tmp_path: Path, no_networks: None, text: str | None,
                                                      words: list[str]) -> None:
    if text is None:  # a valid manifest whose training record nests too deep
        data = manifest_of(good)
        data["training"] = {"deep": json.loads(_nested(MAX_JSON_DEPTH + 1))}
        text = json.dumps(data)
    bad = forge(good, tmp_path / "bad.safetensors", text=text)
    with pytest.raises(StackError) as refused:
        load_stack(bad)
    for word in words:
        assert word in str(refused.value), str(refused.value)
    assert "\n" not in str(refused.value)


def test_brackets_inside_strings_do_not_count_as_nesting(good: Path, tmp_path: Path) -> None:
    deep_text = _nested(5000) + '\\"[[[{{'
    ok = forge(good, tmp_path / "ok.safetensors", lambda m: m.update(description=deep_text))
    assert load_stack(ok).manifest.description == deep_text
    assert json_depth(json.dumps({"a": [[1]], "b": "]]]]"})) == 3


@settings(SETTINGS, max_examples=150)
@given(value=st.recursive(st.integers() | st.text(max_size=4), lambda inner: st.lists(inner, max_size=2)
                          | st.dictionaries(st.text(max_size=3), inner, max_size=2), max_leaves=60),
       depth=st.integers(0, 3000))
@example(value=0, depth=MAX_JSON_DEPTH - 1)
@example(value=0, depth=MAX_JSON_DEPTH)
@example(value=0, depth=2000)
def test_any_json_text_parses_or_is_refused_in_one_sentence(value: Any, depth: int) -> None:
    text = '{"v": ' + "[" * depth + json.dumps(value) + "]" * depth + "}"
    try:
        data = parse_manifest_json(text)
    except StackError as exc:
        assert "\n" not in str(exc) and depth + 1 + json_depth(json.dumps(value)) > MAX_JSON_DEPTH
        return
    assert isinstance(data, dict) and json_depth(text) <= MAX_JSON_DEPTH


# ----------------------------------------------------------------------------------- weights
def _set(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return lambda w: w.update({name: make(w[name])})


BAD_WEIGHTS = [
    ("int64", _set("stage0.net.head.2.bias", lambda t: t.long()), ["stage0.net.head.2.bias", "int64", "float32"]),
    ("int32", _set("stage1.net.output.weight", lambda t: t.int()), ["stage1.net.output.weight", "int32"]),
    ("uint8", _set("stage1.net.output.bias", lambda t: t.to(torch.uint8)), ["stage1.net.output.bias", "uint8"]),
    ("bool", _set("stage0.net.pipeline.0.bias", lambda t: t > 0), ["stage0.net.pipeline.0.bias", "bool"]),
    ("NaN", _set("stage0.net.pipeline.0.weight", lambda t: t.index_fill(0, torch.tensor([1]), float("nan"))),
     ["stage0.net.pipeline.0.weight", "NaN or infinite"]),
    ("+Inf", _set("stage1.net.output.bias", lambda t: t + float("inf")), ["stage1.net.output.bias", "NaN or infinite"]),
    ("-Inf in float16", _set("stage1.net.output.weight", lambda t: t.half().index_fill(0, torch.tensor([0]), float("-inf"))),
     ["stage1.net.output.weight", "NaN or infinite"]),
    ("NaN in bfloat16", _set("stage0.net.head.0.bias", lambda t: t.bfloat16() * float("nan")), ["stage0.net.head.0.bias", "NaN"]),
]


@pytest.mark.parametrize("change, words", [c[1:] for c in BAD_WEIGHTS], ids=[c[0] for c in BAD_WEIGHTS])
def test_weights_must_be_finite_floating_point(good: Path, tmp_path: Path, change, words: list[str]) -> None:
    bad = forge(good, tmp_path / "bad.safetensors", tensors=change)
    with pytest.raises(StackError) as refused:
        load_stack(bad)
    for word in words:
        assert word in str(refused.value), str(refused.value)
    assert "\n" not in str(refused.value)
    if "NaN" not in words[-1] and "infinite" not in words[-1]:  # a type is refused from the header, data unread
        with pytest.raises(StackError):
            inspect_stack(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_floating_point_weights_load_as_float32(good: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    other = forge(good, tmp_path / "other.safetensors", tensors=lambda w: w.update({n: t.to(dtype) for n, t in w.items()}))
    loaded, reference = load_stack(other).weights(), load_stack(good).weights()
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name].to(dtype).float()), name


# ----------------------------------------------------------------------------------- the registry
@pytest.fixture()
def model_folder(good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, str]]:
    """A user model folder with one good stack and one file of each unusable kind (name -> a word of its reason)."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "good.safetensors").write_bytes(good.read_bytes())
    (folder / "garbage.safetensors").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / "empty.safetensors").write_bytes(b"")
    forge(good, folder / "terabyte.safetensors", stage(1, channels=100000))
    forge(good, folder / "deep.safetensors", text=_nested(50_000))
    forge(good, folder / "huge-int.safetensors", text='{"format": "dlir-stack", "v": ' + "1" * 6000 + "}")
    forge(good, folder / "ints.safetensors", tensors=_set("stage0.net.head.2.bias", lambda t: t.long()))
    forge(good, folder / "missing.safetensors", tensors=lambda w: w.pop("stage1.net.output.bias"))
    forge(good, folder / "escape.safetensors", lambda m: m.update(name="../../escape"))
    (folder / "a-folder.safetensors").mkdir()
    monkeypatch.setenv("DLIR_MODELS_DIR", str(folder))
    reasons = {"garbage": "not a valid safetensors", "empty": "empty or truncated", "terabyte": "channels",
               "deep": "nests JSON", "huge-int": "not usable JSON", "ints": "int64", "missing": "lacks 1 weight tensor",
               "escape": "unusable name", "a-folder": "is a folder"}
    return folder, reasons


def test_unusable_files_are_listed_with_their_reason_and_never_hide_the_others(model_folder, good: Path) -> None:
    folder, reasons = model_folder
    registry = scan_registry()
    mine = [(s.name, s.path) for s in registry.stacks if s.path.parent == folder]
    assert mine == [("hostile-base", folder / "good.safetensors")]
    unusable = {u.path.stem: u.reason for u in registry.unusable}
    assert set(unusable) == set(reasons)
    for stem, word in reasons.items():
        assert word in unusable[stem] and "\n" not in unusable[stem], (stem, unusable[stem])
    assert list_stacks() == registry.stacks
    assert resolve_stack("hostile-base") == resolve_stack("good") == folder / "good.safetensors"
    assert "brain-mri" in {s.name for s in registry.stacks}  # the bundled stacks are still found


def test_a_look_up_says_why_a_named_file_is_unusable(model_folder) -> None:
    folder, _ = model_folder
    with pytest.raises(StackError, match=r"terabyte\.safetensors is unusable: .*stage 2: channels"):
        resolve_stack("terabyte")
    with pytest.raises(StackError) as refused:
        resolve_stack("no-such-stack")
    assert "no stack named 'no-such-stack'" in str(refused.value) and "hostile-base" in str(refused.value)
    assert "9 unusable file(s), see dlir info --list" in str(refused.value)


def test_any_failure_reading_a_registry_file_is_contained(model_folder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a file makes the reader raise (here a RecursionError, a MemoryError), the others are still listed."""
    folder, _ = model_folder
    real = dlir.stack.inspect_stack

    def flaky(path):
        if Path(path).stem == "garbage":
            raise RecursionError("maximum recursion depth exceeded")
        if Path(path).stem == "empty":
            raise MemoryError()
        return real(path)

    monkeypatch.setattr(dlir.stack, "inspect_stack", flaky)
    registry = scan_registry()
    assert "hostile-base" in [s.name for s in registry.stacks]
    reasons = {u.path.stem: u.reason for u in registry.unusable}
    assert "RecursionError" in reasons["garbage"] and "MemoryError" in reasons["empty"]


def test_dlir_info_list_prints_usable_stacks_then_each_unusable_file(model_folder, run_dlir: RunDlir) -> None:
    folder, reasons = model_folder
    result = run_dlir("info", "--list", env={"DLIR_MODELS_DIR": str(folder)})
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    usable = [line for line in lines if not line.startswith("unusable: ")]
    unusable = [line for line in lines if line.startswith("unusable: ")]
    assert lines == usable + unusable, "the usable stacks come first"
    assert any(line.startswith("hostile-base ") and line.endswith(str(folder / "good.safetensors")) for line in usable)
    assert len(unusable) == len(reasons)
    for stem, word in reasons.items():
        [line] = [line for line in unusable if line.startswith(f"unusable: {folder / stem}.safetensors: ")]
        assert word in line, line


# ----------------------------------------------------------------------------------- through the command line
@pytest.mark.parametrize("make, words", [
    pytest.param(lambda good, tmp: forge(good, tmp / "bad.safetensors", stage(1, channels=100000)), ["stage 2: channels"],
                 id="terabyte manifest"),
    pytest.param(lambda good, tmp: forge(good, tmp / "bad.safetensors", text=_nested(100_000)), ["nests JSON"], id="deep JSON"),
    pytest.param(lambda good, tmp: forge(good, tmp / "bad.safetensors", tensors=_set("stage1.net.output.bias",
                                                                                   lambda t: t * float("nan"))),
                 ["stage1.net.output.bias", "NaN"], id="NaN weights"),
    pytest.param(lambda good, tmp: forge(good, tmp / "bad.safetensors",
                                         tensors=_set("stage1.net.output.bias", lambda t: t.int())),
                 ["stage1.net.output.bias", "int32"], id="int weights"),
    pytest.param(lambda good, tmp: (tmp / "a-folder").mkdir() or tmp / "a-folder", ["is a folder, not a stack file"],
                 id="a folder"),
    pytest.param(lambda good, tmp: (tmp / "dir.safetensors").mkdir() or tmp / "dir.safetensors", ["is a folder"],
                 id="a folder named .safetensors"),
])
def test_cli_refuses_a_hostile_stack_in_one_line_and_writes_nothing(good: Path, tmp_path: Path, pair: tuple[Path, Path],
                                                                     capsys: pytest.CaptureFixture, make,
                                                                     words: list[str]) -> None:
    """``dlir info STACK`` and ``dlir register F M --stack STACK`` through ``dlir.cli.main``."""
    bad = make(good, tmp_path)
    inputs = [*pair] + ([bad] if bad.is_file() else [])
    before = digest(*inputs)
    out = tmp_path / "out"
    for argv in (["info", str(bad)], ["register", *map(str, pair), "--stack", str(bad), "--out", str(out)]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        line = one_line_error(captured.err)
        for word in words:
            assert word in line, line
        assert captured.out == ""
    assert digest(*inputs) == before
    assert not out.exists()


def test_dlir_register_with_a_hostile_stack_exits_2_touching_nothing(good: Path, tmp_path: Path, pair: tuple[Path, Path],
                                                                      run_dlir: RunDlir) -> None:
    """As a user runs it: ``python -m dlir register``; exit 2, one line naming the problem, nothing written."""
    bad = forge(good, tmp_path / "models" / "terabyte.safetensors", stage(1, control_point_spacing=2**28))
    before = digest(*pair, bad)
    out = tmp_path / "out"
    result = run_dlir("register", *pair, "--stack", bad, "--out", out)
    assert result.returncode == 2 and result.stdout == ""
    assert "stage 2: control_point_spacing must be" in one_line_error(result.stderr)
    by_name = run_dlir("register", *pair, "--stack", "terabyte", "--out", out, env={"DLIR_MODELS_DIR": str(bad.parent)})
    assert by_name.returncode == 2 and "terabyte.safetensors is unusable" in one_line_error(by_name.stderr)
    assert digest(*pair, bad) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


# ----------------------------------------------------------------------------------- --device
@pytest.mark.parametrize("device, words", [
    ("tpu", ["unknown device 'tpu'", "auto, cpu, cuda, cuda:K"]),
    ("cuda:abc", ["unknown device 'cuda:abc'"]),
    ("cuda:-1", ["unknown device"]),
    ("cuda:", ["unknown device"]),
    ("cuda:0x1", ["unknown device"]),
    ("CPU", ["unknown device 'CPU'"]),
    (" cpu", ["unknown device"]),
    ("", ["unknown device ''"]),
    ("cuda:0,1", ["unknown device"]),
    ("x" * 10_000, ["unknown device 'xxxxx", "..."]),
])
def test_unknown_devices_are_refused_in_one_sentence(device: str, words: list[str]) -> None:
    with pytest.raises(DeviceError) as refused:
        resolve_device(device)
    for word in words:
        assert word in str(refused.value)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 200


def test_gpu_devices_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match=rf"no CUDA GPU is available to PyTorch here, so device '{device}'"):
            resolve_device(device)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS"):
        resolve_device("mps")


def test_gpu_devices_with_two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda:01") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match=r"there is no GPU cuda:2: PyTorch sees 2 GPU\(s\) here, cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


@settings(SETTINGS, max_examples=200)
@given(device=st.text(max_size=12) | st.from_regex(r"(cuda|cpu|mps|auto)(:[0-9a-z-]{0,3})?", fullmatch=True))
@example(device="cuda:99999")
@example(device="cuda:0")
def test_any_device_value_resolves_or_is_refused_in_one_sentence(device: str) -> None:
    try:
        chosen = resolve_device(device)
    except DeviceError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:")
    assert isinstance(chosen, torch.device)


def test_cli_register_refuses_a_bad_device_writing_nothing(good: Path, tmp_path: Path, pair: tuple[Path, Path],
                                                           capsys: pytest.CaptureFixture) -> None:
    before = digest(*pair, good)
    devices = ["cuda:abc", "gpu"] + ([] if torch.cuda.is_available() else ["cuda:0"])
    for device in devices:
        out = tmp_path / "out"
        assert main(["register", *map(str, pair), "--stack", str(good), "--device", device, "--out", str(out)]) == 2
        line = one_line_error(capsys.readouterr().err)
        assert device in line and ("unknown device" in line or "no CUDA GPU is available" in line), line
        assert not out.exists()
    assert digest(*pair, good) == before


# ----------------------------------------------------------------------------------- memory
def grid(size: tuple[int, int, int], spacing: float = 1.0) -> Grid:
    return Grid(size=size, spacing=(spacing,) * 3, origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


@pytest.fixture(scope="module")
def small_stack(good: Path):
    return load_stack(good)


def test_a_registration_that_fits_passes(small_stack, monkeypatch: pytest.MonkeyPatch) -> None:
    need = check_memory(small_stack, grid((64, 64, 64)), grid((64, 64, 64)), "cpu", available=2**34)
    assert 0 < need.total < 2**30
    monkeypatch.setattr(dlir.memory, "available_memory", lambda device: None)  # not known here (not Linux): no check
    assert check_memory(small_stack, grid((2048,) * 3), grid((64,) * 3), "cpu").total > 2**36


def test_a_huge_fixed_image_is_refused_before_anything_is_allocated(small_stack) -> None:
    with pytest.raises(DeviceError) as refused:
        check_memory(small_stack, grid((2048, 2048, 2048)), grid((64,) * 3), "cpu", available=8 * 2**30)
    message = str(refused.value)
    assert "needs about" in message and "GB of memory" in message and "only 8.0 GB is available" in message
    assert "fixed image 2048x2048x2048 voxels" in message and "crop or resample the fixed image" in message
    assert not isinstance(refused.value, GPUMemoryError) and "\n" not in message


def test_a_too_fine_network_grid_is_refused_suggesting_a_coarser_one(good: Path, tmp_path: Path) -> None:
    fine = load_stack(forge(good, tmp_path / "fine.safetensors", stage(1, spacing_mm=[0.5, 0.5, 0.5])))
    with pytest.raises(DeviceError) as refused:  # 512^3 network voxels: within the grid bound, not in 4 GB
        check_memory(fine, grid((256, 256, 256)), grid((256,) * 3), "cpu", available=4 * 2**30)
    assert re.search(r"stage 2's network grid 51\dx51\dx51\d voxels", str(refused.value)), str(refused.value)
    assert "coarser network grid (larger spacing_mm)" in str(refused.value)


def test_on_a_gpu_the_refusal_is_an_out_of_memory_error_so_auto_falls_back(small_stack) -> None:
    with pytest.raises(torch.cuda.OutOfMemoryError) as refused:
        check_memory(small_stack, grid((512, 512, 512)), grid((512,) * 3), torch.device("cuda"), available=2**28)
    assert isinstance(refused.value, DeviceError) and isinstance(refused.value, GPUMemoryError)
    assert "the GPU has only 256 MB free" in str(refused.value) and "device 'cpu'" in str(refused.value)


def test_the_estimate_grows_with_the_grids_refinement_and_labels(small_stack) -> None:
    base = estimate(small_stack, grid((64,) * 3), grid((64,) * 3))
    assert estimate(small_stack, grid((128,) * 3), grid((64,) * 3)).total > base.total
    assert estimate(small_stack, grid((64,) * 3), grid((128,) * 3)).total > base.total
    assert estimate(small_stack, grid((64,) * 3), grid((64,) * 3), moving_labels=True).total > base.total
    assert estimate(small_stack, grid((64,) * 3), grid((64,) * 3), refine=True).total >= base.total
    assert estimate(small_stack, grid((2048,) * 3), grid((2048,) * 3)).total > 2**36  # arithmetic only


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="MemAvailable is read from Linux's /proc/meminfo")
def test_available_memory_is_read_on_linux() -> None:
    room = available_memory("cpu")
    assert room is not None and 2**20 < room < 2**50


@pytest.mark.skipif("check_memory(" not in Path(dlir.memory.__file__).with_name("register.py").read_text(encoding="utf-8"),
                    reason="dlir.register does not call dlir.memory.check_memory yet")
def test_dlir_register_refuses_a_pair_that_would_not_fit_before_allocating(good: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """A stack on a 0.4 mm network grid and a 256 mm fixed image: 2.6e8 network voxels (29 GB), refused at once."""
    fine = forge(good, tmp_path / "fine.safetensors", stage(1, spacing_mm=[0.4, 0.4, 0.4]))
    ramp = np.add.outer(np.add.outer(np.arange(32.0), np.arange(32.0)), np.arange(32.0)).astype(np.float32)
    paths = []
    for name in ("fixed", "moving"):
        image = sitk.GetImageFromArray(ramp)
        image.SetSpacing((8.0, 8.0, 8.0))
        paths.append(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    before = digest(*paths, fine)
    out = tmp_path / "out"
    assert main(["register", *map(str, paths), "--stack", str(fine), "--device", "cpu", "--out", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "GB of memory" in line and "stage 2's network grid" in line and "coarser network grid" in line, line
    assert digest(*paths, fine) == before and not out.exists()
