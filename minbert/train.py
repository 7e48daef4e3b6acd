"""The multitask training loop: :class:`TrainState`, :func:`train_step` and :func:`train`.

One flat loop in a fixed order (nanoGPT style)::

    for step in range(start, total_steps):
        lr            the scheduler's value for this step (logged)
        eval/ckpt     dev evaluation, best checkpoint, resumable checkpoint when due
        forward       tasks_for_step(step) -> one batch per task -> task loss + regularizer terms
        backward      weighting.backward(losses)  (sum, weights, PCGrad, ...) through the engine
        clip, step    engine.clip_grad_norm(), engine.optimizer_step()  (single process, or DeepSpeed ZeRO)
        log           metrics.jsonl, progress bar

The set-up is in :mod:`minbert.build`, evaluation in :mod:`minbert.evaluate`, the run folder and
its log in :mod:`minbert.run_dir`. Every method (task schedule, loss weighting, regularizer,
fine-tune mode, engine) is an object behind its own interface; the loop never branches on names.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from . import build
from .data import TaskLoader
from .ema import ParameterEMA
from .engine import Engine
from .evaluate import autocast_context
from .run_dir import RunDir, finish_run, write_config
from .task_schedules import TaskSampler
from .train_config import TrainConfig
from .weighting import Weighting


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite losses in a row)."""


@dataclass
class TrainState:
    """Everything a resumed run restores besides the engine's own state (weights, optimizer, LR schedule).

    :meth:`state_dict` is the trainer's part of a checkpoint, :meth:`load_state_dict` restores all of it.
    """

    weighting: Weighting
    loaders: Dict[str, TaskLoader]  # the train loaders (their epoch and position)
    regularizers: Dict[str, list]
    sampler: TaskSampler
    ema: Optional[ParameterEMA] = None
    step: int = 0  # the next step to run
    best: float = -math.inf  # the best dev overall so far
    top: List[List[float]] = field(default_factory=list)  # [[dev overall, step], ...] kept under top/ (save_top_k)
    nan_run: int = 0  # steps skipped for a non-finite loss or gradient: in a row, and in total
    nan_total: int = 0
    epoch_losses: Dict[str, List[float]] = field(default_factory=dict)  # this epoch's train losses per task

    def __post_init__(self):
        self.epoch_losses = self.epoch_losses or {t: [] for t in self.loaders}

    def state_dict(self) -> Dict:
        return {
            "step": self.step, "best": self.best, "top": self.top, "nan_run": self.nan_run, "nan_total": self.nan_total,
            "epoch_losses": self.epoch_losses, "weighting": self.weighting.state_dict(),
            "loaders": {t: loader.state_dict() for t, loader in self.loaders.items()},
            "regularizers": {t: [r.state_dict() for r in regs] for t, regs in self.regularizers.items()},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "sampler": self.sampler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: Dict) -> None:
        self.step, self.best, self.top = state["step"], state["best"], [list(item) for item in state["top"]]
        self.nan_run, self.nan_total, self.epoch_losses = state["nan_run"], state["nan_total"], state["epoch_losses"]
        self.weighting.load_state_dict(state["weighting"])
        for t, loader_state in state["loaders"].items():
            self.loaders[t].load_state_dict(loader_state)
        for t, states in state["regularizers"].items():
            for reg, reg_state in zip(self.regularizers[t], states):
                reg.load_state_dict(reg_state)
        self.sampler.load_state_dict(state["sampler"])  # refuses a checkpoint of another schedule
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError("--resume: the checkpoint was saved without 'ema'; resume with the run's own config")
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])


def train_step(model, micro_batches: List[list], losses: Dict[str, Callable], regularizers: Dict[str, list],
               weighting: Weighting, engine: Engine, precision: Callable, update: int, state: TrainState,
               run: RunDir) -> bool:
    """Forward and backward of one update over a step's micro-batches (each: one batch per task).

    ``precision()`` is the autocast context of forward and losses. Returns False, back-propagating
    nothing more, as soon as a micro-batch's loss is not finite on some rank. The step's first
    update (``update == 0``) logs the examples, losses and regularizer terms."""
    grad_accum = len(micro_batches)
    for batches in micro_batches:
        task_losses, terms = {}, {}
        for batch in batches:
            t = batch.task
            with precision():  # forward and losses; backward outside
                for reg in regularizers[t]:
                    reg.before_forward(model, batch)
                output = model(batch)  # fp32 whatever the autocast (MultitaskModel.forward)
                loss = losses[t](output, batch.labels)
                for reg in regularizers[t]:
                    for name, term in reg(model, batch, output).items():
                        loss = loss + term
                        terms[f"{t}/{name}"] = float(term.detach())
            task_losses[t] = loss / grad_accum
            if update == 0:
                run.examples += batch.size
        if not engine.all_true(all(bool(torch.isfinite(l.detach()).all()) for l in task_losses.values())):
            return False
        weighting.backward(task_losses, model.shared_parameters(), backward=engine.backward, update_index=update)
        if update == 0:
            logged = {t: float(l.detach()) * grad_accum for t, l in task_losses.items()}
            run.add(logged, terms)
            for t, v in logged.items():
                state.epoch_losses[t].append(v)
    return True


def train(cfg: TrainConfig, resume: Optional[str] = None, engine_builder: Optional[Callable] = None, rank: int = 0,
          world_size: int = 1, log: Optional[Callable[[str], None]] = None, stop_at_step: Optional[int] = None
          ) -> Dict[str, float]:
    """Fine-tune ``cfg.tasks`` on one encoder; returns the best dev overall and the last dev metrics.

    ``engine_builder(model, param_groups, make_scheduler, cfg) -> Engine`` swaps the single-process
    engine for another (``minbert.distributed`` passes DeepSpeed's); ``rank``/``world_size`` shard
    the data. ``stop_at_step`` raises KeyboardInterrupt before that step (a killed run, for tests).
    """
    is_main = rank == 0
    log = log or (lambda msg: print(msg, flush=True) if is_main else None)
    main_log = log if is_main else (lambda msg: None)
    device = torch.device(cfg.device)
    autocast_context(cfg.autocast, device)  # refuses bf16 on a GPU without it before anything is loaded
    # set-up, in the order minbert.build states
    build.seed_everything(cfg.seed)
    if is_main:
        write_config(cfg)
    regularizers = build.setup_regularizers(cfg)
    losses = build.setup_losses(cfg.tasks)
    data = build.setup_data(cfg.tasks, cfg.data, cfg.model, cfg.seed, rank, world_size, main_log)
    build.setup_regularizer_data(regularizers, cfg.data, data.tokenizer, cfg.seed, rank, world_size, main_log)
    sampler, total_steps = build.setup_sampler(cfg.schedule, data.train, cfg.seed, cfg.epochs, cfg.max_steps)
    model, losses = build.setup_model(cfg, losses, device, log)
    weighting = build.setup_weighting(cfg.weighting, cfg.tasks, cfg.seed)
    engine, weighting = build.setup_engine(cfg, model, weighting, sampler, total_steps, engine_builder)
    ema = build.setup_ema(cfg.ema, model)
    state = TrainState(weighting, data.train, regularizers, sampler, ema)
    if resume:
        state.load_state_dict(engine.load_checkpoint(resume))
        log(f"resumed from {resume} at step {state.step} (best dev overall {state.best:.4f})")
    resumed_at = state.step if resume else None  # a resumed step already evaluated and saved
    run = RunDir(cfg, data.tokenizer, engine, sampler.steps_per_epoch, total_steps, state.step, is_main, log)
    batches = build.BatchStreams(data.train)  # after the resume: the loaders continue where they were saved
    precision = functools.partial(autocast_context, cfg.autocast, device)
    metrics = {}
    for step in range(state.step, total_steps):
        state.step = step
        # lr: the scheduler set this step's value at the previous optimizer step
        lr = engine.lr
        # eval / checkpoint: every eval_every / save_every steps, else at each new epoch
        if step > 0 and step != resumed_at:
            new_epoch = sampler.epoch_for_step(step) != sampler.epoch_for_step(step - 1)
            if data.dev and ((step % cfg.eval_every == 0) if cfg.eval_every else new_epoch):
                metrics = run.evaluate(step, model, data.dev, state, ema)
            if new_epoch:
                means = engine.rank_mean({t: float(np.mean(v)) for t, v in state.epoch_losses.items() if v})
                weighting.end_epoch(sampler.epoch_for_step(step) - 1, means,
                                    {k.split("/")[0]: v for k, v in metrics.items() if "/" in k})
                state.epoch_losses = {t: [] for t in state.epoch_losses}
            if (step % cfg.save_every == 0) if cfg.save_every else new_epoch:
                engine.save_checkpoint(run.path / "checkpoint", state.state_dict())
        if stop_at_step is not None and step == stop_at_step:
            raise KeyboardInterrupt(f"stopped before step {step} (stop_at_step)")
        # forward / backward: one batch per task this step, grad_accum times (GSE: two updates on them)
        tasks = sampler.tasks_for_step(step)
        micro_batches = [[batches.next(t).to(device) for t in tasks] for _ in range(cfg.optim.grad_accum)]
        skipped = False
        for update in range(weighting.num_updates):
            finite = train_step(model, micro_batches, losses, regularizers, weighting, engine, precision, update,
                                state, run)
            # clip: a non-finite loss or gradient norm skips the step
            if not finite or not math.isfinite(engine.clip_grad_norm()):
                skipped = True
                break
            # step
            engine.optimizer_step()
        if skipped:  # the LR schedule still advances; nan_patience skipped steps in a row stop the run
            engine.skip_step()
            state.nan_run, state.nan_total = state.nan_run + 1, state.nan_total + 1
            run.log_skip(step, tasks, state.nan_run, state.nan_total)
            if state.nan_run >= cfg.nan_patience:
                raise TrainingError(f"stopping: {state.nan_run} consecutive steps had a non-finite loss or gradient "
                                    f"(nan_patience={cfg.nan_patience}); lower the learning rate or check the data")
            continue
        state.nan_run = 0
        for reg in (r for regs in regularizers.values() for r in regs):  # what follows the new weights
            reg.after_step(model)
        if ema is not None:
            ema.update(model)
        # log
        run.log_step(step, lr, regularizers)
    run.close()

    # final evaluation, checkpoint, predictions, plots
    state.step = total_steps
    if data.dev and total_steps > (resumed_at or 0):
        metrics = run.evaluate(total_steps, model, data.dev, state, ema)
    engine.save_checkpoint(run.path / "checkpoint", state.state_dict())
    if is_main:
        finish_run(run.path, cfg, data.tokenizer, data.datasets, device, log)
    return {"best_overall": state.best, **metrics}
