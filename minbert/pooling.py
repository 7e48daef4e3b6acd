"""Sentence pooling: one vector (B, H) from the encoder's token states (B, L, H).

* ``"cls"``: the state of the first token (``[CLS]``), ``h[:, 0]``.
* ``"pooler"``: BERT's pooler output ``tanh(W h[:, 0] + b)``; the encoder computes it
  (``BertModelOutput.pooler_output``) and it is passed in as ``pooler_output``.
* ``"mean"``: the mean over the non-padded tokens (Sentence-BERT's default, Reimers & Gurevych 2019)::

      pool(h, m)_b = Σ_t m_bt · h_bt / max(1, Σ_t m_bt)

  Padded positions are *selected away* (``torch.where``), not multiplied by zero, so padded states
  that hold Inf/NaN leave the result untouched. A row with no real token pools to zeros, never NaN.
"""
from __future__ import annotations

from typing import Optional

import torch

POOLING_METHODS = ("cls", "pooler", "mean")


def check_hidden_and_mask(hidden: torch.Tensor, attention_mask: torch.Tensor, where: str) -> None:
    """Validate token states (B, L, H) and a padding mask (B, L); errors name ``where`` and the argument."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{where}: hidden must be a torch.Tensor (B, L, H), got {type(hidden).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"{where}: hidden must have shape (B, L, H), got {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise TypeError(f"{where}: hidden must be a floating-point tensor, got {hidden.dtype}")
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{where}: attention_mask must be a torch.Tensor (B, L), got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"{where}: attention_mask must have shape (B, L) = {tuple(hidden.shape[:2])} to match hidden, "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != hidden.device:
        raise ValueError(f"{where}: attention_mask is on {attention_mask.device} but hidden is on {hidden.device}")
    if attention_mask.dtype != torch.bool and attention_mask.numel():
        if attention_mask.is_complex() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(f"{where}: attention_mask must hold 0/1 (or bool) values")


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, H) over positions where ``attention_mask`` (B, L) is set -> (B, H).

    All-padded rows give zeros; padded positions receive zero gradient.
    """
    keep = attention_mask.bool().unsqueeze(-1)  # (B, L, 1)
    total = torch.where(keep, hidden, hidden.new_zeros(())).sum(dim=1)  # (B, H)
    count = keep.sum(dim=1).clamp(min=1).to(hidden.dtype)  # (B, 1)
    return total / count


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    method: str,
    pooler_output: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pool token states ``hidden`` (B, L, H) with padding mask ``attention_mask`` (B, L) into (B, H).

    ``method`` is one of :data:`POOLING_METHODS`; ``"pooler"`` needs ``pooler_output`` (B, H), the
    encoder's tanh pooler (a :class:`minbert.BertModel` built with ``add_pooling_layer=True``).
    """
    if method not in POOLING_METHODS:
        raise ValueError(f"pool: unknown pooling method {method!r}; valid methods: {list(POOLING_METHODS)}")
    check_hidden_and_mask(hidden, attention_mask, "pool")
    if method == "cls":
        return hidden[:, 0]  # (B, H)
    if method == "pooler":
        if pooler_output is None:
            raise ValueError(
                "pool: method 'pooler' needs pooler_output (B, H), the encoder's tanh pooler; this encoder "
                "has none (BertModel(add_pooling_layer=False)?) - use 'cls' or 'mean' instead"
            )
        b, _, h = hidden.shape
        if not isinstance(pooler_output, torch.Tensor) or tuple(pooler_output.shape) != (b, h):
            shape = tuple(pooler_output.shape) if isinstance(pooler_output, torch.Tensor) else type(pooler_output).__name__
            raise ValueError(f"pool: pooler_output must have shape (B, H) = {(b, h)}, got {shape}")
        return pooler_output
    return masked_mean(hidden, attention_mask)
