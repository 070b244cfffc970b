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

from .settings import DataSource, SettingsError, TrainingSettings

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

#: columns of the CSV written for scene volumes (the trainer's CSV columns)
CSV_IMAGE, CSV_LABELS = "image", "labels"


def data_section(settings: TrainingSettings, job_folder: Path, volumes: Sequence[Any] = (),
                 label_maps: Sequence[Any] = ()) -> dict[str, Any]:
    """The ``[data]`` table of the trainer's configuration for the chosen source.

    Scene volumes (``volumes``, ``label_maps``: MRML nodes) are exported into ``job_folder/data``.
    """
    source = DataSource(settings.dataSource)
    if source == DataSource.FOLDER:
        return {"images": str(Path(str(settings.dataFolder)).resolve())}
    if source == DataSource.CSV:
        return {"images": str(Path(str(settings.dataCsv)).resolve())}
    return {"images": str(export_scene_volumes(volumes, label_maps, job_folder / "data"))}


def export_scene_volumes(volumes: Sequence[Any], label_maps: Sequence[Any], folder: Path) -> Path:
    """Write ``volumes`` (and the label maps that belong to them) as NIfTI files plus ``images.csv``; returns the CSV."""
    volumes = [v for v in volumes if v is not None]
    if not volumes:
        raise SettingsError("no scene volume is checked; check the volumes to train on")
    for node in volumes:
        if node.GetImageData() is None:
            raise SettingsError(f"the volume {node.GetName()} has no image data")
        dims = node.GetImageData().GetDimensions()
        if min(dims) < 2:
            raise SettingsError(f"the volume {node.GetName()} is 2D ({dims[0]}x{dims[1]}x{dims[2]}); DLIR trains on 3D images")
    owners = match_label_maps(volumes, label_maps)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    used: set[str] = set()
    for node in volumes:
        stem = _unique(_file_stem(node.GetName()), used)
        image_path = folder / f"{stem}.nii.gz"
        write_volume(node, image_path)
        row = {CSV_IMAGE: str(image_path), CSV_LABELS: ""}
        label = owners.get(node.GetID())
        if label is not None:
            label_path = folder / f"{stem}_labels.nii.gz"
            write_volume(label, label_path)
            row[CSV_LABELS] = str(label_path)
        rows.append(row)
    csv_path = folder / "images.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[CSV_IMAGE, CSV_LABELS])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def match_label_maps(volumes: Sequence[Any], label_maps: Sequence[Any]) -> dict[str, Any]:
    """Volume ID -> its label map: by name (``VOLUME-label``, ``VOLUME_labels``...) or else by identical grid."""
    owners: dict[str, Any] = {}
    for label in [lm for lm in label_maps if lm is not None]:
        by_name = [v for v in volumes if label.GetName().lower().startswith(v.GetName().lower())]
        by_name.sort(key=lambda v: len(v.GetName()), reverse=True)
        candidates = by_name[:1] or [v for v in volumes if same_grid(v, label)]
        if len(candidates) != 1:
            how = "several" if candidates else "none"
            raise SettingsError(f"the label map {label.GetName()} matches {how} of the checked volumes; name it after its volume "
                                f"(e.g. VOLUME-label) and give it the volume's grid")
        owner = candidates[0]
        if not same_grid(owner, label):
            raise SettingsError(f"the label map {label.GetName()} is not on the grid of {owner.GetName()}; resample it onto the volume first")
        if owner.GetID() in owners:
            raise SettingsError(f"the volume {owner.GetName()} has two label maps checked; keep one")
        owners[owner.GetID()] = label
    return owners


def same_grid(a: Any, b: Any) -> bool:
    """Same dimensions and the same IJK -> RAS matrix (spacing, origin, direction)."""
    if a.GetImageData() is None or b.GetImageData() is None:
        return False
    if tuple(a.GetImageData().GetDimensions()) != tuple(b.GetImageData().GetDimensions()):
        return False
    return np.allclose(_ijk_to_ras(a), _ijk_to_ras(b), atol=1e-4)


def _ijk_to_ras(node: Any) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def write_volume(node: Any, path: Path) -> None:
    """Write a volume node to ``path`` with a fresh storage node (the node and its own storage stay as they are)."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.UseCompressionOn()
    if not storage.WriteData(node):
        raise SettingsError(f"could not write the volume {node.GetName()} to {path}")


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "volume"


def _unique(stem: str, used: set[str]) -> str:
    candidate, k = stem, 2
    while candidate in used:
        candidate, k = f"{stem}_{k}", k + 1
    used.add(candidate)
    return candidate
