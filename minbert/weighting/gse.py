"""GSE, a seed project's PCGrad variant: each step makes two updates, first along the PCGrad
direction, then along the plain summed gradient (recomputed at the updated weights).

It uses the trainer's ``num_updates`` contract: the trainer runs forward, ``backward(...,
update_index=k)`` and an optimizer step once for each k in ``range(num_updates)`` on the same batches.
"""
from typing import Callable, Optional

import torch

from .pcgrad import PCGrad


class GSE(PCGrad):
    name = "gse"
    num_updates = 2

    def backward(self, losses, shared_params, backward: Optional[Callable] = None, update_index: int = 0, **_):
        if update_index == 0:
            return super().backward(losses, shared_params, backward)
        self._check(losses)
        scale = 1.0 / len(losses) if self.reduction == "mean" else 1.0
        (backward or torch.autograd.backward)(scale * sum(losses.values()))
        return {}
