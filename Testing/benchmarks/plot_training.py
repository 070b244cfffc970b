"""Plot the training curves of ``dlir train`` jobs from their ``events.jsonl`` (on demand, needs matplotlib).

    .venv/bin/python Testing/benchmarks/plot_training.py OUT.png JOB_DIR [JOB_DIR ...]

One row per job: the training NCC of every stage (a running mean over 20 logged iterations,
against the job's global iteration) and the validation Dice (mean over labels) with the value
before registration as a dashed line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_events(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "events.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def plot(jobs: list[Path], out: Path) -> Path:
    fig, axes = plt.subplots(len(jobs), 2, figsize=(11, 3.2 * len(jobs)), squeeze=False, layout="constrained")
    for (left, right), job in zip(axes, jobs):
        events = read_events(job)
        start = next(e for e in events if e["type"] == "start")
        offsets = np.cumsum([0] + [s["iterations"] for s in start["stages"]])
        for k, stage in enumerate(start["stages"], 1):
            its = [e for e in events if e["type"] == "iteration" and e["stage"] == k]
            if not its:
                continue
            x = np.array([offsets[k - 1] + e["iteration"] for e in its])
            y = np.array([e["ncc"] for e in its])
            smooth = np.convolve(y, np.ones(20) / 20, mode="valid") if len(y) >= 20 else y
            left.plot(x[len(x) - len(smooth):], smooth, label=f"stage {k} ({stage['kind']})")
            val = [e for e in events if e["type"] == "validation" and e["stage"] == k and "dice_mean" in e]
            right.plot([offsets[k - 1] + e["iteration"] for e in val], [e["dice_mean"] for e in val], "o-", ms=2,
                       label=f"stage {k}")
        if start.get("baseline", {}).get("dice_mean") is not None:
            right.axhline(start["baseline"]["dice_mean"], ls="--", color="grey", label="before registration")
        left.set(title=f"{start['name']}: training NCC", xlabel="iteration", ylabel="NCC")
        right.set(title=f"{start['name']}: validation Dice (mean over labels)", xlabel="iteration", ylabel="Dice")
        left.legend(fontsize=8)
        right.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: plot_training.py OUT.png JOB_DIR [JOB_DIR ...]")
    print(plot([Path(p) for p in sys.argv[2:]], Path(sys.argv[1])))
