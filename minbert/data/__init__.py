"""Task data: readers for the CS224N TSV files, an optional hub loader, collation and batch sampling.

File format (CS224N minBERT default project). Tab-separated, one record per line, UTF-8, a header
line naming the columns; the first column is usually an unnamed row index (header ``\\tid\\t...``),
which is ignored. Fields may be CSV-quoted (``"a ""quoted"" word"``), as pandas writes them.

Each task's columns and allowed labels come from its :class:`minbert.tasks.Task` (the table is in
:mod:`minbert.tasks`); Quora's 0/1 labels may also be written 0.0/1.0 (read as int), NLI's as
``entailment``/``neutral``/``contradiction`` (any case) or the digits 0/1/2 in that order. The
``nli`` file is the premise (sentence1) / hypothesis (sentence2) / label file used by supervised
SimCSE; its ``id`` column is optional, and when it has none, ids are ``"line<N>"``.

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

Modules: :mod:`~minbert.data.example` (:class:`Example`), :mod:`~minbert.data.files`
(reading and validation), :mod:`~minbert.data.sources` (CS224N file names, the hub),
:mod:`~minbert.data.batch` (collation) and :mod:`~minbert.data.loader` (batch sampling).
"""
from .batch import Batch, Collator, make_collate
from .example import Example
from .files import REASONS, DataError, TaskData, read_task_file
from .loader import TaskLoader
from .sources import HUB_SOURCES, cs224n_path, load_hub_task, read_cs224n

__all__ = [
    "Example", "DataError", "REASONS", "TaskData", "read_task_file", "cs224n_path", "read_cs224n", "HUB_SOURCES",
    "load_hub_task", "Batch", "Collator", "make_collate", "TaskLoader",
]
