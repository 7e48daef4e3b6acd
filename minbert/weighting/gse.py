"""GSE, a PCGrad variant: two optimizer updates per training step, first along the
PCGrad direction, then along the plain summed gradient recomputed at the updated weights.

The two updates use the interface's ``num_updates`` contract (see :mod:`minbert.weighting.base`):
``num_updates = 2``, and the trainer runs, on the same batches,

    for k in range(weighting.num_updates):
        losses = forward(batches)
        weighting.backward(losses, shared_params, backward=engine.backward, update_index=k)
        engine.step()

``update_index=0`` is :meth:`PCGrad.backward` (projected shared gradient, heads get their own
task's gradient, one draw of the seeded task order); ``update_index=1`` back-propagates the plain
Σ_t L_t (or the mean with ``reduction="mean"``) through the engine's ``backward`` and draws no
order, so the generator advances once per step exactly as with PCGrad.
"""
from typing import Optional

from .base import BackwardFn
from .pcgrad import PCGrad


class GSE(PCGrad):
    name = "gse"
    num_updates = 2

    def backward(self, losses, shared_params, backward: Optional[BackwardFn] = None, update_index: int = 0):
        self._check_update_index(update_index)
        if update_index == 0:
            return super().backward(losses, shared_params, backward)
        return super(PCGrad, self).backward(losses, shared_params, backward, update_index)
