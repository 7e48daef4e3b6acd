"""Dynamic weight averaging (Liu, Johns and Davison, CVPR 2019).

    r_t(e) = L_t(e−1) / L_t(e−2),    w_t(e) = T · exp(r_t / τ) / Σ_k exp(r_k / τ)

with L_t(e) the mean training loss of task t in epoch e and τ = 2. The first two epochs use w_t = 1.
"""
import math

from .base import Weighting


class DWA(Weighting):
    name = "dwa"

    def __init__(self, tasks, temperature: float = 2.0):
        super().__init__(tasks)
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"dwa: temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.history = []  # mean train loss per task, one dict per finished epoch
        self.current = {t: 1.0 for t in self.tasks}

    def weights(self, losses):
        return {t: self.current[t] for t in losses}

    def end_epoch(self, epoch, train_losses, dev_scores):
        self.history.append(dict(train_losses))
        if len(self.history) < 2:
            return
        prev, prev2 = self.history[-1], self.history[-2]
        ratios = {t: prev[t] / prev2[t] for t in self.tasks if t in prev and t in prev2 and prev2[t] > 0}
        if len(ratios) != len(self.tasks):
            return
        exps = {t: math.exp(r / self.temperature) for t, r in ratios.items()}
        z = sum(exps.values())
        self.current = {t: len(self.tasks) * e / z for t, e in exps.items()}

    def state_dict(self):
        return {"history": self.history, "current": self.current}

    def load_state_dict(self, state):
        self.history = list(state["history"])
        self.current = dict(state["current"])
