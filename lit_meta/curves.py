"""Learning curves of finished runs: read them from a run's files, draw them.

A run directory (``logs/<name>/version_N``) holds ``results.json`` (written when fit ends:
the test adaptation curve ``test/acc_by_step`` or ``test/mse_by_step``, the validation curve
``val_curve``) and, with the CSV logger, ``metrics.csv`` (every logged value by step,
validations with ``train/wall_s``, the wall-clock seconds of fit). :func:`read_run` gathers
both; :func:`plot_runs` draws the validation curve over training (against steps or
seconds) and the test adaptation curve of one or several runs into a PNG (matplotlib,
from the ``dev`` extra, imported only here).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass
class RunCurves:
    label: str
    metric: str  # "acc" (classification) or "mse_after" (regression): what the validation curve shows
    validation: list[dict[str, float]] = field(default_factory=list)  # rows with step, wall_s, val/<metric>
    test_by_step: list[float] = field(default_factory=list)  # after 0..K inner steps
    results: dict[str, Any] = field(default_factory=dict)


def find_files(path: str | Path) -> tuple[Path | None, Path | None]:
    """``(results.json, metrics.csv)`` of a run given as its results.json, its directory, or a
    directory above it (the newest run there); either may be None."""
    path = Path(path)
    if path.is_file():
        folder = path.parent
        results = path if path.suffix == ".json" else None
        metrics = path if path.suffix == ".csv" else folder / "metrics.csv"
        return results, metrics if metrics.is_file() else None
    if not path.is_dir():
        raise ValueError(f"no such run: {path}")

    def newest(name: str) -> Path | None:
        found = sorted(path.rglob(name), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    results = path / "results.json" if (path / "results.json").is_file() else newest("results.json")
    folder = results.parent if results is not None else path
    metrics = folder / "metrics.csv" if (folder / "metrics.csv").is_file() else newest("metrics.csv")
    if results is None and metrics is None:
        raise ValueError(f"neither results.json nor metrics.csv under {path}")
    return results, metrics


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """The CSV logger's rows as dicts of floats (empty cells left out)."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {}
            for key, value in row.items():
                try:
                    values[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(values)
    return rows


def read_run(path: str | Path, label: str | None = None) -> RunCurves:
    results_path, metrics_path = find_files(path)
    results = json.loads(results_path.read_text()) if results_path is not None else {}
    metrics = results.get("metrics", {})
    regression = "test/mse_by_step" in metrics or "test/mse_after" in metrics
    rows = read_metrics_csv(metrics_path) if metrics_path is not None else []
    if not results and any("val/mse_after" in r for r in rows):
        regression = True
    metric = "mse_after" if regression else "acc"
    validation = [r for r in rows if f"val/{metric}" in r]
    if not validation:
        validation = [r for r in results.get("val_curve", []) if f"val/{metric}" in r]
    test = metrics.get("test/mse_by_step" if regression else "test/acc_by_step", [])
    if label is None:
        folder = (results_path or metrics_path).parent
        label = f"{results.get('algorithm', folder.parent.name)} ({folder.parent.name}/{folder.name})"
    return RunCurves(label, metric, validation, list(test), results)


def plot_runs(runs: Sequence[RunCurves], output: str | Path, x: str = "step", title: str | None = None,
              panels: Sequence[str] = ("validation", "test")) -> Path:
    """Draw the validation curve (against ``x``: ``step`` or ``time``) and the test adaptation
    curve of ``runs`` into the PNG ``output``; ``panels`` picks which of the two."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    metric = runs[0].metric if runs else "acc"
    name = "accuracy" if metric == "acc" else "MSE"
    for ax, panel in zip(axes[0], panels):
        for run in runs:
            if panel == "validation" and run.validation:
                key = "step" if x == "step" else "train/wall_s"
                points = [(r.get(key, r.get("wall_s")), r[f"val/{run.metric}"]) for r in run.validation]
                points = [(a if x == "step" else a / 60, b) for a, b in points if a is not None]
                ax.plot(*zip(*points), marker="o", markersize=3, label=run.label)
            elif panel == "test" and run.test_by_step:
                ax.plot(range(len(run.test_by_step)), run.test_by_step, marker="o", markersize=3, label=run.label)
        if panel == "validation":
            ax.set_xlabel("meta-training step" if x == "step" else "wall-clock minutes of fit")
            ax.set_ylabel(f"validation {name}")
            ax.set_title("validation during training")
        else:
            ax.set_xlabel("inner steps at test")
            ax.set_ylabel(f"test {name}")
            ax.set_title("test adaptation curve")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
