"""PCGrad on sharded gradients: each rank keeps only its ZeRO shard of every task gradient.

Σ_i g_i^PC = Σ_j w_j g_j with w = pcgrad_weights(G, order) and G_ij = g_i · g_j, and a Gram matrix
is a sum over coordinates: G = all_reduce(Σ_r G^(r)). Per step each rank reduce-scatters every
task's averaged gradient to its shard (``torch.autograd.grad`` on the retained graph), all-reduces
the T×T Gram matrix, derives the same w from the same seeded order, and adds Σ_j (w_j − 1) g_j^(r)
to the partition DeepSpeed steps with (:meth:`Shards.flush`). Task-gradient memory per rank: T·P/N.
ZeRO-3 cannot run several backward passes over one graph and is refused at start-up.
Derivation and the ZeRO-0/1/2 details: docs/pcgrad.md.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from minbert.weighting import PCGrad, gram_matrix, pcgrad_weights

COMBINE_CHUNK = 1 << 22  # columns per float64 chunk when combining (bounds the float64 temporary)


class ShardedPCGradError(RuntimeError):
    """PCGrad's task-gradient shards do not match the ZeRO optimizer's layout."""


class ZeRO3UnsupportedError(RuntimeError):
    """A recipe asks ZeRO stage 3 for something it cannot run (refused at start-up, not mid-run)."""


def check_supported(stage: int, weighting_name: str) -> None:
    """Fail at start-up (not mid-run) for a weighting that ZeRO-3 cannot run."""
    if stage == 3 and weighting_name == "uncertainty":
        raise ZeRO3UnsupportedError(
            "weighting 'uncertainty' is not supported with ZeRO stage 3: it trains log-variance parameters outside "
            "the model, which could not be clipped together with ZeRO-3's partitioned gradients. Use ZeRO stage 0-2.")
    if stage == 3 and weighting_name in ("pcgrad", "gse"):
        raise ZeRO3UnsupportedError(
            f"weighting '{weighting_name}' is not supported with ZeRO stage 3: it needs one backward pass per task "
            "over the same forward graph, and ZeRO-3 frees and re-gathers the partitioned parameters inside hooks "
            "tied to a single backward pass (DeepSpeed issues #3539 and #7352). Use ZeRO stage 1 or 2, which shard "
            "the optimizer states, gradients and PCGrad's task gradients, or a loss-only weighting with stage 3.")


def check_stage3_regularizers(stage: int, cfg) -> None:
    """SMART keeps a teacher copy of the trainable parameters and runs the model on it, and ``ema``
    swaps a weight average in for evaluation; under ZeRO-3 the parameters they would copy are empty
    partitions."""
    if stage == 3 and any(cfg.smart_for(t.name) is not None for t in cfg.tasks):
        raise ZeRO3UnsupportedError(
            "smart is not supported with ZeRO stage 3: its Bregman teacher copies the trainable parameters and "
            "runs the model with them, but under ZeRO-3 each rank only holds empty placeholders for parameters it "
            "does not own. Use ZeRO stage 0-2 (which keep full parameters on every rank).")
    if stage == 3 and getattr(cfg, "ema", None):
        raise ZeRO3UnsupportedError(
            "ema (weight averaging for evaluation) is not supported with ZeRO stage 3: it copies the trainable "
            "parameters into the average and back, but under ZeRO-3 each rank only holds empty placeholders for "
            "parameters it does not own. Use ZeRO stage 0-2, or drop ema.")


# --- collectives --------------------------------------------------------------------------------

def _world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def reduce_scatter_mean(flat: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's chunk of the average over ranks of ``flat`` (length divisible by the world size)."""
    world = _world(group)
    if world == 1:
        return flat.clone()
    if flat.numel() % world:
        raise ValueError(f"reduce_scatter_mean: {flat.numel()} elements do not split into {world} equal chunks")
    out = torch.empty(flat.numel() // world, dtype=flat.dtype, device=flat.device)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, flat, group=group)
    return out.div_(world)


def all_gather_flat(chunk: torch.Tensor, group=None) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return chunk.clone()
    out = torch.empty(chunk.numel() * world, dtype=chunk.dtype, device=chunk.device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, chunk.contiguous(), group=group)
    return out


def sharded_gram(local: torch.Tensor, group=None) -> torch.Tensor:
    """Σ over ranks of each rank's ``local @ localᵀ`` (float64): the Gram matrix of the full gradients."""
    gram = gram_matrix(local)
    if _world(group) > 1:
        dist.all_reduce(gram, group=group)
    return gram


def sharded_pcgrad_weights(local: torch.Tensor, order: Sequence[int], group=None) -> torch.Tensor:
    """PCGrad weights w (T,) from every rank's (T, S_r) shard of the task gradients (same on all ranks)."""
    return pcgrad_weights(sharded_gram(local, group), order)


def combine(local: torch.Tensor, coeffs: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_j coeffs_j local_j in float64, in column chunks (no (T, S) float64 copy); written into/added to ``out``."""
    coeffs = coeffs.to(torch.float64).to(local.device)
    result = out if out is not None else torch.zeros(local.shape[1], dtype=local.dtype, device=local.device)
    for s in range(0, local.shape[1], COMBINE_CHUNK):
        part = coeffs @ local[:, s:s + COMBINE_CHUNK].to(torch.float64)
        result[s:s + COMBINE_CHUNK] += part.to(result.dtype)
    return result


# --- where a rank's shard lives ------------------------------------------------------------------

class Shards:
    """Maps the shared parameters' gradients to this rank's shard and back into the optimizer's."""

    numel: int = 0

    def __init__(self):
        self.pending: Optional[torch.Tensor] = None  # Σ over micro-batches of the shard correction

    def shard(self, grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """(S,) this rank's shard of the rank-average of the given local gradients (aligned with ``params``)."""
        raise NotImplementedError

    def add_pending(self, delta: torch.Tensor) -> None:
        self.pending = delta if self.pending is None else self.pending.add_(delta)

    def flush(self) -> None:
        """Add the pending correction to the reduced gradients the optimizer is about to use."""
        if self.pending is not None:
            self._add_to_reduced(self.pending)
            self.pending = None

    def discard(self) -> None:
        self.pending = None

    def _add_to_reduced(self, delta: torch.Tensor) -> None:
        raise NotImplementedError

    def check_params(self, params: Sequence[nn.Parameter]) -> None:
        if [id(p) for p in params] != self._param_ids:
            raise ShardedPCGradError("sharded PCGrad: the shared parameters changed since the shards were laid out")


class ReplicatedShards(Shards):
    """ZeRO-0: every rank holds the full reduced gradient in ``p.grad``; shards are an even split of
    the flattened shared parameters, and the combined shards are all-gathered back into ``p.grad``."""

    def __init__(self, params: Sequence[nn.Parameter], group=None):
        super().__init__()
        self.params = list(params)
        self._param_ids = [id(p) for p in self.params]
        self.group = group
        self.world, self.rank = _world(group), _rank(group)
        total = sum(p.numel() for p in self.params)
        self.numel = -(-total // self.world)
        self.total = total

    def shard(self, grads):
        p0 = self.params[0]
        flat = torch.zeros(self.numel * self.world, dtype=torch.float32, device=p0.device)
        offset = 0
        for p, g in zip(self.params, grads):
            if g is not None:
                flat[offset:offset + p.numel()].copy_(g.reshape(-1))
            offset += p.numel()
        return reduce_scatter_mean(flat, self.group)

    def _add_to_reduced(self, delta):
        full = all_gather_flat(delta, self.group)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                part = full[offset:offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = part.to(p.dtype).clone()
                else:
                    p.grad.add_(part.to(p.grad.dtype))
                offset += p.numel()


class ZeroPartitionShards(Shards):
    """ZeRO-1/2: a rank's shard is exactly its partition of each parameter group that holds shared
    parameters (coordinates of other parameters in such a group stay zero: only shared parameters'
    gradients are written into the flattened group before the reduce-scatter).

    Group g is flattened in DeepSpeed's order (``round_robin_bit16_groups[g]`` with each tensor's
    padding) into ``partition_size[g] × N`` elements; rank r owns ``[r·size, (r+1)·size)``.
    """

    def __init__(self, optimizer, params: Sequence[nn.Parameter]):
        super().__init__()
        for attr in ("round_robin_bit16_groups", "round_robin_bit16_padding", "partition_size",
                     "real_dp_process_group", "averaged_gradients"):
            if not hasattr(optimizer, attr):
                raise ShardedPCGradError(f"sharded PCGrad: the ZeRO optimizer has no '{attr}' (written against "
                                         f"DeepSpeed 0.19's stage_1_and_2.py; this DeepSpeed differs)")
        self.opt = optimizer
        self.params = list(params)
        self._param_ids = [id(p) for p in self.params]
        shared = {id(p) for p in self.params}
        self.groups = []  # (group index, partition size, world, process group, [(param, flat offset)])
        seen = set()
        numel = 0
        for i, tensors in enumerate(optimizer.round_robin_bit16_groups):
            group = optimizer.real_dp_process_group[i]
            world = _world(group)
            size = int(optimizer.partition_size[i])
            paddings = optimizer.round_robin_bit16_padding[i]
            offset, members = 0, []
            for p, pad in zip(tensors, paddings):
                if id(p) in shared:
                    members.append((p, offset))
                    seen.add(id(p))
                offset += p.numel() + int(pad)
            if not members:
                continue
            if offset != size * world:
                raise ShardedPCGradError(f"sharded PCGrad: group {i} flattens to {offset} elements, not "
                                         f"partition_size {size} × {world} ranks")
            self.groups.append((i, size, world, group, members))
            numel += size
        missing = [p for p in self.params if id(p) not in seen]
        if missing:
            raise ShardedPCGradError(f"sharded PCGrad: {len(missing)} shared parameters are not in the optimizer's groups")
        self.numel = numel
        self.device = self.params[0].device

    def shard(self, grads):
        by_id = {id(p): g for p, g in zip(self.params, grads)}
        out = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        start = 0
        for _, size, world, group, members in self.groups:
            flat = torch.zeros(size * world, dtype=torch.float32, device=self.device)
            for p, offset in members:
                g = by_id.get(id(p))
                if g is not None:
                    flat[offset:offset + p.numel()].copy_(g.reshape(-1))
            out[start:start + size] = reduce_scatter_mean(flat, group)
            del flat
            start += size
        return out

    def _add_to_reduced(self, delta):
        grads = ZeroReducedGradients(self.opt)
        start = 0
        for i, size, _, _, _ in self.groups:
            grads.add_(i, delta[start:start + size])
            start += size


class ZeroReducedGradients:
    """The reduced gradient partitions a ZeRO-1/2 optimizer is about to step with (DeepSpeed 0.19).

    After the boundary backward they are ``averaged_gradients[g]``, a list of tensors (views into
    DeepSpeed's gradient buffers, plus zero padding) whose concatenation is rank r's partition of
    group g; with optimizer offload, the flat ``single_partition_of_fp32_groups[g].grad``, whose
    per-parameter norms DeepSpeed already computed during backward (``norm_for_param_grads``,
    used for its overflow check) and which are refreshed after every change made here.
    """

    def __init__(self, optimizer):
        self.opt = optimizer
        self.offload = bool(getattr(optimizer, "cpu_offload", False))

    def tensors(self, i: int) -> List[torch.Tensor]:
        opt = self.opt
        if self.offload:
            fp32 = opt.single_partition_of_fp32_groups[i].grad
            if fp32 is None:
                raise ShardedPCGradError(f"ZeRO group {i}: no offloaded fp32 gradient at the optimizer step")
            return [fp32.view(-1)[:int(opt.partition_size[i])]]
        store = opt.averaged_gradients
        tensors = store.get(i) if isinstance(store, dict) else store[i]
        if tensors is None:
            raise ShardedPCGradError(f"ZeRO group {i}: DeepSpeed holds no reduced gradient; the last backward of the "
                                     "step did not reach the accumulation boundary")
        return list(tensors)

    def num_groups(self) -> int:
        return len(self.opt.round_robin_bit16_groups)

    def add_(self, i: int, part: torch.Tensor) -> None:
        pos = 0
        with torch.no_grad():
            for t in self.tensors(i):
                n = t.numel()
                t.add_(part[pos:pos + n].view_as(t).to(t.device, t.dtype))
                pos += n
        if pos != part.numel():
            raise ShardedPCGradError(f"ZeRO group {i}: the reduced partition has {pos} elements, expected {part.numel()}")
        self._refresh_norms(i)

    def norm_sq(self) -> torch.Tensor:
        """Σ of squared entries of this rank's partitions (float64; not yet summed over ranks)."""
        total = torch.zeros((), dtype=torch.float64)
        for i in range(self.num_groups()):
            for t in self.tensors(i):
                total += t.detach().to(torch.float64).pow(2).sum().cpu()
        return total

    def scale_(self, coef: float) -> None:
        with torch.no_grad():
            for i in range(self.num_groups()):
                for t in self.tensors(i):
                    t.mul_(coef)
                self._refresh_norms(i)

    def _refresh_norms(self, i: int) -> None:
        if not self.offload:
            return
        opt = self.opt
        flat = opt.single_partition_of_fp32_groups[i].grad.view(-1)
        for p in opt.params_in_partition[i]:
            pid = opt.get_param_id(p)
            if pid in opt.norm_for_param_grads:
                _, _, dest, n = opt.grad_position[pid]
                norm = flat.narrow(0, int(dest), int(n)).to(torch.float64).norm(2)
                opt.norm_for_param_grads[pid] = norm.to(opt.norm_for_param_grads[pid].dtype)


# --- the weighting -------------------------------------------------------------------------------

class ShardedPCGrad:
    """Wraps a :class:`~minbert.weighting.PCGrad` (or GSE) so that it runs on sharded gradients.

    It keeps the wrapped object's interface and state (its seeded order generator, ``state_dict``,
    ``num_updates``), so checkpoints move freely between single-process and DeepSpeed runs. Built
    by :meth:`minbert.distributed.engine.DeepSpeedEngineAdapter.wrap_weighting`.
    """

    def __init__(self, inner: PCGrad, make_shards: Callable[[Sequence[nn.Parameter]], Shards]):
        if not isinstance(inner, PCGrad):
            raise TypeError(f"ShardedPCGrad wraps a PCGrad weighting, got {type(inner).__name__}")
        self.inner = inner
        self._make_shards = make_shards
        self.shards: Optional[Shards] = None
        self.buffer_bytes = 0  # bytes of the (T, S) task-gradient shards of the last step (memory accounting)

    def __getattr__(self, name):  # name, tasks, num_updates, parameters, end_epoch, state_dict, ...
        return getattr(self.inner, name)

    def backward(self, losses: Dict[str, torch.Tensor], shared_params: Sequence[nn.Parameter],
                 backward: Optional[Callable] = None, update_index: int = 0, **_) -> Dict[str, float]:
        inner = self.inner
        inner._check(losses)
        backward = backward or torch.autograd.backward
        if update_index > 0:  # GSE's second update: the plain summed gradient
            return inner.backward(losses, shared_params, backward, update_index=update_index)
        scale = 1.0 / len(losses) if inner.reduction == "mean" else 1.0
        if len(losses) == 1:  # nothing to project against: the plain gradient
            (t, loss), = losses.items()
            backward(scale * loss)
            return {f"pcgrad_w/{t}": 1.0}
        params = [p for p in shared_params if p.requires_grad]
        if self.shards is None:
            self.shards = self._make_shards(params)
        self.shards.check_params(params)
        local = torch.empty(len(losses), self.shards.numel, dtype=torch.float32, device=params[0].device)
        for t, loss in enumerate(losses.values()):
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            local[t] = self.shards.shard(grads)
            del grads
        self.buffer_bytes = local.numel() * local.element_size()
        weights = sharded_pcgrad_weights(local, inner.draw_order(len(losses)))
        inner.last_weights = weights
        # the engine's backward of the sum gives Σ_j g_j; the PCGrad direction needs Σ_j w_j g_j more Σ_j (w_j - 1) g_j
        self.shards.add_pending(combine(local, (weights - 1.0) * scale))
        del local
        backward(scale * sum(losses.values()))
        return {f"pcgrad_w/{t}": float(w) for t, w in zip(losses, weights)}

    # the engine calls these around its optimizer step
    def flush(self) -> None:
        if self.shards is not None:
            self.shards.flush()

    def discard(self) -> None:
        if self.shards is not None:
            self.shards.discard()


def shard_bytes(num_tasks: int, num_shared: int, world_size: int) -> int:
    """fp32 bytes of the task-gradient shards per rank: T · ⌈P/N⌉ · 4."""
    return num_tasks * math.ceil(num_shared / world_size) * 4
