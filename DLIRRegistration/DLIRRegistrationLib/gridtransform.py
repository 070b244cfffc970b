"""The engine's transform as a Slicer transform node: compact, as ``transform.h5`` stores it.

The engine's transform ``T`` maps a fixed point ``x`` to the moving point ``T(x)``: ITK's resampling
direction.  In Slicer that is a transform **from parent**: placed as the moving volume's parent
transform, it shows the moving volume aligned on the fixed one (``../shared/notes/slicer.md``
section 4.1, verified).  The node gets exactly what ``transform.h5`` holds (:mod:`dlir.export`:
affine parts and one displacement field on the finest stage's coarse network grid), read by Slicer's own
ITK transform reader, which also converts LPS to RAS; so the node is as small as the file, never a
grid at the fixed image's full resolution, and saving the node writes the same composite back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import SimpleITK as sitk

#: node attribute marking DLIR's transforms: their displacement grids interpolate linearly (saved with the scene)
INTERPOLATION_ATTRIBUTE = "DLIR.GridInterpolation"


def transformFromItk(itkTransform: sitk.Transform):
    """A VTK transform (fixed RAS -> moving RAS, mm) equal to ``itkTransform`` (fixed LPS -> moving LPS, mm).

    Displacement fields are interpolated linearly, as ITK and the engine do (Slicer's reader
    would choose cubic, which moves points by up to a tenth of a millimetre against them).
    """
    import slicer

    with tempfile.TemporaryDirectory(prefix="dlir-") as folder:
        path = Path(folder) / "transform.h5"
        sitk.WriteTransform(itkTransform, str(path))
        holder = slicer.vtkMRMLTransformNode()
        storage = slicer.vtkMRMLTransformStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(holder):
            raise RuntimeError(f"Slicer could not read the transform it was given ({itkTransform.GetName()})")
    transform = holder.GetTransformFromParent()
    _setLinear(transform)
    return transform


def _setLinear(transform) -> None:
    for part in _parts(transform):
        if part.IsA("vtkGridTransform"):
            part.SetInterpolationModeToLinear()
    transform.Modified()


def _parts(transform) -> list:
    if transform.IsA("vtkGeneralTransform"):
        return [transform.GetConcatenatedTransform(i) for i in range(transform.GetNumberOfConcatenatedTransforms())]
    return [transform]


def setRegistrationResult(transformNode, itkTransform: sitk.Transform, fixedVolumeNode, movingVolumeNode) -> None:
    """Fill ``transformNode`` with the registration's transform (from parent, RAS) and its node references.

    The references use the roles SlicerElastix uses (``vtkMRMLTransformNode.GetFixedNodeReferenceRole()``
    = fixed volume, ``GetMovingNodeReferenceRole()`` = moving volume).  The node is put in world space.
    """
    transformNode.SetAndObserveTransformNodeID(None)
    transformNode.SetAndObserveTransformFromParent(transformFromItk(itkTransform))
    transformNode.SetAttribute(INTERPOLATION_ATTRIBUTE, "linear")
    transformNode.SetNodeReferenceID(transformNode.GetFixedNodeReferenceRole(), fixedVolumeNode.GetID())
    transformNode.SetNodeReferenceID(transformNode.GetMovingNodeReferenceRole(), movingVolumeNode.GetID())


def restoreLinearInterpolation(scene) -> int:
    """Set linear interpolation again on the displacement grids of DLIR's transform nodes in ``scene``; returns how many.

    Slicer's ITK transform reader interpolates displacement grids cubically, and neither the ``.h5`` file nor the
    MRML keeps the interpolation mode: without this a saved and reloaded result would map points differently (by
    tenths of a millimetre) from the engine, ITK and the warped volume.  DLIR's nodes carry
    :data:`INTERPOLATION_ATTRIBUTE`, which the scene does keep.
    """
    count = 0
    nodes = scene.GetNodesByClass("vtkMRMLTransformNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(INTERPOLATION_ATTRIBUTE) == "linear" and node.GetTransformFromParent() is not None:
            _setLinear(node.GetTransformFromParent())
            count += 1
    return count


def observeSceneImports(scene) -> int:
    """Call :func:`restoreLinearInterpolation` whenever a scene (MRML or ``.mrb``) has been read into ``scene``;
    returns the observer's tag.  The module installs it on the application's scene at start-up."""
    import slicer

    return scene.AddObserver(slicer.vtkMRMLScene.EndImportEvent, lambda caller, _event: restoreLinearInterpolation(caller))
