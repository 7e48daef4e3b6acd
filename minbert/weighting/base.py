"""The one interface every multitask weighting method implements (LibMTL-style separation).

The trainer never branches on a method's name. For every optimizer step it runs::

    for k in range(weighting.num_updates):           # 1; GSE takes 2
        losses = {task: loss, ...}                    # forward of this step's batches
        info = weighting.backward(losses, shared_params, backward=engine.backward, update_index=k)
        engine.step()

and at the end of every epoch ``weighting.end_epoch(epoch, train_losses, dev_scores)``.

* ``losses`` maps the tasks present this step (a schedule may pick one task per step) to their
  scalar losses. Every method handles any non-empty subset of its tasks.
* Loss-only methods (equal, fixed, uncertainty, DWA, dev-score) define :meth:`Weighting.weights`
  (or :meth:`Weighting.combine`) and back-propagate the combined scalar once, through
  ``backward`` (the engine's backward, ``torch.autograd.backward`` by default).
* Gradient methods (PCGrad, GSE) override :meth:`Weighting.backward`: they work on per-task
  gradients of ``shared_params`` and write the result into ``.grad``.
* :meth:`Weighting.parameters` lists learnable weights the optimizer must train (uncertainty
  weighting's log-variances), ``[]`` otherwise.
* :meth:`Weighting.state_dict` / :meth:`Weighting.load_state_dict` carry everything a resumed run
  needs (learned weights, loss history, the PCGrad order generator).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

BackwardFn = Callable[[torch.Tensor], None]


class Weighting:
    name = "weighting"
    num_updates = 1  # optimizer updates per training step (GSE takes two); see minbert.weighting.gse

    def __init__(self, tasks: Sequence[str]):
        if isinstance(tasks, str):
            raise ValueError(f"{self.name}: tasks must be a sequence of task names, got the string {tasks!r}")
        tasks = list(tasks)
        if not tasks:
            raise ValueError(f"{self.name}: at least one task is required")
        duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
        if duplicates:
            raise ValueError(f"{self.name}: duplicate task names {duplicates}")
        self.tasks = tasks

    # --- helpers for subclasses -------------------------------------------------------------
    def _check(self, losses: Mapping[str, torch.Tensor]) -> None:
        """``losses`` must be a non-empty mapping of configured tasks to scalar tensors."""
        if not losses:
            raise ValueError(f"{self.name}: no task losses this step")
        unknown = [t for t in losses if t not in self.tasks]
        if unknown:
            raise KeyError(f"{self.name}: losses for unknown tasks {unknown}; configured tasks: {self.tasks}")
        for t, loss in losses.items():
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"{self.name}: the loss of task {t!r} must be a scalar tensor, got {shape}")

    def _check_update_index(self, update_index: int) -> None:
        if not 0 <= int(update_index) < self.num_updates:
            raise ValueError(f"{self.name}: update_index must be in range({self.num_updates}), got {update_index}")

    # --- the interface ----------------------------------------------------------------------
    def parameters(self) -> List[nn.Parameter]:
        """Learnable weights for the optimizer; none by default."""
        return []

    def weights(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """The weight of each task present in ``losses`` (loss-only methods)."""
        return {t: 1.0 for t in losses}

    def combine(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The scalar to back-propagate: Σ_t w_t L_t over the tasks present."""
        self._check(losses)
        w = self.weights(losses)
        return sum(w[t] * loss for t, loss in losses.items())

    def backward(self, losses: Mapping[str, torch.Tensor], shared_params: Sequence[nn.Parameter],
                 backward: Optional[BackwardFn] = None, update_index: int = 0) -> Dict[str, float]:
        """Back-propagate this step's losses; returns log values (the per-task weights)."""
        self._check_update_index(update_index)
        total = self.combine(losses)
        (backward or torch.autograd.backward)(total)
        return {f"weight/{t}": float(v) for t, v in self.weights(losses).items()}

    def end_epoch(self, epoch: int, train_losses: Mapping[str, float], dev_scores: Mapping[str, float]) -> None:
        """Called after each epoch with the mean train loss and the latest dev score per task."""

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tasks={self.tasks})"
