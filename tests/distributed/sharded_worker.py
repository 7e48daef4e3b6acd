"""One rank of the sharded-PCGrad check (run by test_sharded.py as ``python sharded_worker.py OUT``).

Every rank draws the same seeded "local" task gradients for every rank (so each knows the whole
truth), uses its own, and runs the sharded algorithm over gloo; rank 0 also computes the oracle:
:func:`minbert.weighting.pcgrad_project` on the full flattened rank-averaged gradients. Results go
to ``OUT/rank<r>.pt``.
"""
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from minbert.distributed.sharded import (ReplicatedShards, ZeroPartitionShards, all_gather_flat, combine,
                                         sharded_pcgrad_weights)
from minbert.weighting import pcgrad_project, pcgrad_weights, gram_matrix

SHAPES = {"A": (5, 3), "H": (4,), "B": (6,)}  # A, B shared (21 values, odd); H a task head
SHARED = ("A", "B")


def local_grads(num_tasks, world, seed):
    """grads[r][t][name]: rank r's local gradient of task t; task 1 conflicts with task 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(world):
        tasks = []
        for t in range(num_tasks):
            tasks.append({n: torch.randn(s, generator=g) for n, s in SHAPES.items()})
        for n in SHAPES:
            tasks[1][n] = -1.5 * tasks[0][n] + 0.3 * tasks[1][n]
        out.append(tasks)
    return out


def mean_over_ranks(grads, t, name):
    return torch.stack([grads[r][t][name] for r in range(len(grads))]).mean(0)


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in SHAPES.items()}
    shared = [params[n] for n in SHARED]
    results = {}
    for num_tasks, order, seed in ((3, [2, 0, 1], 0), (4, [1, 3, 0, 2], 1)):
        grads = local_grads(num_tasks, world, seed)
        mine = grads[rank]
        # the oracle, on full flattened rank-averaged gradients of the shared parameters
        full = torch.stack([torch.cat([mean_over_ranks(grads, t, n).reshape(-1) for n in SHARED])
                            for t in range(num_tasks)])
        want_direction = pcgrad_project(full, order)
        want_weights = pcgrad_weights(gram_matrix(full), order)
        head_sum = sum(mean_over_ranks(grads, t, "H") for t in range(num_tasks))

        # ZeRO-0 layout: an even split of the shared parameters; p.grad holds the reduced plain sum
        shards = ReplicatedShards(shared)
        local = torch.stack([shards.shard([mine[t][n] for n in SHARED]) for t in range(num_tasks)])
        w = sharded_pcgrad_weights(local, order)
        for n in SHARED:
            params[n].grad = sum(mean_over_ranks(grads, t, n) for t in range(num_tasks)).clone()
        shards.add_pending(combine(local, w - 1.0))
        shards.flush()
        got_replicated = torch.cat([params[n].grad.reshape(-1) for n in SHARED])

        # ZeRO-1/2 layout (a stand-in for DeepSpeed's optimizer): group 0 = [A, H] + 1 padding, group 1 = [B]
        groups = [[params["A"], params["H"]], [params["B"]]]
        paddings = [[0, 1], [0]]
        flats = []
        for members, pads in zip(groups, paddings):
            pieces = []
            for p, pad in zip(members, pads):
                name = next(k for k, v in params.items() if v is p)
                pieces.append(sum(mean_over_ranks(grads, t, name) for t in range(num_tasks)).reshape(-1))
                pieces.append(torch.zeros(pad))
            flats.append(torch.cat(pieces))
        sizes = [f.numel() // world for f in flats]
        averaged = {}
        for i, (flat, size) in enumerate(zip(flats, sizes)):
            part = flat[rank * size:(rank + 1) * size].clone()
            averaged[i] = list(torch.split(part, [1, size - 1]))  # DeepSpeed keeps a list of views
        fake = SimpleNamespace(round_robin_bit16_groups=groups, round_robin_bit16_padding=paddings,
                               partition_size=sizes, real_dp_process_group=[None, None], averaged_gradients=averaged,
                               cpu_offload=False)
        zero = ZeroPartitionShards(fake, shared)
        local_z = torch.stack([zero.shard([mine[t][n] for n in SHARED]) for t in range(num_tasks)])
        w_z = sharded_pcgrad_weights(local_z, order)
        zero.add_pending(combine(local_z, w_z - 1.0))
        zero.flush()
        gathered = [all_gather_flat(torch.cat(averaged[i]))[:sum(SHAPES_numel(m) for m in groups[i]) + sum(paddings[i])]
                    for i in range(len(groups))]
        got_a, got_h = gathered[0][:15], gathered[0][15:19]
        got_zero = torch.cat([got_a, gathered[1][:6]])
        results[num_tasks] = {
            "want_direction": want_direction, "want_weights": want_weights, "head_sum": head_sum,
            "weights": w, "weights_zero": w_z, "replicated": got_replicated, "zero": got_zero, "zero_head": got_h,
            "zero_padding": gathered[0][19:], "shard_numel": shards.numel, "zero_numel": zero.numel,
            "local_shape": tuple(local.shape),
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def SHAPES_numel(p):
    return p.numel()


if __name__ == "__main__":
    main(sys.argv[1])
