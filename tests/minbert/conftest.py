"""Fixtures shared by the model-level tests."""
import shutil

import pytest
import torch

from minbert import BertConfig, BertModel, default_checkpoint

TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                 max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised (seed 0) 2-layer BERT folder with the real vocabulary and tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY_BERT)).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_checkpoint() / name, folder / name)
    return folder
