"""Collation: a list of :class:`~minbert.data.spec.Example` of one task -> a :class:`Batch` of tensors."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..tasks import Task, get_task
from .example import Example

__all__ = ["Batch", "Collator", "make_collate"]


@dataclass
class Batch:
    """A collated batch of one task.

    ``input_ids``, ``attention_mask``, ``token_type_ids``: (B, L) long tensors, the single sentence or
    the cross-encoded pair (or the first sentence of a bi-encoded pair). ``input_ids_b`` etc.: (B, L_b)
    tensors of the second sentence for bi-encoded pairs, else None. ``labels``: (B,) long for
    classification, float32 for regression, None for unlabelled data.
    """

    task: str
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    token_type_ids: torch.Tensor  # (B, L)
    labels: Optional[torch.Tensor] = None  # (B,)
    ids: List[str] = field(default_factory=list)
    input_ids_b: Optional[torch.Tensor] = None  # (B, L_b)
    attention_mask_b: Optional[torch.Tensor] = None  # (B, L_b)
    token_type_ids_b: Optional[torch.Tensor] = None  # (B, L_b)
    swapped: Optional["Batch"] = None  # the same pairs with sentences swapped (symmetric evaluation)
    cross: Optional["Batch"] = None  # hybrid pair encoding: the same pairs cross-encoded (B, L_x)

    @property
    def size(self) -> int:
        """Number of examples (B)."""
        return int(self.input_ids.shape[0])

    def __len__(self) -> int:
        return self.size

    @property
    def is_bi_encoded(self) -> bool:
        return self.input_ids_b is not None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor moved to ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, Batch)):
                value = value.to(device, non_blocking=non_blocking)
            elif isinstance(value, list):
                value = list(value)
            moved[f.name] = value
        return Batch(**moved)


_ENCODING_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class Collator:
    """Callable turning a list of :class:`Example` of one task into a :class:`Batch` (picklable)."""

    def __init__(self, tokenizer, task: Union[str, Task], max_length: int, pair_encoding: str = "cross",
                 symmetric: bool = False, cross_max_length: Optional[int] = None):
        self.spec = get_task(task)
        if symmetric and not self.spec.is_pair:
            raise ValueError(f"make_collate: symmetric needs a pair task, got {self.spec.name!r}")
        self.symmetric = bool(symmetric)
        if pair_encoding not in ("cross", "bi", "hybrid"):
            raise ValueError(f"make_collate: pair_encoding must be 'cross', 'bi' or 'hybrid', got {pair_encoding!r}")
        if cross_max_length is None:
            cross_max_length = 2 * max_length if isinstance(max_length, int) else max_length
        for name, value in (("max_length", max_length), ("cross_max_length", cross_max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"make_collate: {name} must be an integer >= 2, got {value!r}")
        self.cross_max_length = cross_max_length
        if not callable(tokenizer):
            raise TypeError(f"make_collate: tokenizer must be callable, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pair_encoding = pair_encoding if self.spec.is_pair else "single"

    def _encode(self, texts: List[str], pairs: Optional[List[str]] = None,
                max_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
        max_length = max_length or self.max_length
        enc = self.tokenizer(texts, pairs, max_length=max_length) if pairs is not None else \
            self.tokenizer(texts, max_length=max_length)
        for key in _ENCODING_KEYS:
            if key not in enc:
                raise KeyError(f"collate ({self.spec.name}): the tokenizer output has no {key!r}")
            t = enc[key]
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != len(texts):
                raise ValueError(f"collate ({self.spec.name}): tokenizer output {key!r} must be a "
                                 f"(B={len(texts)}, L) tensor, "
                                 f"got {getattr(t, 'shape', type(t).__name__)}")
        return {k: enc[k].long() for k in _ENCODING_KEYS}

    def __call__(self, examples: Sequence[Example]) -> Batch:
        spec = self.spec
        if len(examples) == 0:
            raise ValueError(f"collate ({spec.name}): empty list of examples")
        for ex in examples:
            if ex.task != spec.name:
                raise ValueError(f"collate ({spec.name}): example {ex.id!r} belongs to task {ex.task!r}")
            if spec.is_pair and ex.text_b is None:
                raise ValueError(f"collate ({spec.name}): example {ex.id!r} has no second sentence")
        texts_a = [ex.text_a for ex in examples]
        texts_b = [ex.text_b for ex in examples]
        kw = {}
        if self.pair_encoding == "cross":
            enc = self._encode(texts_a, texts_b)
        else:
            enc = self._encode(texts_a)
            if self.pair_encoding in ("bi", "hybrid"):
                kw = {f"{k}_b": v for k, v in self._encode(texts_b).items()}
        n_labelled = sum(ex.label is not None for ex in examples)
        if n_labelled == 0:
            labels = None
        elif n_labelled < len(examples):
            raise ValueError(f"collate ({spec.name}): {len(examples) - n_labelled} of {len(examples)} "
                             "examples have no label")
        elif spec.is_regression:
            labels = torch.tensor([float(ex.label) for ex in examples], dtype=torch.float32)
        else:
            labels = torch.tensor([int(ex.label) for ex in examples], dtype=torch.long)
        ids = [ex.id for ex in examples]
        if self.pair_encoding == "hybrid":  # the same pairs as one sequence, for the cross member
            kw["cross"] = Batch(task=spec.name, labels=labels, ids=ids,
                                **self._encode(texts_a, texts_b, self.cross_max_length))
        swapped = None
        if self.symmetric:  # the same pairs in the other order, for symmetric evaluation
            swapped = self._plain([replace(ex, text_a=ex.text_b, text_b=ex.text_a) for ex in examples])
        return Batch(task=spec.name, labels=labels, ids=ids, swapped=swapped, **enc, **kw)

    def sentences(self, texts: Sequence[str], ids: Sequence[str]) -> Batch:
        """An unlabelled :class:`Batch` of this task holding ``texts`` as single sentences (one
        sequence each, at most ``max_length`` tokens): sentences a regularizer encodes with the
        task's model besides its examples (supervised SimCSE's hard negatives)."""
        if len(texts) == 0 or len(texts) != len(ids):
            raise ValueError(f"collate ({self.spec.name}): sentences needs as many ids as texts (at least one), "
                             f"got {len(texts)} texts and {len(ids)} ids")
        return Batch(task=self.spec.name, ids=list(ids), **self._encode(list(texts)))

    def _plain(self, examples: Sequence[Example]) -> Batch:
        plain = Collator(self.tokenizer, self.spec, self.max_length,
                         "cross" if self.pair_encoding == "single" else self.pair_encoding,
                         cross_max_length=self.cross_max_length)
        return plain(examples)


def make_collate(tokenizer, task: Union[str, Task], max_length: int, pair_encoding: str = "cross",
                 symmetric: bool = False, cross_max_length: Optional[int] = None) -> Collator:
    """Collate function for one task: dynamic padding to the longest row, truncation at ``max_length``.

    ``pair_encoding`` applies to pair tasks: ``"cross"`` encodes ``[CLS] a [SEP] b [SEP]`` with
    token types 0/1 in one sequence; ``"bi"`` encodes a and b separately (``*_b`` tensors);
    ``"hybrid"`` does both: a and b separately, and the pair as one sequence of at most
    ``cross_max_length`` tokens (default ``2 * max_length``) in ``Batch.cross``.
    ``symmetric=True`` (pair tasks) also collates every pair in the other order into
    ``Batch.swapped``, for evaluation that averages both orders.
    """
    return Collator(tokenizer, task, max_length, pair_encoding, symmetric, cross_max_length)

