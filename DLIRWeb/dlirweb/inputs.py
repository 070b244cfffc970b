"""What the page may register, and reading it into the scene.

Three kinds of source, each named by a key ``kind:name`` that the page holds:

* ``sample:FILE``: a file of the bundled sample pair (``Resources/SampleData``);
* ``folder:RELATIVE/PATH``: an image under the folder given on the command line, never outside
  it (``..``, absolute paths and symbolic links leaving it are refused);
* ``upload:NAME``: a file sent by the browser, size-limited, kept in the server's private
  temporary folder.

Files are read by the engine's reader and checked by the engine's image check, so a file the
command line refuses is refused here with the same sentence; a good file becomes a volume node
through ``DLIRRegistrationLib.volumes.imageToVolumeNode`` (LPS -> RAS as in Slicer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from dlir.errors import InputError
from dlir.io import check_image, read_image

#: file names the folder listing offers (what ``dlir register`` reads, DICOM folders aside)
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
SAMPLE_FIXED = "sample:sample_fixed.nii.gz"
SAMPLE_MOVING = "sample:sample_moving.nii.gz"
SAMPLE_MOVING_LABELS = "sample:sample_moving_labels.nii.gz"
SAMPLE_FIXED_LABELS = "sample:sample_fixed_labels.nii.gz"
#: at most this many files of the served folder are listed
MAX_LISTED = 500


@dataclass(frozen=True)
class Choice:
    """One entry of a file chooser: ``title`` shown, ``value`` the key."""

    title: str
    value: str


class InputFiles:
    """The sources the page offers, and their files; ``folder`` may be None (no server-side files)."""

    def __init__(self, sampleFolder: Path, folder: Path | None, uploadFolder: Path, maxUploadBytes: int) -> None:
        self.sampleFolder = sampleFolder
        self.folder = folder.resolve() if folder is not None else None
        self.uploadFolder = uploadFolder
        self.maxUploadBytes = maxUploadBytes

    def choices(self) -> list[Choice]:
        """Sample files, then the served folder's images, then the uploads."""
        found = [Choice(f"sample: {p.name}", f"sample:{p.name}") for p in sorted(self.sampleFolder.glob("*.nii.gz"))]
        if self.folder is not None:
            listed = sorted(p for p in self.folder.rglob("*") if p.name.lower().endswith(IMAGE_SUFFIXES) and self._inside(p))
            found += [Choice(str(p.relative_to(self.folder)), f"folder:{p.relative_to(self.folder).as_posix()}")
                      for p in listed[:MAX_LISTED]]
        found += [Choice(f"uploaded: {p.name}", f"upload:{p.name}") for p in sorted(self.uploadFolder.iterdir())]
        return found

    def path(self, key: str) -> Path:
        """The file of a key; :class:`InputError` for a key that names nothing this server offers."""
        kind, _, name = key.partition(":")
        if kind == "sample" and name in {p.name for p in self.sampleFolder.glob("*.nii.gz")}:
            return self.sampleFolder / name
        if kind == "upload" and name == safeName(name) and (self.uploadFolder / name).is_file():
            return self.uploadFolder / name
        if kind == "folder" and self.folder is not None:
            path = self.folder / name
            if self._inside(path) and path.is_file():
                return path.resolve()
            raise InputError(f"{name} is not a file under the served folder {self.folder}")
        raise InputError(f"{key!r} is not a file this server offers; choose one from the list or upload it")

    def saveUpload(self, name: str, content: bytes) -> str:
        """Keep an uploaded file (size-limited) in the private upload folder; returns its key."""
        clean = safeName(name)
        if len(content) > self.maxUploadBytes:
            raise InputError(f"the upload {clean} is {len(content) / 2**20:.1f} MB; this server takes files up to "
                             f"{self.maxUploadBytes / 2**20:.0f} MB (dlir-web --max-upload-mb)")
        (self.uploadFolder / clean).write_bytes(content)
        return f"upload:{clean}"

    def asShown(self, sentence: str) -> str:
        """A sentence about a file with the file named as the user knows it: uploads by their name, the served
        folder's files relative to it (so it reads as ``dlir register`` says it when run in that folder)."""
        for folder in (self.uploadFolder, self.folder):
            if folder is not None:
                sentence = sentence.replace(f"{folder}/", "")
        return sentence

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.folder)
        except OSError:
            return False


def safeName(name: str) -> str:
    """A browser's file name reduced to a plain file name (no folders, no odd characters), keeping its suffixes."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name.replace("\\", "/")).name).lstrip(".")
    return base or "upload"


def readVolume(path: Path, what: str) -> sitk.Image:
    """An image as ``dlir register`` reads and checks it (``what``: "fixed image", "moving image"); its sentence else."""
    image = read_image(path, what)
    check_image(image, what, as_float32=False)
    return image


def readLabels(path: Path, what: str) -> sitk.Image:
    """A label map or mask as ``dlir register`` reads it (a 3D scalar image); its sentence else."""
    image = read_image(path, what)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the {what} must be a scalar 3D image")
    return image


def volumeNode(scene, image: sitk.Image, name: str, className: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node holding ``image`` (LPS in, RAS in the scene), with default display."""
    from DLIRRegistrationLib.volumes import imageToVolumeNode

    node = scene.AddNewNodeByClass(className, name)
    imageToVolumeNode(image, node)
    node.CreateDefaultDisplayNodes()
    return node


def segmentationNode(scene, labels: sitk.Image, name: str, sampleNames: bool = False):
    """A segmentation with one segment per label value of ``labels`` (as Slicer imports a label map);
    ``sampleNames``: the sample pair's anatomical segment names."""
    import slicer

    from DLIRRegistrationLib.samplepair import nameSegments

    if labels.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        labels = sitk.Cast(labels, sitk.sitkInt32)
    labelmap = volumeNode(scene, labels, f"{name} labels", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    try:
        if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
            scene.RemoveNode(segmentation)
            raise InputError(f"the {name} cannot be turned into segments")
    finally:
        scene.RemoveNode(labelmap)
    if sampleNames:
        nameSegments(segmentation)
    segmentation.CreateDefaultDisplayNodes()
    return segmentation
