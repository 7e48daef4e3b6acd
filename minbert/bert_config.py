"""``BertConfig``: Hugging Face's BERT configuration fields as a validated dataclass.

A checkpoint's ``config.json`` is read with :meth:`BertConfig.from_json_file`. Fields this
class does not know are kept in ``extra`` (and written back by :meth:`to_dict`), never fatal.
Invalid values raise ``ValueError`` naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict

ATTN_IMPLEMENTATIONS = ("torch", "math", "triton")
HIDDEN_ACTS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish", "tanh")


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    # minbert's own switch: "torch" (SDPA), "math" (explicit reference), "triton" (fused kernel).
    attn_implementation: str = "torch"
    # minbert's own switch: run per-token layers on real tokens only (see minbert.model.Unpadder).
    unpad: bool = True
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive number, got {value!r}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported; expected one of {HIDDEN_ACTS}")
        if self.position_embedding_type != "absolute":
            raise ValueError(
                f"BertConfig.position_embedding_type {self.position_embedding_type!r} is not supported; only 'absolute'"
            )
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"BertConfig.attn_implementation {self.attn_implementation!r} is not valid; "
                f"expected one of {ATTN_IMPLEMENTATIONS}"
            )
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"BertConfig.pad_token_id {self.pad_token_id} is outside [0, vocab_size={self.vocab_size})")

    # --- (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Dict[str, Any], **overrides) -> "BertConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        merged = {**data, **overrides}
        kwargs = {k: v for k, v in merged.items() if k in known}
        extra = {k: v for k, v in merged.items() if k not in known and k != "extra"}
        extra.update(merged.get("extra", {}) or {})
        # HF writes pad_token_id; some configs leave it null.
        if kwargs.get("pad_token_id", 0) is None:
            kwargs["pad_token_id"] = 0
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides) -> "BertConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "bert")
        if model_type not in ("bert",):
            raise ValueError(f"{path}: model_type {model_type!r} is not a BERT model")
        try:
            return cls.from_dict(data, **overrides)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> Dict[str, Any]:
        """An HF-compatible dict (``transformers.BertConfig`` reads it)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("extra", "attn_implementation", "unpad")}
        out.update({k: v for k, v in self.extra.items() if k not in ("architectures", "model_type", "_attn_implementation")})
        out["architectures"] = ["BertModel"]
        out["model_type"] = "bert"
        return out

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
