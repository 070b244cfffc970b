"""The page's safe defaults, without a browser: loopback by default, files only under the served folder, uploads
size-limited and named safely, one registration at a time.  These need no web extra (they run in the test
environment too)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from dlir.errors import InputError
from dlirweb import inputs
from dlirweb.server import isLoopback, main


@pytest.fixture
def files(tmp_path: Path) -> inputs.InputFiles:
    served = tmp_path / "served"
    (served / "sub").mkdir(parents=True)
    (served / "a.nii.gz").write_bytes(b"a")
    (served / "sub" / "b.nrrd").write_bytes(b"b")
    (served / "notes.txt").write_text("not offered")
    (tmp_path / "outside.nii.gz").write_bytes(b"secret")
    os.symlink(tmp_path / "outside.nii.gz", served / "link.nii.gz")
    uploads = tmp_path / "uploads"
    uploads.mkdir(mode=0o700)
    return inputs.InputFiles(Path(inputs.__file__).resolve().parents[2] / "Resources" / "SampleData", served, uploads, 1000)


def test_only_images_under_the_served_folder_are_offered(files: inputs.InputFiles) -> None:
    offered = [c.value for c in files.choices()]
    assert "folder:a.nii.gz" in offered and "folder:sub/b.nrrd" in offered
    assert "folder:notes.txt" not in offered and "folder:link.nii.gz" not in offered  # not an image; leads outside
    assert inputs.SAMPLE_FIXED in offered
    assert files.path("folder:sub/b.nrrd") == files.folder / "sub" / "b.nrrd"


@pytest.mark.parametrize("key", ["folder:../outside.nii.gz", "folder:link.nii.gz", "folder:/etc/passwd",
                                 "upload:../outside.nii.gz", "sample:../../README.md", "file:/etc/passwd"])
def test_a_path_outside_what_is_offered_is_refused(files: inputs.InputFiles, key: str) -> None:
    with pytest.raises(InputError):
        files.path(key)


def test_uploads_are_size_limited_and_kept_under_a_plain_name(files: inputs.InputFiles) -> None:
    key = files.saveUpload("../../my scan (1).nii.gz", b"x" * 10)
    assert key == "upload:my_scan__1_.nii.gz"
    assert (files.uploadFolder / "my_scan__1_.nii.gz").read_bytes() == b"x" * 10
    assert files.path(key).parent == files.uploadFolder
    with pytest.raises(InputError, match=r"the upload big.nii.gz is 0.0 MB; this server takes files up to 0 MB \(dlir-web --max-upload-mb\)"):
        files.saveUpload("big.nii.gz", b"x" * 1001)
    assert not (files.uploadFolder / "big.nii.gz").exists()


def test_a_file_is_named_as_the_user_knows_it_in_sentences(files: inputs.InputFiles) -> None:
    assert files.asShown(f"the fixed image {files.uploadFolder}/a.nii.gz is 2D") == "the fixed image a.nii.gz is 2D"
    assert files.asShown(f"the moving image {files.folder}/sub/b.nrrd is 2D") == "the moving image sub/b.nrrd is 2D"


def test_loopback_is_the_default_and_anything_else_is_said(capsys) -> None:
    assert isLoopback("127.0.0.1") and isLoopback("::1") and isLoopback("localhost")
    assert not isLoopback("0.0.0.0") and not isLoopback("192.168.1.20")
    assert main(["--host", "0.0.0.0", "--folder", "/no/such/folder"]) == 2  # stops before serving
    said = capsys.readouterr().err
    assert "anyone who can reach port 8080 can use this page" in said and "the folder /no/such/folder does not exist" in said
    assert main(["--folder", "/no/such/folder"]) == 2
    assert "anyone" not in capsys.readouterr().err


def test_one_registration_at_a_time(files: inputs.InputFiles, tmp_path: Path) -> None:
    from dlirweb.session import BUSY, Session

    session = Session(scene=None, files=files, resultsFolder=tmp_path)
    with pytest.raises(InputError, match="choose a fixed and a moving image first"):
        asyncio.run(session.register("brain-mri", "fast", lambda step, fraction: None))
    session.running = True
    for attempt in (lambda: asyncio.run(session.register("brain-mri", "fast", lambda step, fraction: None)),
                    lambda: session.choose("fixed", inputs.SAMPLE_FIXED)):
        with pytest.raises(InputError, match=BUSY):
            attempt()


def test_the_readme_commands_install_the_web_extra_and_start_dlir_web() -> None:
    import re
    import tomllib

    repo = Path(__file__).resolve().parents[2]
    section = (repo / "README.md").read_text(encoding="utf-8").split("## Use in a browser", 1)[1].split("\n## ", 1)[0]
    install, start = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert install == 'python3 -m venv .venv-web && .venv-web/bin/pip install -q -e ".[web]"'
    assert start.startswith(".venv-web/bin/dlir-web ")
    assert install in (repo / ".ci" / "run").read_text(encoding="utf-8")  # what CI installs the browser tests with
    project = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["scripts"]["dlir-web"] == "dlirweb.server:main"
    assert all("==" in requirement for requirement in project["optional-dependencies"]["web"])  # pinned
