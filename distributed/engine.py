"""The DeepSpeed engine behind the trainer's engine interface (:class:`minbert.engine.Engine`).

``DeepSpeedEngineAdapter`` wraps ``deepspeed.initialize(model, model_parameters=param groups,
optimizer, lr_scheduler, config)``. How the trainer's calls map onto DeepSpeed:

``backward(loss)``
    ``engine.backward(loss, scale_wrt_gas=False)`` -- the trainer already divides each micro-batch
    loss by ``optim.grad_accum``. The adapter counts backward calls and marks the last one of the
    step as the accumulation boundary (``set_gradient_accumulation_boundary``), where ZeRO-0/1
    reduce and ZeRO-1/2 build the reduced gradient partitions. The trainer calls ``backward``
    exactly ``grad_accum`` times per optimizer step for every weighting (PCGrad's per-task
    gradients use ``torch.autograd.grad``, which does not go through the engine).
``clip_grad_norm()``
    Finishes the step's gradient -- sharded PCGrad adds its combination into the reduced
    partitions, the weighting's own parameters are averaged over ranks -- then computes the global
    pre-clip norm and clips, at the same point and with the same ``max_norm / (norm + 1e-6)``
    factor as ``LocalEngine`` (``torch.nn.utils.clip_grad_norm_``). ``max_norm`` is the JSON's
    ``gradient_clipping``; for stages 0-2 DeepSpeed itself is given ``gradient_clipping: 0``,
    because its clipping would run inside ``engine.step()`` over the module's gradients only,
    after the norm the trainer must see and without the parameters DeepSpeed does not own. Under
    ZeRO-3 DeepSpeed clips inside ``step()`` and the norm returned here is computed the way it
    does. The trainer skips the step when the returned norm is not finite.
``optimizer_step()``
    ``engine.step()`` (optimizer, LR scheduler, gradients cleared), and the same for the
    weighting's parameters.
``skip_step()``
    Drops every gradient DeepSpeed holds (what its own overflow path does) and advances the LR
    schedules, like ``LocalEngine.skip_step``.
``save_checkpoint(dir, client_state)`` / ``load_checkpoint(dir)``
    ``engine.save_checkpoint(dir, tag="step<N>", client_state=...)`` on every rank (each writes its
    optimizer partition; rank 0 replaces the ``latest`` file atomically only after every rank
    finished, so a rank lost mid-save leaves the previous checkpoint loadable). RNG states differ
    per rank (dropout draws depend on the rank's batch shapes) and so does the regularizers' state
    (SMART's teacher is sharded across ranks), so each rank also writes both to its own
    ``rng_rank<r>.pt``.
    Tags beyond the newest ``keep_checkpoints`` are deleted by rank 0.

Parameters the optimizer trains that are not module parameters (uncertainty weighting's
log-variances, a handful of scalars) stay outside DeepSpeed: ZeRO-1/2 require every optimizer
parameter to belong to the module, and DeepSpeed's start-up broadcast rejects 0-dim tensors. The
adapter averages their gradients over ranks and steps them with their own AdamW (same
hyper-parameters and schedule as their group in ``LocalEngine``), clipped jointly with the rest.

Export of the consolidated fp32 model is in :mod:`minbert.distributed.checkpoint`.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from minbert.engine import Engine, build_adamw

from . import sharded
from .config import DeepSpeedConfigError, offloads_optimizer, precision_of, zero_stage

# client-state keys that differ per rank: saved by every rank to its own rng_rank<r>.pt
RANK_LOCAL = ("rng", "regularizers", "ema")

logger = logging.getLogger("minbert.distributed")


class DeepSpeedEngineAdapter(Engine):
    """The trainer's engine interface around a ``deepspeed.DeepSpeedEngine``."""

    def __init__(self, model: nn.Module, groups: List[Dict], make_scheduler, cfg, ds_config: Dict[str, Any],
                 rank: int = 0, world_size: int = 1, keep_checkpoints: int = 2):
        import deepspeed

        self.model = model
        self.cfg = cfg
        self.ds_config = ds_config
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.stage = zero_stage(ds_config)
        self.grad_accum = int(ds_config["gradient_accumulation_steps"])
        self.max_norm = float(ds_config.get("gradient_clipping", 0.0) or 0.0)
        self.keep_checkpoints = keep_checkpoints
        module_params = {id(p) for p in model.parameters()}
        clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
        inside = [{**g, "params": [p for p in g["params"] if id(p) in module_params]} for g in clean]
        outside = [{**g, "params": [p for p in g["params"] if id(p) not in module_params]} for g in clean]
        inside = [g for g in inside if g["params"]]
        outside = [g for g in outside if g["params"]]
        if outside and self.stage == 3:
            raise DeepSpeedConfigError(
                f"weighting '{cfg.weighting.name}' trains parameters of its own; with ZeRO stage 3 they could not be "
                "clipped together with the partitioned model gradients. Use ZeRO stage 0-2 or another weighting.")
        engine_config = copy.deepcopy(ds_config)
        if self.stage < 3:
            engine_config["gradient_clipping"] = 0.0  # clipped in clip_grad_norm(), see the module docstring
        if "optimizer" in ds_config:  # DeepSpeed builds it (e.g. its CPU Adam for optimizer offload)
            optimizer = None
        else:  # the same torch AdamW as the single-process engine
            optimizer = build_adamw(inside, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.fused)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=inside, optimizer=optimizer, lr_scheduler=make_scheduler,
            config=engine_config, dist_init_required=False)
        self.master_aliased = self._alias_fp32_master()
        self.extra_params = [p for g in outside for p in g["params"]]
        self.extra_optimizer = self.extra_scheduler = None
        if outside:
            self.extra_optimizer = build_adamw(outside, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.fused)
            self.extra_scheduler = make_scheduler(self.extra_optimizer)
        self._backward_calls = 0
        self._sharded: Optional[sharded.ShardedPCGrad] = None

    def _alias_fp32_master(self) -> bool:
        """ZeRO-1/2 in fp32: let the "fp32 master" partition share memory with the parameters' own.

        DeepSpeed keeps a separate fp32 copy of each rank's partition (the master weights of mixed
        precision) and copies it back into the parameters after every step. When the parameters are
        fp32 already that copy is identical, so it is made a view of the parameter partition: the
        optimizer updates the parameters in place and the copy-back is a no-op. Saves P/N floats per
        rank; DeepSpeed's fp32 <-> parameter links are rebuilt on the shared memory.
        """
        opt = self.optimizer
        if self.stage not in (1, 2) or self.precision != "fp32" or self.offload:
            return False
        if os.environ.get("MINBERT_DS_ALIAS_MASTER", "1") == "0":
            return False
        if not all(hasattr(opt, a) for a in ("single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups",
                                             "_link_all_hp_params")):
            return False
        pairs = []
        for i, fp32 in enumerate(opt.single_partition_of_fp32_groups):
            lp = opt.parallel_partitioned_bit16_groups[i][dist.get_rank(group=opt.real_dp_process_group[i])]
            if fp32.dtype != lp.dtype or fp32.shape != lp.shape or fp32.device != lp.device:
                return False
            pairs.append((fp32, lp))
        for fp32, lp in pairs:
            fp32.data = lp.data
        opt._link_all_hp_params()
        return True

    # --- the weighting hook ------------------------------------------------------------------
    def wrap_weighting(self, weighting):
        """Gradient-surgery weightings run on sharded gradients; loss-only ones are returned unchanged."""
        from minbert.weighting import PCGrad

        if not isinstance(weighting, PCGrad):
            return weighting
        sharded.check_supported(self.stage, weighting.name)
        self._sharded = sharded.ShardedPCGrad(weighting, self._make_shards)
        return self._sharded

    def _make_shards(self, params):
        if self.stage == 0:
            return sharded.ReplicatedShards(params)
        return sharded.ZeroPartitionShards(self.optimizer, params)

    # --- the engine interface ----------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self._backward_calls += 1
        if self._backward_calls > self.grad_accum:
            raise RuntimeError(f"DeepSpeedEngineAdapter: {self._backward_calls} backward calls before an optimizer "
                               f"step, but gradient_accumulation_steps is {self.grad_accum}")
        self.engine.set_gradient_accumulation_boundary(self._backward_calls == self.grad_accum)
        self.engine.backward(loss, scale_wrt_gas=False)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]] + list(self.extra_params)

    def clip_grad_norm(self) -> float:
        """Finish the step's gradient, clip it to ``gradient_clipping``; return the pre-clip global norm."""
        if self._backward_calls != self.grad_accum:
            raise RuntimeError(f"DeepSpeedEngineAdapter: {self._backward_calls} backward calls in this step, "
                               f"expected gradient_accumulation_steps={self.grad_accum}")
        if self._sharded is not None:
            self._sharded.flush()
        extra = [p for p in self.extra_params if p.grad is not None]
        for p in extra:
            if self.world_size > 1:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)
        extra_sq = sum(float(p.grad.detach().to(torch.float64).pow(2).sum()) for p in extra)
        if self.stage == 3:
            norms = [float(n) for n in self.optimizer._get_norm_groups()]
            if any(n < 0 or not math.isfinite(n) for n in norms):
                return math.inf
            return math.sqrt(sum(n * n for n in norms)) / float(getattr(self.optimizer, "loss_scale", 1.0) or 1.0)
        if self.stage == 0:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            model_sq = sum(float(g.detach().to(torch.float64).pow(2).sum()) for g in grads)
        else:
            reduced = sharded.ZeroReducedGradients(self.optimizer)
            sq = reduced.norm_sq()
            if self.world_size > 1:
                sq = sq.to(self._comm_device())
                dist.all_reduce(sq)
            model_sq = float(sq)
            loss_scale = float(getattr(self.optimizer, "loss_scale", 1.0) or 1.0)
            model_sq /= loss_scale * loss_scale
        norm = math.sqrt(model_sq + extra_sq) if math.isfinite(model_sq + extra_sq) else math.inf
        if not math.isfinite(norm):
            return math.inf
        coef = self.max_norm / (norm + 1e-6)
        if self.max_norm > 0 and coef < 1.0:
            with torch.no_grad():
                if self.stage == 0:
                    for g in grads:
                        g.mul_(coef)
                else:
                    reduced.scale_(coef)
                for p in extra:
                    p.grad.mul_(coef)
        return norm

    def optimizer_step(self) -> None:
        self.engine.step()
        if self.extra_optimizer is not None:
            self.extra_optimizer.step()
            self.extra_scheduler.step()
            self.extra_optimizer.zero_grad(set_to_none=True)
        self._backward_calls = 0

    def skip_step(self) -> None:
        self.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for scheduler in (self.scheduler, self.extra_scheduler):
                if scheduler is not None:
                    scheduler.step()

    def zero_grad(self) -> None:
        """Drop every gradient DeepSpeed holds for this step (what its overflow path does)."""
        self._backward_calls = 0
        if self._sharded is not None:
            self._sharded.discard()
        for p in self.extra_params:
            p.grad = None
        opt = self.optimizer
        if self.stage == 0:
            self.engine.zero_grad()
            return
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        if self.stage == 3:
            if getattr(opt, "offload_optimizer", False):
                opt.reset_cpu_buffers()
            else:
                opt.averaged_gradients = {}
            return
        for attr in ("averaged_gradients", "all_grad_tensors"):
            store = getattr(opt, attr, None)
            if isinstance(store, dict):
                for k in list(store):
                    store[k] = None
        if getattr(opt, "cpu_offload", False) and hasattr(opt, "reset_cpu_buffers"):
            opt.reset_cpu_buffers()
        if hasattr(opt, "micro_step_id"):
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            opt.micro_step_id = INITIAL_MICRO_STEP_ID

    # --- agreement between ranks (the trainer calls these on every rank) ------------------------
    def all_true(self, flag: bool) -> bool:
        """True only if ``flag`` is true on every rank (so all ranks skip a non-finite step together)."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([0.0 if flag else 1.0], device=self._comm_device())
        dist.all_reduce(t)
        return bool(t.item() == 0)

    def rank_mean(self, values: Dict[str, float]) -> Dict[str, float]:
        """The mean over ranks of each value (the keys are the same on every rank)."""
        if self.world_size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        t /= self.world_size
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def _comm_device(self):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    @contextlib.contextmanager
    def full_parameters(self):
        """A context in which every rank's model parameters are whole tensors with storage of their own,
        as ``save_model_dir`` (safetensors) needs; call it on every rank. Read-only: changes made inside
        are not kept. ZeRO-3 gathers the partitioned parameters; ZeRO-1/2 parameters are views into one
        flat buffer per group, which safetensors refuses to save, so they get private copies meanwhile."""
        params = list(self.model.parameters())
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                for p in params:  # the gathered tensors share one buffer too
                    p.data = p.data.clone()
                yield
        elif self.stage in (1, 2):
            views = [p.data for p in params]
            for p in params:
                p.data = p.data.clone()
            try:
                yield
            finally:
                for p, view in zip(params, views):
                    p.data = view
        else:
            yield

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, directory, client_state: Dict) -> None:
        directory = Path(directory)
        tag = f"step{int(client_state['step'])}"
        client = dict(client_state)
        if self.extra_optimizer is not None:
            client["_extra_optimizer"] = {"optimizer": self.extra_optimizer.state_dict(),
                                          "scheduler": self.extra_scheduler.state_dict()}
        # Per-rank state first: RNG states (all ranks are seeded alike, but dropout draws depend on each
        # rank's batch shapes), the regularizers' state and the weight average, which are rank-local
        # (SMART's teacher and the EMA are sharded across ranks; DeepSpeed writes client_state from
        # rank 0 only). DeepSpeed's own 'latest' is written by rank 0 as soon as rank 0's files are
        # done, before its closing barrier, so a rank lost while writing its optimizer partition would
        # leave 'latest' naming a torn tag. We pass save_latest=False and rank 0 replaces 'latest'
        # atomically only after a barrier that every rank reaches when all of its files are written.
        from minbert.pretrained import atomic_path

        rank_local = {key: client.pop(key, None) for key in RANK_LOCAL}
        rank_local.update(rank=self.rank, world_size=self.world_size)
        (directory / tag).mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / tag / f"rng_rank{self.rank}.pt") as tmp:
            torch.save(rank_local, tmp)
        if self.world_size > 1:
            dist.barrier()
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client, save_latest=False)
        if self.world_size > 1:
            dist.barrier()
        if self.is_main:
            with atomic_path(directory / "latest") as tmp:
                tmp.write_text(tag)
            _prune_tags(directory, keep=self.keep_checkpoints, current=tag)

    def load_checkpoint(self, directory) -> Dict:
        directory = Path(directory)
        latest = directory / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"--resume: {directory} holds no DeepSpeed checkpoint (no 'latest' file); "
                                    f"pass RUN_DIR/checkpoint of a run started with minbert.distributed.launch")
        tag = latest.read_text().strip()
        rng_file = directory / tag / f"rng_rank{self.rank}.pt"
        saved = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.is_file() else None
        if saved is None or saved.get("world_size") != self.world_size:
            raise ValueError(f"--resume: {directory / tag} was not written by a run of {self.world_size} ranks "
                             f"(no {rng_file.name} from a {self.world_size}-rank run); the data shards and RNG "
                             f"states would not line up")
        load_path, client = self.engine.load_checkpoint(str(directory), tag=tag)
        if load_path is None or client is None:
            raise FileNotFoundError(f"--resume: DeepSpeed could not load {directory / tag}")
        for key in RANK_LOCAL:  # older checkpoints kept the regularizers in the client state
            if saved.get(key) is not None or key not in client:
                client[key] = saved.get(key)
        if client.get("regularizers") is None:
            client["regularizers"] = {}
        extra = client.pop("_extra_optimizer", None)
        if self.extra_optimizer is not None:
            if extra is None:
                raise ValueError(f"--resume: {directory / tag} has no state for the weighting's own parameters")
            self.extra_optimizer.load_state_dict(extra["optimizer"])
            self.extra_scheduler.load_state_dict(extra["scheduler"])
        self._backward_calls = 0
        return client

    # --- introspection -----------------------------------------------------------------------
    @property
    def precision(self) -> str:
        return precision_of(self.ds_config)

    @property
    def offload(self) -> bool:
        return offloads_optimizer(self.ds_config)


def build_engine(model, groups, make_scheduler, cfg, *, ds_config, rank, world_size, **kw) -> DeepSpeedEngineAdapter:
    """The ``engine_builder`` that :func:`minbert.train.train` passes to :func:`minbert.build.setup_engine`."""
    return DeepSpeedEngineAdapter(model, groups, make_scheduler, cfg, ds_config, rank=rank, world_size=world_size, **kw)


def _prune_tags(directory: Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    tags = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step") and p.name[4:].isdigit()]
    tags.sort(key=lambda p: int(p.name[4:]))
    for old in tags[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
