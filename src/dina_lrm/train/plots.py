"""Training curves from a run's ``metrics.jsonl``: loss, accuracy and eval accuracy per u."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> dict[int, dict]:
    """Step -> metrics; a resumed run re-logs steps after its checkpoint, and the last entry wins."""
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return dict(sorted(rows.items()))


def plot_training_curves(metrics_path: Path, out: Path) -> Path:
    rows = read_metrics(metrics_path)
    eval_keys = sorted({k for row in rows.values() for k in row if k.startswith("eval/")})
    panels = [("train/loss", "loss"), ("train/accuracy", "train accuracy")]
    figure, axes = plt.subplots(1, 3 if eval_keys else 2, figsize=(13 if eval_keys else 9, 3.4))
    for axis, (key, title) in zip(axes, panels):
        steps = [s for s, r in rows.items() if key in r]
        axis.plot(steps, [rows[s][key] for s in steps])
        axis.set(title=title, xlabel="optimizer step")
    if eval_keys:
        for key in eval_keys:
            steps = [s for s, r in rows.items() if key in r]
            axes[2].plot(steps, [rows[s][key] for s in steps], marker="o", label=key.removeprefix("eval/"))
        axes[2].set(title="eval pairwise accuracy (EMA)", xlabel="optimizer step", ylim=(-0.02, 1.02))  # 0 and 1 stay visible
        axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
