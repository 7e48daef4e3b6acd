"""The one interface every multitask weighting method implements (LibMTL-style separation).

The trainer calls, for every step::

    info = weighting.backward(losses, shared_params, backward=engine.backward)

``losses`` maps the tasks present this step (a schedule may pick one task per step) to their
scalar losses. Loss-only methods combine them into one scalar and back-propagate it once;
gradient methods (PCGrad, GSE) work on per-task gradients of ``shared_params``. ``parameters()``
are learnable weights the optimizer must train (uncertainty weighting); ``end_epoch`` feeds
methods that adapt from training losses or dev scores.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn


class Weighting:
    name = "weighting"
    num_updates = 1  # optimizer updates per step (GSE takes two)

    def __init__(self, tasks: Sequence[str]):
        if not tasks:
            raise ValueError(f"{self.name}: at least one task is required")
        self.tasks = list(tasks)

    def _check(self, losses: Dict[str, torch.Tensor]) -> None:
        unknown = [t for t in losses if t not in self.tasks]
        if unknown:
            raise KeyError(f"{self.name}: losses for unknown tasks {unknown}; configured tasks: {self.tasks}")
        if not losses:
            raise ValueError(f"{self.name}: no task losses this step")

    def parameters(self) -> List[nn.Parameter]:
        return []

    def weights(self, losses: Dict[str, torch.Tensor]) -> Dict[str, float]:
        return {t: 1.0 for t in losses}

    def combine(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        self._check(losses)
        w = self.weights(losses)
        return sum(w[t] * loss for t, loss in losses.items())

    def backward(self, losses: Dict[str, torch.Tensor], shared_params: Sequence[nn.Parameter],
                 backward: Optional[Callable[[torch.Tensor], None]] = None) -> Dict[str, float]:
        total = self.combine(losses)
        (backward or torch.autograd.backward)(total)
        return {f"weight/{t}": float(v) for t, v in self.weights(losses).items()}

    def end_epoch(self, epoch: int, train_losses: Dict[str, float], dev_scores: Dict[str, float]) -> None:
        pass

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass
