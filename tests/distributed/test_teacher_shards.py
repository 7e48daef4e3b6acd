"""SMART's momentum teacher sharded over two gloo ranks (``teacher_worker.py``): each rank keeps
about half of θ̃, and the all-gathered teacher equals the EMA's closed form on the whole parameters."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "teacher_worker.py"


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_each_rank_keeps_its_slice(results):
    total = results[0]["numel"]
    assert total == 5 * 3 + 3 + 3 * 3 + 3 * 2 + 2  # the frozen bias is left out
    assert [r["shard_numel"] for r in results] == [18, 17]  # ceil(35 / 2), and the rest


def test_gathered_teacher_equals_the_closed_form(results):
    for r in results:
        assert list(r["gathered"]) == r["names"]
        for name in r["names"]:
            torch.testing.assert_close(r["gathered"][name].double(), r["want"][name], rtol=1e-5, atol=1e-6)
            assert torch.equal(r["gathered"][name], results[0]["gathered"][name])  # every rank sees one θ̃


def test_state_dict_round_trip_and_rank_mismatch(results):
    for r in results:
        for name in r["names"]:
            assert torch.equal(r["reloaded"][name], r["gathered"][name])
        assert r["mismatch"] is not None and "resume with the same number of ranks" in r["mismatch"]
