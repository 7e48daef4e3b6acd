"""One row of a task file: :class:`Example` (a task's columns and labels are in :mod:`minbert.tasks`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["Example"]


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
