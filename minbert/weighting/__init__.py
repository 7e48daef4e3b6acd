"""Multitask loss weighting and gradient surgery, one method per file behind one interface.

``build_weighting(name, tasks, **options)`` builds a method by its name in :data:`WEIGHTINGS`;
the trainer only calls the :class:`~minbert.weighting.base.Weighting` interface.

=============  =====================================================  ==========================
name           method                                                 options
=============  =====================================================  ==========================
equal          Σ_t L_t (or the mean)                                  reduction
fixed          Σ_t w_t L_t, user weights                              weights
uncertainty    learned log-variances, Kendall et al. 2018             task_kinds, init
dwa            dynamic weight averaging, Liu et al. 2019              temperature
dev_score      w_t ∝ (1 − dev score_t)^γ                              gamma, floor, task_kinds
pcgrad         gradient surgery, Yu et al. 2020                       seed, reduction
gse            PCGrad update, then a plain-sum update (2 updates)     seed, reduction
=============  =====================================================  ==========================

The PCGrad arithmetic is also public as pure functions for sharded gradients:
:func:`pcgrad_weights`, :func:`gram_matrix`, :func:`combine_gradients`, and the oracle
:func:`pcgrad_project`.
"""
import inspect

from .base import Weighting
from .dev_score import DevScore
from .dwa import DWA
from .equal import Equal
from .fixed import Fixed
from .gse import GSE
from .pcgrad import PCGrad, combine_gradients, gram_matrix, pcgrad_project, pcgrad_weights
from .uncertainty import Uncertainty

WEIGHTINGS = {cls.name: cls for cls in (Equal, Fixed, Uncertainty, DWA, DevScore, PCGrad, GSE)}


def build_weighting(name: str, tasks, **options) -> Weighting:
    if name not in WEIGHTINGS:
        raise ValueError(f"weighting: unknown method {name!r}; expected one of {sorted(WEIGHTINGS)}")
    cls = WEIGHTINGS[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "tasks")]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ValueError(f"weighting.options: unknown option {unknown[0]!r} for {name!r}; valid options: {valid}")
    return cls(tasks, **options)


__all__ = ["Weighting", "WEIGHTINGS", "build_weighting", "pcgrad_weights", "pcgrad_project", "gram_matrix",
           "combine_gradients", "Equal", "Fixed", "Uncertainty", "DWA", "DevScore", "PCGrad", "GSE"]
