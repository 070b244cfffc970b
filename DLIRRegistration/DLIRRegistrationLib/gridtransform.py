"""The engine's displacement field as a Slicer grid transform node.

The engine's field ``u`` (LPS mm, on the fixed grid) maps a fixed point ``x`` to the moving point
``x + u(x)``: ITK's resampling direction.  In Slicer that is a transform **from parent**: placed
as the moving volume's parent transform, it shows the moving volume aligned on the fixed one
(``../shared/notes/slicer.md`` section 4.1, verified).  Vectors become RAS (``u_RAS = F u_LPS``,
F = diag(-1, -1, 1)); the grid keeps the fixed volume's world origin, spacing and directions.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk

from .volumes import FLIP, VolumeGeometry, vtkMatrix


def gridTransformFromDisplacement(displacement: sitk.Image, geometry: VolumeGeometry):
    """A ``vtkOrientedGridTransform`` (fixed RAS -> moving RAS displacement, mm) on ``geometry``.

    ``displacement`` is the engine's 3-vector image (LPS mm) on the same grid as ``geometry``.
    """
    import slicer
    from vtk.util.numpy_support import numpy_to_vtk

    vectors = sitk.GetArrayFromImage(displacement).astype(np.float64)  # (K, J, I, 3), LPS
    if vectors.shape[:3][::-1] != tuple(geometry.dimensions) or vectors.shape[3] != 3:
        raise ValueError(f"displacement of shape {vectors.shape} does not match the grid {geometry.dimensions}")
    vectorsRAS = np.ascontiguousarray(vectors @ FLIP.T).reshape(-1, 3)
    grid = vtk.vtkImageData()
    grid.SetDimensions(*geometry.dimensions)
    grid.SetOrigin(*(float(v) for v in geometry.origin))
    grid.SetSpacing(*(float(v) for v in geometry.spacing))
    grid.GetPointData().SetScalars(numpy_to_vtk(vectorsRAS, deep=True, array_type=vtk.VTK_DOUBLE))
    direction = np.eye(4)
    direction[:3, :3] = geometry.directions
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(vtkMatrix(direction))
    transform.SetInterpolationModeToLinear()
    return transform


def setRegistrationResult(transformNode, displacement: sitk.Image, geometry: VolumeGeometry, fixedVolumeNode,
                          movingVolumeNode) -> None:
    """Fill ``transformNode`` with the field (from parent, RAS) and the registration's node references.

    The references use the roles SlicerElastix uses (``vtkMRMLTransformNode.GetFixedNodeReferenceRole()``
    = fixed volume, ``GetMovingNodeReferenceRole()`` = moving volume).  The node is put in world space.
    """
    transformNode.SetAndObserveTransformNodeID(None)
    transformNode.SetAndObserveTransformFromParent(gridTransformFromDisplacement(displacement, geometry))
    transformNode.SetNodeReferenceID(transformNode.GetFixedNodeReferenceRole(), fixedVolumeNode.GetID())
    transformNode.SetNodeReferenceID(transformNode.GetMovingNodeReferenceRole(), movingVolumeNode.GetID())
