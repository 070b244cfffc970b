"""DLIR Training without Qt: training jobs (``dlir train`` in a separate process), their progress
as MRML table/plot nodes, job folders that survive restarts, and the model registry hook.

Importable in Slicer, in pytest on the ``slicer-core`` wheel and in any Python with ``vtk``;
never imports ``qt``, ``slicer.app`` or ``slicer.modules``.  Like ``DLIRRegistrationLib`` (and
Slicer), its functions, methods, properties and parameters are camelCase; the engine ``dlir``
below it is snake_case.  Settings are checked by the engine: a bad one raises
``dlir.errors.InputError`` with the sentence ``dlir train`` prints.
"""

from .job import JobError, JobState, TrainingJob, parseEvent, readEvents
from .jobs import JobManager, defaultJobsRoot
from .settings import DataSource, Intensity, TrainingSettings, buildConfig

__all__ = [
    "DataSource",
    "Intensity",
    "JobError",
    "JobManager",
    "JobState",
    "TrainingJob",
    "TrainingSettings",
    "buildConfig",
    "defaultJobsRoot",
    "parseEvent",
    "readEvents",
]
