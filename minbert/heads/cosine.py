"""Cosine-similarity heads on a bi-encoded pair: ``2d+1`` and ``cosine`` / ``cosine_affine`` / ``cosine_sigmoid``."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tasks import BINARY, SINGLE_LABEL
from .base import Features, Head, check_choice, check_positive, check_prob


class CosineFeatureHead(Head):
    """The "2d+1" head: ``[u; v; cos(u, v)]`` (B, 2H + 1) → dropout → Linear → task output."""

    name = "2d+1"
    input_kind = "pair"

    def __init__(self, hidden_size, task_kind, num_classes=None, dropout: float = 0.1,
                 output_transform: str = "identity", score_max: float = 5.0):
        super().__init__(hidden_size, task_kind, num_classes, output_transform, score_max)
        self.dropout = nn.Dropout(check_prob(self.name, "dropout", dropout))
        self.proj = nn.Linear(2 * hidden_size + 1, self.output.output_dim)

    def forward(self, features: Features) -> torch.Tensor:
        p = self._pair(features)
        u, v = p.a.pooled, p.b.pooled
        z = torch.cat([self.dropout(u), self.dropout(v), F.cosine_similarity(u, v, dim=-1, eps=1e-8).unsqueeze(-1)], dim=-1)
        return self.output(self.proj(z))


class CosineHead(Head):
    """Cosine-similarity head on ``u = a.pooled``, ``v = b.pooled``, ``c = cos(u, v) ∈ [−1, 1]``.

    Regression scores (no parameters; ``scale`` = 5 for STS's 0-5 range), by ``variant``:

    ============================  ===============================  ================
    registry name                 score                            range
    ============================  ===============================  ================
    ``"cosine"``                  ``scale · c``                    [−5, 5]
    ``"cosine_affine"``           ``scale · (c + 1) / 2``          [0, 5]
    ``"cosine_sigmoid"``          ``scale · sigmoid(sharpness·c)`` (0, 5), sharpness 20
    ============================  ===============================  ================

    ``"cosine"`` is the plain Sentence-BERT STS objective (regress ``5·cos`` on the 0-5 gold score; the
    model only needs ``c ≥ 0`` for similar pairs). ``"cosine_affine"`` maps the whole cosine range onto
    0-5. ``"cosine_sigmoid"`` saturates: ``c`` near 0 already maps to 2.5.

    Binary (Quora) heads return a logit ``w · c + b`` with learnable ``w`` (init ``binary_scale``) and
    ``b`` (init ``−binary_scale · binary_threshold``), the same for every variant. Classification
    is not supported (one score per pair).
    """

    name = "cosine"
    input_kind = "pair"
    output_dim = 1
    VARIANTS = ("cosine", "cosine_affine", "cosine_sigmoid")

    def __init__(self, hidden_size, task_kind, num_classes=None, variant: str = "cosine", scale: float = 5.0,
                 sharpness: float = 20.0, binary_scale: float = 20.0, binary_threshold: float = 0.5):
        super().__init__(hidden_size, task_kind, task_output=False)
        self.variant = check_choice(self.name, "variant", variant, self.VARIANTS)
        self.name = variant
        if task_kind == SINGLE_LABEL:
            raise ValueError(f"head {variant!r} gives one score per pair; it supports task_kind 'regression' or "
                             f"{BINARY!r}, not {SINGLE_LABEL!r}")
        if num_classes not in (None, 1):
            raise ValueError(f"head {variant!r}: num_classes must be 1 or None, got {num_classes!r}")
        self.scale = check_positive(variant, "scale", scale)
        self.sharpness = check_positive(variant, "sharpness", sharpness)
        if task_kind == BINARY:
            w = check_positive(variant, "binary_scale", binary_scale)
            if not isinstance(binary_threshold, (int, float)) or not -1 <= binary_threshold <= 1:
                raise ValueError(f"{variant}: binary_threshold must be a number in [-1, 1], got {binary_threshold!r}")
            self.logit_scale = nn.Parameter(torch.tensor(float(w)))
            self.logit_bias = nn.Parameter(torch.tensor(-float(w) * float(binary_threshold)))

    def forward(self, features: Features) -> torch.Tensor:
        p = self._pair(features)
        c = F.cosine_similarity(p.a.pooled, p.b.pooled, dim=-1, eps=1e-8)  # (B,)
        if self.task_kind == BINARY:
            return self.logit_scale * c + self.logit_bias
        if self.variant == "cosine":
            return self.scale * c
        if self.variant == "cosine_affine":
            return self.scale * (c + 1) / 2
        return self.scale * torch.sigmoid(self.sharpness * c)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, task_kind={self.task_kind!r}, scale={self.scale}"

    @classmethod
    def option_names(cls, name: str) -> Tuple[str, ...]:
        """The variant is the registry name, and only ``cosine_sigmoid`` has a ``sharpness``."""
        return tuple(n for n in super().option_names(name)
                     if n != "variant" and (n != "sharpness" or name == "cosine_sigmoid"))

    @classmethod
    def from_options(cls, name, hidden_size, task_kind, num_classes, shared, **options) -> "CosineHead":
        return cls(hidden_size, task_kind, num_classes=num_classes, variant=name, **options)

