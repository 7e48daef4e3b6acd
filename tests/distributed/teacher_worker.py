"""One rank of the sharded SMART-teacher check (run by test_teacher_shards.py as
``python teacher_worker.py OUT``).

Every rank builds the same seeded model (a frozen parameter included, and 35 trainable values, odd,
so the last rank's slice is shorter), keeps its slice of MBPP's teacher, applies the same seeded
parameter changes with an EMA update after each, and all-gathers the teacher. It also computes the
closed form of the EMA on the whole parameters and round-trips its slice through state_dict.
Results go to ``OUT/rank<r>.pt``.
"""
import sys

import torch
import torch.distributed as dist

from minbert.ema import ParameterEMA


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)  # frozen: not in the teacher
    return model


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    beta, steps = 0.7, 4
    model = build()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    teacher = ParameterEMA(beta)
    teacher.ensure(model)
    history = [{n: p.detach().double().clone() for n, p in trainable.items()}]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        history.append({n: p.detach().double().clone() for n, p in trainable.items()})
        teacher.update(model)
    gathered = {n: t.clone() for n, t in teacher.tensors().items()}
    want = {n: beta ** steps * history[0][n]
            + sum((1 - beta) * beta ** (steps - j) * history[j][n] for j in range(1, steps + 1))
            for n in trainable}
    state = teacher.state_dict()
    again = ParameterEMA(beta)
    again.load_state_dict(state)
    mismatch = None
    try:
        ParameterEMA(beta).load_state_dict(dict(state, world=3))
    except ValueError as e:
        mismatch = str(e)
    torch.save({"shard_numel": teacher.shard.numel(), "numel": teacher.numel, "gathered": gathered, "want": want,
                "reloaded": {n: t.clone() for n, t in again.tensors().items()}, "mismatch": mismatch,
                "names": list(trainable)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
