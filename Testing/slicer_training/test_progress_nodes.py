"""Events -> table, plot-series and chart nodes in a real MRML scene (slicer-core)."""

from __future__ import annotations

import math

from DLIRTrainingLib.progress import JOB_ATTRIBUTE, TRAINING_COLUMNS, TrainingCurves

START = {"type": "start", "stages": [{"kind": "affine", "iterations": 4}, {"kind": "bspline", "iterations": 6}]}


def iteration(stage: int, it: int, **extra) -> dict:
    return {"type": "iteration", "stage": stage, "iteration": it, "loss": -0.1 * it, "ncc": 0.1 * it, "bending": 0.01 * it,
            "it_per_s": 5.0, **extra}


def test_nodes_are_made_and_wired(scene) -> None:
    curves = TrainingCurves(scene, "brain", jobFolder="/jobs/brain")
    assert curves.table.IsA("vtkMRMLTableNode") and curves.lossChart.IsA("vtkMRMLPlotChartNode")
    table = curves.table.GetTable()
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(TRAINING_COLUMNS)
    assert curves.lossChart.GetNumberOfPlotSeriesNodes() == 3
    assert curves.validationChart.GetNumberOfPlotSeriesNodes() == 2
    loss = curves.series["loss"]
    assert loss.GetTableNodeID() == curves.table.GetID()
    assert (loss.GetXColumnName(), loss.GetYColumnName()) == ("step", "loss")
    assert curves.series["validation dice"].GetTableNodeID() == curves.validationTable.GetID()
    assert all(node.GetAttribute(JOB_ATTRIBUTE) == "/jobs/brain" for node in curves.nodes())
    curves.remove()
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 0


def test_events_fill_the_table(scene) -> None:
    curves = TrainingCurves(scene, "brain")
    modified = []
    curves.table.AddObserver("ModifiedEvent", lambda caller, event: modified.append(1))
    events = [START] + [iteration(1, k) for k in range(1, 5)] + [{"type": "stage_done", "stage": 1}]
    events += [iteration(2, k) for k in range(1, 4)]
    events += [{"type": "validation", "stage": 2, "iteration": 3, "dice": {"1": 0.8, "2": 0.6}, "folding": 0.001}]
    assert curves.addEvents(events) == 8
    assert len(modified) == 1  # one Modified per batch, not per row
    assert curves.rows == 7
    assert curves.column("step") == [1, 2, 3, 4, 5, 6, 7]  # stage 2 continues after stage 1's 4 iterations
    assert curves.column("stage") == [1, 1, 1, 1, 2, 2, 2]
    assert curves.column("iteration") == [1, 2, 3, 4, 1, 2, 3]
    assert math.isclose(curves.column("loss")[-1], -0.3)
    dice = curves.column("dice")
    assert all(math.isnan(v) for v in dice[:-1]) and math.isclose(dice[-1], 0.7)
    assert math.isclose(curves.column("dice_1")[-1], 0.8) and math.isclose(curves.column("dice_2")[-1], 0.6)
    assert math.isclose(curves.column("folding")[-1], 0.001)
    assert curves.column("step", validation=True) == [7]
    assert math.isclose(curves.column("dice_2", validation=True)[0], 0.6)


def test_a_resumed_run_overwrites_repeated_iterations(scene) -> None:
    curves = TrainingCurves(scene, "x")
    curves.addEvents([START] + [iteration(2, k) for k in range(1, 6)])
    # stopped after a checkpoint at iteration 4; the resumed run repeats iteration 5 and goes on
    curves.addEvents([START | {"resumed": True}] + [iteration(2, k, loss=-1.0) for k in range(5, 7)])
    assert curves.column("iteration") == [1, 2, 3, 4, 5, 6]
    assert curves.column("loss")[4:] == [-1.0, -1.0]


def test_unknown_plan_and_unlabelled_validation(scene) -> None:
    curves = TrainingCurves(scene, "y")
    curves.addEvents([iteration(1, 1), iteration(1, 2), iteration(2, 1)])
    assert curves.column("step") == [1, 2, 3]  # without a plan a stage starts after the last step seen
    # the trainer's validation without labels: NCC and folding only
    curves.addEvents([{"type": "validation", "stage": 2, "iteration": 1, "ncc": 0.9, "folding": 0.0, "best": True}])
    assert math.isnan(curves.column("dice")[-1]) and curves.column("folding")[-1] == 0.0
    curves.addEvents([{"type": "validation", "stage": 2, "iteration": 5, "dice": {"3": 0.95, "4": None}, "dice_mean": 0.95,
                        "folding": 0.0, "ncc": 0.9, "best": True}])
    assert curves.rows == 4 and math.isclose(curves.column("dice_3")[-1], 0.95) and math.isclose(curves.column("dice")[-1], 0.95)
    assert "dice_4" not in [curves.table.GetTable().GetColumnName(i) for i in range(curves.table.GetTable().GetNumberOfColumns())]
    assert curves.addEvents([{"type": "checkpoint"}, {"type": "done"}, {"type": "mystery"}]) == 0
