"""A run's folder: model folders (``best/``, ``top/step-<N>/``) and the end-of-run outputs.

Layout of ``cfg.output_dir``::

    config.yaml          the resolved recipe
    metrics.jsonl        train and dev records (minbert.prediction_files.append_jsonl)
    checkpoint/          the resumable checkpoint (the engine's format)
    best/                the best model by dev overall (save_model_dir)
    top/step-<N>/        the k best (save_top_k)
    predictions/         dev/test prediction files of best/ (finish_run)
    curves.png, sst_confusion.png
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import yaml

from . import data as data_lib
from .evaluate import evaluate, predict, predict_splits, write_results
from .finetune import set_trainable
from .metrics import confusion_matrix
from .plots import plot_confusion, plot_curves
from .prediction_files import append_jsonl, read_jsonl
from .model import BertModel
from .multitask import MultitaskModel
from .tokenizer import Tokenizer
from .train_config import TrainConfig


def write_config(cfg: TrainConfig) -> Path:
    """Create the run folder ``cfg.output_dir`` and write the resolved recipe to ``config.yaml`` in it."""
    directory = Path(cfg.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return directory


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


class RunDir:
    """The run folder and log of a training run, held by every rank.

    Rank 0 alone writes (``metrics.jsonl``, ``best/``, ``top/``) and shows the progress bar; every
    rank takes part in what needs all of them: the means over ranks of logged values and the
    gathering of ZeRO-3 parameters for a save. Train losses and regularizer terms collect in a
    window that :meth:`log_step` averages and empties every ``cfg.log_every`` steps.
    """

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, engine, steps_per_epoch: int, total_steps: int,
                 start_step: int = 0, is_main: bool = True, log: Callable[[str], None] = print):
        self.path = Path(cfg.output_dir)
        self.cfg, self.tokenizer, self.engine, self.is_main, self.log = cfg, tokenizer, engine, is_main, log
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.progress = None
        if is_main and not cfg.quiet:
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self._new_window()

    def _new_window(self) -> None:
        self.losses: Dict[str, List[float]] = {}
        self.terms: Dict[str, List[float]] = {}
        self.examples = 0
        self.t0 = time.perf_counter()

    def _write(self, record: Dict) -> None:
        append_jsonl(self.path / "metrics.jsonl", record)

    # --- train -----------------------------------------------------------------------------------
    def add(self, losses: Dict[str, float], terms: Dict[str, float]) -> None:
        """One micro-batch's task losses and regularizer terms (``task/term``) for the window."""
        for t, v in losses.items():
            self.losses.setdefault(t, []).append(v)
        for k, v in terms.items():
            self.terms.setdefault(k, []).append(v)

    def log_step(self, step: int, lr: float, regularizers: Dict[str, Sequence]) -> None:
        """After optimizer step ``step``: advance the progress bar; every ``log_every`` steps (and at the
        last) write the window's means over steps and ranks, the examples per second and the
        regularizers' counters."""
        if self.progress is not None:
            self.progress.update(1)
        if (step + 1) % self.cfg.log_every and step + 1 != self.total_steps:
            return
        rate = self.examples * self.engine.world_size / max(time.perf_counter() - self.t0, 1e-9)
        loss_means = self.engine.rank_mean({t: float(np.mean(v)) for t, v in self.losses.items()})
        term_means = self.engine.rank_mean({k: float(np.mean(v)) for k, v in self.terms.items()})
        if self.is_main:
            for t in self.losses:
                rec = {"step": step + 1, "epoch": (step + 1) / self.steps_per_epoch, "split": "train", "task": t,
                       "loss": loss_means[t], "lr": lr, "examples_per_s": rate}
                rec.update({k.split("/", 1)[1]: v for k, v in term_means.items() if k.startswith(f"{t}/")})
                self._write(rec)
            for reg in (r for regs in regularizers.values() for r in regs):
                if reg.stats():
                    self._write({"step": step + 1, "split": "train", **reg.stats()})
            summary = " ".join(f"{t}={v:.3f}" for t, v in loss_means.items())
            if self.progress is not None:
                self.progress.set_postfix_str(f"{summary} lr={lr:.2e} {rate:.0f} ex/s")
            elif self.cfg.quiet:
                self.log(f"step {step + 1}/{self.total_steps} loss {summary} lr={lr:.2e} {rate:.0f} ex/s")
        self._new_window()

    def log_skip(self, step: int, tasks: Sequence[str], nan_run: int, nan_total: int) -> None:
        """A step skipped for a non-finite loss or gradient."""
        self.log(f"warning: step {step}: non-finite loss or gradient in tasks {tasks}; step skipped "
                 f"({nan_run} in a row, {nan_total} in total)")
        if self.is_main:
            self._write({"step": step, "split": "train", "event": "nonfinite_skip", "consecutive": nan_run,
                         "total": nan_total})

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    # --- dev -------------------------------------------------------------------------------------
    def evaluate(self, step: int, model, loaders: Dict, state, ema=None) -> Dict[str, float]:
        """Dev metrics before step ``step``, logged; the model is kept (:meth:`keep`) when it ranks.
        With ``ema`` the moving average is evaluated and kept; training goes on from the weights."""
        with ema.swapped_in(model) if ema is not None else contextlib.nullcontext():
            metrics, _ = evaluate(model, loaders, torch.device(self.cfg.device), self.cfg.autocast)
            if self.is_main:
                for t in loaders:
                    rec = {"step": step, "epoch": step / self.steps_per_epoch, "split": "dev", "task": t,
                           "overall": metrics["overall"]}
                    rec.update({k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{t}/")})
                    self._write(rec)
                self.log(f"step {step}: dev " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            self.keep(step, metrics, state, model)
        return metrics

    def keep(self, step: int, metrics: Dict[str, float], state, model) -> None:
        """``best/`` when dev overall beats ``state.best`` (``cfg.save_best``), ``top/step-<N>/`` when it
        ranks among the ``cfg.save_top_k`` best; updates ``state.best`` and ``state.top``."""
        cfg = self.cfg
        new_best = metrics["overall"] > state.best
        if new_best:
            state.best = metrics["overall"]
        in_top = bool(cfg.save_top_k) and keep_top_k(state.top, cfg.save_top_k, metrics["overall"], step)
        if (new_best and cfg.save_best) or in_top:
            # ZeRO-3 keeps parameters partitioned: every rank takes part in gathering them (once for both saves)
            with self.engine.full_parameters():
                if self.is_main:
                    info = {"step": step, "dev": metrics}
                    if new_best and cfg.save_best:
                        save_model_dir(self.path / "best", model, cfg, self.tokenizer, info)
                    if in_top:
                        save_model_dir(self.path / "top" / f"step-{step}", model, cfg, self.tokenizer, info)
                        prune_top_k(self.path / "top", state.top)


def finish_run(run_dir: Path, cfg, tokenizer, datasets, device, log) -> None:
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
