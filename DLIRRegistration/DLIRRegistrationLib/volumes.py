"""Volume nodes <-> SimpleITK images, with the exact RAS <-> LPS conversion of the geometry.

Slicer works in RAS millimetres, the engine (``dlir``) in ITK's LPS millimetres; the two differ by
the flip ``F = diag(-1, -1, 1)`` (:func:`dlir.geometry.flip_ras_lps`).  A volume node's geometry (origin = RAS position of the centre of
voxel (0, 0, 0), spacing in mm, direction columns = RAS directions of the i, j, k axes) becomes
the image's ``origin_LPS = F @ origin_RAS``, same spacing, ``direction_LPS = F @ direction_RAS``.
Sign flips are exact in floating point, so node -> image -> node reproduces the geometry bit for bit.

Parent transforms (decision): DLIR registers the volumes **as the user sees them**, in world RAS.
A volume under a chain of *linear* parent transforms is handed to the engine with its world
geometry (the chain is folded into origin, spacing and direction; the node is not hardened or
modified).  A volume under a *non-linear* transform is refused with one sentence asking the user
to harden or remove it, because its world grid is no longer a regular grid.  Outputs are created
in world space (no parent transform) on the fixed volume's world grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import vtk

from dlir.errors import InputError
from dlir.geometry import flip_ras_lps, header_problem


@dataclass(frozen=True)
class VolumeGeometry:
    """A regular grid in world RAS mm: ``x_RAS = origin + directions @ diag(spacing) @ (i, j, k)``."""

    dimensions: tuple[int, int, int]  # (I, J, K) voxels
    origin: np.ndarray  # (3,) RAS mm
    spacing: np.ndarray  # (3,) mm
    directions: np.ndarray  # (3, 3) columns = RAS unit vectors of the i, j, k axes

    def ijkToRAS(self) -> np.ndarray:
        """4x4 homogeneous matrix voxel index (i, j, k) -> world RAS mm."""
        m = np.eye(4)
        m[:3, :3] = self.directions @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def voxelVolumeMm3(self) -> float:
        return float(np.prod(self.spacing))

    def applyTo(self, volumeNode) -> None:
        """Set this geometry on ``volumeNode`` (origin, spacing, IJK-to-RAS directions)."""
        volumeNode.SetOrigin(*(float(v) for v in self.origin))
        volumeNode.SetSpacing(*(float(v) for v in self.spacing))
        volumeNode.SetIJKToRASDirectionMatrix(vtkMatrix(_homogeneous(self.directions)))

    def toOrientedImageData(self, array: np.ndarray):
        """A ``vtkOrientedImageData`` holding ``array`` (K, J, I) on this geometry (for segment representations)."""
        import slicer

        image = slicer.vtkOrientedImageData()
        _fillImageData(image, array, self.dimensions)
        image.SetImageToWorldMatrix(vtkMatrix(self.ijkToRAS()))
        return image


def volumeGeometry(volumeNode, what: str) -> VolumeGeometry:
    """The world RAS grid of a volume node (see the module docstring for parent transforms).

    ``what`` names the volume in error messages ("fixed volume", ...).
    """
    image = volumeNode.GetImageData()
    if image is None:
        raise InputError(f"the {what} '{volumeNode.GetName()}' holds no image data")
    dimensions = tuple(int(d) for d in image.GetDimensions())
    directions = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(directions)
    local = VolumeGeometry(
        dimensions=dimensions,
        origin=np.array(volumeNode.GetOrigin(), dtype=np.float64),
        spacing=np.array(volumeNode.GetSpacing(), dtype=np.float64),
        directions=numpyMatrix(directions)[:3, :3],
    )
    _checkGeometry(local, volumeNode, what)
    parent = volumeNode.GetParentTransformNode()
    if parent is None:
        return local
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"the {what} '{volumeNode.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
            "harden that transform on it (Data module, right-click) or remove it before registering"
        )
    toWorld = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(toWorld)
    world = numpyMatrix(toWorld) @ local.ijkToRAS()
    spacing = np.linalg.norm(world[:3, :3], axis=0)
    dirs = world[:3, :3] / spacing
    if not np.allclose(dirs.T @ dirs, np.eye(3), atol=1e-6):
        raise InputError(
            f"the {what} '{volumeNode.GetName()}' is under a sheared linear transform ('{parent.GetName()}'); "
            "harden it on the volume (which resamples it) before registering"
        )
    geometry = VolumeGeometry(dimensions, world[:3, 3].copy(), spacing, dirs)
    _checkGeometry(geometry, volumeNode, what)
    return geometry


#: how to repair each geometry field in Slicer, for the sentence that refuses it
_GEOMETRY_FIXES = {
    "spacing": "set its true spacing in the Volumes module (Volume Information) before registering",
    "origin": "set its true origin in the Volumes module (Volume Information) before registering",
    "direction": "correct its IJK to RAS direction matrix (Volumes module, Volume Information) so that its columns "
                 "are perpendicular unit vectors, before registering",
}


def _checkGeometry(geometry: VolumeGeometry, volumeNode, what: str) -> None:
    """Refuse a geometry the engine cannot use (zero or NaN spacing, NaN origin, non-orthonormal directions)."""
    problem = header_problem(geometry.spacing, geometry.origin, geometry.directions)
    if problem is not None:
        field, phrase = problem
        raise InputError(f"the {what} '{volumeNode.GetName()}' cannot be registered: its {phrase}; {_GEOMETRY_FIXES[field]}")


def volumeNodeToImage(volumeNode, what: str) -> sitk.Image:
    """A new SimpleITK image (LPS mm) with the node's voxels and world geometry; the node is only read.

    Voxel values and type are kept (the engine casts to float32 itself); multi-component volumes
    become vector images (which the engine refuses with its own sentence).
    """
    geometry = volumeGeometry(volumeNode, what)
    scalars = volumeNode.GetImageData().GetPointData().GetScalars()
    if scalars is None:
        raise InputError(f"the {what} '{volumeNode.GetName()}' holds no voxel values")
    from vtk.util.numpy_support import vtk_to_numpy

    components = scalars.GetNumberOfComponents()
    i, j, k = geometry.dimensions
    shape = (k, j, i) if components == 1 else (k, j, i, components)
    array = np.array(vtk_to_numpy(scalars).reshape(shape), copy=True)
    image = sitk.GetImageFromArray(array, isVector=components > 1)
    setImageGeometry(image, geometry)
    return image


def maskOnGrid(volumeNode, reference: sitk.Image, what: str) -> np.ndarray:
    """The non-zero voxels of ``volumeNode`` (a label map) as a boolean (K, J, I) mask on the grid of ``reference``.

    Both are taken in world coordinates (the node's linear parent transforms folded in, as
    :func:`volumeNodeToImage` does; ``reference`` in LPS), and the mask is carried over by
    nearest-neighbour resampling with the identity, so it may lie on any grid; voxels of
    ``reference`` outside the node's grid are outside the mask.  The node is only read.
    """
    image = volumeNodeToImage(volumeNode, what)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the {what} '{volumeNode.GetName()}' has {image.GetNumberOfComponentsPerPixel()} components "
                         "per voxel; a mask is a label map with one")
    inside = sitk.Cast(image != 0, sitk.sitkUInt8)
    onGrid = sitk.Resample(inside, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(onGrid) != 0


def setImageGeometry(image: sitk.Image, geometry: VolumeGeometry) -> None:
    """Put a world RAS geometry on a SimpleITK image as ITK LPS origin, spacing and direction."""
    image.SetOrigin(tuple(float(v) for v in flip_ras_lps(geometry.origin)))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing))
    image.SetDirection(tuple(float(v) for v in flip_ras_lps(geometry.directions, axis=0).ravel()))


def imageGeometry(image: sitk.Image) -> VolumeGeometry:
    """The world RAS geometry of a SimpleITK image (LPS -> RAS)."""
    return VolumeGeometry(
        dimensions=tuple(int(s) for s in image.GetSize()),
        origin=flip_ras_lps(np.array(image.GetOrigin(), dtype=np.float64)),
        spacing=np.array(image.GetSpacing(), dtype=np.float64),
        directions=flip_ras_lps(np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3), axis=0),
    )


def imageToVolumeNode(image: sitk.Image, volumeNode) -> None:
    """Write a scalar SimpleITK image (LPS) into ``volumeNode``: voxels, type and RAS geometry.

    The node is taken out of any parent transform: the image's geometry is world geometry.
    """
    array = sitk.GetArrayFromImage(image)
    geometry = imageGeometry(image)
    imageData = vtk.vtkImageData()
    _fillImageData(imageData, array, geometry.dimensions)
    volumeNode.SetAndObserveTransformNodeID(None)
    geometry.applyTo(volumeNode)
    volumeNode.SetAndObserveImageData(imageData)


def _fillImageData(imageData, array: np.ndarray, dimensions: tuple[int, int, int]) -> None:
    """Copy a (K, J, I) array into a vtkImageData of ``dimensions`` (I, J, K), origin 0, spacing 1."""
    from vtk.util.numpy_support import get_vtk_array_type, numpy_to_vtk

    flat = np.ascontiguousarray(array).reshape(-1)
    imageData.SetDimensions(*dimensions)
    imageData.AllocateScalars(get_vtk_array_type(flat.dtype), 1)
    imageData.GetPointData().SetScalars(numpy_to_vtk(flat, deep=True, array_type=get_vtk_array_type(flat.dtype)))


def _homogeneous(m3: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = m3
    return m


def vtkMatrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    """A vtkMatrix4x4 with the values of a 4x4 numpy array."""
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def numpyMatrix(m: vtk.vtkMatrix4x4) -> np.ndarray:
    """A 4x4 numpy array with the values of a vtkMatrix4x4."""
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])

