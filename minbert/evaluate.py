"""Evaluation: run a model over loaders, score its predictions, write prediction files.

``predict`` runs one loader (in the run's autocast precision), ``evaluate`` a dict of loaders and
scores them (:func:`score`: per-task metrics plus ``overall``), ``predict_splits`` runs every
configured task over its dev/test files and ``write_results`` writes the CS224N prediction files.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Optional

import torch

from . import data as data_lib
from .metrics import overall_score, task_metric
from .prediction_files import write_predictions
from .multitask import MultitaskModel, predict_from_output
from .train_config import ConfigError


def autocast_context(mode: Optional[str], device) -> contextlib.AbstractContextManager:
    """The mixed-precision context of ``cfg.autocast`` on ``device``: ``torch.autocast`` in bfloat16
    for ``"bf16"``, a null context for ``None`` (fp32).

    Under autocast the matmuls (linear, attention) run in bf16 -- on a CPU with AMX or AVX512-BF16
    through oneDNN, on a GPU through its tensor cores -- while the weights, their gradients and the
    optimizer state stay fp32 and the task outputs come back in fp32 (:meth:`MultitaskModel.forward`),
    so losses, metrics and SMART's divergences are computed in fp32.
    """
    if mode is None:
        return contextlib.nullcontext()
    if mode != "bf16":
        raise ConfigError(f"autocast: {mode!r} is not valid; expected one of [None, 'bf16']")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"autocast: 'bf16' needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} "
                          f"has none (use autocast: null)")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def predict(model: MultitaskModel, loader, device, autocast: Optional[str] = None) -> Dict[str, list]:
    """Run the model over a loader: ids, predictions, labels (None for unlabelled files) and the
    raw task outputs (logits or scores, for ensembles).

    ``autocast`` is the run's ``cfg.autocast`` (the precision the model was trained and selected in)."""
    was_training = model.training
    model.eval()
    ids, preds, labels, outputs = [], [], [], []
    for batch in loader:
        batch = batch.to(device)
        with autocast_context(autocast, device):
            out = model(batch)
            if batch.swapped is not None:  # symmetric evaluation: the mean output of both orders
                out = 0.5 * (out + model(batch.swapped))
        preds.extend(predict_from_output(batch.task, out).cpu().tolist())
        outputs.extend(out.cpu().tolist())
        ids.extend(batch.ids)
        if batch.labels is not None:
            labels.extend(batch.labels.cpu().tolist())
    model.train(was_training)
    return {"ids": ids, "preds": preds, "labels": labels if labels else None, "outputs": outputs}


def summarize(scores: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Flatten per-task metrics and add the CS224N overall score when SST, Quora and STS are all there."""
    flat = {}
    for task, metrics in scores.items():
        for k, v in metrics.items():
            flat[f"{task}/{k}"] = v
    if all(t in scores for t in ("sst", "quora", "sts")):
        flat["overall"] = overall_score(scores["sst"]["accuracy"], scores["quora"]["accuracy"], scores["sts"]["pearson"])
    else:  # the same normalisation, averaged over the tasks present
        parts = [(m["pearson"] + 1) / 2 if "pearson" in m else m["accuracy"] for m in scores.values()]
        flat["overall"] = float(sum(parts) / len(parts)) if parts else float("nan")
    return flat


def score(results: Dict[str, dict]) -> Dict[str, float]:
    """Flat metrics (:func:`summarize`) of ``{task: predict() result}``; unlabelled results are left out."""
    return summarize({task: task_metric(task, r["preds"], r["labels"]) for task, r in results.items()
                      if r["labels"] is not None})


def evaluate(model: MultitaskModel, loaders: Dict, device, autocast: Optional[str] = None
             ) -> (Dict[str, float], Dict[str, dict]):
    """(flat metrics, ``{task: predict() result}``) of the model on each task's loader."""
    outputs = {task: predict(model, loader, device, autocast) for task, loader in loaders.items()}
    return score(outputs), outputs


def predict_splits(model, cfg, tokenizer, datasets, splits=("dev", "test"), device="cpu") -> Dict[tuple, dict]:
    """``{(task, split): predict() result}`` for every configured task and each split it has a file for."""
    results = {}
    for task in cfg.tasks:
        collate = task.collate(tokenizer, evaluation=True)
        for split in splits:
            td = datasets[task.name].get(split)
            if td is not None:
                results[(task.name, split)] = predict(model, data_lib.TaskLoader(td, 64, collate, shuffle=False),
                                                      device, cfg.autocast)
    return results


def write_results(results: Dict[tuple, dict], out_dir: Path) -> Dict[str, Path]:
    """CS224N prediction files ``<task>-<split>-output.csv`` for ``{(task, split): result}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {f"{task}-{split}": write_predictions(out_dir / f"{task}-{split}-output.csv", task, r["ids"], r["preds"])
            for (task, split), r in results.items()}
