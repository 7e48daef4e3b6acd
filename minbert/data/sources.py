"""Where task files come from: the CS224N file names in a data folder, or the Hugging Face hub."""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Union

from .files import RowProblem, TaskData, accept_row, make_example, read_task_file
from ..tasks import SPLITS, TASKS, get_task
from .example import Example

logger = logging.getLogger("minbert.data")

__all__ = ["cs224n_path", "read_cs224n", "HUB_SOURCES", "load_hub_task"]

def cs224n_path(data_dir: Union[str, os.PathLike], task: str, split: str) -> Path:
    """Path of a task's default file (:attr:`minbert.tasks.Task.files`): ``split`` is train, dev or test
    (``test``, also ``test-student``: CS224N's ``*-test-student.csv``)."""
    if task not in TASKS or TASKS[task].files is None:
        raise ValueError(f"no CS224N file name for task {task!r}; "
                         f"known: {', '.join(n for n, t in TASKS.items() if t.files is not None)}")
    splits = {"train": "train", "dev": "dev", "test": "test", "test-student": "test"}
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected train, dev or test")
    return Path(data_dir) / TASKS[task].files[SPLITS.index(splits[split])]


def read_cs224n(data_dir: Union[str, os.PathLike], task: str, split: str, **kwargs) -> TaskData:
    """:func:`read_task_file` on :func:`cs224n_path` (``FileNotFoundError`` names the missing path)."""
    path = cs224n_path(data_dir, task, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {split} file for task {task} in {data_dir}")
    return read_task_file(path, task, **kwargs)


# --- the Hugging Face hub ---------------------------------------------------------------------

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
    spec = get_task(task)
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
            raise RowProblem("missing column", missing[0], "missing from the hub record")
        ex = make_example(hub_spec, dict(row), labelled, i + 1, address, fallback_id=f"{spec.name}-{hub_split}-{i}")
        return replace(ex, task=spec.name)

    for i, row in enumerate(table):
        accept_row(result, seen, i + 1, lambda: convert(row, i), bad_rows, hub_spec.id_column, "in row")
    (logger.warning if result.skipped else logger.info)("%s", result.summary())
    return result

