"""Weights adapted from each task's previous dev score: the weaker a task, the more weight.

After every evaluation (``end_epoch``), with q_t ∈ [0, 1] the task's normalised dev score,

    w_t = T · m_t / Σ_k m_k,      m_t = max(1 − q_t, floor)^γ

so Σ_t w_t = T (γ = 1 by default; γ = 0 gives equal weights; ``floor`` keeps a task that is
nearly solved from vanishing). Normalisation by the task's problem type (``task_kinds``, values
from :data:`minbert.tasks.PROBLEM_TYPES`):

* ``"single_label_classification"``, ``"binary_classification"``: the score is an accuracy, q = s ∈ [0, 1];
* ``"regression"``: the score is a Pearson correlation r ∈ [−1, 1], q = (r + 1) / 2.

Without ``task_kinds`` each task takes its problem type from :mod:`minbert.tasks` (``sts`` is
regression); a task not registered there, or not named in a given ``task_kinds``, counts as
classification. A NaN score (e.g. Pearson r of constant predictions) counts as q = 0, the worst.
Until every task has a dev score the weights stay at 1 (and a later evaluation missing a task
keeps the previous weights).
"""
import math

from ..tasks import PROBLEM_TYPES, REGRESSION, SINGLE_LABEL, TASKS
from .base import Weighting


class DevScore(Weighting):
    name = "dev_score"

    def __init__(self, tasks, gamma: float = 1.0, floor: float = 0.05, task_kinds=None):
        super().__init__(tasks)
        for key, value in (("gamma", gamma), ("floor", floor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"dev_score: {key} must be a finite number >= 0, got {value!r}")
        if floor > 1:
            raise ValueError(f"dev_score: floor must be <= 1, got {floor!r}")
        if task_kinds is None:
            task_kinds = {t: TASKS[t].problem_type for t in self.tasks if t in TASKS}
        unknown = [t for t in task_kinds if t not in self.tasks]
        if unknown:
            raise ValueError(f"dev_score: task_kinds names unknown tasks {unknown}; configured tasks: {self.tasks}")
        bad = {t: k for t, k in task_kinds.items() if k not in PROBLEM_TYPES}
        if bad:
            raise ValueError(f"dev_score: task_kinds must be problem types {list(PROBLEM_TYPES)}, got {bad}")
        self.kinds = {t: task_kinds.get(t, SINGLE_LABEL) for t in self.tasks}
        self.gamma, self.floor = float(gamma), float(floor)
        self.current = {t: 1.0 for t in self.tasks}

    def weights(self, losses):
        return {t: self.current[t] for t in losses}

    def normalise(self, task: str, score: float) -> float:
        """Dev score -> q ∈ [0, 1] (see the module docstring); out-of-range scores are an error."""
        score = float(score)
        if math.isnan(score):
            return 0.0
        lo = -1.0 if self.kinds[task] == REGRESSION else 0.0
        if not lo - 1e-6 <= score <= 1.0 + 1e-6:
            raise ValueError(f"dev_score: the dev score of {self.kinds[task]} task {task!r} must lie in [{lo:g}, 1], "
                             f"got {score!r}")
        q = (score + 1.0) / 2.0 if lo < 0 else score
        return min(max(q, 0.0), 1.0)

    def update(self, scores):
        """``scores``: task -> raw dev score (accuracy or Pearson r)."""
        if not all(t in scores for t in self.tasks):
            return
        raw = {t: max(1.0 - self.normalise(t, scores[t]), self.floor) ** self.gamma for t in self.tasks}
        z = sum(raw.values())
        if z <= 0:  # floor = 0 and every task perfect
            return
        self.current = {t: len(self.tasks) * r / z for t, r in raw.items()}

    def end_epoch(self, epoch, train_losses, dev_scores):
        self.update(dev_scores)

    def state_dict(self):
        return {"current": dict(self.current)}

    def load_state_dict(self, state):
        self.current = dict(state["current"])
