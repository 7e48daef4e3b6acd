"""Sharded PCGrad equals single-process PCGrad on the same (rank-averaged) gradients.

Two gloo ranks (``sharded_worker.py``) each hold only their shard of every task gradient, all-reduce
the T×T Gram matrix and combine their shard; gathered, the result must be the direct sequential
projection (:func:`minbert.weighting.pcgrad_project`) of the full flattened gradients -- for both
shard layouts (an even split for ZeRO-0, DeepSpeed's group partitions with padding and a head
parameter inside a shared group for ZeRO-1/2), with the head's gradient left alone.
"""
import math
from pathlib import Path

import pytest
import torch

import minbert.distributed.sharded as sharded
from minbert.weighting import combine_gradients, pcgrad_project, pcgrad_weights, gram_matrix

WORKER = Path(__file__).resolve().parent / "sharded_worker.py"


@pytest.fixture(scope="module")
def results(run_workers, tmp_path_factory):
    return run_workers(WORKER, tmp_path_factory.mktemp("sharded"))


@pytest.mark.parametrize("num_tasks", [3, 4])
def test_sharded_weights_equal_the_full_gram_weights(results, num_tasks):
    r0, r1 = results[0][num_tasks], results[1][num_tasks]
    torch.testing.assert_close(r0["weights"], r0["want_weights"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r0["weights_zero"], r0["want_weights"], rtol=1e-10, atol=1e-12)
    assert torch.equal(r0["weights"], r1["weights"])  # every rank derives the same w
    assert not torch.allclose(r0["want_weights"], torch.ones(num_tasks, dtype=torch.float64))  # conflicts were projected


@pytest.mark.parametrize("num_tasks", [3, 4])
@pytest.mark.parametrize("layout", ["replicated", "zero"])
def test_sharded_result_equals_direct_projection(results, num_tasks, layout):
    want = results[0][num_tasks]["want_direction"]
    for rank in range(2):
        got = results[rank][num_tasks][layout].to(torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_heads_keep_their_own_gradient_and_padding_stays_zero(results):
    r = results[0][3]
    torch.testing.assert_close(r["zero_head"], r["head_sum"])
    assert torch.equal(r["zero_padding"], torch.zeros_like(r["zero_padding"]))


def test_each_rank_keeps_only_its_shard(results):
    r = results[0][4]
    assert r["shard_numel"] == math.ceil(21 / 2)  # T·⌈P/N⌉ instead of T·P
    assert r["local_shape"] == (4, 11)
    assert r["zero_numel"] == 10 + 3  # its partitions of the two groups


def test_chunked_combination_matches_the_plain_one(monkeypatch):
    monkeypatch.setattr(sharded, "COMBINE_CHUNK", 7)
    grads = torch.randn(3, 50)
    w = torch.tensor([0.5, 1.25, -0.75], dtype=torch.float64)
    torch.testing.assert_close(sharded.combine(grads, w), combine_gradients(grads, w), rtol=0, atol=0)


def test_single_rank_shards_are_the_whole_vector():
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5))]
    shards = sharded.ReplicatedShards(params)
    grads = [torch.randn(3, 2), torch.randn(5)]
    assert torch.equal(shards.shard(grads), torch.cat([g.reshape(-1) for g in grads]))
    local = torch.stack([shards.shard([torch.randn(3, 2), torch.randn(5)]) for _ in range(3)])
    order = [1, 2, 0]
    w = sharded.sharded_pcgrad_weights(local, order)
    torch.testing.assert_close(w, pcgrad_weights(gram_matrix(local), order))
    torch.testing.assert_close(sharded.combine(local, w).double(), pcgrad_project(local, order), rtol=1e-6, atol=1e-6)


def test_stage3_refuses_gradient_surgery_at_start_up():
    with pytest.raises(sharded.ZeRO3UnsupportedError, match="not supported with ZeRO stage 3.*#3539 and #7352"):
        sharded.check_supported(3, "pcgrad")
    sharded.check_supported(2, "pcgrad")
    sharded.check_supported(3, "equal")
