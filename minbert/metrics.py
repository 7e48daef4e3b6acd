"""Evaluation metrics, CS224N prediction files, ``metrics.jsonl`` helpers and plots.

* :func:`accuracy`, :func:`pearson`, :func:`confusion_matrix`; :data:`TASK_METRIC` and
  :func:`task_metric` pick the metric of each task (accuracy for SST, CFIMDB and Quora, Pearson
  correlation for STS).
* :func:`overall_score` is the CS224N leaderboard score ``(SST + (STS + 1) / 2 + Quora) / 3``
  (the Pearson correlation is mapped from [-1, 1] to [0, 1]).
* :func:`write_predictions` / :func:`read_predictions`: the CS224N prediction files, a header
  ``id \\t Predicted_Sentiment `` (or ``Predicted_Is_Paraphrase``, ``Predicted_Similiarity``, as
  the course's files spell it) then one ``{id} , {pred} `` line per example.
* :func:`append_jsonl` / :func:`read_jsonl`: the run's ``metrics.jsonl``.
* :func:`plot_curves` (train loss and dev metric per task) and :func:`plot_confusion`, rendered
  with matplotlib's Agg backend, so they need no display.

Every file is written atomically: to a temporary file in the same directory, then
``os.replace``-d over the target, so a crash never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

import numpy as np

__all__ = [
    "accuracy", "pearson", "overall_score", "confusion_matrix", "TASK_METRIC", "task_metric",
    "PREDICTION_COLUMNS", "write_predictions", "read_predictions", "Predictions", "append_jsonl",
    "read_jsonl", "plot_curves", "plot_confusion",
]

PathLike = Union[str, os.PathLike]

TASK_METRIC = {"sst": "accuracy", "cfimdb": "accuracy", "quora": "accuracy", "sts": "pearson"}

# the header column of the CS224N prediction files ("Similiarity" is the course's spelling)
PREDICTION_COLUMNS = {
    "sst": "Predicted_Sentiment",
    "cfimdb": "Predicted_Sentiment",
    "quora": "Predicted_Is_Paraphrase",
    "sts": "Predicted_Similiarity",
}


# --- metrics -----------------------------------------------------------------------------------

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
    """``{metric name: value}`` for ``task`` (see :data:`TASK_METRIC`)."""
    if task not in TASK_METRIC:
        raise ValueError(f"task_metric: unknown task {task!r}; expected one of {sorted(TASK_METRIC)}")
    name = TASK_METRIC[task]
    fn = accuracy if name == "accuracy" else pearson
    try:
        return {name: fn(preds, labels)}
    except ValueError as e:
        raise ValueError(f"task_metric({task!r}): {e}") from None


# --- atomic files ------------------------------------------------------------------------------

@contextlib.contextmanager
def _atomic_open(path: PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        kwargs = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- prediction files --------------------------------------------------------------------------

class Predictions(NamedTuple):
    ids: List[str]
    preds: List[Union[int, float]]
    column: str  # the header column, e.g. "Predicted_Sentiment"


def _format_pred(task: str, index: int, value: Any) -> str:
    if hasattr(value, "item"):  # numpy / torch scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"write_predictions({task!r}): prediction {index} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"write_predictions({task!r}): prediction {index} is {value!r}")
    if TASK_METRIC[task] == "accuracy":  # class labels are written as ints
        if value != int(value):
            raise ValueError(f"write_predictions({task!r}): prediction {index} must be a class label (an integer), "
                             f"got {value!r}")
        return str(int(value))
    return repr(float(value))


def write_predictions(path: PathLike, task: str, ids: Sequence[str], preds: Any) -> Path:
    """Write a CS224N prediction file (atomically); returns its path.

    Format: ``id \\t <column> `` then ``{id} , {pred} `` per line, with the column of the task in
    :data:`PREDICTION_COLUMNS`. Class predictions (sst, cfimdb, quora) are written as ints,
    similarities (sts) as floats.
    """
    if task not in PREDICTION_COLUMNS:
        raise ValueError(f"write_predictions: unknown task {task!r}; expected one of {sorted(PREDICTION_COLUMNS)}")
    if hasattr(preds, "detach"):
        preds = preds.detach().cpu().tolist()
    ids, preds = list(ids), list(preds)
    if len(ids) != len(preds):
        raise ValueError(f"write_predictions({task!r}): {len(ids)} ids but {len(preds)} predictions")
    lines = [f"id \t {PREDICTION_COLUMNS[task]} \n"]
    for i, (ex_id, pred) in enumerate(zip(ids, preds)):
        ex_id = str(ex_id)
        if not ex_id or ex_id != ex_id.strip() or any(c in ex_id for c in ",\t\r\n"):
            raise ValueError(f"write_predictions({task!r}): id {i} ({ex_id!r}) must be non-empty, without "
                             f"surrounding spaces, commas, tabs or line breaks")
        lines.append(f"{ex_id} , {_format_pred(task, i, pred)} \n")
    path = Path(path)
    with _atomic_open(path) as f:
        f.write("".join(lines))
    return path


def read_predictions(path: PathLike) -> Predictions:
    """Parse a file written by :func:`write_predictions` (or by the CS224N starter code)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty prediction file (expected a header 'id \\t <column>')")
    head = [h.strip() for h in lines[0].split("\t")]
    if len(head) != 2 or head[0] != "id" or head[1] not in PREDICTION_COLUMNS.values():
        raise ValueError(f"{path}:1: bad header {lines[0]!r}; expected 'id \\t <column>' with column one of "
                         f"{sorted(set(PREDICTION_COLUMNS.values()))}")
    ids, preds = [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{path}:{n}: expected '<id> , <prediction>', got {line!r}")
        ex_id, text = parts
        try:
            value: Union[int, float] = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{path}:{n}: prediction {text!r} is not a number") from None
        ids.append(ex_id)
        preds.append(value)
    return Predictions(ids, preds, head[1])


# --- metrics.jsonl -----------------------------------------------------------------------------

def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalars
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"append_jsonl: value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def append_jsonl(path: PathLike, record: Dict[str, Any]) -> None:
    """Append ``record`` as one JSON line (one ``write`` call, flushed)."""
    if not isinstance(record, dict):
        raise ValueError(f"append_jsonl: record must be a dict, got {type(record).__name__}")
    line = json.dumps(record, default=_json_default) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: PathLike) -> List[Dict[str, Any]]:
    """All records of a JSON-lines file; blank lines are ignored.

    A malformed line raises ``ValueError`` naming the file and line, except a last line cut off
    without its newline (a run killed mid-write), which is skipped with a warning.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{path}:{n}: skipping a truncated last line ({e})", RuntimeWarning, stacklevel=2)
                continue
            raise ValueError(f"{path}:{n}: not valid JSON ({e}): {line[:200]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


# --- plots -------------------------------------------------------------------------------------

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
        with _atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def _dev_metric(task: str, record: Dict[str, Any]) -> Optional[str]:
    preferred = TASK_METRIC.get(task)
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
