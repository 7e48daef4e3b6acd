"""PCGrad: gradient surgery for multi-task learning (Yu et al., NeurIPS 2020).

Each task gradient is projected onto the normal plane of every conflicting other one, in a random
order: g_i^PC ← g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j if g_i^PC · g_j < 0; the update is Σ_i g_i^PC.
That sum equals Σ_j w_j g_j with weights w from the T×T Gram matrix G_ij = g_i · g_j alone
(:func:`pcgrad_weights`), which is what lets ZeRO shard it. Derivation: docs/pcgrad.md.
"""
from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .base import BackwardFn, Weighting

CHUNK = 1 << 20  # columns per float64 chunk in gram_matrix / combine_gradients (T·CHUNK·8 bytes of scratch)


def _check_order(op: str, order: Sequence[int], t: int) -> List[int]:
    order = [int(j) for j in order]
    if sorted(order) != list(range(t)):
        raise ValueError(f"{op}: order must be a permutation of range({t}), got {order}")
    return order


def _check_grads(op: str, grads: torch.Tensor) -> None:
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or not grads.is_floating_point():
        got = f"{tuple(grads.shape)} {grads.dtype}" if isinstance(grads, torch.Tensor) else type(grads).__name__
        raise ValueError(f"{op}: grads must be a floating (T, P) tensor of flattened task gradients, got {got}")


def pcgrad_weights(gram: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Weights w (T,), float64 on the CPU, with Σ_j w_j g_j = Σ_i PCGrad(g_i), from the Gram matrix alone.

    ``gram``: (T, T) with G_ij = g_i · g_j (any float dtype/device; used in float64).
    ``order``: a permutation of range(T), the sequence of tasks j each g_i is projected against
    (i itself is skipped). A zero gradient (G_jj = 0) is never projected against, so it neither
    changes other tasks nor divides by zero. Without conflicts (G ≥ 0) w is all ones.
    """
    if not isinstance(gram, torch.Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        got = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ValueError(f"pcgrad_weights: gram must be a square (T, T) matrix, got {got}")
    t = gram.shape[0]
    order = _check_order("pcgrad_weights", order, t)
    g = gram.detach().to(device="cpu", dtype=torch.float64)
    coeffs = torch.eye(t, dtype=torch.float64)  # (T, T); row i: g_i^PC in the basis of the original gradients
    for i in range(t):
        for j in order:
            if j == i or not g[j, j] > 0:
                continue
            dot = coeffs[i] @ g[:, j]  # g_i^PC · g_j
            if dot < 0:
                coeffs[i, j] -= dot / g[j, j]
    return coeffs.sum(0)


def pcgrad_project(grads: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """The direct method on flattened gradients: (T, P) -> Σ_i g_i^PC (P,) in float64.

    The test oracle for :func:`pcgrad_weights` (and usable alone): each g_i is projected in turn,
    for j in ``order`` (j ≠ i), onto the normal plane of the original g_j when g_i^PC · g_j < 0.
    """
    _check_grads("pcgrad_project", grads)
    order = _check_order("pcgrad_project", order, grads.shape[0])
    grads = grads.detach().to(torch.float64)
    norms2 = (grads * grads).sum(1)  # (T,)
    out = torch.zeros_like(grads[0])  # (P,)
    for i in range(grads.shape[0]):
        gi = grads[i].clone()
        for j in order:
            if j == i or not norms2[j] > 0:
                continue
            dot = gi @ grads[j]
            if dot < 0:
                gi = gi - dot / norms2[j] * grads[j]
        out += gi
    return out


def gram_matrix(grads: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """G = grads · gradsᵀ (T, T) in float64, for (T, P) flattened task gradients or a shard of them.

    Accumulated over column chunks, so the float64 scratch is T·chunk, not a (T, P) copy.
    """
    _check_grads("gram_matrix", grads)
    gram = torch.zeros(grads.shape[0], grads.shape[0], dtype=torch.float64, device=grads.device)
    for s in range(0, grads.shape[1], chunk):
        part = grads[:, s:s + chunk].detach().to(torch.float64)  # (T, c)
        gram += part @ part.T
    return gram


def combine_gradients(grads: torch.Tensor, weights: torch.Tensor, out: Optional[torch.Tensor] = None,
                      chunk: int = CHUNK) -> torch.Tensor:
    """Σ_j w_j g_j (P,) for (T, P) gradients (or a shard), summed in float64, in the gradients' dtype.

    Works over column chunks. ``out`` (P,) receives the result and may alias a row of ``grads``
    (each chunk is read in full before it is written), which saves a P-sized buffer.
    """
    _check_grads("combine_gradients", grads)
    if weights.shape != (grads.shape[0],):
        raise ValueError(f"combine_gradients: weights must have shape ({grads.shape[0]},), got {tuple(weights.shape)}")
    if out is None:
        out = torch.empty(grads.shape[1], dtype=grads.dtype, device=grads.device)
    elif out.shape != (grads.shape[1],):
        raise ValueError(f"combine_gradients: out must have shape ({grads.shape[1]},), got {tuple(out.shape)}")
    w = weights.detach().to(device=grads.device, dtype=torch.float64)
    for s in range(0, grads.shape[1], chunk):
        part = w @ grads[:, s:s + chunk].detach().to(torch.float64)  # (c,)
        out[s:s + chunk] = part.to(out.dtype)
    return out


class PCGrad(Weighting):
    """PCGrad on the shared (encoder) parameters; every other parameter gets its own task's gradient.

    ``backward(losses, shared_params)`` with T ≥ 2 tasks present:

    1. For each task t in turn, ``torch.autograd.backward(L_t)`` (graph retained until the last
       task, so a forward shared by several heads works too) with the shared parameters' ``.grad``
       set aside: their fresh ``.grad`` is g_t, copied into one (T, P) buffer and cleared. Every
       parameter outside ``shared_params`` (heads, a layer shared by some tasks) simply
       accumulates, exactly as in a plain backward of Σ_t L_t -- so a head gets exactly its own
       task's gradient. That is T backward passes in all, the minimum: no extra pass for the
       heads and no subtraction of gradients.
    2. G = gram_matrix(buffer); a task order from the method's own seeded ``torch.Generator``
       (the same on every rank for the same seed and step count; its state is in ``state_dict``);
       w = :func:`pcgrad_weights`.
    3. Σ_j w_j g_j is written into the shared parameters' ``.grad``, added to what was there
       (gradient accumulation). A shared parameter that no task reached keeps ``.grad`` as it was
       (``None`` stays ``None``: the optimizer skips it, as after a plain backward).

    Peak extra memory: the (T, P) buffer in the gradients' dtype plus T·CHUNK float64 scratch.
    The engine's ``backward`` is used only when one task is present (then PCGrad is the plain
    gradient); the ZeRO engine replaces this class's ``backward`` with a sharded one that uses
    :func:`gram_matrix`, :func:`pcgrad_weights` and :func:`combine_gradients` on its shard.

    ``reduction="mean"`` scales every task's loss by 1/T (the weights w are scale-invariant).
    """

    name = "pcgrad"

    def __init__(self, tasks, seed: int = 0, reduction: str = "sum"):
        super().__init__(tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"{self.name}: reduction must be 'sum' or 'mean', got {reduction!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"{self.name}: seed must be an int, got {seed!r}")
        seed = int(seed)
        self.reduction = reduction
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.last_weights: Optional[torch.Tensor] = None  # w of the last multi-task step (float64, CPU)

    def draw_order(self, t: int) -> List[int]:
        """The next random task order (a permutation of range(t)) from the method's generator."""
        return torch.randperm(t, generator=self.generator).tolist()

    def _scale(self, n: int) -> float:
        return 1.0 / n if self.reduction == "mean" else 1.0

    def weights(self, losses):  # the loss-only view (combine): the plain sum or mean
        return {t: self._scale(len(losses)) for t in losses}

    def task_gradients(self, losses: Dict[str, torch.Tensor], params: Sequence[nn.Parameter]):
        """Step 1 of :meth:`backward`: (T, P) flattened gradients of each task's (scaled) loss w.r.t.
        ``params`` (zeros where unused) and a per-parameter mask "some task reached it". Other leaves
        accumulate their gradients in ``.grad``; ``params``' own ``.grad`` is left as it was."""
        scale = self._scale(len(losses))
        dtype = params[0].dtype
        for p in params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        total = sum(p.numel() for p in params)
        buf = torch.zeros(len(losses), total, dtype=dtype, device=params[0].device)  # (T, P)
        used = [False] * len(params)
        stash = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            for t, loss in enumerate(losses.values()):
                torch.autograd.backward(scale * loss, retain_graph=t < len(losses) - 1)
                offset = 0
                for k, p in enumerate(params):
                    n = p.numel()
                    if p.grad is not None:
                        buf[t, offset:offset + n] = p.grad.reshape(-1)
                        used[k] = True
                        p.grad = None
                    offset += n
        finally:
            for p, g in zip(params, stash):
                p.grad = g
        return buf, used

    def backward(self, losses, shared_params, backward: Optional[BackwardFn] = None,
                 update_index: int = 0) -> Dict[str, float]:
        self._check_update_index(update_index)
        self._check(losses)
        if len(losses) == 1:  # nothing to project against: the plain gradient
            (t, loss), = losses.items()
            (backward or torch.autograd.backward)(self._scale(1) * loss)
            return {f"pcgrad_w/{t}": 1.0}
        params = [p for p in shared_params if p.requires_grad]
        if not params:
            raise ValueError(f"{self.name}: shared_params holds no parameter that requires grad")
        buf, used = self.task_gradients(losses, params)  # (T, P)
        weights = pcgrad_weights(gram_matrix(buf), self.draw_order(len(losses)))
        self.last_weights = weights
        direction = combine_gradients(buf, weights, out=buf[0])  # (P,), reuses row 0
        offset = 0
        for p, reached in zip(params, used):
            n = p.numel()
            if reached:
                new = direction[offset:offset + n].view_as(p)
                p.grad = new.to(p.dtype, copy=True) if p.grad is None else p.grad.add_(new)
            offset += n
        return {f"pcgrad_w/{t}": float(w) for t, w in zip(losses, weights)}

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
