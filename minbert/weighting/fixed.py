"""Fixed weights: L = Σ_{t∈S} w_t L_t with user-given w_t ≥ 0 for every task (S = tasks present)."""
import math

from .base import Weighting


class Fixed(Weighting):
    name = "fixed"

    def __init__(self, tasks, weights=None):
        super().__init__(tasks)
        if not isinstance(weights, dict):
            raise ValueError(f"fixed: weights must be a mapping task -> weight, got {weights!r}")
        missing = [t for t in self.tasks if t not in weights]
        unknown = [t for t in weights if t not in self.tasks]
        if missing or unknown:
            raise ValueError(f"fixed: weights must name every task exactly; missing {missing}, unknown {unknown}")
        for t, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"fixed: weight of task {t!r} must be a finite number >= 0, got {w!r}")
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"fixed: at least one weight must be > 0, got {weights}")
        self.fixed = {t: float(weights[t]) for t in self.tasks}

    def weights(self, losses):
        return {t: self.fixed[t] for t in losses}
