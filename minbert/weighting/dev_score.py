"""Weights adapted from each task's previous dev score.

After every evaluation, tasks that score worse get more weight:

    w_t ∝ (1 − s_t)^γ,   normalised so that Σ_t w_t = T,

where s_t ∈ [0, 1] is the task's dev score (accuracy; Pearson r mapped to (r + 1) / 2) and γ = 1.
Until the first evaluation every weight is 1.
"""
import math

from .base import Weighting


class DevScore(Weighting):
    name = "dev_score"

    def __init__(self, tasks, gamma: float = 1.0, floor: float = 0.05):
        super().__init__(tasks)
        for key, value in (("gamma", gamma), ("floor", floor)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"dev_score: {key} must be a finite number >= 0, got {value!r}")
        self.gamma, self.floor = float(gamma), float(floor)
        self.current = {t: 1.0 for t in self.tasks}

    def weights(self, losses):
        return {t: self.current[t] for t in losses}

    def update(self, scores):
        """``scores``: task -> score in [0, 1]."""
        raw = {t: max(1.0 - scores[t], self.floor) ** self.gamma for t in self.tasks if t in scores}
        if len(raw) != len(self.tasks):
            return
        z = sum(raw.values())
        self.current = {t: len(self.tasks) * r / z for t, r in raw.items()}

    def end_epoch(self, epoch, train_losses, dev_scores):
        self.update({t: (v + 1) / 2 if t == "sts" else v for t, v in dev_scores.items()})

    def state_dict(self):
        return {"current": self.current}

    def load_state_dict(self, state):
        self.current = dict(state["current"])
