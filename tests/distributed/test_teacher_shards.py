"""SMART's momentum teacher sharded over two gloo ranks (``teacher_worker.py``): each rank keeps
about half of θ̃, and the all-gathered teacher equals the EMA's closed form on the whole parameters."""
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "teacher_worker.py"


@pytest.fixture(scope="module")
def results(run_workers, tmp_path_factory):
    return run_workers(WORKER, tmp_path_factory.mktemp("teacher"))


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
