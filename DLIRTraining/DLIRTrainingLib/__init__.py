"""DLIR Training without Qt: training jobs (``dlir train`` in a separate process), their progress
as MRML table/plot nodes, job folders that survive restarts, and the model registry hook.

Importable in Slicer, in pytest on the ``slicer-core`` wheel and in any Python with ``vtk``;
never imports ``qt``, ``slicer.app`` or ``slicer.modules``.
"""

from .job import JobError, JobState, TrainingJob, parse_event, read_events
from .jobs import JobManager, default_jobs_root
from .settings import DataSource, Intensity, SettingsError, TrainingSettings, build_config

__all__ = [
    "DataSource",
    "Intensity",
    "JobError",
    "JobManager",
    "JobState",
    "SettingsError",
    "TrainingJob",
    "TrainingSettings",
    "build_config",
    "default_jobs_root",
    "parse_event",
    "read_events",
]
