"""``sbert``: the Sentence-BERT classifier on a bi-encoded pair."""
from __future__ import annotations

from typing import Optional

import torch

from .base import Features, Head
from .layers import MLP, sbert_features


class SBERTHead(Head):
    """Sentence-BERT classifier: ``[u; v; |u − v|; u * v]`` (B, 4H) → Linear (``num_layers=0``) or MLP.

    Reimers & Gurevych (2019), "Sentence-BERT", eq. (1): ``o = softmax(W_t (u, v, |u − v|))``; the
    element-wise product ``u * v`` is the variant that works better for STS/Quora in CS224N projects.
    """

    name = "sbert"
    input_kind = "pair"

    def __init__(self, hidden_size, task_kind, num_classes=None, num_layers: int = 0, width: Optional[int] = None,
                 activation: str = "relu", dropout: float = 0.1, output_transform: str = "identity",
                 score_max: float = 5.0):
        super().__init__(hidden_size, task_kind, num_classes, output_transform, score_max)
        width = hidden_size if width is None else width
        self.mlp = MLP(4 * hidden_size, self.output.output_dim, num_layers, width, activation, dropout, self.name)

    def forward(self, features: Features) -> torch.Tensor:
        p = self._pair(features)
        return self.output(self.mlp(sbert_features(p.a.pooled, p.b.pooled)))

