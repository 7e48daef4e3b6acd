"""minbert: fast, distributed multitask fine-tuning of BERT encoders."""
from .checkpoints import default_checkpoint
from .config import BertConfig
from .model import (
    BertAttention,
    BertEmbeddings,
    BertEncoder,
    BertIntermediate,
    BertLayer,
    BertModel,
    BertModelOutput,
    BertOutput,
    BertPooler,
    BertSelfAttention,
    BertSelfOutput,
)
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "BertConfig", "BertModel", "BertModelOutput", "BertEmbeddings", "BertSelfAttention", "BertSelfOutput",
    "BertAttention", "BertIntermediate", "BertOutput", "BertLayer", "BertEncoder", "BertPooler",
    "Tokenizer", "default_checkpoint",
]
