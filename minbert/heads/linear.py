"""Heads on the pooled vector of one sequence: ``linear`` (the CS224N baseline) and ``mlp``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .base import Features, Head, check_prob
from .layers import MLP


class LinearHead(Head):
    """``dropout → Linear(H, output_dim)`` on the pooled vector (the CS224N baseline)."""

    name = "linear"

    def __init__(self, hidden_size, task_kind, num_classes=None, dropout: float = 0.1,
                 output_transform: str = "identity", score_max: float = 5.0):
        super().__init__(hidden_size, task_kind, num_classes, output_transform, score_max)
        self.dropout = nn.Dropout(check_prob(self.name, "dropout", dropout))
        self.proj = nn.Linear(hidden_size, self.output.output_dim)

    def forward(self, features: Features) -> torch.Tensor:
        f = self._sentence(features)
        return self.output(self.proj(self.dropout(f.pooled)))


class MLPHead(Head):
    """:class:`MLP` (``num_layers`` × ``width``, ReLU/GELU/LeakyReLU/SELU, dropout) on the pooled vector."""

    name = "mlp"

    def __init__(self, hidden_size, task_kind, num_classes=None, num_layers: int = 1, width: Optional[int] = None,
                 activation: str = "relu", dropout: float = 0.1, output_transform: str = "identity",
                 score_max: float = 5.0):
        super().__init__(hidden_size, task_kind, num_classes, output_transform, score_max)
        self.mlp = MLP(hidden_size, self.output.output_dim, num_layers, width, activation, dropout, self.name)

    def forward(self, features: Features) -> torch.Tensor:
        f = self._sentence(features)
        return self.output(self.mlp(f.pooled))

