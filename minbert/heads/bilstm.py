"""BiLSTM heads over the token states: ``bilstm`` (one sequence) and ``siamese_bilstm`` (a bi-encoded pair)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..pooling import masked_mean
from .base import Features, Head, check_choice, check_int, check_prob
from .layers import MLP, sbert_features


class MaskedBiLSTM(nn.Module):
    """A bidirectional LSTM over the real tokens only, reduced to one vector (B, out_dim).

    Real tokens are moved to the front of each row (any mask works, not only right padding), the
    batch is packed by length (``pack_padded_sequence``) so padding never enters the recurrence, and
    the outputs are reduced by ``reduce``:

    * ``"last"``: ``[h→_T; h←_1]``, the final forward and backward states of the top layer,
    * ``"mean"`` / ``"max"``: mean / max of the top layer's outputs over the real tokens.

    ``out_dim = 2 · lstm_hidden``. Rows without any real token give zeros.
    """

    REDUCTIONS = ("last", "mean", "max")

    def __init__(self, input_size: int, lstm_hidden: int, num_layers: int = 1, dropout: float = 0.0,
                 reduce: str = "last", where: str = "bilstm"):
        super().__init__()
        check_int(where, "lstm_hidden", lstm_hidden, 1)
        check_int(where, "lstm_layers", num_layers, 1)
        check_prob(where, "dropout", dropout)
        self.reduce = check_choice(where, "reduce", reduce, self.REDUCTIONS)
        # nn.LSTM's dropout acts between stacked layers only.
        self.lstm = nn.LSTM(input_size, lstm_hidden, num_layers=num_layers, batch_first=True,
                            bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)
        self.out_dim = 2 * lstm_hidden

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, l, h = hidden.shape
        keep = mask.bool()  # (B, L)
        lengths = keep.sum(dim=1)  # (B,)
        # Stable sort puts real tokens first, in order: (B, L) gather indices.
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        x = hidden.gather(1, order.unsqueeze(-1).expand(b, l, h))  # (B, L, H)
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)
        if self.reduce == "last":
            z = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # (B, 2 * lstm_hidden)
        else:
            seq, _ = pad_packed_sequence(out, batch_first=True, total_length=l)  # (B, L, 2 * lstm_hidden)
            valid = torch.arange(l, device=hidden.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
            if self.reduce == "mean":
                z = masked_mean(seq, valid)
            else:
                z = seq.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
        # Empty rows were run on one (padding) token to keep the packing valid: zero them.
        return torch.where((lengths > 0).unsqueeze(-1), z, z.new_zeros(()))


class BiLSTMHead(Head):
    """BiLSTM over the token states (:class:`MaskedBiLSTM`), optionally concatenated with the pooled
    vector (``include_pooled``), then dropout → Linear → task output."""

    name = "bilstm"

    def __init__(self, hidden_size, task_kind, num_classes=None, lstm_hidden: Optional[int] = None,
                 lstm_layers: int = 1, reduce: str = "last", include_pooled: bool = False, dropout: float = 0.1,
                 output_transform: str = "identity", score_max: float = 5.0):
        super().__init__(hidden_size, task_kind, num_classes, output_transform, score_max)
        lstm_hidden = max(1, hidden_size // 2) if lstm_hidden is None else lstm_hidden
        self.lstm = MaskedBiLSTM(hidden_size, lstm_hidden, lstm_layers, dropout, reduce, self.name)
        if not isinstance(include_pooled, bool):
            raise ValueError(f"{self.name}: include_pooled must be true or false, got {include_pooled!r}")
        self.include_pooled = include_pooled
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(self.lstm.out_dim + (hidden_size if include_pooled else 0), self.output.output_dim)

    def forward(self, features: Features) -> torch.Tensor:
        f = self._sentence(features)
        z = self.lstm(f.hidden, f.mask)  # (B, 2 * lstm_hidden)
        if self.include_pooled:
            z = torch.cat([z, f.pooled], dim=-1)
        return self.output(self.proj(self.dropout(z)))



class SiameseBiLSTMHead(Head):
    """One shared :class:`MaskedBiLSTM` over each sentence's token states (``u = LSTM(a)``,
    ``v = LSTM(b)``, the same weights for both), then ``[u; v; |u − v|; u * v]`` → MLP → task output."""

    name = "siamese_bilstm"
    input_kind = "pair"

    def __init__(self, hidden_size, task_kind, num_classes=None, lstm_hidden: Optional[int] = None,
                 lstm_layers: int = 1, reduce: str = "last", num_layers: int = 0, width: Optional[int] = None,
                 activation: str = "relu", dropout: float = 0.1, output_transform: str = "identity",
                 score_max: float = 5.0):
        super().__init__(hidden_size, task_kind, num_classes, output_transform, score_max)
        lstm_hidden = max(1, hidden_size // 2) if lstm_hidden is None else lstm_hidden
        self.lstm = MaskedBiLSTM(hidden_size, lstm_hidden, lstm_layers, dropout, reduce, self.name)
        d = self.lstm.out_dim
        self.mlp = MLP(4 * d, self.output.output_dim, num_layers, d if width is None else width, activation, dropout,
                       self.name)

    def forward(self, features: Features) -> torch.Tensor:
        p = self._pair(features)
        u = self.lstm(p.a.hidden, p.a.mask)  # (B, 2 * lstm_hidden)
        v = self.lstm(p.b.hidden, p.b.mask)
        return self.output(self.mlp(sbert_features(u, v)))

