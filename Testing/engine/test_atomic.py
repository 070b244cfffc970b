"""``dlir.atomic``: a file holds its old contents or all of its new ones; no temporary file is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dlir.atomic import atomic_write, write_text_atomically


def test_a_write_replaces_the_file_whole_as_an_ordinary_file(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    target.write_text("old", encoding="utf-8")
    write_text_atomically(target, "new\n")
    assert target.read_text(encoding="utf-8") == "new\n"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".last.pt.dlir-")
        temp.write_bytes(b"half of the ne")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
