"""``HybridHead``: a bi-encoder head and a cross-encoder head inside one model (``pair_encoding: hybrid``)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .base import Features, Head, HybridFeatures, registered_names, upcast


class HybridHead(Head):
    """A two-member ensemble inside one model: a bi-encoder head and a cross-encoder head (``pair_encoding: hybrid``).

    Output ``w · bi(u, v) + (1 − w) · cross([CLS] a [SEP] b [SEP])``: logits for Quora, scores for STS.
    The members are trained as separate predictors: :meth:`wrap_loss` makes the task loss
    ``½ (ℓ(bi, y) + ℓ(cross, y))``, not ``ℓ(output, y)``, so that each member fits the labels on its
    own and their errors stay partly independent (independent training of ensemble members beats
    training their average; Webb et al. 2020, "To Ensemble or Not Ensemble"). On STS dev, averaging a
    separately trained bi-encoder (0.879) and cross-encoder (0.854) gave 0.882 at w = 0.5 and 0.884
    at w = 0.7 (benchmarks/RESULTS.md).
    """

    name = "hybrid"
    input_kind = "hybrid"

    def __init__(self, bi: Head, cross: Head, weight: float = 0.5):
        super().__init__(bi.hidden_size, bi.task_kind, task_output=False)
        if bi.input_kind != "pair":
            raise ValueError(f"head 'hybrid': the bi-encoder member must be a pair head "
                             f"({sorted(registered_names('pair'))}), got {bi.name!r}")
        if cross.input_kind != "sentence":
            raise ValueError(f"head 'hybrid': the cross-encoder member must be a single-sequence head "
                             f"({sorted(registered_names('sentence'))}), got {cross.name!r}")
        if cross.task_kind != bi.task_kind or cross.output_dim != bi.output_dim:
            raise ValueError(f"head 'hybrid': members disagree: bi {bi.task_kind}/{bi.output_dim} outputs, "
                             f"cross {cross.task_kind}/{cross.output_dim}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise ValueError(f"head 'hybrid': weight must be a number in [0, 1], got {weight!r}")
        self.bi, self.cross, self.weight = bi, cross, float(weight)
        self._members: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # (output, bi, cross)

    def forward(self, features: Features) -> torch.Tensor:
        if not isinstance(features, HybridFeatures):
            raise TypeError(f"head 'hybrid' needs HybridFeatures (pair_encoding='hybrid'), got {type(features).__name__}")
        self._check_size(features)
        out_bi = upcast(self.bi(features.pair))  # (B,) or (B, C); fp32 under autocast, as the model's output
        out_cross = upcast(self.cross(features.cross))  # same shape
        output = self.weight * out_bi + (1.0 - self.weight) * out_cross
        self._members = (output, out_bi, out_cross)
        return output

    def wrap_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``loss(output, target)`` for this head's latest ``output``: the mean of its members' losses."""
        head = self

        def member_loss(output: torch.Tensor, target: torch.Tensor, **extra) -> torch.Tensor:
            if head._members is None or head._members[0] is not output:
                raise RuntimeError("head 'hybrid': the loss must be computed on the output of this head's latest "
                                   "forward (its members' outputs are kept only for that one)")
            _, out_bi, out_cross = head._members
            head._members = None  # free the graph references; the next forward sets them again
            return 0.5 * (loss_fn(out_bi, target, **extra) + loss_fn(out_cross, target, **extra))

        return member_loss

    @property
    def output_dim(self) -> int:
        return self.bi.output_dim

    def extra_repr(self) -> str:
        return f"weight={self.weight}"

