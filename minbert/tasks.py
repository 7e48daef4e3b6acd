"""The task registry: every fact about a corpus that the data readers, the model, the losses, the
metrics and the prediction files need, in one :class:`Task` per name in :data:`TASKS`.

==========  ===========================  ==========================  ============  ======================
name        problem type                 columns (text..., label)    labels        prediction column
==========  ===========================  ==========================  ============  ======================
sst         single_label_classification  sentence, sentiment         0..4          Predicted_Sentiment
cfimdb      single_label_classification  sentence, sentiment         0..1          Predicted_Sentiment
quora       binary_classification        sentence1, sentence2,       0/1           Predicted_Is_Paraphrase
                                         is_duplicate
sts         regression                   sentence1, sentence2,       0.0-5.0       Predicted_Similiarity
                                         similarity
nli         single_label_classification  sentence1, sentence2,       0..2 (named)  (not a trained task)
                                         label
==========  ===========================  ==========================  ============  ======================

Problem types. The one vocabulary for "what kind of output a task has" is Hugging Face's
``PretrainedConfig.problem_type`` (``modeling_bert``'s sequence-classification heads):

* ``"single_label_classification"``: logits (B, C), integer labels 0..C−1, softmax cross-entropy;
  the prediction is the arg-max class.
* ``"regression"``: one score per example (B,), float labels, mean squared error; the prediction is
  the score, clamped to the task's label range.
* ``"binary_classification"``: one logit per example (B,), 0/1 labels, BCE-with-logits; the
  prediction is ``logit > 0``. Hugging Face has no name of its own for it: its
  ``"multi_label_classification"`` with one label computes the same loss (``BCEWithLogitsLoss``
  on one logit), but names a different thing (several independent labels), so this is named for
  what it is, in the same ``<what>_classification`` form.

Every ``kind``/``task_kind`` argument in minbert (heads, :class:`~minbert.smart.SMART`, ensembles,
the weightings' ``task_kinds``) takes these values. The default loss and dev metric follow from the
problem type (:data:`DEFAULT_LOSS`, :data:`DEV_METRIC`) unless a task names its own.

Files. ``files`` are the default train, dev and test file names in ``data.dir`` (CS224N's: the test
files are the ``*-test-student.csv`` ones, without labels); a task without default files
(``nli``, read by supervised SimCSE from a file the user names) has ``files=None``. A task with
``trainable=False`` is a data source only: ``tasks:`` in a training config cannot name it.

Adding a task is one :class:`Task` added to :data:`TASKS` here (or, at run time, :func:`register`;
:func:`registered` is the context-manager form that unregisters on exit).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple, Union

import torch

SINGLE_LABEL = "single_label_classification"
BINARY = "binary_classification"
REGRESSION = "regression"
PROBLEM_TYPES = (SINGLE_LABEL, BINARY, REGRESSION)
DEFAULT_LOSS = {SINGLE_LABEL: "cross_entropy", BINARY: "bce_with_logits", REGRESSION: "mse"}
DEV_METRIC = {SINGLE_LABEL: "accuracy", BINARY: "accuracy", REGRESSION: "pearson"}
DEV_METRICS = ("accuracy", "pearson")
SPLITS = ("train", "dev", "test")


def cs224n_files(stem: str) -> Tuple[str, str, str]:
    """The CS224N file names of a corpus: ``<stem>-train.csv``, ``<stem>-dev.csv``, ``<stem>-test-student.csv``."""
    return f"{stem}-train.csv", f"{stem}-dev.csv", f"{stem}-test-student.csv"


@dataclass(frozen=True)
class Task:
    """One corpus: its file layout, its labels and what the model predicts for it.

    ``text_columns``: one column (a single sentence) or two (a sentence pair). Classification tasks
    have ``num_labels`` classes, integer labels in ``label_range`` (``label_names`` maps accepted label
    words to class ids); regression tasks (``num_labels=None``) have float labels in ``label_range``.
    ``default_loss`` and ``dev_metric`` default to the problem type's (see the module docstring).
    """

    name: str
    problem_type: str
    text_columns: Tuple[str, ...]
    label_column: str
    num_labels: Optional[int]
    label_range: Tuple[float, float]
    files: Optional[Tuple[str, str, str]] = None  # default (train, dev, test) file names in data.dir
    prediction_column: Optional[str] = None  # the header column of the task's prediction files
    default_loss: Optional[str] = None
    dev_metric: Optional[str] = None
    label_names: Tuple[Tuple[str, int], ...] = ()
    id_column: str = "id"
    id_required: bool = True
    trainable: bool = True

    def __post_init__(self):
        where = f"task {self.name!r}"
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"{where}: problem_type {self.problem_type!r} is not one of {list(PROBLEM_TYPES)}")
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"{where}: text_columns must name one or two columns, got {self.text_columns!r}")
        n = self.num_labels
        count = isinstance(n, int) and not isinstance(n, bool)
        want, ok = {SINGLE_LABEL: ("an integer >= 2", count and n >= 2), BINARY: ("2", count and n == 2),
                    REGRESSION: ("None", n is None)}[self.problem_type]
        if not ok:
            raise ValueError(f"{where}: a {self.problem_type} task has num_labels {want}, got {n!r}")
        if self.files is not None and len(self.files) != len(SPLITS):
            raise ValueError(f"{where}: files must name the {', '.join(SPLITS)} files, got {self.files!r}")
        if self.default_loss is None:
            object.__setattr__(self, "default_loss", DEFAULT_LOSS[self.problem_type])
        if self.dev_metric is None:
            object.__setattr__(self, "dev_metric", DEV_METRIC[self.problem_type])
        if self.dev_metric not in DEV_METRICS:
            raise ValueError(f"{where}: dev_metric {self.dev_metric!r} is not one of {list(DEV_METRICS)}")

    # --- file layout ----------------------------------------------------------------------------
    @property
    def columns(self) -> Tuple[str, ...]:
        """All columns of a labelled file, in order."""
        return (self.id_column,) + self.text_columns + (self.label_column,)

    @property
    def is_pair(self) -> bool:
        """Two sentences per example (paraphrase, similarity, NLI)."""
        return len(self.text_columns) == 2

    # --- labels and outputs ---------------------------------------------------------------------
    @property
    def is_regression(self) -> bool:
        return self.problem_type == REGRESSION

    @property
    def output_size(self) -> int:
        """Units of the model's output per example: C for single-label classification, else 1."""
        return self.num_labels if self.problem_type == SINGLE_LABEL else 1

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

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """Model output -> prediction: the arg-max class (single-label), 0/1 (binary: ``logit > 0``),
        or the score clamped to ``label_range`` (regression).

        A clamped score is never further from the truth: a head such as 5·cos(u, v) can output −1.2,
        but no gold score lies outside the range. The raw output is what ensembles average and what
        the loss sees."""
        if self.problem_type == SINGLE_LABEL:
            return output.argmax(-1)
        if self.problem_type == BINARY:
            return (output > 0).long()
        lo, hi = self.label_range
        return output.clamp(lo, hi)


TASKS: Dict[str, Task] = {
    "sst": Task("sst", SINGLE_LABEL, ("sentence",), "sentiment", 5, (0, 4), files=cs224n_files("ids-sst"),
                prediction_column="Predicted_Sentiment"),
    "cfimdb": Task("cfimdb", SINGLE_LABEL, ("sentence",), "sentiment", 2, (0, 1), files=cs224n_files("ids-cfimdb"),
                   prediction_column="Predicted_Sentiment"),
    "quora": Task("quora", BINARY, ("sentence1", "sentence2"), "is_duplicate", 2, (0, 1),
                  files=cs224n_files("quora"), prediction_column="Predicted_Is_Paraphrase"),
    # "Similiarity" is the course's spelling
    "sts": Task("sts", REGRESSION, ("sentence1", "sentence2"), "similarity", None, (0.0, 5.0),
                files=cs224n_files("sts"), prediction_column="Predicted_Similiarity"),
    # premise / hypothesis / label rows for supervised SimCSE (minbert.regularizers.SimCSESup)
    "nli": Task("nli", SINGLE_LABEL, ("sentence1", "sentence2"), "label", 3, (0, 2),
                label_names=(("entailment", 0), ("neutral", 1), ("contradiction", 2)), id_required=False,
                trainable=False),
}


def get_task(task: Union[str, Task]) -> Task:
    """The :class:`Task` registered as ``task`` (or the task itself)."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


def trainable_tasks() -> Tuple[str, ...]:
    """The names a training config's ``tasks:`` may use."""
    return tuple(name for name, task in TASKS.items() if task.trainable)


def register(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS`; a name already registered is refused."""
    if not isinstance(task, Task):
        raise TypeError(f"register: expected a Task, got {type(task).__name__}")
    if task.name in TASKS:
        raise ValueError(f"register: a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def unregister(name: str) -> Task:
    """Remove the task ``name`` from :data:`TASKS` and return it."""
    if name not in TASKS:
        raise ValueError(f"unregister: no task named {name!r} is registered")
    return TASKS.pop(name)


@contextlib.contextmanager
def registered(task: Task) -> Iterator[Task]:
    """``with registered(Task(...)) as task:`` the task is known inside the block only."""
    register(task)
    try:
        yield task
    finally:
        unregister(task.name)


__all__ = ["Task", "TASKS", "PROBLEM_TYPES", "SINGLE_LABEL", "BINARY", "REGRESSION", "DEFAULT_LOSS", "DEV_METRIC",
           "DEV_METRICS", "SPLITS", "cs224n_files", "get_task", "trainable_tasks", "register", "unregister",
           "registered"]
