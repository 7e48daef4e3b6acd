"""PCGrad: gradient surgery for multi-task learning (Yu et al., NeurIPS 2020).

For each task i, its gradient is projected, against each other task j taken in a random order,
onto the normal plane of the original g_j whenever they conflict:

    g_i^PC ← g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j      if g_i^PC · g_j < 0

and the update direction is Σ_i g_i^PC. Every g_i^PC stays a linear combination of the original
gradients, g_i^PC = Σ_j c_ij g_j, and the dot products it needs are c_i · G[:, j] with the Gram
matrix G_ij = g_i · g_j. So the whole method reduces to T×T arithmetic (:func:`pcgrad_weights`):

    Σ_i g_i^PC = Σ_j w_j g_j,   w = Σ_i c_i.

That is what makes a sharded version possible: each rank holds a slice of every g_j, adds up its
slice's part of G, all-reduces the T×T matrix, derives the same w, and combines its own slice.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .base import Weighting


def pcgrad_weights(gram: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Weights w (T,) with Σ_j w_j g_j = Σ_i PCGrad(g_i), from the Gram matrix alone (float64).

    ``order`` is the sequence of tasks j each g_i is projected against (i itself is skipped).
    A zero gradient (G_jj = 0) is never projected against.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"pcgrad_weights: gram must be a square (T, T) matrix, got {tuple(gram.shape)}")
    t = gram.shape[0]
    order = [int(j) for j in order]
    if sorted(order) != list(range(t)):
        raise ValueError(f"pcgrad_weights: order must be a permutation of range({t}), got {order}")
    g = gram.detach().to(torch.float64).cpu()
    coeffs = torch.eye(t, dtype=torch.float64)  # row i: g_i^PC in the basis of the original gradients
    for i in range(t):
        for j in order:
            if j == i or g[j, j] <= 0:
                continue
            dot = coeffs[i] @ g[:, j]
            if dot < 0:
                coeffs[i, j] -= dot / g[j, j]
    return coeffs.sum(0)


def pcgrad_project(grads: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """The direct method on flattened gradients (T, P) -> Σ_i g_i^PC (P,); the oracle for tests."""
    grads = grads.to(torch.float64)
    out = torch.zeros_like(grads[0])
    for i in range(grads.shape[0]):
        gi = grads[i].clone()
        for j in order:
            if j == i:
                continue
            gj = grads[j]
            norm2 = gj @ gj
            dot = gi @ gj
            if norm2 > 0 and dot < 0:
                gi = gi - dot / norm2 * gj
        out += gi
    return out


def gram_matrix(grads: torch.Tensor) -> torch.Tensor:
    """G = grads gradsᵀ in float64 for (T, P) flattened task gradients (or a shard of them)."""
    g = grads.to(torch.float64)
    return g @ g.T


def combine_gradients(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j g_j for (T, P) gradients (or a shard), in the gradients' dtype."""
    return (weights.to(torch.float64) @ grads.to(torch.float64)).to(grads.dtype)


class PCGrad(Weighting):
    """PCGrad on the shared (encoder) parameters; task-specific parameters get their own task's gradient.

    ``backward`` computes each present task's gradient of the shared parameters
    (``torch.autograd.grad`` with the graph retained), draws a task order from its own seeded
    generator (identical on every rank for the same seed and step count), derives the weights
    with :func:`pcgrad_weights` and adds Σ w_j g_j to the shared parameters' ``.grad``. Heads are
    reached by one ordinary backward of Σ_t L_t, after which the shared gradients are replaced by
    the PCGrad direction (so the cost is T + 1 backward passes; with one task present it is the
    plain backward).
    """

    name = "pcgrad"

    def __init__(self, tasks, seed: int = 0, reduction: str = "sum"):
        super().__init__(tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"pcgrad: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.generator = torch.Generator().manual_seed(int(seed))
        self.last_weights: Optional[torch.Tensor] = None

    def draw_order(self, t: int) -> List[int]:
        return torch.randperm(t, generator=self.generator).tolist()

    def task_gradients(self, losses: Dict[str, torch.Tensor], params: Sequence[nn.Parameter]) -> torch.Tensor:
        """(T, P) flattened gradients of each task's loss w.r.t. ``params`` (zeros where unused)."""
        rows = []
        for loss in losses.values():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(grads, params)]))
        return torch.stack(rows)

    def backward(self, losses, shared_params, backward: Optional[Callable] = None, **_):
        self._check(losses)
        backward = backward or torch.autograd.backward
        scale = 1.0 / len(losses) if self.reduction == "mean" else 1.0
        if len(losses) == 1:
            backward(scale * next(iter(losses.values())))
            return {}
        params = [p for p in shared_params if p.requires_grad]
        grads = self.task_gradients(losses, params)  # (T, P)
        weights = pcgrad_weights(gram_matrix(grads), self.draw_order(len(losses)))
        self.last_weights = weights
        direction = combine_gradients(grads, weights) * scale  # (P,)
        saved = [p.grad.clone() if p.grad is not None else None for p in params]
        backward(scale * sum(losses.values()))  # heads get their own task's gradient
        offset = 0
        for p, before in zip(params, saved):
            n = p.numel()
            new = direction[offset:offset + n].view_as(p).to(p.dtype)
            p.grad = new if before is None else before + new
            offset += n
        return {f"pcgrad_w/{t}": float(w) for t, w in zip(losses, weights)}

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
