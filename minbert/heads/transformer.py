"""``transformer``: a small Transformer encoder over the token states of one sequence."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..pooling import masked_mean
from .base import Features, Head, check_choice, check_int, check_prob


def _default_heads(hidden_size: int) -> int:
    for n in (12, 8, 6, 4, 2, 1):
        if hidden_size % n == 0:
            return n
    return 1


class TransformerHead(Head):
    """A small Transformer encoder over the token states, then pooling and a linear layer.

    ``num_layers`` ``nn.TransformerEncoderLayer`` blocks (post-LN, GELU) with the padding passed as
    ``src_key_padding_mask``, so padded tokens are never attended to; then ``pooling`` (``"cls"``:
    the first position, ``"mean"``: mean over real tokens) → dropout → Linear → task output.
    """

    name = "transformer"
    POOLINGS = ("cls", "mean")

    def __init__(self, hidden_size, task_kind, num_classes=None, num_layers: int = 1, num_heads: Optional[int] = None,
                 ff_dim: Optional[int] = None, dropout: float = 0.1, pooling: str = "cls",
                 output_transform: str = "identity", score_max: float = 5.0):
        super().__init__(hidden_size, task_kind, num_classes, output_transform, score_max)
        check_int(self.name, "num_layers", num_layers, 1)
        num_heads = _default_heads(hidden_size) if num_heads is None else check_int(self.name, "num_heads", num_heads, 1)
        if hidden_size % num_heads:
            raise ValueError(f"{self.name}: num_heads={num_heads} must divide hidden_size={hidden_size}")
        ff_dim = 2 * hidden_size if ff_dim is None else check_int(self.name, "ff_dim", ff_dim, 1)
        check_prob(self.name, "dropout", dropout)
        self.pooling = check_choice(self.name, "pooling", pooling, self.POOLINGS)
        layer = nn.TransformerEncoderLayer(hidden_size, num_heads, ff_dim, dropout, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, self.output.output_dim)

    def forward(self, features: Features) -> torch.Tensor:
        f = self._sentence(features)
        keep = f.mask.bool()  # (B, L)
        nonempty = keep.any(dim=1)  # (B,)
        # A row with every key masked would give NaN attention: let it attend to everything, zero it below.
        ignore = ~(keep | ~nonempty.unsqueeze(1))  # (B, L) True = padding
        x = self.encoder(f.hidden, src_key_padding_mask=ignore)  # (B, L, H)
        z = x[:, 0] if self.pooling == "cls" else masked_mean(x, keep)  # (B, H)
        z = torch.where(nonempty.unsqueeze(-1), z, z.new_zeros(()))
        return self.output(self.proj(self.dropout(z)))

