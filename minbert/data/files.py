"""Reading and validating task files (:func:`read_task_file`): every bad row is a :class:`DataError`
naming ``file:line: field 'name': ...``, raised or counted (``bad_rows="skip"``) in :class:`TaskData`."""
from __future__ import annotations

import collections
import csv
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from ..tasks import Task, get_task
from .example import Example

logger = logging.getLogger("minbert.data")

__all__ = ["REASONS", "DataError", "RowProblem", "TaskData", "read_task_file", "make_example", "accept_row"]

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


class RowProblem(Exception):
    """Raised inside the row checks; turned into a DataError with the file and line."""

    def __init__(self, reason: str, field: Optional[str], detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NON_FINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)


def _parse_label(spec: Task, raw) -> Union[int, float]:
    """Validate one label value (a string from a file, or a number from the hub)."""
    col = spec.label_column
    if isinstance(raw, bool) or raw is None:
        raise RowProblem("label not a number", col, f"{raw!r} is not a number")
    if isinstance(raw, (int, float)):
        value = float(raw)
        shown = repr(raw)
        if not math.isfinite(value):
            raise RowProblem("label not finite", col, f"{shown} is not a finite number")
    else:
        text = str(raw).strip()
        shown = repr(text)
        if not text:
            raise RowProblem("missing label", col, f"empty label (expected {spec.expected_labels()})")
        lowered = text.lower()
        names = dict(spec.label_names)
        if lowered in names:
            return names[lowered]
        if _NON_FINITE.fullmatch(text):
            raise RowProblem("label not finite", col, f"{shown} is not a finite number")
        if not _NUMBER.fullmatch(text):
            raise RowProblem(
                "label not a number", col,
                f"{shown} is not a number" + (f" nor a label name (expected {spec.expected_labels()})" if names else ""),
            )
        value = float(text)
        if not math.isfinite(value):  # e.g. 1e999
            raise RowProblem("label not finite", col, f"{shown} is not a finite number")
    lo, hi = spec.label_range
    if spec.is_regression:
        if not lo <= value <= hi:
            raise RowProblem("label out of range", col, f"{shown} is out of range (expected {spec.expected_labels()})")
        return value
    if value != int(value) or not lo <= value <= hi:
        raise RowProblem("label out of range", col, f"{shown} is out of range (expected {spec.expected_labels()})")
    return int(value)


def make_example(spec: Task, record: Mapping[str, object], labelled: bool, line: int, source: str,
                  fallback_id: str) -> Example:
    """Check one record (column name -> value) and build its Example; raises RowProblem."""
    if spec.id_column in record:
        ex_id = str(record[spec.id_column]).strip()
        if not ex_id:
            raise RowProblem("empty id", spec.id_column, "empty id")
    else:
        ex_id = fallback_id
    texts = []
    for col in spec.text_columns:
        text = record[col]
        text = "" if text is None else str(text).strip()
        if not text:
            raise RowProblem("empty sentence", col, "empty sentence")
        texts.append(text)
    label = _parse_label(spec, record[spec.label_column]) if labelled else None
    return Example(
        id=ex_id, task=spec.name, text_a=texts[0], text_b=texts[1] if len(texts) > 1 else None,
        label=label, line=line, source=source,
    )


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


def accept_row(result: "TaskData", seen: Dict[str, int], line: int, make: Callable[[], Example], bad_rows: str,
            id_field: Optional[str], where: str) -> None:
    """Append the example ``make()`` builds, refusing a duplicate id; a :class:`RowProblem` is
    raised as a :class:`DataError` (``bad_rows="error"``) or counted in ``result.skipped``."""
    try:
        example = make()
        if example.id in seen:
            raise RowProblem("duplicate id", id_field,
                              f"duplicate id {example.id!r} (first seen {where} {seen[example.id]})")
    except RowProblem as p:
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
    task: Union[str, Task],
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
    spec = get_task(task)
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
            raise RowProblem("undecodable bytes", name, detail) from None
        if not text.strip():
            raise RowProblem("blank line", None, "blank line")
        try:
            row = _split_line(text)
        except csv.Error as e:
            raise RowProblem("malformed quoting", None, f"malformed quoting ({e})") from None
        if len(row) < len(header):
            missing = header[len(row)] or f"#{len(row) + 1}"
            raise RowProblem("missing column", missing,
                              f"missing (the row has {len(row)} fields, the header has {len(header)})")
        if len(row) > len(header):
            raise RowProblem("extra field", None,
                              f"the row has {len(row)} fields but the header has {len(header)} "
                              "(a tab inside a sentence?)")
        record = {c: row[positions[c]] for c in wanted}
        return make_example(spec, record, labelled, lineno, source, fallback_id=f"line{lineno}")

    for lineno, raw in enumerate(lines[1:], start=2):
        accept_row(result, seen, lineno, lambda: parse(raw.rstrip(b"\r"), lineno), bad_rows, spec.id_column, "on line")

    if result.skipped:
        logger.warning("%s", result.summary())
        for err in result.errors[:5]:
            logger.warning("  skipped %s", err)
    else:
        logger.info("%s", result.summary())
    return result
