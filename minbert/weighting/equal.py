"""Equal weighting: L = Σ_t L_t (``reduction="sum"``) or (1/T) Σ_t L_t (``"mean"``)."""
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
