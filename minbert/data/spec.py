"""What a task's rows are: :class:`Example`, and :class:`TaskSpec` (columns and allowed labels) per task."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

__all__ = ["Example", "TaskSpec", "TASK_SPECS", "get_task_spec"]


@dataclass
class Example:
    """One row of a task file. ``label`` is None for unlabelled (test) files."""

    id: str
    task: str
    text_a: str
    text_b: Optional[str] = None
    label: Optional[Union[int, float]] = None
    line: int = 0  # 1-based line in the source file (row number + 1 for hub data)
    source: str = ""  # file path (or hub address)


@dataclass(frozen=True)
class TaskSpec:
    """How one task's file is laid out and what its labels may be.

    ``kind`` is one of ``sentiment``, ``paraphrase``, ``similarity`` or ``nli``. Classification
    tasks have integer labels ``0 .. num_labels - 1``; regression tasks (``num_labels is None``) have
    float labels in ``label_range``. ``label_names`` maps accepted label words to class ids.
    """

    name: str
    kind: str
    text_columns: Tuple[str, ...]
    label_column: str
    num_labels: Optional[int]
    label_range: Tuple[float, float]
    label_names: Tuple[Tuple[str, int], ...] = ()
    id_column: str = "id"
    id_required: bool = True

    @property
    def columns(self) -> Tuple[str, ...]:
        """All columns of a labelled file, in order."""
        return (self.id_column,) + self.text_columns + (self.label_column,)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def is_regression(self) -> bool:
        return self.num_labels is None

    def expected_labels(self) -> str:
        """Human-readable description of the allowed labels (used in error messages)."""
        if self.is_regression:
            lo, hi = self.label_range
            return f"a number from {lo:g} to {hi:g}"
        if self.num_labels == 2:
            text = "0 or 1"
        else:
            text = f"an integer from 0 to {self.num_labels - 1}"
        if self.label_names:
            names = ", ".join(f"{n}={i}" for n, i in self.label_names)
            text = f"{names} or {text}"
        return text


TASK_SPECS: Dict[str, TaskSpec] = {
    "sst": TaskSpec("sst", "sentiment", ("sentence",), "sentiment", 5, (0, 4)),
    "cfimdb": TaskSpec("cfimdb", "sentiment", ("sentence",), "sentiment", 2, (0, 1)),
    "quora": TaskSpec("quora", "paraphrase", ("sentence1", "sentence2"), "is_duplicate", 2, (0, 1)),
    "sts": TaskSpec("sts", "similarity", ("sentence1", "sentence2"), "similarity", None, (0.0, 5.0)),
    "nli": TaskSpec(
        "nli", "nli", ("sentence1", "sentence2"), "label", 3, (0, 2),
        label_names=(("entailment", 0), ("neutral", 1), ("contradiction", 2)), id_required=False,
    ),
}


def get_task_spec(task: Union[str, TaskSpec]) -> TaskSpec:
    """The :class:`TaskSpec` of a task name (or the spec itself)."""
    if isinstance(task, TaskSpec):
        return task
    try:
        return TASK_SPECS[task]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_SPECS)}") from None

