"""ROC curves and calibration (reliability) diagrams of the evaluated tasks, one panel per task.

Drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot: no global figure state and
no backend switch) and written atomically as PNG.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

from engine.eval.metrics import ECE_BINS, TaskData, confidence_bins
from engine.fileio import atomic_open

_PANEL_INCHES = 3.6
_MAX_COLUMNS = 3


def _figure(count: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(_MAX_COLUMNS, max(count, 1))
    rows = math.ceil(max(count, 1) / columns)
    figure = Figure(figsize=(_PANEL_INCHES * columns, _PANEL_INCHES * rows), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, axes


def _save(figure, path: str | os.PathLike) -> None:
    figure.tight_layout()
    with atomic_open(path, "wb") as f:
        figure.savefig(f, format="png")


def plot_roc(tasks: Sequence[TaskData], path: str | os.PathLike) -> None:
    """One panel per task: the ROC curve of P(class 1) for two classes, one-vs-rest curves of each
    class otherwise; the true distribution's curve dashed where the logs carry it."""
    figure, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks):
        columns = [1] if task.num_classes == 2 else range(task.num_classes)
        for k in columns:
            positives = task.labels == k
            if positives.all() or not positives.any():
                continue
            suffix = "" if task.num_classes == 2 else f" class {k}"
            fpr, tpr, _ = roc_curve(positives, task.probs[:, k])
            line, = ax.plot(fpr, tpr, linewidth=1.3, label=f"model{suffix}")
            if task.true_probs is not None:
                fpr, tpr, _ = roc_curve(positives, task.true_probs[:, k])
                ax.plot(fpr, tpr, "--", linewidth=1.0, color=line.get_color(), label=f"truth{suffix}")
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate",
               title=f"{task.name} (n={len(task.labels)})")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    _save(figure, path)


def plot_calibration(tasks: Sequence[TaskData], path: str | os.PathLike, bins: int = ECE_BINS) -> None:
    """One panel per task: observed frequency against predicted probability over ``bins`` equal-width
    bins; P(class 1) for two classes, the top class's confidence against its accuracy otherwise
    (the bins of the expected calibration error)."""
    figure, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks):
        if task.num_classes == 2:
            observed, predicted = calibration_curve(task.labels == 1, task.probs[:, 1], n_bins=bins,
                                                    strategy="uniform")
            ax.set(xlabel="predicted P(class 1)", ylabel="observed frequency of class 1")
        else:
            confidence = task.probs.max(axis=1)
            correct = (task.probs.argmax(axis=1) == task.labels).astype(np.float64)
            which = confidence_bins(confidence, bins)
            counts = np.bincount(which, minlength=bins)
            used = counts > 0
            predicted = np.bincount(which, weights=confidence, minlength=bins)[used] / counts[used]
            observed = np.bincount(which, weights=correct, minlength=bins)[used] / counts[used]
            ax.set(xlabel="confidence of the top class", ylabel="accuracy")
        ax.plot(predicted, observed, "o-", linewidth=1.3, markersize=4, label="model")
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8, label="perfectly calibrated")
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{task.name} (n={len(task.labels)})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    _save(figure, path)
