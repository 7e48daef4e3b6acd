"""Training losses for the multitask trainer.

Task losses, called as ``loss(output, target)``:

* :func:`cross_entropy` (SST, CFIMDB): logits (B, C), integer labels (B,).
* :func:`bce_with_logits` (Quora): logits (B,), 0/1 labels (B,).
* :func:`mse` (STS): scores (B,), gold similarities (B,).
* :func:`cosent` (STS): the same inputs, a ranking loss over all ordered pairs of the batch.

Embedding losses, on sentence vectors from a bi-encoder:

* :func:`cosine_embedding` ``(u, v, target)``: pull paraphrases together, push others below a margin.
* :func:`simcse_unsup` ``(z1, z2)``: unsupervised SimCSE, two dropout views of the same sentences.
* :func:`simcse_sup` ``(anchor, positive, hard_negative)``: supervised SimCSE (NLI triples).
* :func:`mnrl` ``(anchor, positive)``: multiple-negatives ranking loss on paraphrase pairs.

All reduce to a scalar mean. :func:`build_loss` builds a :class:`Loss` (a callable that also
records which inputs it takes, ``Loss.inputs``) from a config name and options; :data:`LOSSES`
is the registry.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .kernels._dispatch import check_same_device, check_same_dtype, check_tensor

_EPS = 1e-8


# --- validation helpers ------------------------------------------------------------------------

def _check_vector_target(op: str, output: torch.Tensor, target: torch.Tensor, out_name: str = "output") -> None:
    check_tensor(output, out_name, op, shape=(None,), dims="(B,)", floating=True)
    check_tensor(target, "target", op, shape=(output.shape[0],), dims="(B,)", device=output.device)


def _check_embeddings(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """Sentence embeddings: floating (B, D), same B and D, dtype and device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    check_tensor(first, first_name, op, shape=(None, None), dims="(B, D)", floating=True)
    for name, t in items[1:]:
        check_tensor(t, name, op, shape=tuple(first.shape), dims="(B, D)", floating=True)
    check_same_dtype(op, **dict(items))
    check_same_device(op, **dict(items))
    if first.shape[0] == 0:
        raise ValueError(f"{op}: argument '{first_name}' has an empty batch (B = 0)")


def _check_positive(op: str, name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{op}: argument '{name}' must be a finite number > 0, got {value!r}")
    return float(value)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``cos(a_i, b_j)`` for all pairs: (B, D), (N, D) -> (B, N)."""
    return F.normalize(a, dim=-1, eps=_EPS) @ F.normalize(b, dim=-1, eps=_EPS).transpose(0, 1)


# --- task losses -------------------------------------------------------------------------------

def cross_entropy(output: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Softmax cross-entropy ``−(1/B) Σ_i log softmax(z_i)_{y_i}``; logits (B, C), labels (B,) in [0, C)."""
    op = "cross_entropy"
    check_tensor(output, "output", op, shape=(None, None), dims="(B, C)", floating=True)
    check_tensor(target, "target", op, shape=(output.shape[0],), dims="(B,)", device=output.device,
                 dtypes=(torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))
    if target.numel():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= output.shape[1]:
            raise ValueError(f"{op}: target holds class {lo if lo < 0 else hi}, outside [0, C) = [0, {output.shape[1]})")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {label_smoothing!r}")
    return F.cross_entropy(output, target.long(), label_smoothing=label_smoothing)


def bce_with_logits(output: torch.Tensor, target: torch.Tensor, pos_weight: Optional[float] = None) -> torch.Tensor:
    """Binary cross-entropy on logits: ``−(1/B) Σ_i [w y_i log σ(z_i) + (1 − y_i) log(1 − σ(z_i))]``.

    ``output``: logits (B,); ``target``: 0/1 labels (B,), any real or integer dtype (Quora writes 0.0/1.0),
    soft labels in [0, 1] allowed. ``pos_weight`` ``w`` weighs the positive class.
    """
    op = "bce_with_logits"
    _check_vector_target(op, output, target)
    if target.numel() and (target.is_complex() or bool((target < 0).any()) or bool((target > 1).any())):
        raise ValueError(f"{op}: target must hold labels in [0, 1], "
                         f"got values in [{float(target.min())}, {float(target.max())}]")
    pw = None
    if pos_weight is not None:
        pw = torch.tensor(_check_positive(op, "pos_weight", pos_weight), dtype=output.dtype, device=output.device)
    return F.binary_cross_entropy_with_logits(output, target.to(output.dtype), pos_weight=pw)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error ``(1/B) Σ_i (ŷ_i − y_i)²``; scores (B,), gold (B,)."""
    op = "mse"
    _check_vector_target(op, output, target)
    if not target.is_floating_point():
        raise TypeError(f"mse: argument 'target' must be a floating-point tensor, got dtype {target.dtype}")
    return F.mse_loss(output, target.to(output.dtype))


def cosent(output: torch.Tensor, target: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """CoSENT (Su 2022; Sentence-Transformers' ``CoSENTLoss``), a ranking loss for similarity scores:
    every pair of examples whose gold scores are ordered ``y_i > y_j`` should have ``ŷ_i > ŷ_j``::

        L = log(1 + Σ_{(i, j): y_i > y_j} exp(λ (ŷ_j − ŷ_i)))

    ``output``: predicted similarities (B,), e.g. cosines; ``target``: gold scores (B,). Only the
    order of the targets matters, as for a correlation metric. ``scale`` is λ in the units of
    ``output``: 20 for cosines, 4 for the ``cosine`` head's 5·cos.
    """
    op = "cosent"
    _check_vector_target(op, output, target)
    if not target.is_floating_point():
        raise TypeError(f"cosent: argument 'target' must be a floating-point tensor, got dtype {target.dtype}")
    lam = _check_positive(op, "scale", scale)
    diff = lam * (output[None, :] - output[:, None])  # (B, B): [i, j] = λ (ŷ_j − ŷ_i)
    ordered = target[:, None] > target[None, :]  # (B, B): y_i > y_j
    terms = torch.cat([diff.new_zeros(1), diff[ordered]])  # the 1 inside the log is exp(0)
    return torch.logsumexp(terms, dim=0)


# --- embedding losses --------------------------------------------------------------------------

def cosine_labels(target: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
    """±1 labels for :func:`cosine_embedding`.

    With ``threshold``: ``+1`` where ``target ≥ threshold`` else ``−1`` (e.g. STS scores, threshold 2.5).
    Without: ``target`` must already be ±1, or 0/1 paraphrase labels (mapped ``y ↦ 2y − 1``).
    """
    op = "cosine_embedding"
    if threshold is not None:
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
            raise ValueError(f"{op}: threshold must be a finite number, got {threshold!r}")
        return torch.where(target >= threshold, 1, -1).to(torch.int64)
    values = set(torch.unique(target).tolist()) if target.numel() else set()
    if values <= {-1, 1}:
        return target.to(torch.int64)
    if values <= {0, 1}:
        return (2 * target - 1).to(torch.int64)
    raise ValueError(
        f"{op}: target must hold ±1 or 0/1 labels, got values {sorted(values)[:6]}; pass threshold= to "
        f"binarise scores (e.g. threshold=2.5 for STS)"
    )


def cosine_embedding(u: torch.Tensor, v: torch.Tensor, target: torch.Tensor, margin: float = 0.0,
                     threshold: Optional[float] = None) -> torch.Tensor:
    """Cosine embedding loss (as ``torch.nn.CosineEmbeddingLoss``), mean over the batch::

        ℓ_i = 1 − cos(u_i, v_i)                 if y_i = +1
        ℓ_i = max(0, cos(u_i, v_i) − margin)    if y_i = −1

    ``u``, ``v``: (B, D). ``target`` (B,): ±1, 0/1 paraphrase labels, or scores with ``threshold``
    (see :func:`cosine_labels`). ``margin`` ∈ [−1, 1].
    """
    op = "cosine_embedding"
    _check_embeddings(op, u=u, v=v)
    check_tensor(target, "target", op, shape=(u.shape[0],), dims="(B,)", device=u.device)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not -1 <= margin <= 1:
        raise ValueError(f"{op}: margin must be a number in [-1, 1], got {margin!r}")
    y = cosine_labels(target, threshold)
    cos = F.cosine_similarity(u, v, dim=-1, eps=_EPS)  # (B,)
    loss = torch.where(y > 0, 1 - cos, (cos - margin).clamp(min=0))
    return loss.mean()


def simcse_unsup(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Unsupervised SimCSE (Gao, Yao & Chen 2021, eq. 4).

    ``z1``, ``z2`` (B, D) are two encodings of the same B sentences under different dropout masks.
    With ``sim`` the cosine and ``τ`` the temperature, the other sentences are in-batch negatives::

        ℓ_i = −log [ exp(sim(z1_i, z2_i) / τ) / Σ_{j=1..B} exp(sim(z1_i, z2_j) / τ) ]

    i.e. cross-entropy over the rows of ``cos(z1, z2ᵀ) / τ`` with targets ``arange(B)``; mean over i.
    """
    op = "simcse_unsup"
    _check_embeddings(op, z1=z1, z2=z2)
    tau = _check_positive(op, "temperature", temperature)
    logits = cosine_matrix(z1, z2) / tau  # (B, B)
    return F.cross_entropy(logits, torch.arange(z1.shape[0], device=z1.device))


def simcse_sup(anchor: torch.Tensor, positive: torch.Tensor, hard_negative: Optional[torch.Tensor] = None,
               temperature: float = 0.05, negative_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Supervised SimCSE (Gao, Yao & Chen 2021, eq. 5): NLI premises ``h_i``, their entailment
    hypotheses ``h_i⁺`` and contradiction hypotheses ``h_i⁻`` (hard negatives), all (B, D)::

        ℓ_i = −log [ exp(sim(h_i, h_i⁺)/τ) / Σ_{j=1..B} ( exp(sim(h_i, h_j⁺)/τ) + exp(sim(h_i, h_j⁻)/τ) ) ]

    i.e. cross-entropy over ``[cos(a, p_all)/τ ; cos(a, n_all)/τ]`` (B, 2B) with target ``i``. Without
    ``hard_negative`` it is the in-batch-negatives loss over positives only. ``negative_mask`` (B,)
    bool marks the rows whose ``hard_negative`` exists; the columns of the others are left out of
    every row's denominator (rows with no contradiction hypothesis in the NLI file).
    """
    op = "simcse_sup"
    _check_embeddings(op, anchor=anchor, positive=positive, hard_negative=hard_negative)
    tau = _check_positive(op, "temperature", temperature)
    logits = cosine_matrix(anchor, positive)  # (B, B)
    if hard_negative is not None:
        negatives = cosine_matrix(anchor, hard_negative)  # (B, B)
        if negative_mask is not None:
            if negative_mask.shape != (anchor.shape[0],) or negative_mask.dtype != torch.bool:
                raise ValueError(f"{op}: negative_mask must be a bool tensor of shape ({anchor.shape[0]},), got "
                                 f"{negative_mask.dtype} {tuple(negative_mask.shape)}")
            negatives = negatives.masked_fill(~negative_mask.to(negatives.device)[None, :], float("-inf"))
        logits = torch.cat([logits, negatives], dim=1)  # (B, 2B)
    return F.cross_entropy(logits / tau, torch.arange(anchor.shape[0], device=anchor.device))


def mnrl(anchor: torch.Tensor, positive: torch.Tensor, scale: float = 20.0,
         negative: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multiple-negatives ranking loss (Henderson et al. 2017, "Efficient Natural Language Response
    Suggestion for Smart Reply", §4.4; Sentence-BERT's ``MultipleNegativesRankingLoss``).

    For paraphrase pairs ``(a_i, p_i)`` (B, D), every other ``p_j`` in the batch is a negative. With
    ``S(a, p) = scale · cos(a, p)``::

        L = −(1/B) Σ_i [ S(a_i, p_i) − log Σ_{j=1..B} exp(S(a_i, p_j)) ]

    i.e. cross-entropy over ``scale · cos(a, pᵀ)`` with targets ``arange(B)``. Optional ``negative``
    (B, D) rows join every anchor's candidates (columns B..2B−1), as hard negatives.
    """
    op = "mnrl"
    _check_embeddings(op, anchor=anchor, positive=positive, negative=negative)
    s = _check_positive(op, "scale", scale)
    candidates = positive if negative is None else torch.cat([positive, negative], dim=0)  # (B or 2B, D)
    logits = s * cosine_matrix(anchor, candidates)  # (B, B or 2B)
    return F.cross_entropy(logits, torch.arange(anchor.shape[0], device=anchor.device))


# --- registry ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., torch.Tensor]
    inputs: Tuple[str, ...]  # positional tensor arguments, in call order
    kind: str  # "task" (output, target) | "embedding" (sentence vectors)
    optional: Tuple[str, ...] = ()  # optional tensor arguments, by keyword


LOSSES: Dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, ("output", "target"), "task"),
    "bce_with_logits": LossSpec(bce_with_logits, ("output", "target"), "task"),
    "mse": LossSpec(mse, ("output", "target"), "task"),
    "cosent": LossSpec(cosent, ("output", "target"), "task"),
    "cosine_embedding": LossSpec(cosine_embedding, ("u", "v", "target"), "embedding"),
    "simcse_unsup": LossSpec(simcse_unsup, ("z1", "z2"), "embedding"),
    "simcse_sup": LossSpec(simcse_sup, ("anchor", "positive", "hard_negative"), "embedding"),
    "mnrl": LossSpec(mnrl, ("anchor", "positive"), "embedding", optional=("negative",)),
}


def loss_options(name: str) -> Tuple[str, ...]:
    """Option names :func:`build_loss` accepts for loss ``name``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {sorted(LOSSES)}")
    spec = LOSSES[name]
    params = inspect.signature(spec.fn).parameters
    tensors = spec.inputs + spec.optional
    return tuple(p for p in params if p not in tensors and params[p].default is not inspect.Parameter.empty)


@dataclass
class Loss:
    """A configured loss: ``loss(*tensors)`` calls ``fn(*tensors, **options)``.

    ``inputs`` lists the tensors it takes, in order (``("output", "target")`` for task losses;
    sentence embeddings for the others), so a trainer can feed it without branching on its name.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    inputs: Tuple[str, ...]
    kind: str
    options: Dict[str, Any] = field(default_factory=dict)

    def __call__(self, *tensors: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self.fn(*tensors, **extra, **self.options)


def build_loss(name: str, **options) -> Loss:
    """Build loss ``name`` (a key of :data:`LOSSES`) with ``options`` (e.g. ``temperature=0.05``).

    Unknown names or options raise ``ValueError`` naming them and listing the valid ones; option
    values are checked now (a zero temperature fails here, not at the first step).
    """
    valid = loss_options(name)
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ValueError(f"loss {name!r}: unknown option {unknown[0]!r}; valid options: {sorted(valid)}")
    for key in ("temperature", "scale", "pos_weight"):
        if options.get(key) is not None:
            _check_positive(name, key, options[key])
    if "margin" in options and (not isinstance(options["margin"], (int, float)) or not -1 <= options["margin"] <= 1):
        raise ValueError(f"{name}: argument 'margin' must be a number in [-1, 1], got {options['margin']!r}")
    if "label_smoothing" in options and (not isinstance(options["label_smoothing"], (int, float))
                                         or not 0 <= options["label_smoothing"] < 1):
        raise ValueError(f"{name}: argument 'label_smoothing' must be in [0, 1), got {options['label_smoothing']!r}")
    if options.get("threshold") is not None and (not isinstance(options["threshold"], (int, float))
                                                 or not math.isfinite(options["threshold"])):
        raise ValueError(f"{name}: argument 'threshold' must be a finite number, got {options['threshold']!r}")
    spec = LOSSES[name]
    return Loss(name, spec.fn, spec.inputs, spec.kind, dict(options))
