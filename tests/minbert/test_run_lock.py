"""One run per output folder (minbert/run_lock.py): live holders refuse, dead ones are taken over."""
import json
import os
import signal
import subprocess
import sys

import pytest

from minbert.run_lock import LOCK_NAME, RunLock, RunLockError, check_not_live

HOLD = """
import sys, time
from minbert.run_lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(run_dir):
    """A child process that takes the lock and sleeps; returns it once the lock is held."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_lock_on_the_same_folder_is_refused_and_names_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunLockError, match=rf"in use by the run on host .*, PID {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    RunLock(tmp_path / "run").acquire().release()  # released: free again, without a warning


def test_a_live_process_holds_the_folder(tmp_path):
    child = _holder(tmp_path)
    try:
        with pytest.raises(RunLockError, match=rf"PID {child.pid}"):
            RunLock(tmp_path).acquire()
        with pytest.raises(RunLockError, match=rf"still live .*PID {child.pid}"):
            check_not_live(tmp_path)
    finally:
        child.kill()
        child.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    child = _holder(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == child.pid  # its record is still there
    check_not_live(tmp_path)  # dead: no error
    with pytest.warns(UserWarning, match=rf"taking over the lock left by .*PID {child.pid}"):
        lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""


def test_check_not_live_accepts_a_folder_without_a_lock(tmp_path):
    check_not_live(tmp_path / "missing")
    check_not_live(tmp_path)
