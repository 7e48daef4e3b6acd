"""Dynamic weight averaging (Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019).

With L_t(e) the mean training loss of task t over epoch e, T tasks and temperature τ (2 in the paper):

    r_t(e) = L_t(e−1) / L_t(e−2),      w_t(e) = T · exp(r_t(e) / τ) / Σ_k exp(r_k(e) / τ)

so a task whose loss falls more slowly gets more weight, and Σ_t w_t = T. The first two epochs use
w_t = 1. The trainer feeds L_t(e) through :meth:`DWA.end_epoch`; if an epoch has no finite, positive
mean loss for some task (e.g. a random schedule never picked it), the weights stay as they were.
"""
import math

from .base import Weighting


class DWA(Weighting):
    name = "dwa"

    def __init__(self, tasks, temperature: float = 2.0):
        super().__init__(tasks)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"dwa: temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.history = []  # mean train loss per task of the last two finished epochs
        self.current = {t: 1.0 for t in self.tasks}

    def weights(self, losses):
        return {t: self.current[t] for t in losses}

    def end_epoch(self, epoch, train_losses, dev_scores):
        self.history = (self.history + [{t: float(v) for t, v in train_losses.items()}])[-2:]
        if len(self.history) < 2:
            return
        prev2, prev = self.history
        ok = all(t in prev and t in prev2 and math.isfinite(prev[t]) and math.isfinite(prev2[t]) and prev2[t] > 0
                 for t in self.tasks)
        if not ok:
            return
        ratios = {t: prev[t] / prev2[t] for t in self.tasks}
        top = max(ratios.values())  # subtract the max before exp: same weights, no overflow
        exps = {t: math.exp((r - top) / self.temperature) for t, r in ratios.items()}
        z = sum(exps.values())
        self.current = {t: len(self.tasks) * e / z for t, e in exps.items()}

    def state_dict(self):
        return {"history": [dict(h) for h in self.history], "current": dict(self.current)}

    def load_state_dict(self, state):
        self.history = [dict(h) for h in state["history"]][-2:]
        self.current = dict(state["current"])
