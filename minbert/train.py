"""The multitask training loop.

One flat loop in a fixed order (nanoGPT style)::

    for step in range(start, total_steps):
        lr            the scheduler's value for this step (logged)
        eval/ckpt     dev evaluation, best checkpoint, resumable checkpoint when due
        forward       tasks_for_step(step) -> one batch per task -> task loss + regularizer terms
        backward      weighting.backward(losses)  (sum, weights, PCGrad, ...) through the engine
        clip + step   engine.step()  (single process, or DeepSpeed ZeRO)
        log           metrics.jsonl, progress bar

Every method (task schedule, loss weighting, regularizer, fine-tune mode, engine) is an object
behind its own interface; the loop never branches on method names.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import yaml

from . import data as data_lib
from .engine import LocalEngine, build_adamw, param_groups
from .finetune import count_parameters, set_trainable
from .losses import build_loss
from .evaluate import autocast_context, evaluate
from .metrics import append_jsonl
from .model import BertModel
from .multitask import MultitaskModel
from .ema import ParameterEMA
from .run_dir import finish_run, keep_top_k, prune_top_k, save_model_dir
from .regularizers import REGULARIZERS, RegularizerContext, build_regularizers
from .schedules import build_lr_scheduler, build_task_sampler
from .tokenizer import Tokenizer
from .train_config import ConfigError, TrainConfig
from .weighting import build_weighting

logger = logging.getLogger("minbert.train")


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite losses in a row)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> Dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


# --- data ---------------------------------------------------------------------------------------

def load_task_data(cfg: TrainConfig, log=print) -> Dict[str, Dict[str, Optional[data_lib.TaskData]]]:
    """Read train/dev/test files of every task; report what was skipped. Missing dev/test files are allowed."""
    out = {}
    for task in cfg.tasks:
        files = task.files(cfg.data.dir)
        splits = {}
        for split, path in files.items():
            if cfg.data.source == "hub":
                splits[split] = data_lib.load_hub_task(task.name, {"train": "train", "dev": "validation", "test": "test"}[split],
                                                       bad_rows=cfg.data.bad_rows)
                continue
            if path is None or not path.exists():
                if split == "train":
                    raise FileNotFoundError(f"tasks.{task.name}.train_file: {path} does not exist (data.dir={cfg.data.dir})")
                splits[split] = None
                continue
            td = data_lib.read_task_file(path, task.name, bad_rows=cfg.data.bad_rows)
            if td.num_skipped:
                log(f"warning: {td.summary()}")
            splits[split] = td
        limit = {"train": task.max_train_examples, "dev": task.max_dev_examples}
        for split, n in limit.items():
            td = splits.get(split)
            if n is not None and td is not None and len(td.examples) > n:
                rng = random.Random(cfg.seed)
                td.examples = sorted(rng.sample(td.examples, n), key=lambda e: e.line)
        out[task.name] = splits
    return out


# --- the trainer ------------------------------------------------------------------------------

def _task_regularizers(cfg: TrainConfig) -> Dict[str, list]:
    """Per task: aux losses, then SMART when :meth:`TrainConfig.smart_for` says it is on."""
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


def train(
    cfg: TrainConfig,
    resume: Optional[str] = None,
    engine_builder: Optional[Callable] = None,
    rank: int = 0,
    world_size: int = 1,
    log: Optional[Callable[[str], None]] = None,
    stop_at_step: Optional[int] = None,
) -> Dict[str, float]:
    """Fine-tune ``cfg.tasks`` on one encoder; returns the best dev metrics.

    ``engine_builder(model, param_groups, scheduler_fn, cfg) -> engine`` swaps the single-process
    engine for another with the same interface (``minbert.distributed`` passes DeepSpeed's).
    """
    is_main = rank == 0
    log = log or (lambda msg: print(msg, flush=True) if is_main else None)
    device = torch.device(cfg.device)
    autocast_context(cfg.autocast, device)  # refuses bf16 on a GPU without it before anything is loaded
    seed_everything(cfg.seed)
    run_dir = Path(cfg.output_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "config.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    regularizers = _task_regularizers(cfg)
    loss_fns = _task_losses(cfg)

    # data ------------------------------------------------------------------------------------
    tokenizer = Tokenizer.from_pretrained(cfg.model)
    datasets = load_task_data(cfg, log if is_main else (lambda m: None))
    train_loaders, dev_loaders = {}, {}
    for task in cfg.tasks:
        train_loaders[task.name] = data_lib.TaskLoader(
            datasets[task.name]["train"], task.batch_size, task.collate(tokenizer), shuffle=True, seed=cfg.seed,
            bucket_by_length=cfg.data.bucket_by_length, rank=rank, world_size=world_size, swap_pairs=task.swap_pairs)
        if datasets[task.name]["dev"] is not None:
            dev_loaders[task.name] = data_lib.TaskLoader(
                datasets[task.name]["dev"], max(64, task.batch_size), task.collate(tokenizer, evaluation=True),
                shuffle=False, bucket_by_length=False)
    for task in cfg.tasks:  # regularizers that read their own data (supervised SimCSE's NLI file)
        context = RegularizerContext(task=task.name, data_dir=cfg.data.dir, bad_rows=cfg.data.bad_rows,
                                     tokenizer=tokenizer, seed=cfg.seed, rank=rank, world_size=world_size,
                                     log=log if is_main else (lambda m: None))
        for reg in regularizers[task.name]:
            reg.setup(context)
    batches_per_epoch = {t: len(loader) for t, loader in train_loaders.items()}
    names = [t.name for t in cfg.tasks]
    sampler = build_task_sampler(cfg.schedule.kind, names, batches_per_epoch, seed=cfg.seed,
                                 epoch_size=cfg.schedule.epoch_size, multiplier=cfg.schedule.multiplier,
                                 order=cfg.schedule.order, **cfg.schedule.options)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = getattr(sampler, "total_steps", None) or steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    # model, optimizer, engine ---------------------------------------------------------------
    bert = BertModel.from_pretrained(cfg.model, attn_implementation=cfg.attn_implementation)
    model = MultitaskModel(bert, cfg.tasks)
    loss_fns = {t: model.task_loss(t, fn) for t, fn in loss_fns.items()}
    set_trainable(model, cfg)
    model.to(device).train()
    counts = count_parameters(model)
    log(f"parameters: {counts['trainable']:,} trainable of {counts['total']:,} "
        f"({100.0 * counts['trainable'] / counts['total']:.2f}%), finetune={cfg.finetune}")
    weighting = build_weighting(cfg.weighting.name, names, **_weighting_options(cfg))
    groups = param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.head_lr, weighting.parameters(),
                          layer_decay=cfg.optim.layer_decay)
    warmup = int(cfg.optim.warmup_ratio * total_steps)

    def make_scheduler(optimizer):
        return build_lr_scheduler(optimizer, cfg.optim.schedule, total_steps=total_steps,
                                  steps_per_epoch=steps_per_epoch, warmup_steps=warmup, gamma=cfg.optim.gamma,
                                  epoch_starts=getattr(sampler, "epoch_starts", None))

    if engine_builder is None:
        try:
            optimizer = build_adamw(groups, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.fused)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        engine = LocalEngine(model, optimizer, make_scheduler(optimizer), cfg.optim.grad_clip)
    else:
        engine = engine_builder(model, groups, make_scheduler, cfg)
    # an engine whose gradients live in shards (DeepSpeed ZeRO) supplies its own PCGrad
    weighting = engine.wrap_weighting(weighting)
    shared_params = model.shared_parameters()
    # weight averaging for evaluation (cfg.ema): θ̄ = θ now, so a ZeRO-3 run is refused before training
    ema = ParameterEMA(cfg.ema, where="ema", warmup=True, dtype=torch.float32) if cfg.ema else None
    if ema is not None:
        ema.ensure(model)
    # with several ranks: agree on skipping, log the mean over ranks (identity for the local engine)
    all_true, rank_mean = engine.all_true, engine.rank_mean
    num_updates = weighting.num_updates

    # state that a resume restores -----------------------------------------------------------
    start_step, best, nan_run, nan_total = 0, -math.inf, 0, 0
    top: List[List[float]] = []  # [[dev overall, step], ...] of the models kept under top/ (cfg.save_top_k)
    epoch_losses: Dict[str, List[float]] = {t: [] for t in names}
    if resume:
        client = engine.load_checkpoint(resume)
        start_step, best = client["step"], client["best"]
        top = [list(item) for item in client.get("top", [])]
        nan_run, nan_total = client["nan_run"], client["nan_total"]
        epoch_losses = client["epoch_losses"]
        weighting.load_state_dict(client["weighting"])
        for t, state in client["loaders"].items():
            train_loaders[t].load_state_dict(state)
        for t, states in client["regularizers"].items():
            for reg, state in zip(regularizers[t], states):
                reg.load_state_dict(state)
        sampler.load_state_dict(client["sampler"])  # refuses a checkpoint of another schedule
        if ema is not None:
            if client.get("ema") is None:
                raise ValueError(f"--resume: {resume} was saved without 'ema'; resume with the run's own config")
            ema.load_state_dict(client["ema"])
        set_rng_state(client["rng"])
        log(f"resumed from {resume} at step {start_step} (best dev overall {best:.4f})")
    iterators = {t: iter(loader) for t, loader in train_loaders.items()}

    def next_batch(task):
        try:
            return next(iterators[task])
        except StopIteration:  # the loader moved to its next epoch: smaller tasks restart
            iterators[task] = iter(train_loaders[task])
            return next(iterators[task])

    def client_state(step):
        return {
            "step": step, "best": best, "top": top, "nan_run": nan_run, "nan_total": nan_total,
            "epoch_losses": epoch_losses,
            "weighting": weighting.state_dict(), "loaders": {t: l.state_dict() for t, l in train_loaders.items()},
            "regularizers": {t: [r.state_dict() for r in regs] for t, regs in regularizers.items()},
            "rng": rng_state(), "sampler": sampler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
        }

    def run_eval(step):
        # with cfg.ema the averaged weights are evaluated (and saved as best); training goes on from θ
        with ema.swapped_in(model) if ema is not None else contextlib.nullcontext():
            return evaluate_and_keep_best(step)

    def evaluate_and_keep_best(step):
        nonlocal best
        metrics, outputs = evaluate(model, dev_loaders, device, cfg.autocast)
        epoch = step / steps_per_epoch
        if is_main:
            for t in dev_loaders:
                rec = {"step": step, "epoch": epoch, "split": "dev", "task": t, "overall": metrics["overall"]}
                rec.update({k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{t}/")})
                append_jsonl(run_dir / "metrics.jsonl", rec)
            log(f"step {step}: dev " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        new_best = metrics["overall"] > best
        if new_best:
            best = metrics["overall"]
        in_top = bool(cfg.save_top_k) and keep_top_k(top, cfg.save_top_k, metrics["overall"], step)
        if (new_best and cfg.save_best) or in_top:
            # ZeRO-3 keeps parameters partitioned: every rank takes part in gathering them (once for both saves)
            with engine.full_parameters():
                if is_main:
                    info = {"step": step, "dev": metrics}
                    if new_best and cfg.save_best:
                        save_model_dir(run_dir / "best", model, cfg, tokenizer, info)
                    if in_top:
                        save_model_dir(run_dir / "top" / f"step-{step}", model, cfg, tokenizer, info)
                        prune_top_k(run_dir / "top", top)
        return metrics

    # the loop ----------------------------------------------------------------------------------
    progress = None
    if is_main and not cfg.quiet:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
    window = {"loss": {}, "examples": 0, "t0": time.perf_counter(), "terms": {}}
    metrics = {}
    for step in range(start_step, total_steps):
        # lr: the scheduler set this step's value at the previous engine.step()
        lr = engine.lr
        # eval / checkpoint
        if step > 0 and not (resume and step == start_step):  # a resumed step already did this
            new_epoch = sampler.epoch_for_step(step) != sampler.epoch_for_step(step - 1)
            due_eval = (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and new_epoch)
            if due_eval and dev_loaders:
                metrics = run_eval(step)
            if new_epoch:
                epoch = sampler.epoch_for_step(step)
                means = rank_mean({t: float(np.mean(v)) for t, v in epoch_losses.items() if v})
                weighting.end_epoch(epoch - 1, means, {k.split("/")[0]: v for k, v in metrics.items() if "/" in k})
                epoch_losses = {t: [] for t in names}
            due_save = (cfg.save_every and step % cfg.save_every == 0) or (not cfg.save_every and new_epoch)
            if due_save:
                engine.save_checkpoint(run_dir / "checkpoint", client_state(step)) if is_main or world_size > 1 else None
        if stop_at_step is not None and step == stop_at_step:
            raise KeyboardInterrupt(f"stopped before step {step} (stop_at_step)")
        # forward / backward (one batch per task this step, times grad_accum)
        tasks = sampler.tasks_for_step(step)
        micro_batches = [[next_batch(t).to(device) for t in tasks] for _ in range(cfg.optim.grad_accum)]
        skipped = False
        for update in range(num_updates):  # 1, or 2 for methods that take two updates per step (GSE)
            for batches in micro_batches:
                losses, terms_log = {}, {}
                for batch in batches:
                    t = batch.task
                    with autocast_context(cfg.autocast, device):  # forward and losses; backward outside
                        for reg in regularizers[t]:
                            reg.before_forward(model, batch)
                        output = model(batch)  # fp32 whatever the autocast (MultitaskModel.forward)
                        loss = loss_fns[t](output, batch.labels)
                        for reg in regularizers[t]:
                            for name, term in reg(model, batch, output).items():
                                loss = loss + term
                                terms_log[f"{t}/{name}"] = float(term.detach())
                    losses[t] = loss / cfg.optim.grad_accum
                    if update == 0:
                        window["examples"] += batch.size
                if not all_true(all(bool(torch.isfinite(l.detach()).all()) for l in losses.values())):
                    skipped = True
                    break
                weighting.backward(losses, shared_params, backward=engine.backward,
                                   **({"update_index": update} if num_updates > 1 else {}))
                if update == 0:
                    for t, l in losses.items():
                        window["loss"].setdefault(t, []).append(float(l.detach()) * cfg.optim.grad_accum)
                        epoch_losses[t].append(float(l.detach()) * cfg.optim.grad_accum)
                    for k, v in terms_log.items():
                        window["terms"].setdefault(k, []).append(v)
            # clip + step (a non-finite gradient norm also skips the step)
            if skipped or not math.isfinite(engine.clip_grad_norm()):
                skipped = True
                break
            engine.optimizer_step()
        if skipped:
            engine.skip_step()
            nan_run += 1
            nan_total += 1
            log(f"warning: step {step}: non-finite loss or gradient in tasks {tasks}; step skipped "
                f"({nan_run} in a row, {nan_total} in total)")
            if is_main:
                append_jsonl(run_dir / "metrics.jsonl", {"step": step, "split": "train", "event": "nonfinite_skip",
                                                         "consecutive": nan_run, "total": nan_total})
            if nan_run >= cfg.nan_patience:
                raise TrainingError(f"stopping: {nan_run} consecutive steps had a non-finite loss or gradient "
                                    f"(nan_patience={cfg.nan_patience}); lower the learning rate or check the data")
            continue
        nan_run = 0
        for regs in regularizers.values():
            for reg in regs:
                reg.after_step(model)
        if ema is not None:
            ema.update(model)
        # log
        if progress is not None:
            progress.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
            elapsed = max(time.perf_counter() - window["t0"], 1e-9)
            rate = window["examples"] * world_size / elapsed
            loss_means = rank_mean({t: float(np.mean(v)) for t, v in window["loss"].items()})
            term_means = rank_mean({k: float(np.mean(v)) for k, v in window["terms"].items()})
            if is_main:
                for t in window["loss"]:
                    rec = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch, "split": "train", "task": t,
                           "loss": loss_means[t], "lr": lr, "examples_per_s": rate}
                    rec.update({k.split("/", 1)[1]: v for k, v in term_means.items() if k.startswith(f"{t}/")})
                    append_jsonl(run_dir / "metrics.jsonl", rec)
                for regs in regularizers.values():
                    for reg in regs:
                        if reg.stats():
                            append_jsonl(run_dir / "metrics.jsonl", {"step": step + 1, "split": "train", **reg.stats()})
                summary = " ".join(f"{t}={v:.3f}" for t, v in loss_means.items())
                if progress is not None:
                    progress.set_postfix_str(f"{summary} lr={lr:.2e} {rate:.0f} ex/s")
                elif cfg.quiet:
                    log(f"step {step + 1}/{total_steps} loss {summary} lr={lr:.2e} {rate:.0f} ex/s")
            window = {"loss": {}, "examples": 0, "t0": time.perf_counter(), "terms": {}}
    if progress is not None:
        progress.close()

    # final evaluation, checkpoint, predictions, plots -----------------------------------------
    if dev_loaders and total_steps > start_step:
        metrics = run_eval(total_steps)
    engine.save_checkpoint(run_dir / "checkpoint", client_state(total_steps)) if is_main or world_size > 1 else None
    if is_main:
        finish_run(run_dir, model, cfg, tokenizer, datasets, device, log)
    return {"best_overall": best, **metrics}


def _task_losses(cfg: TrainConfig) -> Dict:
    """Each task's main loss, ``loss(output, labels)``; embedding losses belong in ``aux_losses``."""
    out = {}
    for t in cfg.tasks:
        try:
            loss = build_loss(t.loss_name, **t.loss_options)
        except ValueError as e:
            raise ConfigError(f"tasks.{t.name}.loss: {e}") from None
        if getattr(loss, "kind", "task") != "task":
            raise ConfigError(f"tasks.{t.name}.loss: {t.loss_name!r} is an embedding loss; a task loss takes "
                              f"(output, labels). Add it under tasks.{t.name}.aux_losses instead")
        out[t.name] = loss
    return out


def _weighting_options(cfg: TrainConfig) -> Dict:
    options = dict(cfg.weighting.options)
    if cfg.weighting.name == "fixed" and "weights" not in options:
        options["weights"] = {t.name: t.weight for t in cfg.tasks}
    if cfg.weighting.name in ("pcgrad", "gse") and "seed" not in options:
        options["seed"] = cfg.seed
    if cfg.weighting.name in ("uncertainty", "dev_score") and "task_kinds" not in options:
        options["task_kinds"] = {t.name: ("regression" if t.kind == "regression" else "classification") for t in cfg.tasks}
    return options
