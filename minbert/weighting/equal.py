"""Equal weighting over the tasks present in a step.

    reduction="sum" (default):  L = Σ_t L_t
    reduction="mean":           L = (1/|S|) Σ_{t∈S} L_t,   S = the tasks present this step
"""
from .base import Weighting


class Equal(Weighting):
    name = "equal"

    def __init__(self, tasks, reduction: str = "sum"):
        super().__init__(tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"equal: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def weights(self, losses):
        w = 1.0 / len(losses) if self.reduction == "mean" else 1.0
        return {t: w for t in losses}
