"""The head interface: encoder features in, task output out.

Every head is a :class:`Head` (an ``nn.Module``) whose ``forward(features)`` takes

* :class:`SentenceFeatures`: one sequence per example (a single sentence, or a sentence pair
  encoded jointly by a *cross-encoder*): token states, mask and pooled vector;
* :class:`PairFeatures`: a *bi-encoder* pair, each sentence encoded alone (``a`` and ``b``);
* :class:`HybridFeatures`: both encodings of a pair (the hybrid head's two members),

and returns, by ``task_kind`` (the task's problem type, :data:`minbert.tasks.PROBLEM_TYPES`):

* ``"single_label_classification"``: logits (B, C) (SST-5: C = 5, CFIMDB: C = 2),
* ``"binary_classification"``: one logit per example (B,) (Quora; the loss is BCE-with-logits),
* ``"regression"``: one score per example (B,) (STS, 0-5).

Each head ends in ``output_dim`` units (C, or 1 for binary and regression) followed by the task's
output transform (:class:`TaskOutput`): identity for logits; for regression either identity or
``score_max · sigmoid(x)`` (``output_transform="sigmoid"``), which keeps scores inside (0, score_max).

A head class declares ``name`` and ``input_kind`` (``"sentence"``, ``"pair"`` or ``"hybrid"``) and
reads its features through :meth:`Head._sentence` or :meth:`Head._pair`, which fail with a message
naming the right encoding. :meth:`Head.option_names` and :meth:`Head.from_options` are what the
registry (:func:`minbert.heads.build_head`) calls; a head overrides them only when its options are
not exactly its constructor's (the cosine variants, the shared relational layer).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..pooling import check_hidden_and_mask, pool
from ..tasks import PROBLEM_TYPES, REGRESSION, SINGLE_LABEL

OUTPUT_TRANSFORMS = ("identity", "sigmoid")
# constructor arguments build_head sets itself; every other constructor argument is an option
FIXED_ARGUMENTS = ("self", "hidden_size", "task_kind", "num_classes")


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


# --- shared checks ----------------------------------------------------------------------------

def check_int(where: str, name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_prob(where: str, name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{where}: {name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_positive(where: str, name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_choice(where: str, name: str, value: Any, choices) -> str:
    if value not in choices:
        raise ValueError(f"{where}: {name}={value!r} is not valid; expected one of {list(choices)}")
    return value


# --- task output -------------------------------------------------------------------------------

class TaskOutput(nn.Module):
    """Maps the head's last layer (B, output_dim) to the task output.

    single-label classification: logits (B, C); binary: logit (B,); regression: ``x`` (identity) or
    ``score_max · sigmoid(x)`` (``transform="sigmoid"``), shape (B,).
    """

    def __init__(self, task_kind: str, num_classes: Optional[int], transform: str = "identity",
                 score_max: float = 5.0, where: str = "head"):
        super().__init__()
        check_choice(where, "task_kind", task_kind, PROBLEM_TYPES)
        if task_kind == SINGLE_LABEL:
            if num_classes is None:
                raise ValueError(f"{where}: task_kind={SINGLE_LABEL!r} needs num_classes (e.g. 5 for SST, 2 for CFIMDB)")
            check_int(where, "num_classes", num_classes, 2)
            self.output_dim = num_classes
        else:
            if num_classes not in (None, 1):
                raise ValueError(f"{where}: task_kind={task_kind!r} has one output; num_classes must be 1 or None, "
                                 f"got {num_classes!r}")
            self.output_dim = 1
        check_choice(where, "output_transform", transform, OUTPUT_TRANSFORMS)
        if transform != "identity" and task_kind != REGRESSION:
            raise ValueError(
                f"{where}: output_transform={transform!r} only applies to regression; {task_kind} heads return "
                f"logits (the loss applies the sigmoid/softmax)"
            )
        self.task_kind = task_kind
        self.transform = transform
        self.score_max = check_positive(where, "score_max", score_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, output_dim)
        if self.task_kind == SINGLE_LABEL:
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

    def __init__(self, hidden_size: int, task_kind: str, num_classes: Optional[int] = None,
                 output_transform: str = "identity", score_max: float = 5.0, task_output: bool = True):
        """``task_output``: end in a :class:`TaskOutput` (``self.output``) built from ``num_classes``,
        ``output_transform`` and ``score_max``; ``False`` for heads that make their output themselves."""
        super().__init__()
        self.hidden_size = check_int(self.name, "hidden_size", hidden_size, 1)
        self.task_kind = check_choice(self.name, "task_kind", task_kind, PROBLEM_TYPES)
        if task_output:
            self.output = TaskOutput(task_kind, num_classes, output_transform, score_max, self.name)

    @property
    def output_dim(self) -> int:
        """Units of the last layer: C for classification, 1 for binary and regression."""
        return self.output.output_dim

    def _sentence(self, features: Features) -> SentenceFeatures:
        if isinstance(features, PairFeatures):
            raise TypeError(
                f"head {self.name!r} reads one sequence (SentenceFeatures) but got a bi-encoder PairFeatures; "
                f"use pair_encoding='cross' for this task or a pair head ({sorted(registered_names('pair'))})"
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
                f"({sorted(registered_names('sentence'))})"
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
    def option_names(cls, name: str) -> Tuple[str, ...]:
        """The options :func:`~minbert.heads.build_head` accepts for this class registered as ``name``:
        its constructor's arguments but :data:`FIXED_ARGUMENTS`."""
        return tuple(p for p in inspect.signature(cls.__init__).parameters if p not in FIXED_ARGUMENTS)

    @classmethod
    def from_options(cls, name: str, hidden_size: int, task_kind: str, num_classes: Optional[int],
                     shared: Optional[Dict[str, nn.Module]], **options) -> "Head":
        """The head :func:`~minbert.heads.build_head` builds for registry name ``name`` (``options``
        are checked against :meth:`option_names`; ``shared`` holds modules heads share by key)."""
        return cls(hidden_size, task_kind, num_classes=num_classes, **options)


def registered_names(input_kind: str) -> Tuple[str, ...]:
    """Registry names of the heads that read ``input_kind`` features (for error messages)."""
    from . import PAIR_HEADS, SENTENCE_HEADS

    return PAIR_HEADS if input_kind == "pair" else SENTENCE_HEADS



def upcast(output: torch.Tensor) -> torch.Tensor:
    """A half-precision (fp16/bf16) output in fp32; fp32 and fp64 unchanged."""
    return output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
