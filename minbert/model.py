"""A minimal BERT encoder with Hugging Face's module decomposition and weight names.

Every parameter has the name it has in ``transformers.BertModel`` (``embeddings.LayerNorm.weight``,
``encoder.layer.0.attention.self.query.weight``, ...), so HF checkpoints load without renaming and
:meth:`BertModel.save_pretrained` writes folders that ``transformers`` loads.

Attention is chosen by ``config.attn_implementation``:

* ``"torch"``: ``torch.nn.functional.scaled_dot_product_attention`` with an additive padding mask
  (on CPU with autograd recording, explicit math instead: it measured faster there).
* ``"math"``: explicit ``softmax(QKᵀ/√d + mask) V``; the readable reference the tests compare with.
* ``"triton"``: the fused kernel :func:`minbert.kernels.attention.attention` (padding-aware, in-kernel dropout).

Only the implementation changes; names and weights stay the same.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bert_config import BertConfig

logger = logging.getLogger(__name__)

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


@dataclass
class BertModelOutput:
    """What :meth:`BertModel.forward` returns.

    (Named ``BertModelOutput`` because Hugging Face's decomposition already uses ``BertOutput`` for
    the feed-forward output module; ``minbert.BertOutput`` is that module.)
    """

    last_hidden_state: torch.Tensor  # (B, L, H)
    pooler_output: Optional[torch.Tensor]  # (B, H)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # input of each layer, then the last output


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device)  # (L,)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, L, H)
        x = x + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


def attention_math(q, k, v, key_padding_mask, dropout_p: float, training: bool) -> torch.Tensor:
    """Explicit attention, ``softmax(QKᵀ/√d + M) V``, with HF's additive mask (finfo.min on padded keys)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, L, L)
    if key_padding_mask is not None:
        scores = scores + _additive_mask(key_padding_mask, scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout_p, training=training)
    return torch.matmul(probs, v)  # (B, H, L, D)


def _additive_mask(key_padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1 = token, 0 = pad  ->  (B, 1, 1, L) additive mask, 0 or finfo.min (Hugging Face's choice)."""
    keep = key_padding_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


class Unpadder:
    """Moves token states between the padded layout (B, L, H) and the packed layout (T, H) of real tokens.

    Linear layers, GELU, LayerNorm and dropout are per token, so minbert runs them on the T real
    tokens only and pads just around attention. On typical fine-tuning batches (lengths spread
    over 30-100% of L) this removes a third or more of the encoder's work. Outputs at padded
    positions are zeros (Hugging Face leaves unspecified values there; nothing reads them).
    """

    def __init__(self, attention_mask: torch.Tensor):
        self.batch, self.length = attention_mask.shape
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)  # (T,)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)  # (B, L, H) -> (T, H)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, -1)  # (T, H) -> (B, L, H)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.all_head_size = config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.attn_implementation = config.attn_implementation

    def _heads(self, x: torch.Tensor, unpadder: Optional[Unpadder]) -> torch.Tensor:
        if unpadder is not None:
            x = unpadder.pad(x)  # (T, H) -> (B, L, H)
        b, l, _ = x.shape
        return x.view(b, l, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, H, L, D)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                additive_mask: Optional[torch.Tensor] = None, unpadder: Optional[Unpadder] = None) -> torch.Tensor:
        """(B, L, H) or, with ``unpadder``, packed (T, H) token states in; the same layout out."""
        q = self._heads(self.query(hidden_states), unpadder)  # (B, H, L, D)
        k = self._heads(self.key(hidden_states), unpadder)
        v = self._heads(self.value(hidden_states), unpadder)
        p = self.dropout_p if self.training else 0.0
        impl = self.attn_implementation
        if impl == "torch" and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            # Measured on CPU (benchmarks/RESULTS.md): SDPA's backward with a mask is slower than
            # autograd through explicit math, while its no-grad forward is faster. Pick the faster.
            ctx = attention_math(q, k, v, attention_mask, p, self.training)
        elif impl == "torch":
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=p)
        elif impl == "math":
            ctx = attention_math(q, k, v, attention_mask, p, self.training)
        elif impl == "triton":
            from minbert.kernels.attention import attention

            ctx = attention(q, k, v, key_padding_mask=attention_mask, dropout_p=p)
        else:  # config validation makes this unreachable
            raise ValueError(f"unknown attn_implementation {impl!r}")
        b, _, l, _ = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(b, l, self.all_head_size)  # (B, L, H)
        return unpadder.unpad(ctx) if unpadder is not None else ctx


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask, additive_mask=None, unpadder=None):
        return self.output(self.self(hidden_states, attention_mask, additive_mask, unpadder), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))  # (B, L, I)


class BertOutput(nn.Module):
    """The feed-forward output block (dense, dropout, residual, LayerNorm), as in Hugging Face."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask, additive_mask=None, unpadder=None):
        attn = self.attention(hidden_states, attention_mask, additive_mask, unpadder)  # (B, L, H) or (T, H)
        return self.output(self.intermediate(attn), attn)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states, attention_mask, additive_mask=None, start_layer: int = 0,
                output_hidden_states: bool = False, unpadder: Optional[Unpadder] = None):
        """Runs layers ``start_layer..``; with ``unpadder`` the states stay packed (T, H) between layers."""
        states = [] if output_hidden_states else None
        if unpadder is not None:
            hidden_states = unpadder.unpad(hidden_states)  # (T, H)
        restore = unpadder.pad if unpadder is not None else (lambda x: x)
        for layer in self.layer[start_layer:]:
            if states is not None:
                states.append(restore(hidden_states))
            hidden_states = layer(hidden_states, attention_mask, additive_mask, unpadder)
        hidden_states = restore(hidden_states)  # (B, L, H)
        if states is not None:
            states.append(hidden_states)
        return hidden_states, states


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))  # (B, H)


class BertModel(nn.Module):
    """BERT encoder: embeddings, ``num_hidden_layers`` transformer layers, tanh pooler."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Hugging Face's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_attn_implementation(self, name: str) -> None:
        """Switch the attention implementation of every layer (no weight changes)."""
        self.config.attn_implementation = name
        self.config.validate()
        for layer in self.encoder.layer:
            layer.attention.self.attn_implementation = name

    # --- input checks ------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"BertModel: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"BertModel: input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"BertModel: input_ids must be int64 or int32, got {input_ids.dtype}")
        b, l = input_ids.shape
        if l > cfg.max_position_embeddings:
            raise ValueError(
                f"BertModel: input_ids has length {l} > max_position_embeddings={cfg.max_position_embeddings}"
            )
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"BertModel: input_ids contains id {bad} outside the vocabulary [0, {cfg.vocab_size})")
        for name, t, limit in (("attention_mask", attention_mask, 2), ("token_type_ids", token_type_ids, cfg.type_vocab_size)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"BertModel: {name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != (b, l):
                raise ValueError(
                    f"BertModel: {name} must have the shape of input_ids (B, L) = {(b, l)}, got {tuple(t.shape)}"
                )
            if t.device != input_ids.device:
                raise ValueError(f"BertModel: {name} is on {t.device} but input_ids is on {input_ids.device}")
            if name == "token_type_ids" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
                raise ValueError(f"BertModel: token_type_ids must be in [0, {limit}), got values in [{int(t.min())}, {int(t.max())}]")
            if name == "attention_mask" and t.is_floating_point() and t.numel() and not bool(((t == 0) | (t == 1)).all()):
                raise ValueError("BertModel: attention_mask must hold 0/1 (or bool) values")

    def embed(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The embedding-layer output, i.e. the encoder input (B, L, H)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.embeddings(input_ids, token_type_ids)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        *,
        encoder_input: Optional[torch.Tensor] = None,
        start_layer: int = 0,
        output_hidden_states: bool = False,
    ) -> BertModelOutput:
        """Encode a batch.

        ``encoder_input`` (B, L, H), when given, replaces the embeddings and is fed to layer
        ``start_layer`` (SMART perturbs it); ``input_ids`` is then not needed.
        """
        if encoder_input is None:
            self._check_inputs(input_ids, attention_mask, token_type_ids)
            hidden = self.embed(input_ids, token_type_ids)  # (B, L, H)
        else:
            hidden = encoder_input
            if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"BertModel: encoder_input must have shape (B, L, {self.config.hidden_size}), got {tuple(hidden.shape)}"
                )
            if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
                raise ValueError(
                    f"BertModel: attention_mask must have shape (B, L) = {tuple(hidden.shape[:2])}, got {tuple(attention_mask.shape)}"
                )
        if not 0 <= start_layer <= self.config.num_hidden_layers:
            raise ValueError(f"BertModel: start_layer must be in [0, {self.config.num_hidden_layers}], got {start_layer}")
        b, l = hidden.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(b, l, dtype=torch.long, device=hidden.device)
        additive = None
        if self.config.attn_implementation == "torch":  # SDPA wants the (B, 1, 1, L) additive form
            additive = _additive_mask(attention_mask, hidden.dtype)  # (B, 1, 1, L)
        unpadder = None
        if self.config.unpad and not bool(attention_mask.bool().all()):
            unpadder = Unpadder(attention_mask)
        last, states = self.encoder(hidden, attention_mask, additive, start_layer, output_hidden_states, unpadder)
        pooled = self.pooler(last) if self.pooler is not None else None
        return BertModelOutput(last, pooled, tuple(states) if states is not None else None)

    # --- checkpoints -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path=None, strict: bool = True, **config_overrides) -> "BertModel":
        """Load a Hugging Face BERT folder (config.json + model.safetensors or pytorch_model.bin).

        ``name_or_path=None`` loads the embedded default checkpoint. Keys may carry a ``bert.``
        prefix; heads the encoder does not use (``cls.*``, ...) are ignored. Missing or
        shape-mismatched keys raise one error that lists them all (``strict=False`` keeps the
        fresh initialisation for missing keys instead, with a warning).
        """
        from .pretrained import load_state_dict, resolve_checkpoint

        folder = resolve_checkpoint(name_or_path)
        config = BertConfig.from_json_file(folder / "config.json", **config_overrides)
        state, source = load_state_dict(folder)
        model = cls(config)
        model.load_hf_state_dict(state, source=str(source), strict=strict)
        return model

    def load_hf_state_dict(self, state: dict, source: str = "state dict", strict: bool = True) -> None:
        """Load HF-named tensors, normalising prefixes and old LayerNorm names; one error lists all problems."""
        own = self.state_dict()
        renamed = {}
        for key, value in state.items():
            k = key[len("bert."):] if key.startswith("bert.") else key
            k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            renamed[k] = value
        missing = [k for k in own if k not in renamed and ".lora_" not in k]  # adapters are not in base checkpoints
        mismatched = [f"{k}: checkpoint {tuple(renamed[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in own if k in renamed and tuple(renamed[k].shape) != tuple(own[k].shape)]
        unused = sorted(k for k in renamed if k not in own)
        problems = []
        if mismatched:
            problems.append("shape-mismatched keys:\n  " + "\n  ".join(mismatched))
        if missing and strict:
            problems.append("missing keys:\n  " + "\n  ".join(missing))
        if problems:
            raise ValueError(f"cannot load {source} into BertModel:\n" + "\n".join(problems))
        if missing:
            logger.warning("%s lacks %d keys, left at their initial values: %s", source, len(missing), missing)
        if unused:
            logger.info("ignoring %d keys of %s not used by BertModel (e.g. %s)", len(unused), source, unused[:3])
        with torch.no_grad():
            for k, t in own.items():
                if k in renamed:
                    t.copy_(renamed[k].to(t.dtype))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors (atomically) that ``transformers.BertModel`` loads."""
        from safetensors.torch import save_file

        from .pretrained import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        from .lora import merged_state_dict

        # LoRA adapters (if any) are folded into the weights: the folder is a plain HF BERT.
        tensors = {k: v.detach().contiguous().cpu() for k, v in merged_state_dict(self).items()}
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        with atomic_path(directory / "config.json") as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.config.to_dict(), f, indent=2, sort_keys=True)
                f.write("\n")
        return directory
