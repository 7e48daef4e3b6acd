"""Task heads: encoder features in, task output out.

Every head is an ``nn.Module`` whose ``forward(features)`` takes a :class:`SentenceFeatures` (one
sequence: a single sentence, or a sentence pair encoded jointly by a *cross-encoder*) or a
:class:`PairFeatures` (a *bi-encoder* pair: each sentence encoded alone) and returns

* ``task_kind="classification"``: logits (B, C) (SST-5: C = 5, CFIMDB: C = 2),
* ``task_kind="binary"``: one logit per example (B,) (Quora; the loss is BCE-with-logits),
* ``task_kind="regression"``: one score per example (B,) (STS, 0-5).

Each head ends in ``output_dim`` units (C, or 1 for binary and regression) followed by the task's
output transform (:class:`TaskOutput`): identity for logits; for regression either identity or
``score_max · sigmoid(x)`` (``output_transform="sigmoid"``), which keeps scores inside (0, score_max).

Single-sentence heads (``linear``, ``mlp``, ``bilstm``, ``transformer``) also serve cross-encoded
pairs. Pair heads (``sbert``, ``2d+1``, ``cosine*``, ``siamese_bilstm``, ``relational``) need a
bi-encoder :class:`PairFeatures`, with ``u = a.pooled`` and ``v = b.pooled`` unless they read tokens.

Heads are built from config dicts with :func:`build_head`; unknown names or options fail with a
message naming the key and listing the valid ones.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .pooling import check_hidden_and_mask, masked_mean, pool

TASK_KINDS = ("classification", "binary", "regression")
ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "selu": nn.SELU,
}
OUTPUT_TRANSFORMS = ("identity", "sigmoid")


# --- features ---------------------------------------------------------------------------------

@dataclass
class SentenceFeatures:
    """Encoder features of one sequence per example (a sentence, or a cross-encoded pair)."""

    hidden: torch.Tensor  # (B, L, H) last-layer token states
    mask: torch.Tensor  # (B, L) 1 = real token, 0 = padding
    pooled: torch.Tensor  # (B, H) sentence vector (see minbert.pooling.pool)

    def __post_init__(self):
        check_hidden_and_mask(self.hidden, self.mask, "SentenceFeatures")
        b, _, h = self.hidden.shape
        if not isinstance(self.pooled, torch.Tensor) or tuple(self.pooled.shape) != (b, h):
            got = tuple(self.pooled.shape) if isinstance(self.pooled, torch.Tensor) else type(self.pooled).__name__
            raise ValueError(f"SentenceFeatures: pooled must have shape (B, H) = {(b, h)}, got {got}")

    @classmethod
    def from_encoder(cls, hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "cls",
                     pooler_output: Optional[torch.Tensor] = None) -> "SentenceFeatures":
        """Features from encoder outputs, pooling with ``pooling`` (one of ``POOLING_METHODS``)."""
        return cls(hidden, mask, pool(hidden, mask, pooling, pooler_output))

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[-1]


@dataclass
class PairFeatures:
    """Bi-encoder features of a sentence pair: each sentence encoded on its own."""

    a: SentenceFeatures
    b: SentenceFeatures

    def __post_init__(self):
        for name in ("a", "b"):
            if not isinstance(getattr(self, name), SentenceFeatures):
                raise TypeError(f"PairFeatures: {name} must be a SentenceFeatures, got {type(getattr(self, name)).__name__}")
        if self.a.batch_size != self.b.batch_size or self.a.hidden_size != self.b.hidden_size:
            raise ValueError(
                f"PairFeatures: a and b must share (B, H); got a.pooled {tuple(self.a.pooled.shape)} "
                f"and b.pooled {tuple(self.b.pooled.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.a.batch_size

    @property
    def hidden_size(self) -> int:
        return self.a.hidden_size


@dataclass
class HybridFeatures:
    """Both encodings of a sentence pair: each sentence alone (``pair``) and the pair as one sequence (``cross``)."""

    pair: PairFeatures
    cross: SentenceFeatures

    def __post_init__(self):
        if not isinstance(self.pair, PairFeatures) or not isinstance(self.cross, SentenceFeatures):
            raise TypeError(f"HybridFeatures: expected (PairFeatures, SentenceFeatures), got "
                            f"({type(self.pair).__name__}, {type(self.cross).__name__})")
        if self.pair.batch_size != self.cross.batch_size:
            raise ValueError(f"HybridFeatures: pair and cross must share B; got {self.pair.batch_size} "
                             f"and {self.cross.batch_size}")

    # so that code reading a bi-encoded pair's sentence vectors (ranking losses) works unchanged
    @property
    def a(self) -> SentenceFeatures:
        return self.pair.a

    @property
    def b(self) -> SentenceFeatures:
        return self.pair.b

    @property
    def batch_size(self) -> int:
        return self.pair.batch_size

    @property
    def hidden_size(self) -> int:
        return self.pair.hidden_size


Features = Union[SentenceFeatures, PairFeatures, HybridFeatures]


# --- small building blocks ---------------------------------------------------------------------

def _check_int(where: str, name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_prob(where: str, name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{where}: {name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_positive(where: str, name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_choice(where: str, name: str, value: Any, choices) -> str:
    if value not in choices:
        raise ValueError(f"{where}: {name}={value!r} is not valid; expected one of {list(choices)}")
    return value


def make_activation(name: str, where: str = "activation") -> nn.Module:
    _check_choice(where, "activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """``num_layers`` hidden blocks ``Linear(·, width) → activation → dropout``, then ``Linear(·, out_dim)``.

    Dropout is also applied to the input. With SELU the dropouts are ``AlphaDropout`` (keeps the
    self-normalising mean and variance, Klambauer et al. 2017). ``num_layers=0`` is a linear layer.
    """

    def __init__(self, in_dim: int, out_dim: int, num_layers: int = 1, width: Optional[int] = None,
                 activation: str = "relu", dropout: float = 0.1, where: str = "MLP"):
        super().__init__()
        _check_int(where, "num_layers", num_layers, 0)
        width = in_dim if width is None else _check_int(where, "width", width, 1)
        _check_prob(where, "dropout", dropout)
        make_activation(activation, where)
        drop = nn.AlphaDropout if activation == "selu" else nn.Dropout
        layers = [drop(dropout)]
        dim = in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(dim, width), make_activation(activation), drop(dropout)]
            dim = width
        layers.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sbert_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sentence-BERT pair features ``[u; v; |u − v|; u * v]`` (B, 4H) (Reimers & Gurevych 2019)."""
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


class TaskOutput(nn.Module):
    """Maps the head's last layer (B, output_dim) to the task output.

    classification: logits (B, C); binary: logit (B,); regression: ``x`` (identity) or
    ``score_max · sigmoid(x)`` (``transform="sigmoid"``), shape (B,).
    """

    def __init__(self, task_kind: str, num_classes: Optional[int], transform: str = "identity",
                 score_max: float = 5.0, where: str = "head"):
        super().__init__()
        _check_choice(where, "task_kind", task_kind, TASK_KINDS)
        if task_kind == "classification":
            if num_classes is None:
                raise ValueError(f"{where}: task_kind='classification' needs num_classes (e.g. 5 for SST, 2 for CFIMDB)")
            _check_int(where, "num_classes", num_classes, 2)
            self.output_dim = num_classes
        else:
            if num_classes not in (None, 1):
                raise ValueError(f"{where}: task_kind={task_kind!r} has one output; num_classes must be 1 or None, "
                                 f"got {num_classes!r}")
            self.output_dim = 1
        _check_choice(where, "output_transform", transform, OUTPUT_TRANSFORMS)
        if transform != "identity" and task_kind != "regression":
            raise ValueError(
                f"{where}: output_transform={transform!r} only applies to regression; {task_kind} heads return "
                f"logits (the loss applies the sigmoid/softmax)"
            )
        self.task_kind = task_kind
        self.transform = transform
        self.score_max = _check_positive(where, "score_max", score_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, output_dim)
        if self.task_kind == "classification":
            return x  # (B, C)
        x = x.squeeze(-1)  # (B,)
        if self.transform == "sigmoid":
            x = self.score_max * torch.sigmoid(x)
        return x

    def extra_repr(self) -> str:
        return f"task_kind={self.task_kind!r}, output_dim={self.output_dim}, transform={self.transform!r}"


# --- head base ---------------------------------------------------------------------------------

class Head(nn.Module):
    """Base class: ``input_kind`` is ``"sentence"`` or ``"pair"``; ``output_dim``; ``task_kind``."""

    name = "head"
    input_kind = "sentence"

    def __init__(self, hidden_size: int, task_kind: str):
        super().__init__()
        self.hidden_size = _check_int(self.name, "hidden_size", hidden_size, 1)
        self.task_kind = _check_choice(self.name, "task_kind", task_kind, TASK_KINDS)

    @property
    def output_dim(self) -> int:
        """Units of the last layer: C for classification, 1 for binary and regression."""
        return self.output.output_dim

    def _sentence(self, features: Features) -> SentenceFeatures:
        if isinstance(features, PairFeatures):
            raise TypeError(
                f"head {self.name!r} reads one sequence (SentenceFeatures) but got a bi-encoder PairFeatures; "
                f"use pair_encoding='cross' for this task or a pair head ({sorted(PAIR_HEADS)})"
            )
        if not isinstance(features, SentenceFeatures):
            raise TypeError(f"head {self.name!r}: expected SentenceFeatures, got {type(features).__name__}")
        self._check_size(features)
        return features

    def _pair(self, features: Features) -> PairFeatures:
        if isinstance(features, SentenceFeatures):
            raise TypeError(
                f"head {self.name!r} compares two sentences and needs a bi-encoder PairFeatures(a, b); got "
                f"SentenceFeatures (a cross-encoded pair?) - use pair_encoding='bi' or a single-sequence head "
                f"({sorted(SENTENCE_HEADS)})"
            )
        if not isinstance(features, PairFeatures):
            raise TypeError(f"head {self.name!r}: expected PairFeatures, got {type(features).__name__}")
        self._check_size(features)
        return features

    def wrap_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The task loss ``loss(output, target)`` this head trains with (the given one; see :class:`HybridHead`)."""
        return loss_fn

    def _check_size(self, features: Features) -> None:
        if features.hidden_size != self.hidden_size:
            raise ValueError(f"head {self.name!r} was built for hidden size {self.hidden_size}, "
                             f"got features with H = {features.hidden_size}")

    @classmethod
    def from_options(cls, hidden_size: int, task_kind: str, num_classes: Optional[int],
                     shared: Optional[Dict[str, nn.Module]], **options) -> "Head":
        return cls(hidden_size, task_kind, num_classes=num_classes, **options)


# --- single-sequence heads ---------------------------------------------------------------------

class LinearHead(Head):
    """``dropout → Linear(H, output_dim)`` on the pooled vector (the CS224N baseline)."""

    name = "linear"

    def __init__(self, hidden_size, task_kind, num_classes=None, dropout: float = 0.1,
                 output_transform: str = "identity", score_max: float = 5.0):
        super().__init__(hidden_size, task_kind)
        self.output = TaskOutput(task_kind, num_classes, output_transform, score_max, self.name)
        self.dropout = nn.Dropout(_check_prob(self.name, "dropout", dropout))
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
        super().__init__(hidden_size, task_kind)
        self.output = TaskOutput(task_kind, num_classes, output_transform, score_max, self.name)
        self.mlp = MLP(hidden_size, self.output.output_dim, num_layers, width, activation, dropout, self.name)

    def forward(self, features: Features) -> torch.Tensor:
        f = self._sentence(features)
        return self.output(self.mlp(f.pooled))


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
        _check_int(where, "lstm_hidden", lstm_hidden, 1)
        _check_int(where, "lstm_layers", num_layers, 1)
        _check_prob(where, "dropout", dropout)
        self.reduce = _check_choice(where, "reduce", reduce, self.REDUCTIONS)
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
        super().__init__(hidden_size, task_kind)
        self.output = TaskOutput(task_kind, num_classes, output_transform, score_max, self.name)
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
        super().__init__(hidden_size, task_kind)
        self.output = TaskOutput(task_kind, num_classes, output_transform, score_max, self.name)
        _check_int(self.name, "num_layers", num_layers, 1)
        num_heads = _default_heads(hidden_size) if num_heads is None else _check_int(self.name, "num_heads", num_heads, 1)
        if hidden_size % num_heads:
            raise ValueError(f"{self.name}: num_heads={num_heads} must divide hidden_size={hidden_size}")
        ff_dim = 2 * hidden_size if ff_dim is None else _check_int(self.name, "ff_dim", ff_dim, 1)
        _check_prob(self.name, "dropout", dropout)
        self.pooling = _check_choice(self.name, "pooling", pooling, self.POOLINGS)
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


# --- pair heads (bi-encoder) -------------------------------------------------------------------

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
        super().__init__(hidden_size, task_kind)
        self.output = TaskOutput(task_kind, num_classes, output_transform, score_max, self.name)
        width = hidden_size if width is None else width
        self.mlp = MLP(4 * hidden_size, self.output.output_dim, num_layers, width, activation, dropout, self.name)

    def forward(self, features: Features) -> torch.Tensor:
        p = self._pair(features)
        return self.output(self.mlp(sbert_features(p.a.pooled, p.b.pooled)))


class CosineFeatureHead(Head):
    """The "2d+1" head: ``[u; v; cos(u, v)]`` (B, 2H + 1) → dropout → Linear → task output."""

    name = "2d+1"
    input_kind = "pair"

    def __init__(self, hidden_size, task_kind, num_classes=None, dropout: float = 0.1,
                 output_transform: str = "identity", score_max: float = 5.0):
        super().__init__(hidden_size, task_kind)
        self.output = TaskOutput(task_kind, num_classes, output_transform, score_max, self.name)
        self.dropout = nn.Dropout(_check_prob(self.name, "dropout", dropout))
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
        super().__init__(hidden_size, task_kind)
        self.variant = _check_choice(self.name, "variant", variant, self.VARIANTS)
        self.name = variant
        if task_kind == "classification":
            raise ValueError(f"head {variant!r} gives one score per pair; it supports task_kind 'regression' or "
                             f"'binary', not 'classification'")
        if num_classes not in (None, 1):
            raise ValueError(f"head {variant!r}: num_classes must be 1 or None, got {num_classes!r}")
        self.scale = _check_positive(variant, "scale", scale)
        self.sharpness = _check_positive(variant, "sharpness", sharpness)
        if task_kind == "binary":
            w = _check_positive(variant, "binary_scale", binary_scale)
            if not isinstance(binary_threshold, (int, float)) or not -1 <= binary_threshold <= 1:
                raise ValueError(f"{variant}: binary_threshold must be a number in [-1, 1], got {binary_threshold!r}")
            self.logit_scale = nn.Parameter(torch.tensor(float(w)))
            self.logit_bias = nn.Parameter(torch.tensor(-float(w) * float(binary_threshold)))

    def forward(self, features: Features) -> torch.Tensor:
        p = self._pair(features)
        c = F.cosine_similarity(p.a.pooled, p.b.pooled, dim=-1, eps=1e-8)  # (B,)
        if self.task_kind == "binary":
            return self.logit_scale * c + self.logit_bias
        if self.variant == "cosine":
            return self.scale * c
        if self.variant == "cosine_affine":
            return self.scale * (c + 1) / 2
        return self.scale * torch.sigmoid(self.sharpness * c)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, task_kind={self.task_kind!r}, scale={self.scale}"


class SiameseBiLSTMHead(Head):
    """One shared :class:`MaskedBiLSTM` over each sentence's token states (``u = LSTM(a)``,
    ``v = LSTM(b)``, the same weights for both), then ``[u; v; |u − v|; u * v]`` → MLP → task output."""

    name = "siamese_bilstm"
    input_kind = "pair"

    def __init__(self, hidden_size, task_kind, num_classes=None, lstm_hidden: Optional[int] = None,
                 lstm_layers: int = 1, reduce: str = "last", num_layers: int = 0, width: Optional[int] = None,
                 activation: str = "relu", dropout: float = 0.1, output_transform: str = "identity",
                 score_max: float = 5.0):
        super().__init__(hidden_size, task_kind)
        self.output = TaskOutput(task_kind, num_classes, output_transform, score_max, self.name)
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


class RelationalLayer(nn.Module):
    """A relation module shared by several pair tasks: ``r(u, v) = MLP([u; v; |u − v|; u * v])`` (B, width).

    ``num_layers`` blocks ``Linear → activation → dropout`` (input dropout first). One instance can
    serve Quora and STS at once, so both tasks train the same relation parameters::

        rel = RelationalLayer(hidden_size=384, width=256)
        quora_head = build_head("relational", 384, "binary", relational=rel)
        sts_head = build_head("relational", 384, "regression", relational=rel)
        assert quora_head.relational is sts_head.relational

    From config dicts, pass one ``shared`` dict to every :func:`build_head` call: heads with the same
    ``share_as`` key (default ``"relational"``) get the same layer::

        shared = {}
        heads = {t: build_head("relational", 384, kind, shared=shared) for t, kind in
                 (("quora", "binary"), ("sts", "regression"))}

    (``model.parameters()`` lists a shared parameter once; build optimizer groups from it.)
    """

    OPTIONS = ("width", "num_layers", "activation", "dropout")

    def __init__(self, hidden_size: int, width: Optional[int] = None, num_layers: int = 1,
                 activation: str = "relu", dropout: float = 0.1):
        super().__init__()
        where = "RelationalLayer"
        self.hidden_size = _check_int(where, "hidden_size", hidden_size, 1)
        width = hidden_size if width is None else _check_int(where, "width", width, 1)
        _check_int(where, "num_layers", num_layers, 1)
        _check_prob(where, "dropout", dropout)
        make_activation(activation, where)
        drop = nn.AlphaDropout if activation == "selu" else nn.Dropout
        layers = [drop(dropout)]
        dim = 4 * hidden_size
        for _ in range(num_layers):
            layers += [nn.Linear(dim, width), make_activation(activation), drop(dropout)]
            dim = width
        self.net = nn.Sequential(*layers)
        self.out_dim = width
        self.options = {"width": width, "num_layers": num_layers, "activation": activation, "dropout": float(dropout)}

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.net(sbert_features(u, v))  # (B, width)


class RelationalHead(Head):
    """Task head on a (possibly shared) :class:`RelationalLayer`: ``Linear(r(u, v))`` → task output.

    ``relational``: a layer to use (shared by passing the same instance to several heads); otherwise
    one is built from ``width``, ``num_layers``, ``activation``, ``dropout``. Through
    :func:`build_head`, ``share_as`` (default ``"relational"``, ``None`` = private) names the entry of
    the ``shared`` dict the layer is stored under.
    """

    name = "relational"
    input_kind = "pair"

    def __init__(self, hidden_size, task_kind, num_classes=None, relational: Optional[RelationalLayer] = None,
                 width: Optional[int] = None, num_layers: int = 1, activation: str = "relu", dropout: float = 0.1,
                 output_transform: str = "identity", score_max: float = 5.0):
        super().__init__(hidden_size, task_kind)
        self.output = TaskOutput(task_kind, num_classes, output_transform, score_max, self.name)
        if relational is None:
            relational = RelationalLayer(hidden_size, width, num_layers, activation, dropout)
        elif not isinstance(relational, RelationalLayer):
            raise TypeError(f"{self.name}: relational must be a RelationalLayer, got {type(relational).__name__}")
        elif relational.hidden_size != hidden_size:
            raise ValueError(f"{self.name}: the shared RelationalLayer was built for hidden size "
                             f"{relational.hidden_size}, this head for {hidden_size}")
        self.relational = relational
        self.proj = nn.Linear(relational.out_dim, self.output.output_dim)

    def forward(self, features: Features) -> torch.Tensor:
        p = self._pair(features)
        return self.output(self.proj(self.relational(p.a.pooled, p.b.pooled)))

    @classmethod
    def from_options(cls, hidden_size, task_kind, num_classes, shared, share_as: Optional[str] = "relational",
                     relational: Optional[RelationalLayer] = None, **options) -> "RelationalHead":
        layer_opts = {k: options.pop(k) for k in RelationalLayer.OPTIONS if k in options}
        if relational is not None:
            if layer_opts:
                raise ValueError(f"head 'relational': got a RelationalLayer instance and layer options "
                                 f"{sorted(layer_opts)}; give one or the other")
            return cls(hidden_size, task_kind, num_classes, relational=relational, **options)
        if shared is None or share_as is None:
            return cls(hidden_size, task_kind, num_classes, **layer_opts, **options)
        if share_as in shared:
            layer = shared[share_as]
            if not isinstance(layer, RelationalLayer):
                raise TypeError(f"head 'relational': shared[{share_as!r}] is a {type(layer).__name__}, "
                                f"not a RelationalLayer")
            wanted = dict(layer_opts)
            if wanted.get("width", 0) is None:
                wanted["width"] = hidden_size
            if "dropout" in wanted and isinstance(wanted["dropout"], (int, float)):
                wanted["dropout"] = float(wanted["dropout"])
            if any(layer.options[k] != wanted[k] for k in wanted):
                raise ValueError(f"head 'relational': share_as={share_as!r} already holds a layer with options "
                                 f"{layer.options}, which conflict with {layer_opts}")
        else:
            layer = shared[share_as] = RelationalLayer(hidden_size, **layer_opts)
        return cls(hidden_size, task_kind, num_classes, relational=layer, **options)


# --- bi + cross ---------------------------------------------------------------------------------

def upcast(output: torch.Tensor) -> torch.Tensor:
    """A half-precision (fp16/bf16) output in fp32; fp32 and fp64 unchanged."""
    return output.float() if output.dtype in (torch.float16, torch.bfloat16) else output


class HybridHead(Head):
    """A two-member ensemble inside one model: a bi-encoder head and a cross-encoder head (``pair_encoding: hybrid``).

    Output ``w · bi(u, v) + (1 − w) · cross([CLS] a [SEP] b [SEP])``: logits for Quora, scores for STS.
    The members are trained as separate predictors: :meth:`wrap_loss` makes the task loss
    ``½ (ℓ(bi, y) + ℓ(cross, y))``, not ``ℓ(output, y)``, so that each member fits the labels on its
    own and their errors stay partly independent (independent training of ensemble members beats
    training their average; Webb et al. 2020, "To Ensemble or Not Ensemble"). On STS dev, averaging a
    separately trained bi-encoder (0.879) and cross-encoder (0.854) gave 0.882 at w = 0.5 and 0.884
    at w = 0.7 (benchmarks/RESULTS.md).
    """

    name = "hybrid"
    input_kind = "hybrid"

    def __init__(self, bi: Head, cross: Head, weight: float = 0.5):
        super().__init__(bi.hidden_size, bi.task_kind)
        if bi.input_kind != "pair":
            raise ValueError(f"head 'hybrid': the bi-encoder member must be a pair head ({sorted(PAIR_HEADS)}), "
                             f"got {bi.name!r}")
        if cross.input_kind != "sentence":
            raise ValueError(f"head 'hybrid': the cross-encoder member must be a single-sequence head "
                             f"({sorted(SENTENCE_HEADS)}), got {cross.name!r}")
        if cross.task_kind != bi.task_kind or cross.output_dim != bi.output_dim:
            raise ValueError(f"head 'hybrid': members disagree: bi {bi.task_kind}/{bi.output_dim} outputs, "
                             f"cross {cross.task_kind}/{cross.output_dim}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise ValueError(f"head 'hybrid': weight must be a number in [0, 1], got {weight!r}")
        self.bi, self.cross, self.weight = bi, cross, float(weight)
        self._members: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # (output, bi, cross)

    def forward(self, features: Features) -> torch.Tensor:
        if not isinstance(features, HybridFeatures):
            raise TypeError(f"head 'hybrid' needs HybridFeatures (pair_encoding='hybrid'), got {type(features).__name__}")
        self._check_size(features)
        out_bi = upcast(self.bi(features.pair))  # (B,) or (B, C); fp32 under autocast, as the model's output
        out_cross = upcast(self.cross(features.cross))  # same shape
        output = self.weight * out_bi + (1.0 - self.weight) * out_cross
        self._members = (output, out_bi, out_cross)
        return output

    def wrap_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``loss(output, target)`` for this head's latest ``output``: the mean of its members' losses."""
        head = self

        def member_loss(output: torch.Tensor, target: torch.Tensor, **extra) -> torch.Tensor:
            if head._members is None or head._members[0] is not output:
                raise RuntimeError("head 'hybrid': the loss must be computed on the output of this head's latest "
                                   "forward (its members' outputs are kept only for that one)")
            _, out_bi, out_cross = head._members
            head._members = None  # free the graph references; the next forward sets them again
            return 0.5 * (loss_fn(out_bi, target, **extra) + loss_fn(out_cross, target, **extra))

        return member_loss

    @property
    def output_dim(self) -> int:
        return self.bi.output_dim

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


# --- registry ----------------------------------------------------------------------------------

HEADS: Dict[str, Type[Head]] = {
    "linear": LinearHead,
    "mlp": MLPHead,
    "bilstm": BiLSTMHead,
    "transformer": TransformerHead,
    "sbert": SBERTHead,
    "2d+1": CosineFeatureHead,
    "cosine": CosineHead,
    "cosine_affine": CosineHead,
    "cosine_sigmoid": CosineHead,
    "siamese_bilstm": SiameseBiLSTMHead,
    "relational": RelationalHead,
}
SENTENCE_HEADS = tuple(n for n, c in HEADS.items() if c.input_kind == "sentence")
PAIR_HEADS = tuple(n for n, c in HEADS.items() if c.input_kind == "pair")
_FIXED = ("self", "hidden_size", "task_kind", "num_classes")


def head_options(name: str) -> Tuple[str, ...]:
    """The option names ``build_head`` accepts for head ``name``."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid heads: {sorted(HEADS)}")
    cls = HEADS[name]
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in _FIXED]
    if cls is CosineHead:
        names.remove("variant")  # chosen by the registry name
        if name != "cosine_sigmoid":
            names.remove("sharpness")
    if cls is RelationalHead:
        names.append("share_as")
    return tuple(names)


def build_head(name: str, hidden_size: int, task_kind: str, *, num_classes: Optional[int] = None,
               shared: Optional[Dict[str, nn.Module]] = None, **options) -> Head:
    """Build head ``name`` (a key of :data:`HEADS`) for hidden size ``hidden_size``.

    ``task_kind``: ``"classification"`` (give ``num_classes``), ``"binary"`` or ``"regression"``.
    ``options`` are the head's constructor options (see :func:`head_options`); an unknown one raises
    ``ValueError`` naming it and listing the valid ones. ``shared`` is a dict the caller passes to
    every head of one model, through which heads share modules (``relational``).
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid heads: {sorted(HEADS)}")
    if task_kind not in TASK_KINDS:
        raise ValueError(f"head {name!r}: unknown task_kind {task_kind!r}; valid kinds: {list(TASK_KINDS)}")
    valid = head_options(name)
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ValueError(f"head {name!r}: unknown option {unknown[0]!r}"
                         f"{' (and ' + str(unknown[1:]) + ')' if len(unknown) > 1 else ''}; valid options: {sorted(valid)}")
    cls = HEADS[name]
    if cls is CosineHead:
        options["variant"] = name
    return cls.from_options(hidden_size, task_kind, num_classes, shared, **options)
