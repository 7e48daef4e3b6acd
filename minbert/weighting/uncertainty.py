"""Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

With a learnable s_t = log σ_t² per task:

    regression:      L = Σ_t  ½ exp(−s_t) L_t + ½ s_t        (= L_t / (2σ_t²) + log σ_t)
    classification:  L = Σ_t    exp(−s_t) L_t + ½ s_t        (= L_t / σ_t²    + log σ_t)
"""
import torch
import torch.nn as nn

from .base import Weighting


class Uncertainty(Weighting):
    name = "uncertainty"

    def __init__(self, tasks, task_kinds=None, init: float = 0.0):
        super().__init__(tasks)
        task_kinds = task_kinds or {}
        bad = {t: k for t, k in task_kinds.items() if k not in ("regression", "classification")}
        if bad:
            raise ValueError(f"uncertainty: task_kinds must be 'regression' or 'classification', got {bad}")
        self.kinds = {t: task_kinds.get(t, "classification") for t in self.tasks}
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.tensor(float(init))) for t in self.tasks})

    def parameters(self):
        return list(self.log_vars.values())

    def combine(self, losses):
        self._check(losses)
        total = 0.0
        for t, loss in losses.items():
            s = self.log_vars[t].to(loss.device)
            scale = 0.5 if self.kinds[t] == "regression" else 1.0
            total = total + scale * torch.exp(-s) * loss + 0.5 * s
        return total

    def weights(self, losses):
        return {t: float((0.5 if self.kinds[t] == "regression" else 1.0) * torch.exp(-self.log_vars[t].detach()))
                for t in losses}

    def state_dict(self):
        return {t: p.detach().clone() for t, p in self.log_vars.items()}

    def load_state_dict(self, state):
        with torch.no_grad():
            for t, v in state.items():
                self.log_vars[t].copy_(v)
