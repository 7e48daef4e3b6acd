"""Plots of a run: train loss and dev metric curves per task, and confusion matrices.

Both are rendered with matplotlib's Agg backend, so they need no display, and written atomically
(:func:`minbert.prediction_files.atomic_open`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .prediction_files import PathLike, atomic_open
from .tasks import TASKS

__all__ = ["plot_curves", "plot_confusion"]


def _figure(width: float, height: float):
    """A figure drawn by the Agg (raster, display-free) backend.

    The Agg backend is selected before pyplot is imported, so plotting works on headless machines;
    figures are closed after saving.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height))


def _save_png(plt, fig, path: PathLike) -> Path:
    path = Path(path)
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def _dev_metric(task: str, record: Dict[str, Any]) -> Optional[str]:
    preferred = TASKS[task].dev_metric if task in TASKS else None
    if preferred is not None and _finite(record.get(preferred)):
        return preferred
    for key in ("accuracy", "pearson"):
        if _finite(record.get(key)):
            return key
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_curves(records: Sequence[Dict[str, Any]], path: PathLike) -> Path:
    """One subplot per task: train loss (left axis) and the dev metric (right axis) against step.

    ``records`` are ``metrics.jsonl`` rows. Train rows: ``{"step", "split": "train", "task",
    "loss", ...}``; dev rows: ``{"step", "split": "dev", "task", "accuracy" | "pearson",
    "overall", ...}``. Rows without a task or a step (events, regularizer statistics) are ignored.
    When dev rows carry ``overall``, a last subplot shows it. Raises ``ValueError`` when there is
    nothing to plot.
    """
    train: Dict[str, List] = {}
    dev: Dict[str, List] = {}
    overall: Dict[int, float] = {}
    for rec in records:
        if not isinstance(rec, dict):
            raise ValueError(f"plot_curves: records must be dicts, got {type(rec).__name__}")
        step, task, split = rec.get("step"), rec.get("task"), rec.get("split")
        if not _finite(step) or not isinstance(task, str):
            continue
        if split == "train" and _finite(rec.get("loss")):
            train.setdefault(task, []).append((step, float(rec["loss"])))
        elif split == "dev":
            key = _dev_metric(task, rec)
            if key is not None:
                dev.setdefault(task, []).append((step, float(rec[key]), key))
            if _finite(rec.get("overall")):
                overall[step] = float(rec["overall"])
    tasks = list(dict.fromkeys(list(train) + list(dev)))
    if not tasks:
        raise ValueError("plot_curves: no train loss or dev metric records to plot")
    panels = len(tasks) + (1 if overall else 0)
    plt, fig = _figure(8.0, 2.8 * panels)
    axes = fig.subplots(panels, 1, squeeze=False, sharex=True)[:, 0]
    for ax, task in zip(axes, tasks):
        ax.set_title(task)
        ax.set_xlabel("step")
        handles = []
        if task in train:
            pts = sorted(train[task])
            handles += ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", lw=1.2, label="train loss")
            ax.set_ylabel("train loss", color="tab:blue")
        else:
            ax.set_yticks([])
        if task in dev:
            pts = sorted(dev[task])
            metric = pts[-1][2]
            twin = ax.twinx()
            handles += twin.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:orange", marker="o",
                                 ms=3, lw=1.2, label=f"dev {metric}")
            twin.set_ylabel(f"dev {metric}", color="tab:orange")
        ax.legend(handles=handles, loc="best", fontsize="small")
        ax.grid(True, alpha=0.3)
    if overall:
        ax = axes[-1]
        steps = sorted(overall)
        ax.plot(steps, [overall[s] for s in steps], color="tab:green", marker="o", ms=3, label="dev overall")
        ax.set_title("overall (SST + (STS + 1) / 2 + Quora) / 3")
        ax.set_xlabel("step")
        ax.set_ylabel("dev overall")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save_png(plt, fig, path)


def plot_confusion(cm: Any, labels: Sequence[str], path: PathLike, title: str = "confusion matrix") -> Path:
    """Heat map of a (C, C) confusion matrix (rows: gold, columns: predicted) with the counts."""
    op = "plot_confusion"
    if hasattr(cm, "detach"):
        cm = cm.detach().cpu().numpy()
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"{op}: cm must be a square (C, C) matrix, got shape {cm.shape}")
    if cm.dtype.kind not in "biuf" or not np.isfinite(cm).all() or (cm < 0).any():
        raise ValueError(f"{op}: cm must hold finite counts >= 0")
    labels = [str(label) for label in labels]
    if len(labels) != cm.shape[0]:
        raise ValueError(f"{op}: {len(labels)} labels for a {cm.shape[0]}x{cm.shape[0]} matrix")
    size = 1.2 + 0.7 * cm.shape[0]
    plt, fig = _figure(size + 1.5, size)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    top = float(cm.max()) if cm.size else 0.0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            value = cm[i, j]
            text = f"{int(value)}" if float(value).is_integer() else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize="small",
                    color="white" if top and value > top / 2 else "black")
    fig.tight_layout()
    return _save_png(plt, fig, path)
