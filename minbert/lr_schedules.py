"""Learning-rate schedules.

:func:`lr_factor` gives the multiplier of the base learning rate at a step, as a pure function;
:func:`build_lr_scheduler` wraps it in a ``torch.optim.lr_scheduler.LambdaLR``. Kinds
(:data:`LR_SCHEDULES`): ``constant`` (optional linear warm-up), ``linear`` (linear warm-up from 0
to 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``, as
``transformers.get_linear_schedule_with_warmup``) and ``exponential`` (``gamma ** epoch`` with
``epoch = step // steps_per_epoch``, the per-epoch decay of the SMARTer recipe, γ = 0.9;
optional warm-up).
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Optional, Sequence

import torch

__all__ = ["LR_SCHEDULES", "lr_factor", "build_lr_scheduler"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


LR_SCHEDULES = ("constant", "linear", "exponential")


def _check_lr_args(kind, step, total_steps, steps_per_epoch, warmup_steps, gamma, epoch_starts) -> None:
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; expected one of {list(LR_SCHEDULES)}")
    op = f"lr schedule {kind!r}"
    if not _is_int(step) or step < 0:
        raise ValueError(f"{op}: step must be an int >= 0, got {step!r}")
    if total_steps is not None and (not _is_int(total_steps) or total_steps < 1):
        raise ValueError(f"{op}: total_steps must be an int >= 1, got {total_steps!r}")
    if steps_per_epoch is not None and (not _is_int(steps_per_epoch) or steps_per_epoch < 1):
        raise ValueError(f"{op}: steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
    if not _is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"{op}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if total_steps is not None and warmup_steps > total_steps:
        raise ValueError(f"{op}: warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
    if not _is_number(gamma) or not math.isfinite(gamma) or not 0 < gamma <= 1:
        raise ValueError(f"{op}: gamma must be in (0, 1], got {gamma!r}")
    if kind == "linear" and total_steps is None:
        raise ValueError(f"{op}: total_steps is required (the decay reaches 0 at total_steps)")
    if kind == "exponential" and steps_per_epoch is None and epoch_starts is None:
        raise ValueError(f"{op}: steps_per_epoch is required (the rate decays by gamma once per epoch)")
    if epoch_starts is not None:
        starts = list(epoch_starts)
        if not starts or starts[0] != 0 or any(not _is_int(s) for s in starts) \
                or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"{op}: epoch_starts must be strictly increasing ints starting at 0, got {starts!r}")


def lr_factor(kind: str, step: int, *, total_steps: Optional[int], steps_per_epoch: Optional[int],
              warmup_steps: int = 0, gamma: float = 0.9, epoch_starts: Optional[Sequence[int]] = None) -> float:
    """Multiplier of the base learning rate at optimizer step ``step``.

    * warm-up (all kinds): ``step / warmup_steps`` while ``step < warmup_steps``, else 1;
    * ``constant``: the warm-up factor;
    * ``linear``: the warm-up, then ``max(0, (total_steps − step) / (total_steps − warmup_steps))``,
      i.e. 1 at the end of the warm-up and 0 at ``total_steps``;
    * ``exponential``: warm-up × ``gamma ** epoch``, ``epoch = step // steps_per_epoch`` (or the
      index of the epoch containing ``step`` in ``epoch_starts``, the first step of every epoch, for
      schedules whose epochs differ in length such as :class:`StagedSampler`).
    """
    _check_lr_args(kind, step, total_steps, steps_per_epoch, warmup_steps, gamma, epoch_starts)
    warm = step / warmup_steps if step < warmup_steps else 1.0
    if kind == "constant":
        return float(warm)
    if kind == "linear":
        if step < warmup_steps:
            return float(warm)
        return float(max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps)))
    if epoch_starts is not None:
        epoch = bisect.bisect_right(list(epoch_starts), step) - 1
    else:
        epoch = step // steps_per_epoch
    return float(warm * gamma ** epoch)


class _LRFactor:
    """Picklable ``step -> factor`` (LambdaLR saves its ``__dict__`` in ``state_dict``)."""

    def __init__(self, kind: str, **kwargs: Any) -> None:
        self.kind = kind
        self.kwargs = kwargs

    def __call__(self, step: int) -> float:
        return lr_factor(self.kind, int(step), **self.kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, *, total_steps: Optional[int] = None,
                       steps_per_epoch: Optional[int] = None, warmup_steps: int = 0, gamma: float = 0.9,
                       epoch_starts: Optional[Sequence[int]] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; call ``scheduler.step()`` after each optimizer step.

    The arguments are checked here, before any training, not at the first ``step()``.
    """
    if epoch_starts is not None:
        epoch_starts = [int(s) if _is_int(s) else s for s in epoch_starts]
    _check_lr_args(kind, 0, total_steps, steps_per_epoch, warmup_steps, gamma, epoch_starts)
    fn = _LRFactor(kind, total_steps=total_steps, steps_per_epoch=steps_per_epoch, warmup_steps=warmup_steps,
                   gamma=gamma, epoch_starts=epoch_starts)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
