"""Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

Each task t has a learnable homoscedastic noise σ_t. With the parametrisation s_t = log σ_t²
(unconstrained, numerically stable; initialised to ``init``):

    regression:      L = Σ_t  L_t / (2σ_t²) + log σ_t  =  Σ_t ½ exp(−s_t) L_t + ½ s_t
    classification:  L = Σ_t  L_t / σ_t²    + log σ_t  =  Σ_t   exp(−s_t) L_t + ½ s_t

summed over the tasks present in the step. The s_t are returned by :meth:`parameters` and must be
given to the optimizer (the trainer puts them in a group without weight decay). ``task_kinds``
maps tasks to their problem types (:data:`minbert.tasks.PROBLEM_TYPES`): ``"regression"`` takes the
½ of the regression line, either classification type the classification line, which is also the
one for tasks not named.
"""
import math

import torch
import torch.nn as nn

from ..tasks import PROBLEM_TYPES, REGRESSION, SINGLE_LABEL
from .base import Weighting


class Uncertainty(Weighting):
    name = "uncertainty"

    def __init__(self, tasks, task_kinds=None, init: float = 0.0):
        super().__init__(tasks)
        task_kinds = dict(task_kinds or {})
        unknown = [t for t in task_kinds if t not in self.tasks]
        if unknown:
            raise ValueError(f"uncertainty: task_kinds names unknown tasks {unknown}; configured tasks: {self.tasks}")
        bad = {t: k for t, k in task_kinds.items() if k not in PROBLEM_TYPES}
        if bad:
            raise ValueError(f"uncertainty: task_kinds must be problem types {list(PROBLEM_TYPES)}, got {bad}")
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ValueError(f"uncertainty: init (the initial log σ²) must be a finite number, got {init!r}")
        self.kinds = {t: task_kinds.get(t, SINGLE_LABEL) for t in self.tasks}
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.tensor(float(init))) for t in self.tasks})

    def _scale(self, task: str) -> float:
        return 0.5 if self.kinds[task] == REGRESSION else 1.0

    def parameters(self):
        return list(self.log_vars.values())

    def combine(self, losses):
        self._check(losses)
        total = 0.0
        for t, loss in losses.items():
            s = self.log_vars[t].to(loss.device)
            total = total + self._scale(t) * torch.exp(-s) * loss + 0.5 * s
        return total

    def weights(self, losses):
        """The effective weight of each L_t: ½exp(−s_t) (regression) or exp(−s_t) (classification)."""
        return {t: self._scale(t) * math.exp(-float(self.log_vars[t].detach())) for t in losses}

    def state_dict(self):
        return {t: p.detach().clone() for t, p in self.log_vars.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.tasks):
            raise KeyError(f"uncertainty: state has tasks {sorted(state)}, this weighting has {sorted(self.tasks)}")
        with torch.no_grad():
            for t, v in state.items():
                self.log_vars[t].copy_(torch.as_tensor(v))
