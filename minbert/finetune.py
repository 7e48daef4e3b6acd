"""Fine-tune modes: which parameters train. Each is a function ``set_trainable(model, cfg) -> trainable params``.

* ``full-model``: the encoder and the heads.
* ``last-linear-layer``: the encoder is frozen (and kept in eval mode, so no dropout), heads train.
* ``lora``: low-rank adapters on chosen encoder linears (``minbert.lora.apply_lora``); the base
  weights are frozen, heads train. Options come from the config's ``lora:`` block.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch.nn as nn


def _full_model(model, cfg) -> List[nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(True)
    return [p for p in model.parameters()]


def _last_linear_layer(model, cfg) -> List[nn.Parameter]:
    for p in model.bert.parameters():
        p.requires_grad_(False)
    model.freeze_encoder_mode = True
    return [p for p in model.heads.parameters()]


def _lora(model, cfg) -> List[nn.Parameter]:
    from .lora import apply_lora

    options = dict(cfg.lora)
    per_task = options.pop("per_task", False)
    tasks = [t.name for t in cfg.tasks] if per_task else None
    apply_lora(model.bert, tasks=tasks, **options)
    return [p for p in model.parameters() if p.requires_grad]


FINETUNE: Dict[str, Callable] = {"full-model": _full_model, "last-linear-layer": _last_linear_layer, "lora": _lora}


def set_trainable(model, cfg) -> List[nn.Parameter]:
    if cfg.finetune not in FINETUNE:
        raise ValueError(f"finetune: unknown mode {cfg.finetune!r}; expected one of {sorted(FINETUNE)}")
    return FINETUNE[cfg.finetune](model, cfg)


def count_parameters(model: nn.Module) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
