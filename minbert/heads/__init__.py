"""Task heads, one family per file behind one interface (:class:`~minbert.heads.base.Head`).

``build_head(name, hidden_size, task_kind, num_classes=..., shared=..., **options)`` builds a head
by its name in :data:`HEADS`; the model only calls the :class:`Head` interface
(``forward(features) -> output``, ``wrap_loss``). Unknown names or options fail with a message
naming the key and listing the valid ones (:func:`head_options`).

==================  ==================================================================  ==============
name                head                                                                reads
==================  ==================================================================  ==============
linear              dropout → Linear on the pooled vector (the CS224N baseline)         one sequence
mlp                 MLP on the pooled vector                                            one sequence
bilstm              BiLSTM over the token states (+ the pooled vector)                  one sequence
transformer         a small Transformer encoder over the token states                   one sequence
sbert               ``[u; v; |u − v|; u * v]`` → Linear or MLP (Sentence-BERT)         bi-encoded pair
2d+1                ``[u; v; cos(u, v)]`` → Linear                                      bi-encoded pair
cosine, cosine_*    ``5·cos(u, v)`` and variants (no parameters for regression)         bi-encoded pair
siamese_bilstm      one BiLSTM over each sentence's tokens, then SBERT features → MLP   bi-encoded pair
relational          a relation module (shareable between tasks) → Linear               bi-encoded pair
==================  ==================================================================  ==============

Single-sequence heads (:data:`SENTENCE_HEADS`) also serve cross-encoded pairs. Pair heads
(:data:`PAIR_HEADS`) need a bi-encoder :class:`PairFeatures`, with ``u = a.pooled`` and
``v = b.pooled`` unless they read tokens. :class:`HybridHead` (``pair_encoding: hybrid``) combines
one of each; the model builds it around two registered heads.

A new head is one file with a :class:`Head` subclass plus one line in :data:`HEADS`.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

import torch.nn as nn

from ..tasks import PROBLEM_TYPES
from .base import (
    FIXED_ARGUMENTS,
    OUTPUT_TRANSFORMS,
    Features,
    Head,
    HybridFeatures,
    PairFeatures,
    SentenceFeatures,
    TaskOutput,
    upcast,
)
from .bilstm import BiLSTMHead, MaskedBiLSTM, SiameseBiLSTMHead
from .cosine import CosineFeatureHead, CosineHead
from .hybrid import HybridHead
from .layers import ACTIVATIONS, MLP, make_activation, sbert_features
from .linear import LinearHead, MLPHead
from .relational import RelationalHead, RelationalLayer
from .sbert import SBERTHead
from .transformer import TransformerHead

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


def head_options(name: str) -> Tuple[str, ...]:
    """The option names ``build_head`` accepts for head ``name``."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid heads: {sorted(HEADS)}")
    return HEADS[name].option_names(name)


def build_head(name: str, hidden_size: int, task_kind: str, *, num_classes: Optional[int] = None,
               shared: Optional[Dict[str, nn.Module]] = None, **options) -> Head:
    """Build head ``name`` (a key of :data:`HEADS`) for hidden size ``hidden_size``.

    ``task_kind``: a problem type of :mod:`minbert.tasks`: ``"single_label_classification"`` (give
    ``num_classes``), ``"binary_classification"`` or ``"regression"``.
    ``options`` are the head's constructor options (see :func:`head_options`); an unknown one raises
    ``ValueError`` naming it and listing the valid ones. ``shared`` is a dict the caller passes to
    every head of one model, through which heads share modules (``relational``).
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid heads: {sorted(HEADS)}")
    if task_kind not in PROBLEM_TYPES:
        raise ValueError(f"head {name!r}: unknown task_kind {task_kind!r}; valid kinds: {list(PROBLEM_TYPES)}")
    valid = head_options(name)
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ValueError(f"head {name!r}: unknown option {unknown[0]!r}"
                         f"{' (and ' + str(unknown[1:]) + ')' if len(unknown) > 1 else ''}; valid options: {sorted(valid)}")
    return HEADS[name].from_options(name, hidden_size, task_kind, num_classes, shared, **options)


__all__ = [
    "HEADS", "SENTENCE_HEADS", "PAIR_HEADS", "OUTPUT_TRANSFORMS", "ACTIVATIONS", "FIXED_ARGUMENTS",
    "build_head", "head_options", "Head", "TaskOutput", "Features", "SentenceFeatures", "PairFeatures",
    "HybridFeatures", "upcast", "MLP", "make_activation", "sbert_features", "MaskedBiLSTM", "LinearHead", "MLPHead",
    "BiLSTMHead", "SiameseBiLSTMHead", "TransformerHead", "SBERTHead", "CosineFeatureHead", "CosineHead",
    "RelationalLayer", "RelationalHead", "HybridHead",
]
