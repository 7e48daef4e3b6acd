"""WordPiece tokenization through the ``tokenizers`` library.

:class:`Tokenizer` loads ``tokenizer.json`` when a checkpoint folder has one, else builds a BERT
WordPiece tokenizer from ``vocab.txt`` (lower-casing per ``tokenizer_config.json``). Calling it on
sentences (or sentence pairs) returns torch tensors padded to the longest sequence in the batch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer``: ``tok(texts, texts_pair=None, max_length=128)``."""

    def __init__(self, backend: _HFTokenizer, pad_token: str = "[PAD]"):
        self.backend = backend
        pad_id = backend.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"tokenizer vocabulary has no pad token {pad_token!r}")
        self.pad_token = pad_token
        self.pad_token_id = pad_id
        self.backend.no_truncation()
        self.backend.enable_padding(pad_id=pad_id, pad_token=pad_token)  # to the longest in the batch
        self._max_length: Optional[int] = None

    @classmethod
    def from_pretrained(cls, name_or_path=None) -> "Tokenizer":
        """Load from a checkpoint folder (None -> the embedded default checkpoint)."""
        from .pretrained import resolve_checkpoint

        folder = resolve_checkpoint(name_or_path, need_config=False)
        options = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            with open(cfg_path, encoding="utf-8") as f:
                options = json.load(f)
        if (folder / "tokenizer.json").is_file():
            try:
                backend = _HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:
                raise ValueError(f"{folder / 'tokenizer.json'}: cannot be read by the tokenizers library ({e})") from None
        elif (folder / "vocab.txt").is_file():
            from tokenizers.implementations import BertWordPieceTokenizer

            lowercase = bool(options.get("do_lower_case", True))
            strip_accents = options.get("strip_accents", None)
            backend = BertWordPieceTokenizer(
                str(folder / "vocab.txt"),
                lowercase=lowercase,
                strip_accents=strip_accents,
                clean_text=True,
                handle_chinese_chars=bool(options.get("tokenize_chinese_chars", True)),
            )._tokenizer
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt")
        return cls(backend, pad_token=options.get("pad_token", "[PAD]") if isinstance(options.get("pad_token", "[PAD]"), str) else "[PAD]")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def _set_max_length(self, max_length: int) -> None:
        if max_length != self._max_length:
            if not isinstance(max_length, int) or max_length < 2:
                raise ValueError(f"Tokenizer: max_length must be an integer >= 2, got {max_length!r}")
            self.backend.enable_truncation(max_length=max_length, strategy="longest_first")
            self._max_length = max_length

    def __call__(
        self,
        texts: Union[str, Sequence[str]],
        texts_pair: Optional[Sequence[str]] = None,
        max_length: int = 512,
    ) -> Dict[str, torch.Tensor]:
        """Encode sentences (or pairs, with token_type_ids 1 on the second) into (B, L) int64 tensors."""
        if isinstance(texts, str):
            texts = [texts]
            if isinstance(texts_pair, str):
                texts_pair = [texts_pair]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"Tokenizer: texts[{i}] must be a str, got {type(t).__name__}")
        self._set_max_length(max_length)
        if texts_pair is not None:
            texts_pair = list(texts_pair)
            if len(texts_pair) != len(texts):
                raise ValueError(f"Tokenizer: texts has {len(texts)} items but texts_pair has {len(texts_pair)}")
            encodings = self.backend.encode_batch(list(zip(texts, texts_pair)))
        else:
            encodings = self.backend.encode_batch(texts)
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
        }

    def tokenize(self, text: str) -> List[str]:
        """WordPiece tokens of one text, with special tokens."""
        self.backend.no_truncation()
        self._max_length = None
        return self.backend.encode(text).tokens

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        from .pretrained import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "tokenizer.json") as tmp:
            self.backend.save(str(tmp))
        vocab = self.backend.get_vocab()
        with atomic_path(directory / "vocab.txt") as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
                    f.write(token + "\n")
