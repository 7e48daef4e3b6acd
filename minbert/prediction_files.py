"""CS224N prediction files and the run's ``metrics.jsonl``.

* :func:`write_predictions` / :func:`read_predictions`: the CS224N prediction files, a header
  ``id \\t Predicted_Sentiment `` (or ``Predicted_Is_Paraphrase``, ``Predicted_Similiarity``, as
  the course's files spell it) then one ``{id} , {pred} `` line per example.
* :func:`append_jsonl` / :func:`read_jsonl`: the run's ``metrics.jsonl``.

Every file is written atomically (:func:`atomic_open`): to a temporary file in the same directory,
then ``os.replace``-d over the target, so a crash never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Sequence, Union

import numpy as np

from .tasks import TASKS, get_task

__all__ = ["prediction_columns", "write_predictions", "read_predictions", "Predictions", "append_jsonl",
           "read_jsonl", "atomic_open"]

PathLike = Union[str, os.PathLike]


def prediction_columns() -> Dict[str, str]:
    """task -> the header column of its prediction files, for every task that has one
    (:attr:`minbert.tasks.Task.prediction_column`)."""
    return {name: task.prediction_column for name, task in TASKS.items() if task.prediction_column}


# --- atomic files ------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w") -> Iterator[Any]:
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
    if not get_task(task).is_regression:  # class labels are written as ints
        if value != int(value):
            raise ValueError(f"write_predictions({task!r}): prediction {index} must be a class label (an integer), "
                             f"got {value!r}")
        return str(int(value))
    return repr(float(value))


def write_predictions(path: PathLike, task: str, ids: Sequence[str], preds: Any) -> Path:
    """Write a CS224N prediction file (atomically); returns its path.

    Format: ``id \\t <column> `` then ``{id} , {pred} `` per line, with the column of the task in
    :func:`prediction_columns`. Class predictions (sst, cfimdb, quora) are written as ints,
    similarities (sts) as floats.
    """
    columns = prediction_columns()
    if task not in columns:
        raise ValueError(f"write_predictions: unknown task {task!r}; expected one of {sorted(columns)}")
    if hasattr(preds, "detach"):
        preds = preds.detach().cpu().tolist()
    ids, preds = list(ids), list(preds)
    if len(ids) != len(preds):
        raise ValueError(f"write_predictions({task!r}): {len(ids)} ids but {len(preds)} predictions")
    lines = [f"id \t {columns[task]} \n"]
    for i, (ex_id, pred) in enumerate(zip(ids, preds)):
        ex_id = str(ex_id)
        if not ex_id or ex_id != ex_id.strip() or any(c in ex_id for c in ",\t\r\n"):
            raise ValueError(f"write_predictions({task!r}): id {i} ({ex_id!r}) must be non-empty, without "
                             f"surrounding spaces, commas, tabs or line breaks")
        lines.append(f"{ex_id} , {_format_pred(task, i, pred)} \n")
    path = Path(path)
    with atomic_open(path) as f:
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
    columns = set(prediction_columns().values())
    if len(head) != 2 or head[0] != "id" or head[1] not in columns:
        raise ValueError(f"{path}:1: bad header {lines[0]!r}; expected 'id \\t <column>' with column one of "
                         f"{sorted(columns)}")
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

