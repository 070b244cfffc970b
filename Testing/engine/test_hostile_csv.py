"""Hostile pairs tables for `dlir register --pairs` (and `dlir evaluate`, which reads them the same way).

A table is read (UTF-8, or UTF-8/16/32 with a byte-order mark) or refused with one sentence
naming the file and the problem (an :class:`~dlir.errors.InputError`), never a traceback; an id
that is accepted is a plain folder name, so ``OUT/ID`` stays inside ``OUT``.  Property-based
(hypothesis, derandomised, with the recorded cases as explicit examples) on the reader itself,
and end to end through ``dlir register --pairs`` for the encodings.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dlir.cli import main
from dlir.errors import InputError
from dlir.pairs import check_pair_id, read_pairs

CHECKS = settings(derandomize=True, database=None, deadline=None, max_examples=150,
                  suppress_health_check=[HealthCheck.too_slow])

# every character but surrogates (which no encoder writes); NUL is written and read back too
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
SAFE_ID = st.text(st.sampled_from("abcXYZ019_-. é"), min_size=1, max_size=12).filter(lambda s: s.strip() not in ("", ".", ".."))
ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-32")


def encode(text: str, encoding: str) -> bytes:
    """``text`` in ``encoding``; the ``-bom`` variants put the byte-order mark in front of the plain UTF-16 of that order."""
    if encoding == "utf-16-le-bom":
        return codecs.BOM_UTF16_LE + text.encode("utf-16-le")
    if encoding == "utf-16-be-bom":
        return codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    return text.encode(encoding)


def table(ids: list[str]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(["id", "fixed", "moving"])
    writer.writerows([pair_id, f"f{n}.nii.gz", f"m{n}.nii.gz"] for n, pair_id in enumerate(ids))
    return buffer.getvalue()


def one_sentence(exc: InputError, path: Path | None = None) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text
    if path is not None:
        assert str(path) in text, text
    return text


def is_plain(pair_id: str, base: Path) -> bool:
    """``base/ID`` is a folder directly inside ``base``, whatever the platform's separators."""
    return (pair_id not in ("", ".", "..") and Path(pair_id).name == pair_id and not Path(pair_id).is_absolute()
            and "\\" not in pair_id and ":" not in pair_id and all(ord(c) >= 32 and ord(c) != 127 for c in pair_id)
            and (base / pair_id).resolve().parent == base.resolve())


# ----------------------------------------------------------------------------------- ids
@CHECKS
@given(ANY_TEXT)
@example("../x")
@example("/etc/x")
@example("..")
@example(".")
@example("")
@example("a/b")
@example("a\\b")
@example("C:x")
@example("nul\x00byte")
@example("new\nline")
@example("summary.csv")
@example("SUMMARY.CSV")
@example("x" * 201)
@example("é" * 101)
def test_an_accepted_id_is_a_plain_folder_name(pair_id: str) -> None:
    base = Path(tempfile.gettempdir()) / "dlir-out"
    try:
        accepted = check_pair_id(pair_id, "row 7 of pairs.csv")
    except InputError as exc:
        text = one_sentence(exc)
        assert "row 7 of pairs.csv" in text and "plain name" in text, text
        return
    assert accepted == pair_id
    assert is_plain(pair_id, base), repr(pair_id)
    assert pair_id.casefold() != "summary.csv" and len(pair_id.encode()) <= 200


@CHECKS
@given(SAFE_ID)
@example("case 1")
@example("a.b")
@example("...")
def test_a_plain_id_is_accepted(pair_id: str) -> None:
    assert check_pair_id(pair_id, "row 2 of pairs.csv") == pair_id


# ----------------------------------------------------------------------------------- tables
@CHECKS
@given(ids=st.lists(ANY_TEXT, min_size=1, max_size=5), encoding=st.sampled_from(ENCODINGS))
@example(ids=["a", "A"], encoding="utf-8")  # one folder on macOS and Windows
@example(ids=["../escape"], encoding="utf-8-sig")
@example(ids=["ok", "/abs/olute"], encoding="utf-16")
@example(ids=["ok", ""], encoding="utf-32")  # an empty id gets a generated one
def test_a_table_is_read_whole_or_refused_with_a_sentence(ids: list[str], encoding: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.csv"
        path.write_bytes(encode(table(ids), encoding))
        try:
            pairs = read_pairs(path)
        except InputError as exc:
            one_sentence(exc, path)
            return
        assert len(pairs) == len(ids)
        for n, (pair, given_id) in enumerate(zip(pairs, ids)):
            assert pair.id == (given_id.strip() or f"pair{n:03d}")
            assert is_plain(pair.id, Path(folder) / "out"), repr(pair.id)
            assert pair.fixed == Path(folder) / f"f{n}.nii.gz" and pair.moving == Path(folder) / f"m{n}.nii.gz"
        assert len({p.id.casefold() for p in pairs}) == len(pairs)


@CHECKS
@given(ids=st.lists(SAFE_ID, min_size=1, max_size=5, unique_by=lambda s: s.strip().casefold()), encoding=st.sampled_from(ENCODINGS))
@example(ids=["brain1", "lung 2"], encoding="utf-8-sig")
@example(ids=["é-ü"], encoding="utf-16-be-bom")
def test_every_encoding_with_a_byte_order_mark_reads_the_same_table(ids: list[str], encoding: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        plain, marked = Path(folder) / "plain.csv", Path(folder) / "marked.csv"
        plain.write_text(table(ids), encoding="utf-8", newline="")
        marked.write_bytes(encode(table(ids), encoding))
        assert [p.id for p in read_pairs(marked)] == [s.strip() for s in ids]
        assert [(p.id, p.fixed, p.moving) for p in read_pairs(marked)] == [(p.id, p.fixed, p.moving) for p in read_pairs(plain)]


LATIN1 = "id,fixed,moving\ncafé,f.nii.gz,m.nii.gz\n".encode("latin-1")


@CHECKS
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xef\xbb\xbf")
@example(b"\xff\xfe")
@example(LATIN1)
@example(b"\xef\xbb\xbf" + LATIN1)  # a UTF-8 mark before Latin-1 bytes
@example("id,fixed,moving\na,f.nii.gz,m.nii.gz\n".encode("utf-16-le"))  # UTF-16 without a mark
@example(b"\x00\x00\xfe\xff" + b"\x00")  # a UTF-32 mark, then not UTF-32
@example(b"fixed,moving\n" + b"a" * 200_000 + b",m.nii.gz\n")  # a field beyond the csv module's limit
@example(b"fixed,moving,fixed\nf.nii.gz,m.nii.gz,g.nii.gz\n")  # a column named twice
@example(b'fixed,moving\n"f.nii.gz,m.nii.gz\n')  # an unterminated quote
@example(b"\x1f\x8b\x08\x00" + bytes(40))  # a gzip file given as the table
def test_any_bytes_are_read_or_refused_with_a_sentence(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.csv"
        path.write_bytes(data)
        try:
            pairs = read_pairs(path)
        except InputError as exc:
            one_sentence(exc, path)
            return
        assert pairs and all(is_plain(p.id, Path(folder)) for p in pairs)


@pytest.mark.parametrize("data, words", [
    (LATIN1, ["not valid UTF-8", "0xe9", "save it as UTF-8"]),
    ("id,fixed,moving\na,f.nii.gz,m.nii.gz\n".encode("utf-16-le"), ["NUL characters", "UTF-16"]),
    (b"\xff\xfe" + b"\x00\xd8", ["not valid UTF-16"]),
    (b"fixed,moving,fixed\nf.nii.gz,m.nii.gz,g.nii.gz\n", ["column 'fixed' twice"]),
    (b"fixed,moving\n" + b"a" * 200_000 + b",m.nii.gz\n", ["not a valid CSV file", "line 2"]),
    (b"id,fixed,moving\nx,f.nii.gz,m.nii.gz\nX,f.nii.gz,m.nii.gz\n", ["id 'X' twice", "as 'x'"]),
])
def test_the_refusals_say_what_is_wrong(tmp_path: Path, data: bytes, words: list[str]) -> None:
    path = tmp_path / "pairs.csv"
    path.write_bytes(data)
    with pytest.raises(InputError) as caught:
        read_pairs(path)
    text = one_sentence(caught.value, path)
    for word in words:
        assert word in text, text


def test_header_names_with_spaces_are_read(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(" id , fixed ,moving\n a , f.nii.gz , m.nii.gz \n", encoding="utf-8")
    (pair,) = read_pairs(path)
    assert (pair.id, pair.fixed, pair.moving) == ("a", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz")


def test_pair_folders_get_plain_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--pairs .`` inside a pair folder: its id is the folder's name, not '' (which would write into OUT itself)."""
    pair = tmp_path / "case7"
    pair.mkdir()
    for name in ("fixed.nii.gz", "moving.nii.gz"):
        (pair / name).write_bytes(b"x")
    monkeypatch.chdir(pair)
    assert [p.id for p in read_pairs(".")] == ["case7"]


# ----------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, fresh_stack_file: Path) -> Path:
    root = tmp_path_factory.mktemp("hostile-csv-images")
    for name, seed in (("fixed", 0), ("moving", 1)):
        from scipy import ndimage

        arr = ndimage.gaussian_filter(np.random.default_rng(seed).random((16, 16, 16)), 1.5).astype(np.float32)
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(image, str(root / f"{name} é.nii.gz"))  # a non-ASCII name: the encoding matters
    shutil.copyfile(fresh_stack_file, root / "stack.safetensors")
    return root


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be-bom"])
def test_register_reads_a_table_with_a_byte_order_mark(images: Path, tmp_path: Path, capfd, encoding: str) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark: the first column (here ``fixed``) must still be found."""
    path = images / f"pairs-{encoding}.csv"
    path.write_bytes(encode("fixed,moving,id\nfixed é.nii.gz,moving é.nii.gz,été\n", encoding))
    out = tmp_path / "out"
    capfd.readouterr()
    code = main(["register", "--pairs", str(path), "--stack", str(images / "stack.safetensors"), "--out", str(out), "--device", "cpu"])
    err = capfd.readouterr().err
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv", "été"]
    assert (out / "été" / "result.json").is_file()


@pytest.mark.parametrize("data, words", [
    (LATIN1, ["not valid UTF-8", "0xe9"]),
    ("fixed,moving\nf.nii.gz,m.nii.gz\n".encode("utf-16-le"), ["NUL characters"]),
])
def test_register_refuses_a_table_it_cannot_read_with_one_line(tmp_path: Path, capfd, data: bytes, words: list[str],
                                                              fresh_stack_file: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_bytes(data)
    capfd.readouterr()
    code = main(["register", "--pairs", str(path), "--stack", str(fresh_stack_file), "--out", str(tmp_path / "out")])
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for word in [str(path), *words]:
        assert word in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == ["pairs.csv"]
