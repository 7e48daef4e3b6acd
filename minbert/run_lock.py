"""One run per output folder: an advisory lock on ``OUTPUT_DIR/.lock`` held for the whole run.

The lock is ``fcntl.flock`` on an open file, so the operating system releases it when the holder
exits for any reason (``kill -9`` included): a lock is never stale while its file stays. The file
records the holder (host, PID, start time) for the messages. A second run into the same folder
stops at once naming the holder; a file left with a holder's record by a process that died is
taken over with a warning that names it. ``--resume`` of a run that is still live is refused the
same way, since the resumed run takes the lock of its own folder.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Dict, Optional

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """The output folder is in use by another live run."""


def _holder_text(holder: Optional[Dict]) -> str:
    if not holder:
        return "another process"
    return (f"the run on host {holder.get('host', '?')}, PID {holder.get('pid', '?')} "
            f"(started {holder.get('started', '?')})")


def _read_holder(f) -> Optional[Dict]:
    f.seek(0)
    text = f.read()
    if not text.strip():
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {"host": "?", "pid": "?", "started": "?"}
    return holder if isinstance(holder, dict) else None


class RunLock:
    """``with RunLock(run_dir):`` holds the folder's lock for the duration of the block.

    ``acquire()`` raises :class:`RunLockError` when a live process holds it; ``release()`` empties
    the record and unlocks (the file itself stays, so no other process can lock a file about to be
    unlinked).
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._file = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(f)
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLockError(f"output_dir {self.run_dir} is in use by {_holder_text(holder)}; wait for "
                                   f"it to finish, stop it, or choose another output_dir") from None
            raise
        left = _read_holder(f)
        if left is not None:
            warnings.warn(f"output_dir {self.run_dir}: taking over the lock left by {_holder_text(left)}, "
                          f"which is no longer running", stacklevel=2)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is None:
            return
        try:
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
        finally:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_not_live(run_dir) -> None:
    """Raise :class:`RunLockError` when a live run holds ``run_dir`` (e.g. the run a ``--resume``
    path belongs to); do nothing when the folder or its lock file does not exist."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return
    with open(path, "r", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise RunLockError(f"{run_dir} belongs to a run that is still live ({_holder_text(_read_holder(f))}); "
                               f"stop it before resuming from it") from None
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
