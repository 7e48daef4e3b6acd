"""Task data: readers for the CS224N TSV files, an optional hub loader, collation and batch sampling.

File format (CS224N minBERT default project). Tab-separated, one record per line, UTF-8, a header
line naming the columns; the first column is usually an unnamed row index (header ``\\tid\\t...``),
which is ignored. Fields may be CSV-quoted (``"a ""quoted"" word"``), as pandas writes them.

- ``sst`` (sentiment): ``id, sentence, sentiment``; integer labels 0..4.
- ``cfimdb`` (sentiment): ``id, sentence, sentiment``; integer labels 0..1.
- ``quora`` (paraphrase): ``id, sentence1, sentence2, is_duplicate``; 0/1, also written 0.0/1.0 (read as int).
- ``sts`` (similarity): ``id, sentence1, sentence2, similarity``; float labels in [0, 5].
- ``nli`` (nli): ``id, sentence1, sentence2, label``; ``entailment``/``neutral``/``contradiction`` (any case)
  or the digits 0/1/2 in that order; the ``id`` column is optional.

The ``nli`` task is the premise (sentence1) / hypothesis (sentence2) / label file used by supervised
SimCSE; when it has no ``id`` column, ids are ``"line<N>"``.

Validation. Every data line is checked and the first problem found is reported as a
:class:`DataError` naming ``file:line: field 'name': ...``. Problems (``reason`` strings, see
:data:`REASONS`): a row with too few fields (``missing column``) or too many (``extra field``),
malformed CSV quoting, a blank line, an empty id, an empty sentence, an empty label, a label that is not a
number, a label out of range, a NaN or infinite label, a duplicate id, and bytes that are not UTF-8.
With ``bad_rows="error"`` (default) the first problem raises; with ``bad_rows="skip"`` such rows are
skipped and counted per reason in :attr:`TaskData.skipped` (and logged), so that every data line is
either an example or a counted skip. Header problems (empty file, undecodable header, duplicate or
missing required column) always raise.

Batching. :func:`make_collate` turns a list of :class:`Example` into a :class:`Batch` through a
tokenizer with the interface ``tok(texts, texts_pair=None, max_length=...) -> dict`` of (B, L) long
tensors padded to the longest row (dynamic padding), with a fixed ``max_length`` per task. Pairs are
either cross-encoded (one sequence, token types 0/1) or bi-encoded (each sentence alone, ``*_b``
tensors). :class:`TaskLoader` samples batches: seeded shuffling per epoch, optional length
bucketing, resumable position, and sharding over data-parallel ranks.
"""
from __future__ import annotations

import collections
import csv
import logging
import math
import os
import re
import zlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "Example", "TaskSpec", "TASK_SPECS", "get_task_spec", "DataError", "REASONS", "TaskData", "read_task_file",
    "cs224n_path", "read_cs224n", "HUB_SOURCES", "load_hub_task", "Batch", "Collator", "make_collate", "TaskLoader",
]

# --------------------------------------------------------------------------------------------------
# Examples and task specifications
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Validation errors
# --------------------------------------------------------------------------------------------------

REASONS = (
    "missing column", "extra field", "malformed quoting", "blank line", "empty id", "empty sentence",
    "missing label", "label not a number", "label out of range", "label not finite", "duplicate id", "undecodable bytes",
)


class DataError(ValueError):
    """A problem in a data file: ``path:line: field 'name': detail``.

    Attributes ``path``, ``line`` (1-based, or None for the whole file), ``field`` (or None),
    ``reason`` (one of :data:`REASONS`, or ``"header"`` / ``"file"`` for fatal problems) and ``detail``.
    """

    def __init__(self, path, line: Optional[int], field: Optional[str], reason: str, detail: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        self.detail = detail
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}':" if field is not None else ""
        super().__init__(f"{where}:{what} {detail}")


class _RowProblem(Exception):
    """Raised inside the row checks; turned into a DataError with the file and line."""

    def __init__(self, reason: str, field: Optional[str], detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NON_FINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)


def _parse_label(spec: TaskSpec, raw) -> Union[int, float]:
    """Validate one label value (a string from a file, or a number from the hub)."""
    col = spec.label_column
    if isinstance(raw, bool) or raw is None:
        raise _RowProblem("label not a number", col, f"{raw!r} is not a number")
    if isinstance(raw, (int, float)):
        value = float(raw)
        shown = repr(raw)
        if not math.isfinite(value):
            raise _RowProblem("label not finite", col, f"{shown} is not a finite number")
    else:
        text = str(raw).strip()
        shown = repr(text)
        if not text:
            raise _RowProblem("missing label", col, f"empty label (expected {spec.expected_labels()})")
        lowered = text.lower()
        names = dict(spec.label_names)
        if lowered in names:
            return names[lowered]
        if _NON_FINITE.fullmatch(text):
            raise _RowProblem("label not finite", col, f"{shown} is not a finite number")
        if not _NUMBER.fullmatch(text):
            raise _RowProblem(
                "label not a number", col,
                f"{shown} is not a number" + (f" nor a label name (expected {spec.expected_labels()})" if names else ""),
            )
        value = float(text)
        if not math.isfinite(value):  # e.g. 1e999
            raise _RowProblem("label not finite", col, f"{shown} is not a finite number")
    lo, hi = spec.label_range
    if spec.is_regression:
        if not lo <= value <= hi:
            raise _RowProblem("label out of range", col, f"{shown} is out of range (expected {spec.expected_labels()})")
        return value
    if value != int(value) or not lo <= value <= hi:
        raise _RowProblem("label out of range", col, f"{shown} is out of range (expected {spec.expected_labels()})")
    return int(value)


def _make_example(spec: TaskSpec, record: Mapping[str, object], labelled: bool, line: int, source: str,
                  fallback_id: str) -> Example:
    """Check one record (column name -> value) and build its Example; raises _RowProblem."""
    if spec.id_column in record:
        ex_id = str(record[spec.id_column]).strip()
        if not ex_id:
            raise _RowProblem("empty id", spec.id_column, "empty id")
    else:
        ex_id = fallback_id
    texts = []
    for col in spec.text_columns:
        text = record[col]
        text = "" if text is None else str(text).strip()
        if not text:
            raise _RowProblem("empty sentence", col, "empty sentence")
        texts.append(text)
    label = _parse_label(spec, record[spec.label_column]) if labelled else None
    return Example(
        id=ex_id, task=spec.name, text_a=texts[0], text_b=texts[1] if len(texts) > 1 else None,
        label=label, line=line, source=source,
    )


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """The examples read from one file, and the rows skipped (reason -> count, with the errors)."""

    path: str
    task: str
    examples: List[Example]
    skipped: collections.Counter = field(default_factory=collections.Counter)
    labelled: bool = True
    errors: List[DataError] = field(default_factory=list)  # one per skipped row, in file order

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: file, task, examples read, rows skipped and why."""
        kind = "labelled" if self.labelled else "unlabelled"
        text = f"{self.path} ({self.task}, {kind}): {len(self.examples)} examples, {self.num_skipped} rows skipped"
        if self.skipped:
            text += " (" + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) + ")"
        return text


def _split_line(text: str) -> List[str]:
    return next(csv.reader([text], delimiter="\t", quotechar='"', doublequote=True, strict=True))


def _undecodable(raw: bytes, header: Optional[List[str]]) -> Tuple[Optional[str], str]:
    """Where the bad bytes of a line are: (field name or None, description)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        start, bad = e.start, raw[e.start:e.end]
    else:  # pragma: no cover - only called for lines that fail to decode
        return None, "undecodable bytes"
    column = raw[:start].count(b"\t")
    name = None
    if header is not None and column < len(header):
        name = header[column] or f"#{column + 1}"
    return name, f"undecodable bytes {bad!r} at byte {start + 1} (the file must be UTF-8)"


def _accept(result: "TaskData", seen: Dict[str, int], line: int, make: Callable[[], Example], bad_rows: str,
            id_field: Optional[str], where: str) -> None:
    """Append the example ``make()`` builds, refusing a duplicate id; a :class:`_RowProblem` is
    raised as a :class:`DataError` (``bad_rows="error"``) or counted in ``result.skipped``."""
    try:
        example = make()
        if example.id in seen:
            raise _RowProblem("duplicate id", id_field,
                              f"duplicate id {example.id!r} (first seen {where} {seen[example.id]})")
    except _RowProblem as p:
        err = DataError(result.path, line, p.field, p.reason, p.detail)
        if bad_rows == "error":
            raise err from None
        result.skipped[p.reason] += 1
        result.errors.append(err)
        return
    seen[example.id] = line
    result.examples.append(example)


def read_task_file(
    path: Union[str, os.PathLike],
    task: Union[str, TaskSpec],
    *,
    bad_rows: str = "error",
    labelled: Optional[bool] = None,
) -> TaskData:
    """Read and validate one CS224N-format TSV file.

    ``bad_rows="error"`` raises a :class:`DataError` on the first bad row; ``"skip"`` skips bad rows
    and counts them per reason (header problems always raise). ``labelled=None`` reads the label
    column when the header has one (``*-test-student.csv`` files have none); ``True`` requires it;
    ``False`` ignores it.
    """
    spec = get_task_spec(task)
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"read_task_file: bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    path = Path(path)
    source = str(path)
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line; it does not start an empty one
    if not lines:
        raise DataError(source, None, None, "file", "empty file (no header line)")

    # ---- header (always fatal) ----
    raw_header = lines[0].rstrip(b"\r")
    try:
        header = _split_line(raw_header.decode("utf-8"))
    except UnicodeDecodeError:
        name, detail = _undecodable(raw_header, None)
        raise DataError(source, 1, None, "header", "header line has " + detail) from None
    except csv.Error as e:
        raise DataError(source, 1, None, "header", f"header line has malformed quoting ({e})") from None
    header = [h.strip() for h in header]
    positions: Dict[str, int] = {}
    for i, name in enumerate(header):
        if not name:
            continue  # the unnamed row-index column
        if name in positions:
            raise DataError(source, 1, name, "header",
                            f"column appears twice in the header (columns {positions[name] + 1} and {i + 1})")
        positions[name] = i
    shown_header = ", ".join(repr(h) for h in header)
    required = list(spec.text_columns)
    if spec.id_required:
        required.insert(0, spec.id_column)
    for col in required:
        if col not in positions:
            raise DataError(source, 1, col, "header",
                            f"required column is missing from the header (columns: {shown_header}; "
                            f"task {spec.name} needs {', '.join(spec.columns)})")
    has_label = spec.label_column in positions
    if labelled is None:
        labelled = has_label
    elif labelled and not has_label:
        raise DataError(source, 1, spec.label_column, "header",
                        f"label column is missing from the header (columns: {shown_header})")
    labelled = bool(labelled)
    wanted = [c for c in spec.columns if c in positions and (labelled or c != spec.label_column)]

    # ---- rows ----
    result = TaskData(path=source, task=spec.name, examples=[], labelled=labelled)
    seen: Dict[str, int] = {}

    def parse(raw: bytes, lineno: int) -> Example:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            name, detail = _undecodable(raw, header)
            raise _RowProblem("undecodable bytes", name, detail) from None
        if not text.strip():
            raise _RowProblem("blank line", None, "blank line")
        try:
            row = _split_line(text)
        except csv.Error as e:
            raise _RowProblem("malformed quoting", None, f"malformed quoting ({e})") from None
        if len(row) < len(header):
            missing = header[len(row)] or f"#{len(row) + 1}"
            raise _RowProblem("missing column", missing,
                              f"missing (the row has {len(row)} fields, the header has {len(header)})")
        if len(row) > len(header):
            raise _RowProblem("extra field", None,
                              f"the row has {len(row)} fields but the header has {len(header)} "
                              "(a tab inside a sentence?)")
        record = {c: row[positions[c]] for c in wanted}
        return _make_example(spec, record, labelled, lineno, source, fallback_id=f"line{lineno}")

    for lineno, raw in enumerate(lines[1:], start=2):
        _accept(result, seen, lineno, lambda: parse(raw.rstrip(b"\r"), lineno), bad_rows, spec.id_column, "on line")

    if result.skipped:
        logger.warning("%s", result.summary())
        for err in result.errors[:5]:
            logger.warning("  skipped %s", err)
    else:
        logger.info("%s", result.summary())
    return result


_CS224N_FILES = {"sst": "ids-sst-{}.csv", "cfimdb": "ids-cfimdb-{}.csv", "quora": "quora-{}.csv", "sts": "sts-{}.csv"}


def cs224n_path(data_dir: Union[str, os.PathLike], task: str, split: str) -> Path:
    """Path of a CS224N file: ``split`` is train, dev or test (``test`` -> ``*-test-student.csv``)."""
    if task not in _CS224N_FILES:
        raise ValueError(f"no CS224N file name for task {task!r}; known: {', '.join(_CS224N_FILES)}")
    splits = {"train": "train", "dev": "dev", "test": "test-student", "test-student": "test-student"}
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected train, dev or test")
    return Path(data_dir) / _CS224N_FILES[task].format(splits[split])


def read_cs224n(data_dir: Union[str, os.PathLike], task: str, split: str, **kwargs) -> TaskData:
    """:func:`read_task_file` on :func:`cs224n_path` (``FileNotFoundError`` names the missing path)."""
    path = cs224n_path(data_dir, task, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {split} file for task {task} in {data_dir}")
    return read_task_file(path, task, **kwargs)


# --------------------------------------------------------------------------------------------------
# Optional Hugging Face hub loader
# --------------------------------------------------------------------------------------------------

# task -> (dataset, config, id column or None, text columns, label column)
HUB_SOURCES = {
    "quora": ("nyu-mll/glue", "qqp", "idx", ("question1", "question2"), "label"),
    "sts": ("nyu-mll/glue", "stsb", "idx", ("sentence1", "sentence2"), "label"),
    "sst": ("SetFit/sst5", None, None, ("text",), "label"),
}
_HUB_SPLITS = {"train": "train", "dev": "validation", "validation": "validation", "test": "test"}


def load_hub_task(task: str, split: str, *, bad_rows: str = "error", cache_dir: Optional[str] = None) -> TaskData:
    """Load a task from the Hugging Face hub through ``datasets`` (GLUE qqp / stsb, SetFit/sst5).

    ``split`` is train, dev (= validation) or test. GLUE test labels are hidden (-1), so the test
    split is returned unlabelled. Rows are validated as in :func:`read_task_file`. Raises
    ``RuntimeError`` when ``datasets`` is not installed or the hub cannot be reached.
    """
    spec = get_task_spec(task)
    if spec.name not in HUB_SOURCES:
        raise ValueError(f"load_hub_task: no hub source for task {spec.name!r} (available: {', '.join(HUB_SOURCES)})")
    if split not in _HUB_SPLITS:
        raise ValueError(f"load_hub_task: unknown split {split!r}; expected train, dev or test")
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"load_hub_task: bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    repo, config, id_col, text_cols, label_col = HUB_SOURCES[spec.name]
    hub_split = _HUB_SPLITS[split]
    local_hint = (
        "Use the local CS224N TSV files instead: read_task_file(path, task) or "
        "read_cs224n(data_dir, task, split) (the CLI's --data-dir)."
    )
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise RuntimeError(
            f"load_hub_task({spec.name!r}, {split!r}) needs the `datasets` library, which is not installed "
            f"(pip install datasets). {local_hint}"
        ) from None
    address = f"hf://{repo}" + (f"/{config}" if config else "") + f":{hub_split}"
    try:
        args = (repo, config) if config else (repo,)
        table = datasets.load_dataset(*args, split=hub_split, cache_dir=cache_dir)
    except Exception as e:  # offline, missing cache, hub errors: all reported the same way
        raise RuntimeError(
            f"could not load {address} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"If this machine is offline (or HF_DATASETS_OFFLINE=1 without a cache), {local_hint}"
        ) from e

    labelled = hub_split != "test" or spec.name == "sst"
    hub_spec = replace(spec, id_column=id_col or spec.id_column, text_columns=tuple(text_cols), label_column=label_col)
    result = TaskData(path=address, task=spec.name, examples=[], labelled=labelled)
    seen: Dict[str, int] = {}
    needed = ((id_col,) if id_col else ()) + tuple(text_cols) + ((label_col,) if labelled else ())

    def convert(row, i: int) -> Example:
        missing = [c for c in needed if c not in row]
        if missing:
            raise _RowProblem("missing column", missing[0], "missing from the hub record")
        ex = _make_example(hub_spec, dict(row), labelled, i + 1, address, fallback_id=f"{spec.name}-{hub_split}-{i}")
        return replace(ex, task=spec.name)

    for i, row in enumerate(table):
        _accept(result, seen, i + 1, lambda: convert(row, i), bad_rows, hub_spec.id_column, "in row")
    (logger.warning if result.skipped else logger.info)("%s", result.summary())
    return result


# --------------------------------------------------------------------------------------------------
# Batches and collation
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A collated batch of one task.

    ``input_ids``, ``attention_mask``, ``token_type_ids``: (B, L) long tensors, the single sentence or
    the cross-encoded pair (or the first sentence of a bi-encoded pair). ``input_ids_b`` etc.: (B, L_b)
    tensors of the second sentence for bi-encoded pairs, else None. ``labels``: (B,) long for
    classification, float32 for regression, None for unlabelled data.
    """

    task: str
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    token_type_ids: torch.Tensor  # (B, L)
    labels: Optional[torch.Tensor] = None  # (B,)
    ids: List[str] = field(default_factory=list)
    input_ids_b: Optional[torch.Tensor] = None  # (B, L_b)
    attention_mask_b: Optional[torch.Tensor] = None  # (B, L_b)
    token_type_ids_b: Optional[torch.Tensor] = None  # (B, L_b)
    swapped: Optional["Batch"] = None  # the same pairs with sentences swapped (symmetric evaluation)
    cross: Optional["Batch"] = None  # hybrid pair encoding: the same pairs cross-encoded (B, L_x)

    @property
    def size(self) -> int:
        """Number of examples (B)."""
        return int(self.input_ids.shape[0])

    def __len__(self) -> int:
        return self.size

    @property
    def is_bi_encoded(self) -> bool:
        return self.input_ids_b is not None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor moved to ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, Batch)):
                value = value.to(device, non_blocking=non_blocking)
            elif isinstance(value, list):
                value = list(value)
            moved[f.name] = value
        return Batch(**moved)


_ENCODING_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class Collator:
    """Callable turning a list of :class:`Example` of one task into a :class:`Batch` (picklable)."""

    def __init__(self, tokenizer, task: Union[str, TaskSpec], max_length: int, pair_encoding: str = "cross",
                 symmetric: bool = False, cross_max_length: Optional[int] = None):
        self.spec = get_task_spec(task)
        if symmetric and not self.spec.is_pair:
            raise ValueError(f"make_collate: symmetric needs a pair task, got {self.spec.name!r}")
        self.symmetric = bool(symmetric)
        if pair_encoding not in ("cross", "bi", "hybrid"):
            raise ValueError(f"make_collate: pair_encoding must be 'cross', 'bi' or 'hybrid', got {pair_encoding!r}")
        if cross_max_length is None:
            cross_max_length = 2 * max_length if isinstance(max_length, int) else max_length
        for name, value in (("max_length", max_length), ("cross_max_length", cross_max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"make_collate: {name} must be an integer >= 2, got {value!r}")
        self.cross_max_length = cross_max_length
        if not callable(tokenizer):
            raise TypeError(f"make_collate: tokenizer must be callable, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pair_encoding = pair_encoding if self.spec.is_pair else "single"

    def _encode(self, texts: List[str], pairs: Optional[List[str]] = None,
                max_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
        max_length = max_length or self.max_length
        enc = self.tokenizer(texts, pairs, max_length=max_length) if pairs is not None else \
            self.tokenizer(texts, max_length=max_length)
        for key in _ENCODING_KEYS:
            if key not in enc:
                raise KeyError(f"collate ({self.spec.name}): the tokenizer output has no {key!r}")
            t = enc[key]
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != len(texts):
                raise ValueError(f"collate ({self.spec.name}): tokenizer output {key!r} must be a "
                                 f"(B={len(texts)}, L) tensor, "
                                 f"got {getattr(t, 'shape', type(t).__name__)}")
        return {k: enc[k].long() for k in _ENCODING_KEYS}

    def __call__(self, examples: Sequence[Example]) -> Batch:
        spec = self.spec
        if len(examples) == 0:
            raise ValueError(f"collate ({spec.name}): empty list of examples")
        for ex in examples:
            if ex.task != spec.name:
                raise ValueError(f"collate ({spec.name}): example {ex.id!r} belongs to task {ex.task!r}")
            if spec.is_pair and ex.text_b is None:
                raise ValueError(f"collate ({spec.name}): example {ex.id!r} has no second sentence")
        texts_a = [ex.text_a for ex in examples]
        texts_b = [ex.text_b for ex in examples]
        kw = {}
        if self.pair_encoding == "cross":
            enc = self._encode(texts_a, texts_b)
        else:
            enc = self._encode(texts_a)
            if self.pair_encoding in ("bi", "hybrid"):
                kw = {f"{k}_b": v for k, v in self._encode(texts_b).items()}
        n_labelled = sum(ex.label is not None for ex in examples)
        if n_labelled == 0:
            labels = None
        elif n_labelled < len(examples):
            raise ValueError(f"collate ({spec.name}): {len(examples) - n_labelled} of {len(examples)} "
                             "examples have no label")
        elif spec.is_regression:
            labels = torch.tensor([float(ex.label) for ex in examples], dtype=torch.float32)
        else:
            labels = torch.tensor([int(ex.label) for ex in examples], dtype=torch.long)
        ids = [ex.id for ex in examples]
        if self.pair_encoding == "hybrid":  # the same pairs as one sequence, for the cross member
            kw["cross"] = Batch(task=spec.name, labels=labels, ids=ids,
                                **self._encode(texts_a, texts_b, self.cross_max_length))
        swapped = None
        if self.symmetric:  # the same pairs in the other order, for symmetric evaluation
            swapped = self._plain([replace(ex, text_a=ex.text_b, text_b=ex.text_a) for ex in examples])
        return Batch(task=spec.name, labels=labels, ids=ids, swapped=swapped, **enc, **kw)

    def _plain(self, examples: Sequence[Example]) -> Batch:
        plain = Collator(self.tokenizer, self.spec, self.max_length,
                         "cross" if self.pair_encoding == "single" else self.pair_encoding,
                         cross_max_length=self.cross_max_length)
        return plain(examples)


def make_collate(tokenizer, task: Union[str, TaskSpec], max_length: int, pair_encoding: str = "cross",
                 symmetric: bool = False, cross_max_length: Optional[int] = None) -> Collator:
    """Collate function for one task: dynamic padding to the longest row, truncation at ``max_length``.

    ``pair_encoding`` applies to pair tasks: ``"cross"`` encodes ``[CLS] a [SEP] b [SEP]`` with
    token types 0/1 in one sequence; ``"bi"`` encodes a and b separately (``*_b`` tensors);
    ``"hybrid"`` does both: a and b separately, and the pair as one sequence of at most
    ``cross_max_length`` tokens (default ``2 * max_length``) in ``Batch.cross``.
    ``symmetric=True`` (pair tasks) also collates every pair in the other order into
    ``Batch.swapped``, for evaluation that averages both orders.
    """
    return Collator(tokenizer, task, max_length, pair_encoding, symmetric, cross_max_length)


# --------------------------------------------------------------------------------------------------
# Batch sampling
# --------------------------------------------------------------------------------------------------


def _word_length(ex: Example) -> int:
    return len(ex.text_a.split()) + (len(ex.text_b.split()) if ex.text_b else 0)


class TaskLoader:
    """Iterable of :class:`Batch` over one task's examples: shuffling, length bucketing, resume, sharding.

    Order. Each epoch builds a list of *global batches* of ``batch_size * world_size`` example
    indices, the same on every rank: a permutation seeded by ``(seed, epoch)`` (or file order when
    ``shuffle=False``); with ``bucket_by_length`` the permutation is cut into chunks of
    ``bucket_chunk`` global batches, each chunk is sorted by length (``length_fn``, default: words in
    text_a and text_b) and cut into global batches, and then the order of all global batches is
    shuffled (seeded). Sorting within chunks keeps similar lengths together, so dynamic padding
    pads less, while chunking and shuffling keep the batches random.

    Sharding. Rank ``r`` of ``world_size`` takes rows ``r::world_size`` of every global batch, so
    the ranks together see exactly the batches a single process with ``batch_size * world_size``
    would see, and every rank yields the same number of batches. Exception: a last global batch
    with fewer rows than ranks gives the surplus ranks a repeat of one of its rows (so none is empty);
    ``drop_last=True`` drops the incomplete last global batch instead.

    Augmentation. ``swap_pairs=True`` (pair tasks) swaps the two sentences of a seeded half of the
    examples each epoch (:meth:`swapped`): paraphrase and similarity are symmetric, so a
    cross-encoder sees both orders of a pair over the run.

    Epochs and resume. Iterating runs the rest of the current epoch, then advances ``epoch`` by one.
    ``set_epoch(e)`` moves to the start of epoch ``e`` (it keeps the position when ``e`` is already
    the current epoch, so ``load_state_dict`` followed by ``set_epoch`` of the same epoch resumes
    mid-epoch). ``state_dict()`` holds ``(epoch, batch_index)``; ``load_state_dict`` restores it and
    checks that the data and sampling options are the same. One iterator at a time: starting a new
    one invalidates the previous.
    """

    def __init__(
        self,
        examples: Union[Sequence[Example], TaskData],
        batch_size: int,
        collate: Callable[[List[Example]], Batch],
        *,
        shuffle: bool = True,
        seed: int = 0,
        bucket_by_length: bool = False,
        bucket_chunk: int = 50,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        length_fn: Optional[Callable[[Example], int]] = None,
        swap_pairs: bool = False,
    ):
        if isinstance(examples, TaskData):
            examples = examples.examples
        self.examples = list(examples)
        for name, value, low in (("batch_size", batch_size, 1), ("bucket_chunk", bucket_chunk, 1),
                                 ("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TaskLoader: {name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"TaskLoader: rank must be < world_size ({world_size}), got {rank}")
        if not callable(collate):
            raise TypeError(f"TaskLoader: collate must be callable, got {type(collate).__name__}")
        if not self.examples:
            raise ValueError("TaskLoader: no examples")
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.global_batch_size = batch_size * world_size
        if drop_last and len(self.examples) < self.global_batch_size:
            raise ValueError(f"TaskLoader: drop_last with {len(self.examples)} examples and a global batch of "
                             f"{self.global_batch_size} leaves no batch")
        self.collate = collate
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.bucket_by_length = bool(bucket_by_length)
        self.bucket_chunk = bucket_chunk
        self.drop_last = bool(drop_last)
        self.length_fn = length_fn or _word_length
        self.swap_pairs = bool(swap_pairs)
        if self.swap_pairs and any(ex.text_b is None for ex in self.examples):
            raise ValueError("TaskLoader: swap_pairs needs pair examples (text_b), but some rows have one sentence")
        self._swap_cache: Tuple[int, Optional[List[bool]]] = (-1, None)
        self.epoch = 0
        self._batch_index = 0
        self._generation = 0
        self._cache: Tuple[int, List[List[int]]] = (-1, [])
        self._fingerprint = zlib.crc32("\n".join(f"{ex.task}\t{ex.id}" for ex in self.examples).encode("utf-8"))

    # ---- order ----
    def _generator(self, epoch: int, stream: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + epoch * 2 + stream) % (2 ** 63))
        return g

    def global_batches(self, epoch: Optional[int] = None) -> List[List[int]]:
        """The global batches (lists of example indices) of an epoch, identical on all ranks."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache[0] == epoch:
            return self._cache[1]
        n, gbs = len(self.examples), self.global_batch_size
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator(epoch, 0)).tolist()
        else:
            order = list(range(n))
        if self.bucket_by_length:
            lengths = [self.length_fn(ex) for ex in self.examples]
            chunk = self.bucket_chunk * gbs
            order = [i for s in range(0, n, chunk) for i in sorted(order[s:s + chunk], key=lengths.__getitem__)]
        batches = [order[s:s + gbs] for s in range(0, n, gbs)]
        if self.drop_last and len(batches[-1]) < gbs:
            batches.pop()
        if self.bucket_by_length and self.shuffle:
            perm = torch.randperm(len(batches), generator=self._generator(epoch, 1)).tolist()
            batches = [batches[i] for i in perm]
        self._cache = (epoch, batches)
        return batches

    def rank_rows(self, global_batch: List[int]) -> List[int]:
        """This rank's rows of a global batch: ``global_batch[rank::world_size]``."""
        rows = global_batch[self.rank::self.world_size]
        if not rows:  # fewer rows than ranks: repeat one so that no rank gets an empty batch
            rows = [global_batch[self.rank % len(global_batch)]]
        return rows

    def __len__(self) -> int:
        """Batches per epoch (on every rank)."""
        n, gbs = len(self.examples), self.global_batch_size
        return n // gbs if self.drop_last else -(-n // gbs)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    @property
    def batch_index(self) -> int:
        """Batches of the current epoch already yielded."""
        return self._batch_index

    def swapped(self, epoch: Optional[int] = None) -> List[bool]:
        """``swap_pairs``: which examples have their two sentences swapped in ``epoch`` (a seeded,
        per-epoch draw, the same on every rank, so a resumed run swaps the same rows)."""
        epoch = self.epoch if epoch is None else epoch
        if self._swap_cache[0] != epoch:
            draw = torch.rand(len(self.examples), generator=self._generator(epoch, 2)) < 0.5
            self._swap_cache = (epoch, draw.tolist())
        return self._swap_cache[1]

    def example(self, index: int) -> Example:
        """Example ``index`` as this epoch yields it (with ``swap_pairs``, possibly swapped)."""
        ex = self.examples[index]
        if self.swap_pairs and self.swapped()[index]:
            ex = replace(ex, text_a=ex.text_b, text_b=ex.text_a)
        return ex

    # ---- iteration ----
    def __iter__(self) -> Iterator[Batch]:
        self._generation += 1
        return self._run(self._generation)

    def _run(self, generation: int) -> Iterator[Batch]:
        batches = self.global_batches(self.epoch)
        while self._batch_index < len(batches):
            if generation != self._generation:
                raise RuntimeError("TaskLoader: this iterator was superseded by a newer iter() "
                                   "or set_epoch/load_state_dict")
            rows = self.rank_rows(batches[self._batch_index])
            batch = self.collate([self.example(i) for i in rows])
            self._batch_index += 1
            yield batch
        if generation == self._generation:
            self.epoch += 1
            self._batch_index = 0

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch`` (kept as is when it is the current epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"TaskLoader.set_epoch: epoch must be an integer >= 0, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch = epoch
            self._batch_index = 0
            self._generation += 1

    # ---- checkpointing ----
    def _options(self) -> Dict[str, object]:
        return {
            "num_examples": len(self.examples), "fingerprint": self._fingerprint, "seed": self.seed,
            "batch_size": self.batch_size, "world_size": self.world_size, "shuffle": self.shuffle,
            "bucket_by_length": self.bucket_by_length, "bucket_chunk": self.bucket_chunk, "drop_last": self.drop_last,
            "swap_pairs": self.swap_pairs,
        }

    def state_dict(self) -> Dict[str, object]:
        """Position (epoch, batch_index) plus the options that determine the order."""
        return {"epoch": self.epoch, "batch_index": self._batch_index, **self._options()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Resume at the saved position; the data and sampling options must be those it was saved with."""
        for key in ("epoch", "batch_index"):
            if key not in state:
                raise KeyError(f"TaskLoader.load_state_dict: state has no {key!r}")
        for key, value in self._options().items():
            if key in state and state[key] != value:
                raise ValueError(f"TaskLoader.load_state_dict: saved {key}={state[key]!r} but this loader has {value!r}; "
                                 f"the batch order would differ")
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or not 0 <= index <= len(self):
            raise ValueError(f"TaskLoader.load_state_dict: position epoch={epoch}, batch_index={index} is out of range "
                             f"({len(self)} batches per epoch)")
        self.epoch, self._batch_index = epoch, index
        self._generation += 1
