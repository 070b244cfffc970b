"""Slicer's own slice views without Qt: the red, yellow and green views of a scene, off screen.

The views are composed exactly as in the Slicer application: ``vtkMRMLSliceLogic`` reslices and
blends the layers of each view's ``vtkMRMLSliceCompositeNode`` (background, foreground at its
opacity, label) through every volume's display node (colour node, window, threshold,
interpolation) and parent transform (non-linear ones included), and the displayable managers
draw the rest (``vtkMRMLSegmentationsDisplayableManager2D``: segment fills and outlines).  What
Qt adds in the application (``qMRMLSliceView`` puts the slice logic's image into a 2D actor and
hands the view to the displayable managers) is done here with plain VTK, as trame-slicer does.
The render window is off screen (EGL or OSMesa in the vtk wheel); :func:`offscreenRenderingError`
says whether that works on this machine.

Pixel <-> world: a view's image is ``(rows, columns, 3)`` uint8 with row 0 at the top; the
slice node's ``XYToRAS`` maps the pixel with column ``x`` and row-from-the-bottom ``y`` (XY =
pixel index, origin at the bottom left, as in Slicer) to world RAS (mm); :meth:`SlicerViews.pixelRAS`
gives that point for every pixel.

Use::

    views = SlicerViews(scene)        # before loading data: adds Slicer's default colour nodes
    ...                               # load volumes, run registerVolumes (it sets the layers)
    views.fit()                       # FitSliceToBackground, as on loading a volume
    views.jumpTo(ras)                 # all three slices through one world point
    image = views.render("Red")       # (H, W, 3) uint8
    views.savePNG("Red", "red.png")
    views.close()
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import vtk

#: layout name -> (orientation, view colour as in Slicer's layouts)
SLICE_VIEWS = {
    "Red": ("Axial", (0.952, 0.290, 0.200)),
    "Yellow": ("Sagittal", (0.929, 0.835, 0.298)),
    "Green": ("Coronal", (0.431, 0.690, 0.294)),
}
SLICE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLModelSliceDisplayableManager")

_PROBE = """
import vtk
window = vtk.vtkRenderWindow()
window.SetOffScreenRendering(1)
window.SetSize(8, 8)
renderer = vtk.vtkRenderer()
renderer.SetBackground(1, 0, 0)
window.AddRenderer(renderer)
window.Render()
grab = vtk.vtkWindowToImageFilter()
grab.SetInput(window)
grab.Update()
pixel = [grab.GetOutput().GetScalarComponentAsDouble(4, 4, 0, c) for c in range(3)]
assert pixel == [255.0, 0.0, 0.0], pixel
print(type(window).__name__)
"""


def offscreenRenderingError() -> str | None:
    """None when VTK renders off screen here, else why not (checked in a child process: a failing
    OpenGL set-up may abort the process)."""
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"off-screen rendering check failed to run: {error}"
    if probe.returncode == 0:
        return None
    text = re.sub(r"\x1b\[[0-9;]*m", "", probe.stderr or probe.stdout)
    tail = [" ".join(line.split()) for line in text.strip().splitlines()[-3:]]
    return (f"VTK cannot render off screen here (exit {probe.returncode}: {' | '.join(tail)}); "
            "install EGL with Mesa's software renderer, e.g. Debian's libegl1 libegl-mesa0 libgl1-mesa-dri")


def prepareScene(scene):
    """Make ``scene`` look like the application's: application logic with slice/view logic
    collections, Slicer's default colour nodes (the Grey table of new volumes, the generic anatomy
    colours of label maps), slice orientation presets and the crosshair.  Call it before loading
    data, as the application does at start-up; returns the ``vtkSlicerApplicationLogic``."""
    import slicer

    existing = getattr(scene, "_dlirApplicationLogic", None)
    if existing is not None:
        return existing
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
        colors.AddDefaultColorNodes()
    app.SetSliceLogics(vtk.vtkCollection())
    app.SetViewLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)  # patient right on screen left
    if scene.GetFirstNodeByClass("vtkMRMLCrosshairNode") is None:
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        scene.AddNode(crosshair)
    # what the application's IO manager adds: a cache folder, where .mrb bundles are unpacked (ReadFromMRB)
    remote = slicer.vtkMRMLRemoteIOLogic()
    remote.SetMRMLScene(scene)
    remote.SetMRMLApplicationLogic(app)
    remote.GetCacheManager().SetRemoteCacheDirectory(tempfile.mkdtemp(prefix="dlir-views-cache-"))
    io = slicer.vtkDataIOManagerLogic()
    io.SetMRMLScene(scene)
    io.SetMRMLApplicationLogic(app)
    io.SetAndObserveDataIOManager(remote.GetDataIOManager())
    remote.AddDataIOToScene()
    # the logics must live as long as the scene
    scene._dlirApplicationLogic, scene._dlirIO = app, (remote, io)
    return app


class _View:
    """One off-screen render window with a renderer and a displayable-manager group."""

    def __init__(self, size: tuple[int, int], factory, managers: tuple[str, ...]) -> None:
        import slicer

        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetMultiSamples(0)  # exact colours for the pixel checks
        self.window.SetSize(*size)
        self.renderer = vtk.vtkRenderer()
        self.window.AddRenderer(self.renderer)
        # displayable managers reach the interactor through the renderer's window
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()
        instance = factory.GetInstance()
        for manager in managers:
            if not instance.IsDisplayableManagerRegistered(manager):
                instance.RegisterDisplayableManager(manager)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.SetRenderer(self.renderer)
        self.managers.Initialize(instance, self.renderer)

    def grab(self) -> np.ndarray:
        from vtk.util.numpy_support import vtk_to_numpy

        self.managers.RequestRender()
        self.window.Render()
        grabber = vtk.vtkWindowToImageFilter()
        grabber.SetInput(self.window)
        grabber.SetInputBufferTypeToRGB()
        grabber.ReadFrontBufferOff()
        grabber.Update()
        image = grabber.GetOutput()
        width, height, _ = image.GetDimensions()
        return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)[::-1].copy()

    def close(self) -> None:
        self.managers.SetMRMLDisplayableNode(None)
        self.window.Finalize()


class SlicerViews:
    """Red (axial), yellow (sagittal) and green (coronal) slice views of ``scene``."""

    def __init__(self, scene, size: tuple[int, int] = (256, 256)) -> None:
        import slicer

        self.scene = scene
        self.size = size
        self.app = prepareScene(scene)
        self._views: dict[str, _View] = {}
        self._logics: dict[str, object] = {}
        for name, (orientation, color) in SLICE_VIEWS.items():
            view = _View(size, slicer.vtkMRMLSliceViewDisplayableManagerFactory, SLICE_MANAGERS)
            view.renderer.GetActiveCamera().ParallelProjectionOn()
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLApplicationLogic(self.app)
            self.app.GetSliceLogics().AddItem(logic)
            logic.SetMRMLScene(scene)
            node = logic.AddSliceNode(name)  # also the view's vtkMRMLSliceCompositeNode
            node.SetOrientation(orientation)
            node.SetLayoutColor(*color)
            node.SetLayoutLabel(name[0])
            view.managers.SetMRMLDisplayableNode(node)
            # what qMRMLSliceView does with the slice logic's blended image: a 2D actor behind everything
            mapper = vtk.vtkImageMapper()
            mapper.SetColorWindow(255)
            mapper.SetColorLevel(127.5)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetDisplayLocationToBackground()
            view.renderer.AddViewProp(actor)
            view.mapper, view.actor = mapper, actor
            logic.ResizeSliceNode(*size)
            self._views[name] = view
            self._logics[name] = logic

    # --- nodes -----------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._views)

    def sliceLogic(self, name: str):
        return self._logics[name]

    def sliceNode(self, name: str):
        return self._logics[name].GetSliceNode()

    def compositeNode(self, name: str):
        return self._logics[name].GetSliceCompositeNode()

    def setLayers(self, background=None, foreground=None, foregroundOpacity: float | None = None, names=None) -> None:
        """Background/foreground volume nodes (None: empty layer) of the named views (default: all slice views)."""
        for name in names or self.names:
            composite = self.compositeNode(name)
            composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
            composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
            if foregroundOpacity is not None:
                composite.SetForegroundOpacity(foregroundOpacity)

    # --- geometry --------------------------------------------------------------------------
    def fit(self) -> None:
        """Every slice view fitted to its background volume, slices through the volume's centre."""
        for name in self.names:
            logic = self._logics[name]
            logic.ResizeSliceNode(*self.size)
            logic.FitSliceToBackground()
            logic.SnapSliceOffsetToIJK()

    def jumpTo(self, ras) -> None:
        """Every slice view through the world point ``ras`` (mm), snapped to the background's voxel centres."""
        for name in self.names:
            self.sliceNode(name).JumpSliceByOffsetting(*[float(v) for v in ras])
            self._logics[name].SnapSliceOffsetToIJK()

    def pixelRAS(self, name: str) -> np.ndarray:
        """World RAS (mm) of every pixel of :meth:`render`'s image, ``(rows, columns, 3)``, row 0 at the top."""
        matrix = self.sliceNode(name).GetXYToRAS()
        xy_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        width, height = self.size
        y, x = np.mgrid[height - 1:-1:-1, 0:width]
        points = np.stack([x, y, np.zeros_like(x), np.ones_like(x)], -1).astype(np.float64)
        return (points @ xy_to_ras.T)[..., :3]

    # --- pictures --------------------------------------------------------------------------
    def render(self, name: str) -> np.ndarray:
        """The named view as ``(rows, columns, 3)`` uint8 RGB, row 0 at the top."""
        logic = self._logics[name]
        # as the application's slice widget does on every layout or size change: displayable managers
        # pick up nodes that arrived in a batch (a scene read from a file) on the slice node's next change
        self.sliceNode(name).Modified()
        logic.UpdateImageData()
        view = self._views[name]
        connection = logic.GetImageDataConnection()  # the slice logic replaces it when the layers change
        view.mapper.SetInputConnection(connection)
        view.actor.SetVisibility(connection is not None)
        return view.grab()

    def savePNG(self, name: str, path: str | Path) -> np.ndarray:
        """Render the named view and write it as a PNG; returns the image."""
        image = self.render(name)
        writePNG(image, path)
        return image

    def close(self) -> None:
        for view in self._views.values():
            view.close()
        for logic in self._logics.values():
            self.app.GetSliceLogics().RemoveItem(logic)
            logic.SetMRMLScene(None)
        self._views.clear()
        self._logics.clear()


def writePNG(image: np.ndarray, path: str | Path) -> None:
    """Write an ``(rows, columns, 3)`` uint8 image (row 0 at the top) with VTK's PNG writer."""
    from vtk.util.numpy_support import numpy_to_vtk

    height, width, _ = image.shape
    data = vtk.vtkImageData()
    data.SetDimensions(width, height, 1)
    scalars = numpy_to_vtk(np.ascontiguousarray(image[::-1]).reshape(-1, 3), deep=True)
    scalars.SetNumberOfComponents(3)
    data.GetPointData().SetScalars(scalars)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(data)
    writer.Write()
