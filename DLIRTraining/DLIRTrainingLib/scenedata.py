"""Training data for a job: a folder, a CSV, or volumes of the scene exported into the job folder.

Scene volumes are written with Slicer's own storage node (NIfTI, geometry kept: Slicer's RAS
becomes the file's LPS as every Slicer writer does) into ``JOB/data/`` together with a CSV of
their paths, so the trainer (a separate process) reads them like any other data set.  The nodes
themselves are never modified.  Only MRML classes are used (runs on the slicer-core wheel).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dlir.errors import InputError

from .settings import DataSource, TrainingSettings

#: columns of the CSV written for scene volumes (the trainer's CSV columns)
CSV_IMAGE, CSV_LABELS = "image", "labels"
#: where scene volumes go in a job folder, and the CSV listing them
SCENE_DATA_DIR, SCENE_CSV = "data", "images.csv"


def trainingImages(settings: TrainingSettings, jobFolder: Path) -> str:
    """The trainer's ``data.images`` for the chosen source: the folder or CSV chosen ('' when none), or
    for scene volumes the CSV :func:`exportSceneVolumes` writes into ``jobFolder``."""
    if DataSource(settings.dataSource) == DataSource.SCENE:
        return str(Path(jobFolder).resolve() / SCENE_DATA_DIR / SCENE_CSV)
    return settings.imagesSource()


def checkSceneVolumes(volumes: Sequence[Any], labelMaps: Sequence[Any] = ()) -> dict[str, Any]:
    """Refuse scene volumes the trainer could not use (none, no image data, 2D; label maps that belong to
    no single volume); returns volume ID -> its label map (:func:`matchLabelMaps`)."""
    volumes = [v for v in volumes if v is not None]
    if not volumes:
        raise InputError("no scene volume is checked; check the volumes to train on")
    for node in volumes:
        if node.GetImageData() is None:
            raise InputError(f"the volume {node.GetName()} has no image data")
        dims = node.GetImageData().GetDimensions()
        if min(dims) < 2:
            raise InputError(f"the volume {node.GetName()} is 2D ({dims[0]}x{dims[1]}x{dims[2]}); DLIR trains on 3D images")
    return matchLabelMaps(volumes, labelMaps)


def exportSceneVolumes(volumes: Sequence[Any], labelMaps: Sequence[Any], jobFolder: Path) -> Path:
    """Write ``volumes`` (and the label maps that belong to them) as NIfTI files plus a CSV of them into
    ``jobFolder/data``; returns the CSV (:func:`trainingImages`)."""
    owners = checkSceneVolumes(volumes, labelMaps)
    volumes = [v for v in volumes if v is not None]
    folder = Path(jobFolder) / SCENE_DATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    used: set[str] = set()
    for node in volumes:
        stem = _unique(_fileStem(node.GetName()), used)
        image_path = folder / f"{stem}.nii.gz"
        writeVolume(node, image_path)
        row = {CSV_IMAGE: str(image_path), CSV_LABELS: ""}
        label = owners.get(node.GetID())
        if label is not None:
            label_path = folder / f"{stem}_labels.nii.gz"
            writeVolume(label, label_path)
            row[CSV_LABELS] = str(label_path)
        rows.append(row)
    csv_path = folder / SCENE_CSV
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[CSV_IMAGE, CSV_LABELS])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def matchLabelMaps(volumes: Sequence[Any], labelMaps: Sequence[Any]) -> dict[str, Any]:
    """Volume ID -> its label map: by name (``VOLUME-label``, ``VOLUME_labels``...) or else by identical grid."""
    owners: dict[str, Any] = {}
    for label in [lm for lm in labelMaps if lm is not None]:
        by_name = [v for v in volumes if label.GetName().lower().startswith(v.GetName().lower())]
        by_name.sort(key=lambda v: len(v.GetName()), reverse=True)
        candidates = by_name[:1] or [v for v in volumes if sameGrid(v, label)]
        if len(candidates) != 1:
            how = "several" if candidates else "none"
            raise InputError(f"the label map {label.GetName()} matches {how} of the checked volumes; name it after its volume "
                                f"(e.g. VOLUME-label) and give it the volume's grid")
        owner = candidates[0]
        if not sameGrid(owner, label):
            raise InputError(f"the label map {label.GetName()} is not on the grid of {owner.GetName()}; resample it onto the volume first")
        if owner.GetID() in owners:
            raise InputError(f"the volume {owner.GetName()} has two label maps checked; keep one")
        owners[owner.GetID()] = label
    return owners


def sameGrid(a: Any, b: Any) -> bool:
    """Same dimensions and the same IJK -> RAS matrix (spacing, origin, direction)."""
    if a.GetImageData() is None or b.GetImageData() is None:
        return False
    if tuple(a.GetImageData().GetDimensions()) != tuple(b.GetImageData().GetDimensions()):
        return False
    return np.allclose(_ijkToRAS(a), _ijkToRAS(b), atol=1e-4)


def _ijkToRAS(node: Any) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def writeVolume(node: Any, path: Path) -> None:
    """Write a volume node to ``path`` with a fresh storage node (the node and its own storage stay as they are)."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.UseCompressionOn()
    if not storage.WriteData(node):
        raise InputError(f"could not write the volume {node.GetName()} to {path}")


def _fileStem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "volume"


def _unique(stem: str, used: set[str]) -> str:
    candidate, k = stem, 2
    while candidate in used:
        candidate, k = f"{stem}_{k}", k + 1
    used.add(candidate)
    return candidate
