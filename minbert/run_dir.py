"""A run's folder: model folders (``best/``, ``top/step-<N>/``) and the end-of-run outputs.

Layout of ``cfg.output_dir``::

    config.yaml          the resolved recipe
    metrics.jsonl        train and dev records (minbert.metrics.append_jsonl)
    checkpoint/          the resumable checkpoint (the engine's format)
    best/                the best model by dev overall (save_model_dir)
    top/step-<N>/        the k best (save_top_k)
    predictions/         dev/test prediction files of best/ (finish_run)
    curves.png, sst_confusion.png
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from . import data as data_lib
from .evaluate import predict, predict_splits, write_results
from .finetune import set_trainable
from .metrics import confusion_matrix, plot_confusion, plot_curves, read_jsonl
from .model import BertModel
from .multitask import MultitaskModel
from .tokenizer import Tokenizer
from .train_config import TrainConfig


def save_model_dir(directory: Path, model: MultitaskModel, cfg: TrainConfig, tokenizer: Tokenizer, extra: Dict) -> None:
    """Write a self-contained model folder atomically (a temporary folder renamed into place).

    Layout: ``encoder/`` (HF format: config.json, model.safetensors), ``multitask.safetensors``
    (all weights: encoder, adapters, heads), ``train_config.yaml``, tokenizer files, ``info.json``.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.bert.save_pretrained(tmp / "encoder")
    save_model(model, str(tmp / "multitask.safetensors"))  # de-duplicates shared modules (relational)
    tokenizer.save_pretrained(tmp)
    with open(tmp / "train_config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    with open(tmp / "info.json", "w", encoding="utf-8") as f:
        json.dump(extra, f, indent=2)
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)


def load_model_dir(directory, device="cpu", attn_implementation: Optional[str] = None):
    """Rebuild (model, cfg, tokenizer) from a folder written by :func:`save_model_dir`."""
    from safetensors.torch import load_model

    from .bert_config import BertConfig
    from .train_config import load_config

    directory = Path(directory)
    if not (directory / "multitask.safetensors").is_file():
        raise FileNotFoundError(f"{directory} is not a minbert model folder (multitask.safetensors is missing)")
    cfg = load_config(directory / "train_config.yaml")
    if attn_implementation:
        cfg.attn_implementation = attn_implementation
    bert_cfg = BertConfig.from_json_file(directory / "encoder" / "config.json", attn_implementation=cfg.attn_implementation)
    model = MultitaskModel(BertModel(bert_cfg), cfg.tasks)
    set_trainable(model, cfg)
    load_model(model, str(directory / "multitask.safetensors"))
    tokenizer = Tokenizer.from_pretrained(directory)
    return model.to(device).eval(), cfg, tokenizer


def keep_top_k(top: List[List[float]], k: int, overall: float, step: int) -> bool:
    """Add ``(overall, step)`` to ``top`` (the k best by dev overall, best first; ties keep the earlier
    step) if it ranks among the k best; returns whether it does. ``top`` is changed in place."""
    if any(int(s) == step for _, s in top):  # the same step evaluated again (a resumed run's final eval)
        return False
    if len(top) >= k and overall <= top[-1][0]:
        return False
    top.append([overall, step])
    top.sort(key=lambda item: (-item[0], item[1]))
    del top[k:]
    return True


def prune_top_k(directory: Path, top: List[List[float]]) -> None:
    """Remove the ``step-<N>`` folders under ``directory`` that are no longer in ``top``."""
    keep = {f"step-{int(step)}" for _, step in top}
    for child in Path(directory).glob("step-*"):
        if child.name not in keep:
            shutil.rmtree(child)


def finish_run(run_dir: Path, model, cfg, tokenizer, datasets, device, log) -> None:
    """Predictions of the best model for dev and test files, and the plots."""
    best_dir = run_dir / "best"
    if cfg.predict and best_dir.exists():
        best_model, _, _ = load_model_dir(best_dir, device=device, attn_implementation=cfg.attn_implementation)
        write_results(predict_splits(best_model, cfg, tokenizer, datasets, ("dev", "test"), device),
                      run_dir / "predictions")
        log(f"predictions written to {run_dir / 'predictions'}")
    records = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    if records:
        plot_curves(records, run_dir / "curves.png")
    if "sst" in [t.name for t in cfg.tasks] and datasets["sst"].get("dev") is not None and best_dir.exists():
        best_model, _, _ = load_model_dir(best_dir, device=device, attn_implementation=cfg.attn_implementation)
        task = cfg.task("sst")
        collate = data_lib.make_collate(tokenizer, "sst", task.max_length)
        result = predict(best_model, data_lib.TaskLoader(datasets["sst"]["dev"], 64, collate, shuffle=False), device,
                         cfg.autocast)
        cm = confusion_matrix(result["preds"], result["labels"], 5)
        plot_confusion(cm, ["0", "1", "2", "3", "4"], run_dir / "sst_confusion.png")
