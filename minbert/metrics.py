"""Evaluation metrics.

* :func:`accuracy`, :func:`pearson`, :func:`confusion_matrix`; :func:`task_metric` computes a
  task's dev metric (:attr:`minbert.tasks.Task.dev_metric`: accuracy for SST, CFIMDB and Quora,
  Pearson correlation for STS).
* :func:`overall_score` is the CS224N leaderboard score ``(SST + (STS + 1) / 2 + Quora) / 3``
  (the Pearson correlation is mapped from [-1, 1] to [0, 1]).

Prediction files and ``metrics.jsonl`` are in :mod:`minbert.prediction_files`, plots in
:mod:`minbert.plots`.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict

import numpy as np

from .tasks import get_task, trainable_tasks

__all__ = ["accuracy", "pearson", "overall_score", "confusion_matrix", "task_metric"]


def _as_array(values: Any, name: str, op: str) -> np.ndarray:
    """A 1-D numpy array from a list, numpy array or torch tensor (moved to the CPU)."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch.Tensor without importing torch
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{op}: argument '{name}' cannot be read as an array: {e}") from None
    if arr.ndim != 1:
        raise ValueError(f"{op}: argument '{name}' must be 1-D (N,), got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{op}: argument '{name}' must hold numbers, got dtype {arr.dtype}")
    return arr


def _pair(pred: Any, gold: Any, op: str) -> (np.ndarray, np.ndarray):
    p, g = _as_array(pred, "pred", op), _as_array(gold, "gold", op)
    if p.shape != g.shape:
        raise ValueError(f"{op}: 'pred' has {p.shape[0]} values but 'gold' has {g.shape[0]}")
    if p.size == 0:
        raise ValueError(f"{op}: 'pred' and 'gold' are empty; the metric is undefined")
    for name, arr in (("pred", p), ("gold", g)):
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"{op}: argument '{name}' holds NaN or Inf at index "
                             f"{int(np.flatnonzero(~np.isfinite(arr))[0])}")
    return p, g


def accuracy(pred: Any, gold: Any) -> float:
    """Fraction of ``pred[i] == gold[i]`` (labels compared as numbers: ``1 == 1.0``)."""
    p, g = _pair(pred, gold, "accuracy")
    return float(np.mean(p.astype(np.float64) == g.astype(np.float64)))


def pearson(pred: Any, gold: Any) -> float:
    """Pearson correlation ``Σ(x−x̄)(y−ȳ) / sqrt(Σ(x−x̄)² Σ(y−ȳ)²)``, computed in float64.

    The correlation is undefined when either input is constant (a zero variance). Rather than
    NaN, which would poison the overall score and the best-checkpoint comparison, this returns
    0.0 (no linear relation) and emits a ``RuntimeWarning``. At least two values are required.
    """
    op = "pearson"
    x, y = _pair(pred, gold, op)
    if x.size < 2:
        raise ValueError(f"{op}: needs at least 2 values, got {x.size}")
    x, y = x.astype(np.float64), y.astype(np.float64)
    constant = [name for name, a in (("pred", x), ("gold", y)) if np.all(a == a[0])]
    if constant:
        warnings.warn(f"{op}: {' and '.join(constant)} constant, the correlation is undefined; returning 0.0",
                      RuntimeWarning, stacklevel=2)
        return 0.0
    xc, yc = x - x.mean(), y - y.mean()
    r = float(np.dot(xc, yc) / math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc))))
    return min(1.0, max(-1.0, r))


def overall_score(sst_acc: float, quora_acc: float, sts_pearson: float) -> float:
    """The CS224N leaderboard score ``(sst_acc + (sts_pearson + 1) / 2 + quora_acc) / 3``."""
    args = (("sst_acc", sst_acc, 0.0), ("quora_acc", quora_acc, 0.0), ("sts_pearson", sts_pearson, -1.0))
    for name, value, lo in args:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                or not math.isfinite(value) or not lo <= value <= 1.0:
            raise ValueError(f"overall_score: argument '{name}' must be a number in [{lo:g}, 1], got {value!r}")
    return float((sst_acc + (sts_pearson + 1.0) / 2.0 + quora_acc) / 3.0)


def confusion_matrix(pred: Any, gold: Any, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, ``cm[gold, pred]``: rows are the true class, columns the prediction."""
    op = "confusion_matrix"
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"{op}: num_classes must be an int >= 1, got {num_classes!r}")
    p, g = _pair(pred, gold, op)
    for name, arr in (("pred", p), ("gold", g)):
        if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
            raise ValueError(f"{op}: argument '{name}' holds non-integer labels")
        ints = arr.astype(np.int64)
        bad = (ints < 0) | (ints >= num_classes)
        if bad.any():
            raise ValueError(f"{op}: argument '{name}' holds label {int(ints[bad][0])}, outside [0, {num_classes})")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (g.astype(np.int64), p.astype(np.int64)), 1)
    return cm


def task_metric(task: str, preds: Any, labels: Any) -> Dict[str, float]:
    """``{metric name: value}`` for ``task``, with its dev metric (:attr:`minbert.tasks.Task.dev_metric`)."""
    if task not in trainable_tasks():
        raise ValueError(f"task_metric: unknown task {task!r}; expected one of {sorted(trainable_tasks())}")
    name = get_task(task).dev_metric
    fn = accuracy if name == "accuracy" else pearson
    try:
        return {name: fn(preds, labels)}
    except ValueError as e:
        raise ValueError(f"task_metric({task!r}): {e}") from None

