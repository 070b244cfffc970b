"""Images come in from NIfTI, NRRD, MHA and DICOM series with their geometry intact (LPS mm)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dlir.errors import InputError
from dlir.geometry import Grid
from dlir.io import check_image, read_image


def oblique_image() -> sitk.Image:
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.integers(-500, 1500, size=(6, 9, 8)).astype(np.int16))
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-12.5, 30.25, -8.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return image


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """One file per slice with the tags ITK's GDCM reader uses to rebuild the geometry."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.99887766"
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.1",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in origin),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])),
            "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}",
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_file_formats_keep_geometry_and_values(tmp_path: Path, suffix: str) -> None:
    image = oblique_image()
    path = tmp_path / f"image{suffix}"
    sitk.WriteImage(image, str(path))
    back = read_image(path)
    assert Grid.from_image(back).same_as(Grid.from_image(image), tol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_dicom_series_folder(tmp_path: Path) -> None:
    image = oblique_image()
    write_dicom_series(image, tmp_path / "series")
    back = read_image(tmp_path / "series")
    assert Grid.from_image(back).same_as(Grid.from_image(image), tol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_unusable_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "missing.nii.gz", "fixed image")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        read_image(tmp_path / "empty.nii.gz")
    (tmp_path / "junk.nrrd").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot be read"):
        read_image(tmp_path / "junk.nrrd")
    (tmp_path / "nodicom").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path / "nodicom")
    with pytest.raises(InputError, match="2D"):
        check_image(sitk.Image([8, 8], sitk.sitkFloat32), "moving image")
    with pytest.raises(InputError, match="constant"):
        check_image(sitk.Image([8, 8, 8], sitk.sitkFloat32))
    nan = sitk.GetImageFromArray(np.full((4, 4, 4), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="NaN"):
        check_image(nan)


@pytest.mark.parametrize("cut", [1, 4, 5, 1000])
def test_an_integer_nifti_gz_cut_short_is_refused_though_it_is_not_inflated_to_be_checked(
    tmp_path: Path, cut: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole integer .nii.gz is known whole by its gzip trailer: the check reads (inflates) its header only, not its
    voxels (ITK inflates them once, to read them); any cut fails that test and the full check, which reads on into
    the voxels, names the truncation (cut by 1, 4 or 5 bytes the trailer itself is damaged)."""
    reads: list[int] = []  # the sizes asked of the check's gzip stream
    real_open = gzip.open

    class Counting:
        def __init__(self, *args, **kwargs) -> None:
            self.file = real_open(*args, **kwargs)

        def read(self, size: int = -1) -> bytes:
            reads.append(size)
            return self.file.read(size)

        def __enter__(self) -> "Counting":
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    monkeypatch.setattr(gzip, "open", Counting)
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, (20, 30, 40)).astype(np.int16))
    whole = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(whole), useCompression=True)
    assert np.array_equal(sitk.GetArrayFromImage(read_image(whole)), sitk.GetArrayFromImage(image))
    assert reads == [540]  # the header
    reads.clear()
    cut_path = tmp_path / "cut.nii.gz"
    cut_path.write_bytes(whole.read_bytes()[:-cut])
    with pytest.raises(InputError, match="truncated"):
        read_image(cut_path, "fixed image")
    assert reads[0] == 540 and len(reads) > 1  # the full check read on into the voxels
