"""Regularizers and auxiliary losses: extra loss terms added to a task's loss, behind one interface.

A regularizer is called after the task's forward pass with the model, the batch and the task
output, and returns named scalar terms that the trainer adds to that task's loss::

    terms = reg(model, batch, output)     # {"simcse": tensor(0.7)}
    reg.after_step(model)                 # after each optimizer step (e.g. SMART's teacher EMA)

``reg.before_forward(model, batch)`` runs just before the task's forward pass.

Implementations register themselves in :data:`REGULARIZERS` by name (``minbert.smart`` adds
``smart``). The trainer builds them from the config and never branches on their names.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import torch

REGULARIZERS: Dict[str, Callable[..., "Regularizer"]] = {}


def register(name: str):
    def wrap(cls):
        REGULARIZERS[name] = cls
        return cls

    return wrap


class Regularizer:
    name = "regularizer"

    def before_forward(self, model, batch) -> None:
        """Called just before the task's forward pass (e.g. to record the RNG state for shared dropout,
        or to ask the model to keep the input of a layer, ``model.capture_layer = k``)."""

    def __call__(self, model, batch, output: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, model) -> None:
        """Called once after every optimizer step."""

    def stats(self) -> Dict[str, float]:
        """Counters for the training log (e.g. skipped steps)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def _pooled(features):
    """(B, H) sentence vectors of the first (and second) sentence."""
    if hasattr(features, "a"):
        return features.a.pooled, features.b.pooled
    return features.pooled, None


@register("simcse_unsup")
class SimCSEUnsup(Regularizer):
    """Unsupervised SimCSE on the batch's sentences: two dropout views of each sentence are positives."""

    name = "simcse_unsup"

    def __init__(self, weight: float = 1.0, temperature: float = 0.05):
        self.weight = float(weight)
        self.temperature = float(temperature)

    def __call__(self, model, batch, output):
        from .losses import simcse_unsup

        z1, _ = _pooled(model.features(batch))
        z2, _ = _pooled(model.features(batch))  # a second dropout view
        return {self.name: self.weight * simcse_unsup(z1, z2, temperature=self.temperature)}


@register("mnrl")
class MultipleNegativesRanking(Regularizer):
    """Multiple-negatives ranking loss on the paraphrase positives of a bi-encoded pair batch."""

    name = "mnrl"

    def __init__(self, weight: float = 1.0, scale: float = 20.0, threshold: float = 0.5):
        self.weight = float(weight)
        self.scale = float(scale)
        self.threshold = float(threshold)

    def __call__(self, model, batch, output):
        from .losses import mnrl

        if batch.input_ids_b is None:
            raise ValueError(f"mnrl needs a bi-encoded pair task (pair_encoding: bi); task {batch.task!r} is not")
        u, v = _pooled(model.features(batch))
        positive = batch.labels.float() > self.threshold if batch.task == "quora" else batch.labels.float() >= 4.0
        if int(positive.sum()) < 2:
            return {self.name: u.sum() * 0.0}
        return {self.name: self.weight * mnrl(u[positive], v[positive], scale=self.scale)}


def build_regularizers(specs: Sequence[Dict[str, Any]]) -> List[Regularizer]:
    """``[{name: simcse_unsup, weight: 0.1}, ...]`` -> regularizer objects (clear error on unknown names)."""
    out = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in REGULARIZERS:
            raise ValueError(f"aux_losses[{i}]: unknown name {name!r}; expected one of {sorted(REGULARIZERS)}")
        try:
            out.append(REGULARIZERS[name](**spec))
        except TypeError as e:
            raise ValueError(f"aux_losses[{i}] ({name}): {e}") from None
    return out
