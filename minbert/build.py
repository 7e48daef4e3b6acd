"""The trainer's set-up: one named builder per part, each given the config sections it reads.

:func:`minbert.train.train` calls them in this order, which these constraints fix:

1. :func:`seed_everything` first. SMART derives its noise seeds from ``torch.initial_seed()`` when
   it is built, and :func:`setup_model` draws the heads' (and LoRA's) initial weights from torch's
   global generator, so both must follow the seeding and keep their order.
2. :func:`setup_regularizers` and :func:`setup_losses` before any file is read, so that a bad
   option fails at once.
3. :func:`setup_data` (the tokenizer, every task's files and loaders), then
   :func:`setup_regularizer_data`: regularizers that read their own file need the tokenizer.
4. :func:`setup_sampler`: which tasks train at each step; it needs the train loaders' lengths and
   gives the step counts the LR schedule needs.
5. :func:`setup_model`: the encoder, heads and fine-tuning mode, and each task's loss as its
   head trains it.
6. :func:`setup_weighting`, then :func:`setup_engine`: the optimizer also trains the weighting's
   own parameters, and the engine may hand back another weighting (sharded PCGrad under ZeRO).
7. :func:`setup_ema` last: the average starts from the weights the engine holds.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import data as data_lib
from .ema import ParameterEMA
from .engine import Engine, LocalEngine, build_adamw, param_groups
from .finetune import count_parameters, set_trainable
from .losses import build_loss
from .model import BertModel
from .multitask import MultitaskModel
from .regularizers import REGULARIZERS, Regularizer, RegularizerContext, build_regularizers
from .lr_schedules import build_lr_scheduler
from .task_schedules import TaskSampler, build_task_sampler
from .tokenizer import Tokenizer
from .train_config import ConfigError, DataConfig, OptimConfig, ScheduleConfig, TaskConfig, TrainConfig, WeightingConfig
from .weighting import Weighting, build_weighting

Log = Callable[[str], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# --- losses and regularizers ----------------------------------------------------------------------

def setup_regularizers(cfg: TrainConfig) -> Dict[str, List[Regularizer]]:
    """Per task: its ``aux_losses``, then SMART when :meth:`TrainConfig.smart_for` says it is on.
    All of them are bound to each other (tasks with the same β share one SMART teacher)."""
    out = {}
    for task in cfg.tasks:
        regs = build_regularizers(task.aux_losses)
        smart = cfg.smart_for(task.name)
        if smart is not None:
            import minbert.smart  # noqa: F401  (registers "smart")

            try:
                regs.append(REGULARIZERS["smart"](task=task.name, kind=task.kind, **smart.options()))
            except TypeError as e:
                raise ConfigError(f"smart (task {task.name}): {e}") from None
        out[task.name] = regs
    everyone = [r for regs in out.values() for r in regs]
    for reg in everyone:
        reg.bind(everyone)
    return out


def setup_losses(tasks: Sequence[TaskConfig]) -> Dict[str, Callable]:
    """Each task's main loss, ``loss(output, labels)``; embedding losses belong in ``aux_losses``."""
    out = {}
    for t in tasks:
        try:
            loss = build_loss(t.loss_name, **t.loss_options)
        except ValueError as e:
            raise ConfigError(f"tasks.{t.name}.loss: {e}") from None
        if getattr(loss, "kind", "task") != "task":
            raise ConfigError(f"tasks.{t.name}.loss: {t.loss_name!r} is an embedding loss; a task loss takes "
                              f"(output, labels). Add it under tasks.{t.name}.aux_losses instead")
        out[t.name] = loss
    return out


# --- data -------------------------------------------------------------------------------------------

def load_task_data(tasks: Sequence[TaskConfig], data: DataConfig, seed: int, log: Log = print
                   ) -> Dict[str, Dict[str, Optional[data_lib.TaskData]]]:
    """Read train/dev/test files of every task; report what was skipped. Missing dev/test files are allowed."""
    out = {}
    for task in tasks:
        files = task.files(data.dir)
        splits = {}
        for split, path in files.items():
            if data.source == "hub":
                splits[split] = data_lib.load_hub_task(task.name, {"train": "train", "dev": "validation", "test": "test"}[split],
                                                       bad_rows=data.bad_rows)
                continue
            if path is None or not path.exists():
                if split == "train":
                    raise FileNotFoundError(f"tasks.{task.name}.train_file: {path} does not exist (data.dir={data.dir})")
                splits[split] = None
                continue
            td = data_lib.read_task_file(path, task.name, bad_rows=data.bad_rows)
            if td.num_skipped:
                log(f"warning: {td.summary()}")
            splits[split] = td
        limit = {"train": task.max_train_examples, "dev": task.max_dev_examples}
        for split, n in limit.items():
            td = splits.get(split)
            if n is not None and td is not None and len(td.examples) > n:
                rng = random.Random(seed)
                td.examples = sorted(rng.sample(td.examples, n), key=lambda e: e.line)
        out[task.name] = splits
    return out


@dataclass
class TrainData:
    """The run's tokenizer, files (``{task: {split: TaskData or None}}``) and loaders."""

    tokenizer: Tokenizer
    datasets: Dict[str, Dict[str, Optional[data_lib.TaskData]]]
    train: Dict[str, data_lib.TaskLoader]  # every task, this rank's shard, shuffled
    dev: Dict[str, data_lib.TaskLoader]  # the tasks with a dev file, whole, in file order


def setup_data(tasks: Sequence[TaskConfig], data: DataConfig, model: Optional[str], seed: int, rank: int = 0,
               world_size: int = 1, log: Log = print) -> TrainData:
    """The tokenizer of checkpoint ``model``, every task's files, its train loader and dev loader."""
    tokenizer = Tokenizer.from_pretrained(model)
    datasets = load_task_data(tasks, data, seed, log)
    train, dev = {}, {}
    for task in tasks:
        train[task.name] = data_lib.TaskLoader(
            datasets[task.name]["train"], task.batch_size, task.collate(tokenizer), shuffle=True, seed=seed,
            bucket_by_length=data.bucket_by_length, rank=rank, world_size=world_size, swap_pairs=task.swap_pairs)
        if datasets[task.name]["dev"] is not None:
            dev[task.name] = data_lib.TaskLoader(
                datasets[task.name]["dev"], max(64, task.batch_size), task.collate(tokenizer, evaluation=True),
                shuffle=False, bucket_by_length=False)
    return TrainData(tokenizer, datasets, train, dev)


def setup_regularizer_data(regularizers: Dict[str, List[Regularizer]], data: DataConfig, tokenizer: Tokenizer,
                           seed: int, rank: int = 0, world_size: int = 1, log: Log = print) -> None:
    """Let each regularizer read its own data (supervised SimCSE's NLI file)."""
    for task, regs in regularizers.items():
        context = RegularizerContext(task=task, data_dir=data.dir, bad_rows=data.bad_rows, tokenizer=tokenizer,
                                     seed=seed, rank=rank, world_size=world_size, log=log)
        for reg in regs:
            reg.setup(context)


class BatchStreams:
    """Endless training batches per task: a loader that runs out starts its next epoch, so smaller
    tasks restart while larger ones go on. Build it after a resume has restored the loaders."""

    def __init__(self, loaders: Dict[str, data_lib.TaskLoader]):
        self.loaders = loaders
        self.iterators = {t: iter(loader) for t, loader in loaders.items()}

    def next(self, task: str) -> data_lib.Batch:
        try:
            return next(self.iterators[task])
        except StopIteration:
            self.iterators[task] = iter(self.loaders[task])
            return next(self.iterators[task])


def setup_sampler(schedule: ScheduleConfig, loaders: Dict[str, data_lib.TaskLoader], seed: int, epochs: int,
                  max_steps: Optional[int]) -> (TaskSampler, int):
    """(the task sampler, the run's total steps): ``epochs`` of the schedule's epochs, at most ``max_steps``."""
    sampler = build_task_sampler(schedule.kind, list(loaders), {t: len(loader) for t, loader in loaders.items()},
                                 seed=seed, epoch_size=schedule.epoch_size, multiplier=schedule.multiplier,
                                 order=schedule.order, **schedule.options)
    total_steps = sampler.total_steps or sampler.steps_per_epoch * epochs
    return sampler, total_steps if max_steps is None else min(total_steps, max_steps)


# --- model, weighting, engine -------------------------------------------------------------------------

def setup_model(cfg: TrainConfig, losses: Dict[str, Callable], device, log: Log = print
                ) -> (MultitaskModel, Dict[str, Callable]):
    """(the model in train mode on ``device``, each task's loss as its head trains it): the encoder
    ``cfg.model`` with ``cfg.attn_implementation``, ``cfg.tasks``' heads, ``cfg.finetune``'s trainable set."""
    model = MultitaskModel(BertModel.from_pretrained(cfg.model, attn_implementation=cfg.attn_implementation), cfg.tasks)
    losses = {t: model.task_loss(t, fn) for t, fn in losses.items()}
    set_trainable(model, cfg)
    model.to(device).train()
    counts = count_parameters(model)
    log(f"parameters: {counts['trainable']:,} trainable of {counts['total']:,} "
        f"({100.0 * counts['trainable'] / counts['total']:.2f}%), finetune={cfg.finetune}")
    return model, losses


def setup_weighting(weighting: WeightingConfig, tasks: Sequence[TaskConfig], seed: int) -> Weighting:
    """The loss weighting, with the options it takes from the tasks and the run when not given."""
    options = dict(weighting.options)
    if weighting.name == "fixed" and "weights" not in options:
        options["weights"] = {t.name: t.weight for t in tasks}
    if weighting.name in ("pcgrad", "gse") and "seed" not in options:
        options["seed"] = seed
    if weighting.name in ("uncertainty", "dev_score") and "task_kinds" not in options:
        options["task_kinds"] = {t.name: t.kind for t in tasks}
    return build_weighting(weighting.name, [t.name for t in tasks], **options)


def setup_engine(cfg: TrainConfig, model: MultitaskModel, weighting: Weighting, sampler: TaskSampler,
                 total_steps: int, engine_builder: Optional[Callable] = None) -> (Engine, Weighting):
    """(the engine, the weighting to train with). AdamW over ``param_groups`` (``cfg.optim``, plus the
    weighting's own parameters) with ``cfg.optim.schedule``; ``engine_builder(model, groups,
    make_scheduler, cfg)`` builds another engine instead of :class:`LocalEngine` (DeepSpeed's)."""
    optim: OptimConfig = cfg.optim
    groups = param_groups(model, optim.lr, optim.weight_decay, optim.head_lr, weighting.parameters(),
                          layer_decay=optim.layer_decay)

    def make_scheduler(optimizer):
        return build_lr_scheduler(optimizer, optim.schedule, total_steps=total_steps,
                                  steps_per_epoch=sampler.steps_per_epoch, warmup_steps=int(optim.warmup_ratio * total_steps),
                                  gamma=optim.gamma, epoch_starts=getattr(sampler, "epoch_starts", None))

    if engine_builder is not None:
        engine = engine_builder(model, groups, make_scheduler, cfg)
    else:
        try:
            optimizer = build_adamw(groups, optim.lr, optim.betas, optim.eps, optim.fused)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        engine = LocalEngine(model, optimizer, make_scheduler(optimizer), optim.grad_clip)
    return engine, engine.wrap_weighting(weighting)


def setup_ema(beta: Optional[float], model: MultitaskModel) -> Optional[ParameterEMA]:
    """The moving average of the weights that is evaluated (``cfg.ema``), started at the current weights."""
    if not beta:
        return None
    ema = ParameterEMA(beta, where="ema", warmup=True, dtype=torch.float32)
    ema.ensure(model)
    return ema
