"""Prediction ensembles of saved multitask models (``minbert evaluate/predict --checkpoint A B ...``).

Each member runs with its own saved config (tokenization lengths, pair encoding, precision), and
the members' outputs are averaged per example, matched by id:

* classification (SST, CFIMDB): the mean of the class probabilities, p̄ = (1/M) Σ_m softmax(z_m);
  the prediction is argmax p̄;
* binary (Quora): the mean probability p̄ = (1/M) Σ_m σ(z_m); duplicate when p̄ > 0.5;
* regression (STS): the mean score.

Members may hold different tasks: each task is averaged over the members that hold it, so a
multitask model can be joined by single-task specialists, and snapshots of one run (``save_top_k``)
by models of other runs.

Averaging probabilities rather than logits is the usual deep-ensemble rule (Lakshminarayanan et
al. 2017); for one member it gives that member's predictions exactly.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from .multitask import predict_from_output
from .tasks import BINARY, SINGLE_LABEL


class EnsembleError(ValueError):
    """Members that cannot be averaged (other tasks, other examples)."""


def to_probabilities(task_kind: str, outputs: torch.Tensor) -> torch.Tensor:
    """Model outputs (logits (N, C), a logit (N,), or scores (N,)) in the space members are averaged in."""
    if task_kind == SINGLE_LABEL:
        return outputs.float().softmax(-1)
    if task_kind == BINARY:
        return outputs.float().sigmoid()
    return outputs.float()


def from_probabilities(task_kind: str, mean: torch.Tensor) -> torch.Tensor:
    """The inverse map, so that :func:`minbert.multitask.predict_from_output` applies unchanged."""
    if task_kind == SINGLE_LABEL:
        return mean.clamp_min(1e-12).log()
    if task_kind == BINARY:
        return torch.logit(mean.clamp(1e-12, 1 - 1e-12))
    return mean


def average_members(task: str, task_kind: str, results: Sequence[Dict[str, list]]) -> Dict[str, list]:
    """One task's ensemble from each member's :func:`minbert.evaluate.predict` result (with ``outputs``).

    Members must have scored the same examples: the ids are matched, and a member missing an id or
    holding an extra one is an error naming both."""
    if not results:
        raise EnsembleError(f"ensemble ({task}): no members")
    ids = list(results[0]["ids"])
    index = {i: n for n, i in enumerate(ids)}
    if len(index) != len(ids):
        raise EnsembleError(f"ensemble ({task}): member 0 has duplicate ids")
    total = None
    for m, result in enumerate(results):
        if sorted(result["ids"]) != sorted(ids):
            missing = sorted(set(ids) - set(result["ids"]))[:3]
            extra = sorted(set(result["ids"]) - set(ids))[:3]
            raise EnsembleError(f"ensemble ({task}): member {m} scored other examples than member 0 "
                             f"(missing e.g. {missing}, extra e.g. {extra})")
        order = torch.tensor([index[i] for i in result["ids"]])
        member = to_probabilities(task_kind, torch.as_tensor(result["outputs"]))
        probs = torch.empty_like(member)
        probs[order] = member
        total = probs if total is None else total + probs
    mean = total / len(results)
    preds = predict_from_output(task, from_probabilities(task_kind, mean))
    labels = results[0]["labels"]
    if labels is not None:
        by_id = dict(zip(results[0]["ids"], labels))
        labels = [by_id[i] for i in ids]
    return {"ids": ids, "preds": preds.tolist(), "labels": labels, "outputs": mean.tolist()}


def score_checkpoints(checkpoints: Sequence[str], splits: Sequence[str] = ("dev",), data_dir: Optional[str] = None,
                      bad_rows: Optional[str] = None, device: str = "cpu") -> Tuple[object, Dict[Tuple[str, str], dict]]:
    """Score saved models on their tasks' files: ``(config of the first, {(task, split): result})``.

    One checkpoint gives its own predictions; several give their ensemble (:func:`average_members`):
    each task (and split) is averaged over the members that hold it, so single-task specialists can
    join a multitask model. Each member is loaded, run with its own config and freed before the next one."""
    from .build import load_task_data
    from .evaluate import predict_splits
    from .run_dir import load_model_dir

    if not checkpoints:
        raise EnsembleError("ensemble: no checkpoints given")
    members, configs = [], []
    for checkpoint in checkpoints:
        model, cfg, tokenizer = load_model_dir(checkpoint, device=device)
        if data_dir:
            cfg.data.dir = data_dir
        if bad_rows:
            cfg.data.bad_rows = bad_rows
        for task in cfg.tasks:  # score the full dev sets
            task.max_dev_examples = None
        configs.append(cfg)
        datasets = load_task_data(cfg.tasks, cfg.data, cfg.seed)
        members.append(predict_splits(model, cfg, tokenizer, datasets, splits, device))
        del model
    kinds = {t.name: t.kind for cfg in configs for t in cfg.tasks}
    keys = list(dict.fromkeys(key for m in members for key in m))  # first member's order, then the others'
    scored = {key: average_members(key[0], kinds[key[0]], [m[key] for m in members if key in m]) for key in keys}
    return configs[0], scored
