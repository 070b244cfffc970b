"""Training events -> MRML: a table of the curves, plot series and chart nodes for a plot view.

:class:`TrainingCurves` owns, for one job, in a given ``vtkMRMLScene``:

- ``DLIR training NAME`` (vtkMRMLTableNode): one row per ``iteration`` event with ``step``
  (iterations over all stages so far, the x axis), ``stage`` (1-based), ``iteration`` (within the
  stage), ``loss``, ``ncc``, ``bending``, ``it_per_s`` and the validation columns ``dice`` (mean
  over labels), ``dice_<label>`` and ``folding`` (NaN except on rows where a ``validation``
  event came);
- ``DLIR validation NAME`` (vtkMRMLTableNode): one row per ``validation`` event (the Dice curves
  are plotted from it, so lines join validation points without gaps);
- plot series for loss / NCC / bending and for mean Dice / folding, in two chart nodes
  (``DLIR loss NAME`` and ``DLIR validation NAME``), ready for a Slicer plot view
  (``slicer.modules.plots.logic().ShowChartInLayout(chart)`` in the application).

Only MRML/VTK classes are used, so this runs headless on the ``slicer-core`` wheel.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import vtk

from .job import Event, stageNumber

TRAINING_COLUMNS = ("step", "stage", "iteration", "loss", "ncc", "bending", "it_per_s", "dice", "folding")
VALIDATION_COLUMNS = ("step", "stage", "iteration", "dice", "folding")
INT_COLUMNS = ("step", "stage", "iteration")

#: (column, colour) of the loss chart's and the validation chart's series
LOSS_SERIES = (("loss", (0.85, 0.33, 0.10)), ("ncc", (0.00, 0.45, 0.74)), ("bending", (0.47, 0.67, 0.19)))
VALIDATION_SERIES = (("dice", (0.49, 0.18, 0.56)), ("folding", (0.64, 0.08, 0.18)))

#: node attribute that ties our nodes to a job folder (lets a fresh widget find them again)
JOB_ATTRIBUTE = "DLIRTraining.JobFolder"


class TrainingCurves:
    """The table, plot-series and chart nodes of one job's curves in ``scene``; feed it events."""

    def __init__(self, scene: Any, name: str, jobFolder: str | None = None) -> None:
        self.scene = scene
        self.name = name
        self.jobFolder = jobFolder
        self.table = self._table(f"DLIR training {name}", TRAINING_COLUMNS)
        self.validationTable = self._table(f"DLIR validation {name}", VALIDATION_COLUMNS)
        self.lossChart = self._chart(f"DLIR loss {name}", f"{name}: training loss", "value")
        self.validationChart = self._chart(f"DLIR validation chart {name}", f"{name}: validation", "Dice / folding fraction")
        self.series: dict[str, Any] = {}
        for column, colour in LOSS_SERIES:
            self.series[column] = self._series(self.lossChart, self.table, column, colour)
        for column, colour in VALIDATION_SERIES:
            self.series[f"validation {column}"] = self._series(self.validationChart, self.validationTable, column, colour,
                                                               markers=True)
        self._stageOffsets: dict[int, int] = {}
        self._stageIterations: list[int] = []
        self._lastStep = 0
        self._lastRowOf: dict[tuple[int, int], int] = {}

    # ------------------------------------------------------------------------------ nodes
    def _tag(self, node: Any) -> Any:
        if self.jobFolder:
            node.SetAttribute(JOB_ATTRIBUTE, self.jobFolder)
        return node

    def _table(self, nodeName: str, columns: Iterable[str]) -> Any:
        node = self._tag(self.scene.AddNewNodeByClass("vtkMRMLTableNode", nodeName))
        table = node.GetTable()
        for column in columns:
            array = vtk.vtkIntArray() if column in INT_COLUMNS else vtk.vtkDoubleArray()
            array.SetName(column)
            table.AddColumn(array)
        return node

    def _chart(self, nodeName: str, title: str, yTitle: str) -> Any:
        chart = self._tag(self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", nodeName))
        chart.SetTitle(title)
        chart.SetXAxisTitle("iteration (all stages)")
        chart.SetYAxisTitle(yTitle)
        chart.SetLegendVisibility(True)
        return chart

    def _series(self, chart: Any, table: Any, column: str, colour: tuple[float, float, float], markers: bool = False) -> Any:
        node = self._tag(self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.name} {column}"))
        node.SetAndObserveTableNodeID(table.GetID())
        node.SetXColumnName("step")
        node.SetYColumnName(column)
        node.SetPlotType(node.PlotTypeScatter)
        node.SetMarkerStyle(node.MarkerStyleCircle if markers else node.MarkerStyleNone)
        node.SetLineStyle(node.LineStyleSolid)
        node.SetColor(*colour)
        chart.AddAndObservePlotSeriesNodeID(node.GetID())
        return node

    def nodes(self) -> list[Any]:
        return [self.table, self.validationTable, self.lossChart, self.validationChart, *self.series.values()]

    def remove(self) -> None:
        """Take every node of these curves out of the scene."""
        for node in self.nodes():
            if node.GetScene() is not None:
                self.scene.RemoveNode(node)

    # ------------------------------------------------------------------------------ events
    def addEvents(self, events: Iterable[Event]) -> int:
        """Add a batch of events; the table nodes are marked modified once. Returns the rows added."""
        nodes = (self.table, self.validationTable)
        was_modifying = [node.StartModify() for node in nodes]
        added = 0
        try:
            for event in events:
                added += self._add(event)
            if added:
                for node in nodes:
                    node.GetTable().Modified()
        finally:
            for node, was in zip(nodes, was_modifying):
                node.EndModify(was)
        return added

    def _step(self, event: Event) -> tuple[int, int, int]:
        stage = stageNumber(event) or 1
        iteration = int(event.get("iteration", 0))
        if stage not in self._stageOffsets:
            if self._stageIterations and stage - 1 <= len(self._stageIterations):
                self._stageOffsets[stage] = sum(self._stageIterations[: stage - 1])
            else:  # no plan known: a new stage starts after the last step seen
                self._stageOffsets[stage] = self._lastStep
        return self._stageOffsets[stage] + iteration, stage, iteration

    def _add(self, event: Event) -> int:
        kind = event.get("type")
        if kind == "start":
            stages = event.get("stages")
            if isinstance(stages, list):
                self._stageIterations = [int(s.get("iterations", 0)) if isinstance(s, dict) else 0 for s in stages]
                if not all(self._stageIterations):
                    self._stageIterations = []
            return 0
        if kind == "iteration":
            step, stage, iteration = self._step(event)
            key = (stage, iteration)
            if key in self._lastRowOf:  # a resumed run repeats iterations after the checkpoint: overwrite
                row = self._lastRowOf[key]
            else:
                row = self.table.GetTable().InsertNextBlankRow(math.nan)
                self._lastRowOf[key] = row
            values = {"step": step, "stage": stage, "iteration": iteration, "loss": event.get("loss"), "ncc": event.get("ncc"),
                      "bending": event.get("bending"), "it_per_s": event.get("it_per_s")}
            self._setRow(self.table, row, values)
            self._lastStep = max(self._lastStep, step)
            return 1
        if kind == "validation":
            step, stage, iteration = self._step(event)
            dice = _dicePerLabel(event)
            mean = event.get("dice_mean")
            if mean is None and dice:
                mean = sum(dice.values()) / len(dice)
            values: dict[str, Any] = {"step": step, "stage": stage, "iteration": iteration, "dice": mean,
                                      "folding": event.get("folding")}
            for label, value in dice.items():
                values[f"dice_{label}"] = value
                for node in (self.table, self.validationTable):
                    self._ensureColumn(node, f"dice_{label}")
            vrow = self.validationTable.GetTable().InsertNextBlankRow(math.nan)
            self._setRow(self.validationTable, vrow, values)
            if iteration == 0:  # the stage before training (its identity): a validation row only
                return 1
            row = self._lastRowOf.get((stage, iteration))
            if row is None:  # validation before any iteration row of that step: give it its own row
                row = self.table.GetTable().InsertNextBlankRow(math.nan)
                self._lastRowOf[(stage, iteration)] = row
                self._setRow(self.table, row, {"step": step, "stage": stage, "iteration": iteration})
            self._setRow(self.table, row, {k: v for k, v in values.items() if k not in ("step", "stage", "iteration")})
            return 1
        return 0

    @staticmethod
    def _ensureColumn(node: Any, column: str) -> None:
        table = node.GetTable()
        if table.GetColumnByName(column) is not None:
            return
        array = vtk.vtkDoubleArray()
        array.SetName(column)
        array.SetNumberOfTuples(table.GetNumberOfRows())
        array.Fill(math.nan)
        table.AddColumn(array)

    @staticmethod
    def _setRow(node: Any, row: int, values: dict[str, Any]) -> None:
        table = node.GetTable()
        for column, value in values.items():
            array = table.GetColumnByName(column)
            if array is None:
                continue
            if column in INT_COLUMNS:
                array.SetValue(row, int(value or 0))
            else:
                array.SetValue(row, _number(value))

    # ------------------------------------------------------------------------------ reading back
    def column(self, name: str, validation: bool = False) -> list[float]:
        """A column's values as a list (tests, exports)."""
        table = (self.validationTable if validation else self.table).GetTable()
        array = table.GetColumnByName(name)
        if array is None:
            raise KeyError(f"no column {name!r}")
        return [array.GetValue(i) for i in range(table.GetNumberOfRows())]

    @property
    def rows(self) -> int:
        return self.table.GetTable().GetNumberOfRows()


def _dicePerLabel(event: Event) -> dict[str, float]:
    """``{label: mean Dice}`` of a validation event (none when the validation pairs have no labels)."""
    dice = event.get("dice")
    if not isinstance(dice, dict):
        return {}
    values = {str(label): _number(value) for label, value in dice.items()}
    return {label: value for label, value in values.items() if not math.isnan(value)}


def _number(value: Any) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan
