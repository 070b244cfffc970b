"""The conventional baseline: elastix (``itk-elastix``) with the DLIR paper's settings.

Affine then cubic B-spline registration (de Vos et al. 2019, section 5.2): advanced normalised
correlation, adaptive stochastic gradient descent, 500 iterations per resolution, 2000 random
samples per iteration, a 4-level Gaussian smoothing pyramid, final B-spline grid 10 mm, no
bending penalty, geometric-centre initialisation; labels are warped by nearest neighbour.

The result is expressed like DLIR's: a displacement field ``u`` on the FULL-resolution fixed
grid, 3-vector float32 in LPS mm, with ``T(x) = x + u(x)`` mapping fixed points to moving points
(elastix's own convention, so the field is taken as transformix computes it).  The same metric
code then scores both methods.

``itk-elastix`` is optional (``pip install "dlir[bench]"``); :func:`require_elastix` raises an
:class:`ElastixMissingError` that says how to install it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import DLIRError

ELASTIX_REQUIREMENT = "itk-elastix==0.25.4"
#: the metric of the paper's baseline (one contrast) and elastix's metric for images of different contrasts
NCC_METRIC = "AdvancedNormalizedCorrelation"
MI_METRIC = "AdvancedMattesMutualInformation"
INSTALL_HINT = (
    f"the elastix baseline needs the optional package {ELASTIX_REQUIREMENT}: install it with "
    f"`pip install {ELASTIX_REQUIREMENT}` (or `pip install -e \".[bench]\"` in the DLIR source folder)"
)


class ElastixMissingError(DLIRError):
    """``itk-elastix`` is not installed (the message says how to install it)."""


def require_elastix() -> ModuleType:
    """Import ``itk`` with its elastix wrapping and load it (a few seconds the first time).

    Raises :class:`ElastixMissingError` when ``itk-elastix`` is not installed.
    """
    try:
        import itk
        itk.ElastixRegistrationMethod  # noqa: B018 - itk loads its modules lazily: load elastix now
    except (ImportError, AttributeError) as exc:
        raise ElastixMissingError(INSTALL_HINT) from exc
    return itk


def elastix_available() -> bool:
    """True when ``itk`` with the elastix wrapping can be imported (without loading elastix itself)."""
    from importlib.util import find_spec

    try:
        import itk  # noqa: F401 - cheap: itk loads its modules lazily
    except ImportError:
        return False
    return find_spec("itk.itkElastixRegistrationMethodPython") is not None


@dataclass(frozen=True)
class ElastixSettings:
    """Settings of the conventional baseline (defaults: the DLIR paper's, see module docstring).

    ``final_grid_mm``: B-spline control-point spacing of the finest resolution (mm).
    ``threads``: CPU threads elastix and transformix may use.  ``metric``: :data:`NCC_METRIC` (the paper's) or
    :data:`MI_METRIC` (Mattes mutual information, elastix's default 32 histogram bins: for different contrasts).  ``step_estimation``: how the
    optimiser's step sizes are set (elastix's ``ASGDParameterEstimationMethod``; its default,
    ``Original``, costs about 2 s per resolution and stage on 2 cores whatever the image size).
    """

    iterations: int = 500
    samples: int = 2000
    resolutions: int = 4
    final_grid_mm: float = 10.0
    threads: int = 2
    metric: str = NCC_METRIC
    step_estimation: str = "Original"

    @classmethod
    def quick(cls, threads: int = 2) -> "ElastixSettings":
        """A few iterations at one resolution with cheap step estimation: for smoke tests, not for numbers."""
        return cls(iterations=20, samples=500, resolutions=1, threads=threads, step_estimation="DisplacementDistribution")

    def describe(self) -> str:
        """One line for reports."""
        return (f"affine + B-spline (final grid {self.final_grid_mm:g} mm), {self.metric}, "
                f"AdaptiveStochasticGradientDescent, {self.iterations} iterations x {self.resolutions} resolutions, "
                f"{self.samples} random samples, step estimation {self.step_estimation}, no bending penalty, "
                f"{self.threads} threads")


def parameter_maps(settings: ElastixSettings) -> list[dict[str, list[str]]]:
    """The affine and B-spline parameter maps (elastix's defaults overridden by ``settings``)."""
    itk = require_elastix()
    po = itk.ParameterObject.New()
    common = {
        "Metric": [settings.metric],
        "Registration": ["MultiResolutionRegistration"],  # one metric: no bending penalty
        "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "MaximumNumberOfIterations": [str(settings.iterations)],
        "NumberOfSpatialSamples": [str(settings.samples)],
        "ImageSampler": ["RandomCoordinate"],
        "NewSamplesEveryIteration": ["true"],
        "NumberOfResolutions": [str(settings.resolutions)],
        "ASGDParameterEstimationMethod": [settings.step_estimation],
        "FixedImagePyramid": ["FixedSmoothingImagePyramid"],
        "MovingImagePyramid": ["MovingSmoothingImagePyramid"],
        "ResultImagePixelType": ["float"],
        "WriteResultImage": ["true"],
    }
    affine = {k: list(v) for k, v in po.GetDefaultParameterMap("affine", settings.resolutions).items()}
    affine.update(common)
    affine["AutomaticTransformInitialization"] = ["true"]
    affine["AutomaticTransformInitializationMethod"] = ["GeometricalCenter"]
    bspline = {k: list(v) for k, v in po.GetDefaultParameterMap("bspline", settings.resolutions, settings.final_grid_mm).items()}
    bspline.update(common)
    bspline.pop("Metric0Weight", None)
    bspline.pop("Metric1Weight", None)
    return [affine, bspline]


@dataclass
class ElastixResult:
    """Elastix's registration expressed on the full-resolution fixed grid (LPS mm, fixed -> moving)."""

    displacement: sitk.Image  # 3-vector float32, T(x) = x + u(x)
    warped: sitk.Image  # elastix's result image (cubic B-spline interpolation), float32
    warped_labels: sitk.Image | None  # nearest neighbour, pixel type of the moving labels
    timings: dict[str, float] = field(default_factory=dict)


def to_itk(image: sitk.Image, itk: ModuleType) -> Any:
    """A new float32 ITK image with the voxels and geometry (LPS mm) of a scalar SimpleITK image."""
    out = itk.image_from_array(sitk.GetArrayFromImage(image).astype(np.float32))
    out.SetOrigin(tuple(image.GetOrigin()))
    out.SetSpacing(tuple(image.GetSpacing()))
    out.SetDirection(itk.matrix_from_array(np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)))
    return out


def _array_on(array: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.CopyInformation(reference)
    return image


def register_elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    moving_labels: sitk.Image | None = None,
    settings: ElastixSettings = ElastixSettings(),
) -> ElastixResult:
    """Register ``moving`` onto ``fixed`` with elastix; inputs are never modified.

    Timings (s): ``convert`` (SimpleITK -> ITK), ``register`` (elastix: affine + B-spline, result
    image), ``transformix`` (displacement field on the fixed grid and, when given, the labels
    warped by nearest neighbour), ``collect`` (ITK -> SimpleITK).
    """
    itk = require_elastix()
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(settings.threads)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    fixed_itk, moving_itk = to_itk(fixed, itk), to_itk(moving, itk)
    po = itk.ParameterObject.New()
    for m in parameter_maps(settings):
        po.AddParameterMap(m)
    timings["convert"] = time.perf_counter() - t

    t = time.perf_counter()
    warped_itk, result_po = itk.elastix_registration_method(
        fixed_itk, moving_itk, parameter_object=po, number_of_threads=settings.threads, log_to_console=False
    )
    timings["register"] = time.perf_counter() - t

    t = time.perf_counter()
    nearest = itk.ParameterObject.New()
    for k in range(result_po.GetNumberOfParameterMaps()):
        nearest.AddParameterMap(result_po.GetParameterMap(k))
        nearest.SetParameter(k, "FinalBSplineInterpolationOrder", "0")
    source = to_itk(moving_labels if moving_labels is not None else moving, itk)
    with tempfile.TemporaryDirectory(prefix="dlir-transformix-") as scratch:
        # transformix also writes the field to its output directory (the working folder by default)
        transformix = itk.TransformixFilter.New(Input=source, TransformParameterObject=nearest)
        transformix.SetComputeDeformationField(True)
        transformix.SetOutputDirectory(scratch)
        transformix.SetLogToConsole(False)
        transformix.SetNumberOfWorkUnits(settings.threads)
        transformix.Update()
        field_arr = itk.array_from_image(transformix.GetOutputDeformationField()).astype(np.float32)
        labels_arr = itk.array_from_image(transformix.GetOutput()) if moving_labels is not None else None
    timings["transformix"] = time.perf_counter() - t

    t = time.perf_counter()
    if field_arr.shape[:3] != tuple(reversed(fixed.GetSize())):
        raise DLIRError(f"elastix returned a field of shape {field_arr.shape[:3]} for a fixed image of size {fixed.GetSize()}")
    displacement = _array_on(field_arr, fixed, is_vector=True)
    warped = _array_on(itk.array_from_image(warped_itk).astype(np.float32), fixed)
    warped_labels = None
    if labels_arr is not None and moving_labels is not None:
        warped_labels = sitk.Cast(_array_on(np.rint(labels_arr).astype(np.float32), fixed), moving_labels.GetPixelID())
    timings["collect"] = time.perf_counter() - t
    return ElastixResult(displacement, warped, warped_labels, timings)

