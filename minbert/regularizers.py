"""Regularizers and auxiliary losses: extra loss terms added to a task's loss, behind one interface.

A regularizer is called after the task's forward pass with the model, the batch and the task
output, and returns named scalar terms that the trainer adds to that task's loss::

    terms = reg(model, batch, output)     # {"simcse": tensor(0.7)}
    reg.after_step(model)                 # after each optimizer step (e.g. SMART's teacher EMA)

``reg.before_forward(model, batch)`` runs just before the task's forward pass.

Implementations register themselves in :data:`REGULARIZERS` by name (``minbert.smart`` adds
``smart``). The trainer builds them from the config and never branches on their names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .tasks import get_task

REGULARIZERS: Dict[str, Callable[..., "Regularizer"]] = {}


def register(name: str):
    def wrap(cls):
        REGULARIZERS[name] = cls
        return cls

    return wrap


@dataclass
class RegularizerContext:
    """What :meth:`Regularizer.setup` gets: the host task, the run's data settings and tokenizer."""

    task: str
    data_dir: str
    bad_rows: str
    tokenizer: Any
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    log: Callable[[str], None] = print


class Regularizer:
    name = "regularizer"

    def before_forward(self, model, batch) -> None:
        """Called just before the task's forward pass (e.g. to record the RNG state for shared dropout,
        or to ask the model to keep the input of a layer, ``model.capture_layer = k``)."""

    def __call__(self, model, batch, output: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def setup(self, context: "RegularizerContext") -> None:
        """Called once by the trainer when the run's tokenizer and data settings are known (e.g. to
        read an extra data file)."""

    def bind(self, regularizers: Sequence["Regularizer"]) -> None:
        """Called once, before training, with every regularizer of the run (all tasks), so that
        instances can share state (e.g. one SMART teacher for all tasks)."""

    def after_step(self, model) -> None:
        """Called once after every optimizer step."""

    def stats(self) -> Dict[str, float]:
        """Counters for the training log (e.g. skipped steps)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def _pooled(features):
    """(B, H) sentence vectors of the first (and second) sentence."""
    if hasattr(features, "a"):
        return features.a.pooled, features.b.pooled
    return features.pooled, None


@register("simcse_unsup")
class SimCSEUnsup(Regularizer):
    """Unsupervised SimCSE on the batch's sentences: two dropout views of each sentence are positives."""

    name = "simcse_unsup"

    def __init__(self, weight: float = 1.0, temperature: float = 0.05):
        self.weight = float(weight)
        self.temperature = float(temperature)

    def __call__(self, model, batch, output):
        from .losses import simcse_unsup

        z1, _ = _pooled(model.features(batch))
        z2, _ = _pooled(model.features(batch))  # a second dropout view
        return {self.name: self.weight * simcse_unsup(z1, z2, temperature=self.temperature)}


@register("mnrl")
class MultipleNegativesRanking(Regularizer):
    """Multiple-negatives ranking loss on the positive pairs of a bi-encoded pair batch: paraphrase
    labels above ``threshold`` (binary classification), similarity scores of at least 4 (regression)."""

    name = "mnrl"

    def __init__(self, weight: float = 1.0, scale: float = 20.0, threshold: float = 0.5):
        self.weight = float(weight)
        self.scale = float(scale)
        self.threshold = float(threshold)

    def __call__(self, model, batch, output):
        from .losses import mnrl

        if batch.input_ids_b is None:
            raise ValueError(f"mnrl needs a bi-encoded pair task (pair_encoding: bi); task {batch.task!r} is not")
        u, v = _pooled(model.features(batch))
        labels = batch.labels.float()
        positive = labels >= 4.0 if get_task(batch.task).is_regression else labels > self.threshold
        if int(positive.sum()) < 2:
            return {self.name: u.sum() * 0.0}
        return {self.name: self.weight * mnrl(u[positive], v[positive], scale=self.scale)}


@register("simcse_sup")
class SimCSESup(Regularizer):
    """Supervised SimCSE (Gao, Yao & Chen 2021, eq. 5) on NLI triples, added to the host task's loss.

    ``file``: an NLI TSV (``id, sentence1, sentence2, label``; see :mod:`minbert.data`), relative to
    ``data.dir`` unless absolute. Each premise's entailment hypotheses are its positives and its
    first contradiction hypothesis the hard negative (cycling when it has several); entailment
    pairs whose premise has no contradiction in the file are still used, without a hard negative of
    their own (the other rows' still count; the number is logged, never dropped silently); neutral
    rows are not used (counted too). Every call draws the next batch of ``batch_size`` triples from a seeded,
    resumable :class:`minbert.data.TaskLoader` (sharded by rank like the tasks' data) and encodes
    the sentences with the host task's pooling::

        ℓ_i = −log [ e^{sim(h_i, h_i⁺)/τ} / Σ_j ( e^{sim(h_i, h_j⁺)/τ} + e^{sim(h_i, h_j⁻)/τ} ) ]
    """

    name = "simcse_sup"

    def __init__(self, file: str = None, weight: float = 1.0, temperature: float = 0.05, batch_size: int = 32,
                 max_length: int = 64):
        if not file or not isinstance(file, str):
            raise ValueError("simcse_sup needs option 'file': the NLI TSV with premise/hypothesis/label rows")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"simcse_sup: batch_size must be an integer >= 2 (in-batch negatives), got {batch_size!r}")
        if not float(temperature) > 0:
            raise ValueError(f"simcse_sup: temperature must be > 0, got {temperature!r}")
        self.file, self.weight, self.temperature = file, float(weight), float(temperature)
        self.batch_size, self.max_length = batch_size, int(max_length)
        self.loader = None
        self._iter = None
        self.counts: Dict[str, int] = {}

    def setup(self, context) -> None:
        from pathlib import Path

        from . import data as data_lib

        path = Path(self.file)
        if not path.is_absolute():
            path = Path(context.data_dir) / path
        td = data_lib.read_task_file(path, "nli", bad_rows=context.bad_rows)
        entail, contra = {}, {}
        neutral = 0
        for ex in td.examples:  # labels: 0 entailment, 1 neutral, 2 contradiction
            if ex.label == 0:
                entail.setdefault(ex.text_a, []).append(ex)
            elif ex.label == 2:
                contra.setdefault(ex.text_a, []).append(ex.text_b)
            else:
                neutral += 1
        self.host = context.task
        self.negatives: List[Optional[str]] = []
        triples = []
        for premise, rows in entail.items():
            negs = contra.get(premise, [])
            for k, ex in enumerate(rows):
                self.negatives.append(negs[k % len(negs)] if negs else None)
                # label: the index of this row's hard negative in self.negatives
                triples.append(data_lib.Example(ex.id, "nli", ex.text_a, ex.text_b, len(self.negatives) - 1,
                                                ex.line, ex.source))
        if not triples:
            raise ValueError(f"simcse_sup: {path} has no entailment rows (label 0 / 'entailment')")
        without = sum(n is None for n in self.negatives)
        self.counts = {"triples": len(triples) - without, "pairs_without_negative": without, "neutral_unused": neutral}
        context.log(f"simcse_sup ({self.host}): {path}: {len(triples) - without} triples, {without} entailment "
                    f"pairs without a contradiction for their premise (no hard negative of their own), {neutral} neutral "
                    f"rows not used")
        self.nli_collate = data_lib.make_collate(context.tokenizer, "nli", self.max_length, "bi")
        self.loader = data_lib.TaskLoader(triples, self.batch_size, self._collate, shuffle=True, seed=context.seed,
                                          rank=context.rank, world_size=context.world_size)

    def _collate(self, rows):
        import dataclasses

        # NLI sentences, encoded by the host task's model (its pooling, its adapters)
        pairs = dataclasses.replace(self.nli_collate(rows), task=self.host, labels=None)
        has = torch.tensor([self.negatives[ex.label] is not None for ex in rows])  # (B,)
        if not bool(has.any()):
            return pairs, None, None
        # rows without a contradiction get a placeholder sentence whose column the loss masks out
        texts = [self.negatives[ex.label] or ex.text_b for ex in rows]
        negs = self.nli_collate.sentences(texts, [ex.id for ex in rows])  # hypotheses alone, one sequence each
        return pairs, dataclasses.replace(negs, task=self.host), has

    def _next(self):
        if self.loader is None:
            raise RuntimeError("simcse_sup: setup(context) was not called (the trainer calls it once the tokenizer exists)")
        try:
            return next(self._iter)
        except (StopIteration, TypeError):
            self._iter = iter(self.loader)
            return next(self._iter)

    def __call__(self, model, batch, output):
        from .losses import simcse_sup

        pairs, negs, has = self._next()
        device = batch.input_ids.device
        feats = model.features(pairs.to(device))  # premises (a) and entailment hypotheses (b)
        negative = model.features(negs.to(device)).pooled if negs is not None else None  # (B, H)
        model.set_task(batch.task)  # back to the host task for anything that follows
        loss = simcse_sup(feats.a.pooled, feats.b.pooled, negative, temperature=self.temperature,
                          negative_mask=None if has is None or bool(has.all()) else has)
        return {self.name: self.weight * loss}

    def stats(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {"loader": self.loader.state_dict()} if self.loader is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("loader") is not None and self.loader is not None:
            self.loader.load_state_dict(state["loader"])
            self._iter = None


def build_regularizers(specs: Sequence[Dict[str, Any]]) -> List[Regularizer]:
    """``[{name: simcse_unsup, weight: 0.1}, ...]`` -> regularizer objects (clear error on unknown names)."""
    out = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in REGULARIZERS:
            raise ValueError(f"aux_losses[{i}]: unknown name {name!r}; expected one of {sorted(REGULARIZERS)}")
        try:
            out.append(REGULARIZERS[name](**spec))
        except TypeError as e:
            raise ValueError(f"aux_losses[{i}] ({name}): {e}") from None
    return out
