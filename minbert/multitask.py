"""One BERT encoder shared by per-task heads.

Data flow for one batch of task ``t``::

    Batch ──embed──▶ encoder inputs [(B, L, H)] (one per sentence for bi-encoded pairs)
          ──encode─▶ SentenceFeatures / PairFeatures (token states, mask, pooled vector)
          ──head───▶ task output: logits (B, C), a logit (B,), or a score (B,)

``embed`` and ``forward(batch, inputs=...)`` are separate so that regularizers (SMART) can perturb
the encoder inputs, or the input of layer k (``start_layer=k``), and re-run only what follows.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .heads import HybridFeatures, HybridHead, PairFeatures, SentenceFeatures, build_head, upcast
from .model import BertModel
from .pooling import pool
from .tasks import get_task
from .train_config import TaskConfig


class MultitaskModel(nn.Module):
    """``bert`` (a :class:`BertModel`, so its weights keep HF names under ``bert.``) plus ``heads``."""

    def __init__(self, bert: BertModel, tasks: Sequence[TaskConfig]):
        super().__init__()
        self.bert = bert
        self.tasks = {t.name: t for t in tasks}
        hidden = bert.config.hidden_size
        shared: Dict[str, nn.Module] = {}  # modules heads share by name (the relational layer)
        heads = {}
        for t in tasks:
            num_classes = get_task(t.name).output_size  # C, or 1 for one logit or score
            try:
                heads[t.name] = build_head(t.head, hidden, t.kind, num_classes=num_classes, shared=shared,
                                           **t.head_options)
            except (TypeError, ValueError) as e:
                raise ValueError(f"tasks.{t.name}.head: {e}") from None
            if t.pair_encoding == "hybrid":  # heads[t] becomes the bi member, beside a cross member
                h = t.hybrid_options
                try:
                    cross = build_head(h["head"], hidden, t.kind, num_classes=num_classes, shared=shared,
                                       **h["head_options"])
                    heads[t.name] = HybridHead(heads[t.name], cross, h["weight"])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"tasks.{t.name}.hybrid: {e}") from None
        self.heads = nn.ModuleDict(heads)
        # pooling of each encoded sequence: a (and b) with the task's, a hybrid pair's cross sequence with its own
        self.poolings = {t.name: (t.pooling, t.pooling, t.hybrid_options["pooling"]) for t in tasks}
        # When set to k, the next forward keeps the input of encoder layer k of each sentence in
        # ``self.captured`` (with its autograd graph): SMART at layer k perturbs it and re-runs only
        # the layers above k. None: nothing is kept.
        self.capture_layer: Optional[int] = None
        self.captured: Optional[List[torch.Tensor]] = None

    def train(self, mode: bool = True):
        """With a frozen encoder (``last-linear-layer``) the encoder stays in eval mode (no dropout)."""
        super().train(mode)
        if mode and getattr(self, "freeze_encoder_mode", False):
            self.bert.eval()
        return self

    # --- encoder inputs --------------------------------------------------------------------
    def embed(self, batch) -> List[torch.Tensor]:
        """Encoder inputs for the batch: one (B, L, H) tensor, two for a bi-encoded pair, and the
        cross-encoded pair (B, L_x, H) third for a hybrid one."""
        inputs = [self.bert.embed(batch.input_ids, batch.token_type_ids)]
        if batch.input_ids_b is not None:
            inputs.append(self.bert.embed(batch.input_ids_b, batch.token_type_ids_b))
        if batch.cross is not None:
            inputs.append(self.bert.embed(batch.cross.input_ids, batch.cross.token_type_ids))
        return inputs

    def masks(self, batch) -> List[torch.Tensor]:
        out = [batch.attention_mask]
        if batch.input_ids_b is not None:
            out.append(batch.attention_mask_b)
        if batch.cross is not None:
            out.append(batch.cross.attention_mask)
        return out

    def hidden_at(self, batch, layer: int) -> List[torch.Tensor]:
        """The input of encoder layer ``layer`` for each sentence (layer 0 = the embedding output)."""
        if layer == 0:
            return self.embed(batch)
        outs = []
        for inp, mask in zip(self.embed(batch), self.masks(batch)):
            states = self.bert(attention_mask=mask, encoder_input=inp, output_hidden_states=True).hidden_states
            outs.append(states[layer])
        return outs

    # --- forward -----------------------------------------------------------------------------
    def set_task(self, task: str) -> None:
        """Tell task-aware submodules (per-task LoRA adapters: anything with ``set_task``) the batch's task."""
        for module in self.bert.modules():
            if module is not self and hasattr(module, "set_task"):
                module.set_task(task)

    def features(self, batch, inputs: Optional[List[torch.Tensor]] = None, start_layer: int = 0):
        self.set_task(batch.task)
        if inputs is None:
            inputs = self.embed(batch) if start_layer == 0 else self.hidden_at(batch, start_layer)
        feats = []
        capture = self.capture_layer
        self.captured = [] if capture is not None else None
        for inp, mask, pooling in zip(inputs, self.masks(batch), self.poolings[batch.task]):
            if capture is not None and capture > start_layer:
                out = self.bert(attention_mask=mask, encoder_input=inp, start_layer=start_layer, output_hidden_states=True)
                self.captured.append(out.hidden_states[capture - start_layer])
            else:
                if capture is not None:
                    self.captured.append(inp)
                out = self.bert(attention_mask=mask, encoder_input=inp, start_layer=start_layer)
            pooled = pool(out.last_hidden_state, mask, pooling, pooler_output=out.pooler_output)  # (B, H)
            feats.append(SentenceFeatures(hidden=out.last_hidden_state, mask=mask, pooled=pooled))
        if len(feats) == 1:
            return feats[0]
        pair = PairFeatures(a=feats[0], b=feats[1])
        return pair if len(feats) == 2 else HybridFeatures(pair=pair, cross=feats[2])

    def forward(self, batch, inputs: Optional[List[torch.Tensor]] = None, start_layer: int = 0) -> torch.Tensor:
        """The task output for ``batch.task``: logits (B, C), a logit (B,) or a score (B,); at least fp32
        (under ``torch.autocast`` the heads' matmuls run in bf16; losses and metrics want fp32)."""
        return upcast(self.heads[batch.task](self.features(batch, inputs, start_layer)))

    def task_loss(self, task: str, loss_fn):
        """The loss ``loss(output, labels)`` that trains task ``task``'s head (a hybrid head averages its members')."""
        return self.heads[task].wrap_loss(loss_fn)

    def head_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

    def shared_parameters(self) -> List[nn.Parameter]:
        """Parameters every task's loss reaches (the encoder), as PCGrad needs them."""
        return [p for p in self.bert.parameters() if p.requires_grad]


def predict_from_output(task: str, output: torch.Tensor) -> torch.Tensor:
    """Model output -> prediction of ``task`` (:meth:`minbert.tasks.Task.predict`): a class index,
    0/1, or a score clamped to the task's label range."""
    return get_task(task).predict(output)
