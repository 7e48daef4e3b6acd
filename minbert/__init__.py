"""minbert: fast, distributed multitask fine-tuning of BERT encoders.

``minbert.kernels`` and ``minbert.distributed`` are the folders ``kernels/`` and ``distributed/``.
Neither has an ``__init__.py``: PyPI has packages named ``kernels`` (a dependency of transformers)
and ``distributed``, and Python started in a checkout puts the checkout first on ``sys.path``. A
folder without ``__init__.py`` loses to a regular package anywhere later on the path, so
``import kernels`` and ``import distributed`` find the installed packages, never these folders.
Import the modules inside them by their full names (``minbert.kernels.attention``).
"""
import importlib.machinery as _machinery
import os as _os
import sys as _sys


class _SiblingFolders:
    """Finds ``minbert.kernels`` / ``minbert.distributed`` beside ``minbert/`` in a checkout.

    An installed wheel has them inside ``minbert/``, where the normal path search finds them; in a
    checkout (an editable install, or Python started from the repository root) they sit beside
    ``minbert/`` and this meta-path finder, consulted after the normal search, maps them there as
    namespace packages.
    """

    ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    # name -> (folder beside minbert/, a file only minbert's folder has: beside an installed
    # minbert, site-packages/kernels is Hugging Face's package and must never be taken)
    NAMES = {"minbert.kernels": ("kernels", "_dispatch.py"), "minbert.distributed": ("distributed", "launch.py")}

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        folder, marker = cls.NAMES.get(fullname, (None, None))
        if folder is None or not _os.path.isfile(_os.path.join(cls.ROOT, folder, marker)):
            return None
        spec = _machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [_os.path.join(cls.ROOT, folder)]
        return spec


if not any(f is _SiblingFolders or getattr(f, "__qualname__", None) == "_SiblingFolders" for f in _sys.meta_path):
    _sys.meta_path.append(_SiblingFolders)

from .pretrained import default_checkpoint
from .bert_config import BertConfig
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
