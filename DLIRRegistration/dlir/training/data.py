"""Training data: which images, read once, normalised and resampled onto an axis-aligned training grid.

A source is a folder (every image file or DICOM-series sub-folder in it), a glob pattern, or a CSV
with the columns ``image`` and optionally ``labels``, ``mask`` and ``pair`` (paths relative to the
CSV; rows sharing a ``pair`` value are listed pairs, the first row the fixed image).  Each image
is normalised with the stack's intensity recipe (so training and inference see the same values)
and resampled (anti-aliased, trilinear) onto an identity-direction grid at the finest stage
spacing covering its bounding box (LPS mm); label maps go there by nearest neighbour.
"""

from __future__ import annotations

import csv
import glob
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..geometry import Grid, image_to_tensor, sample
from ..io import IMAGE_SUFFIXES, check_image, check_label_map, read_image
from ..pipeline import PreparedImage
from ..preprocess import network_grid, normalise_intensity, smooth_for_spacing
from ..recipe import IntensitySpec
from ..transforms import grid_points


@dataclass(frozen=True)
class ImageEntry:
    """One training image's files (``labels``/``mask`` optional) and its listed-pair id."""

    image: Path
    labels: Path | None = None
    mask: Path | None = None
    pair: str | None = None


@dataclass
class TrainingImage:
    """An image on its training grid: intensities in [0, 1] and labels (``[1, 1, D, H, W]``, float label values)."""

    entry: ImageEntry
    prepared: PreparedImage
    labels: torch.Tensor | None

    @property
    def name(self) -> str:
        return _stem(self.entry.image)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def find_images(source: str) -> list[ImageEntry]:
    """The entries of a folder, a glob or a CSV (see the module docstring); refuses an empty source."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".csv":
        entries = _from_csv(path)
    elif path.is_dir():
        entries = [ImageEntry(p) for p in sorted(path.iterdir())
                   if _is_image(p) or (p.is_dir() and any(_looks_dicom(f) for f in p.iterdir()))]
    elif any(c in source for c in "*?["):
        entries = [ImageEntry(Path(p)) for p in sorted(glob.glob(source, recursive=True)) if _is_image(Path(p))]
    elif path.exists():
        raise InputError(f"the training data {source} is neither a folder, a glob nor a CSV file")
    else:
        raise InputError(f"the training data {source} does not exist")
    if not entries:
        raise InputError(f"no training images found in {source}")
    return entries


def _looks_dicom(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() == ".dcm" or path.suffix == "")


def _from_csv(path: Path) -> list[ImageEntry]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise InputError(f"the CSV {path} needs a header with an 'image' column (and optionally labels, mask, pair)")
        rows = list(reader)

    def resolve(value: str | None) -> Path | None:
        if not value or not value.strip():
            return None
        p = Path(value.strip()).expanduser()
        return p if p.is_absolute() else path.parent / p

    entries = []
    for number, row in enumerate(rows, 2):
        image = resolve(row.get("image"))
        if image is None:
            raise InputError(f"row {number} of {path} has no image")
        entries.append(ImageEntry(image, resolve(row.get("labels")), resolve(row.get("mask")), (row.get("pair") or "").strip() or None))
    return entries


def load_image(entry: ImageEntry, intensity: IntensitySpec, spacing: tuple[float, float, float], min_size: int) -> TrainingImage:
    """Read, check, normalise and resample one entry onto its training grid (``spacing`` mm, LPS axis-aligned)."""
    image = check_image(read_image(entry.image, "training image"), f"training image {entry.image}")
    grid = Grid.from_image(image)
    raw = image_to_tensor(image)
    normalised = normalise_intensity(raw, intensity)
    target = network_grid(grid, spacing, 1, min_size)
    points = grid_points(target)
    prepared = PreparedImage(sample(smooth_for_spacing(normalised, grid, spacing), grid, points), target)
    labels = None
    if entry.labels is not None:
        label_image = check_label_map(read_image(entry.labels, "label map"), image, f"label map {entry.labels}", f"image {entry.image}")
        labels = sample(image_to_tensor(label_image), Grid.from_image(label_image), points, mode="nearest")
    return TrainingImage(entry, prepared, labels)


def pair_groups(images: list[TrainingImage]) -> list[tuple[TrainingImage, TrainingImage]]:
    """The listed (fixed, moving) pairs: images sharing a ``pair`` id, the first one fixed, each later one moving."""
    groups: dict[str, list[TrainingImage]] = {}
    for image in images:
        if image.entry.pair:
            groups.setdefault(image.entry.pair, []).append(image)
    return [(members[0], moving) for members in groups.values() for moving in members[1:]]
