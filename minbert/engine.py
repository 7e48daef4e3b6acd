"""The optimisation engine behind one interface, :class:`Engine`: every method the trainer calls.

:class:`LocalEngine` is single-process torch (AdamW with decoupled weight decay, gradient
clipping, an LR scheduler). ``minbert.distributed`` provides the DeepSpeed ZeRO engine
(:class:`minbert.distributed.engine.DeepSpeedEngineAdapter`), another subclass, so the trainer
runs unchanged under either.
"""
from __future__ import annotations

import abc
import contextlib
import warnings
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm", "norm.weight")


def _depth(name: str, num_layers: int) -> int:
    """Depth of an encoder parameter for layer-wise lr decay: embeddings 0, layer i at i + 1, the
    pooler (and anything else above the layers) at num_layers + 1."""
    if ".embeddings." in f".{name}":
        return 0
    marker = "encoder.layer."
    if marker in name:
        return int(name.split(marker, 1)[1].split(".", 1)[0]) + 1
    return num_layers + 1


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr: Optional[float] = None,
                 extra: Iterable[nn.Parameter] = (), layer_decay: float = 1.0) -> List[Dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights; heads may get their own lr.

    ``layer_decay`` < 1 is layer-wise lr decay (Clark et al. 2020, ELECTRA; Howard & Ruder 2018's
    discriminative fine-tuning): an encoder parameter at depth d (embeddings 0, layer i at i + 1,
    pooler L + 1) gets ``lr · layer_decay^(L + 1 − d)``, so the lower layers, which hold the most
    general features, move least. Heads keep ``head_lr``.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"param_groups: layer_decay must be in (0, 1], got {layer_decay!r}")
    bert = getattr(model, "bert", None)
    num_layers = getattr(getattr(bert, "config", None), "num_hidden_layers", 0)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not any(tag in name for tag in NO_DECAY) and p.dim() > 1
        is_head = name.startswith("heads.") or name.startswith("relational.")
        depth = num_layers + 1 if is_head or layer_decay == 1 else _depth(name, num_layers)
        key = (decay, is_head, -depth)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - depth)
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr": (head_lr or lr) if is_head else lr * scale, "names": []}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    out = [g for _, g in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1], kv[0][2]))]
    extra = [p for p in extra if p.requires_grad]
    if extra:
        out.append({"params": extra, "weight_decay": 0.0, "lr": head_lr or lr, "names": ["weighting"] * len(extra)})
    for g in out:
        g["initial_lr"] = g["lr"]
    return out


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` takes these parameters: floating point, all on one
    device type that has the fused kernel (CUDA; the CPU since torch 2.4)."""
    params = list(params)
    if not params:
        return False
    kinds = {p.device.type for p in params}
    if len(kinds) != 1 or not all(p.is_floating_point() for p in params):
        return False
    kind = kinds.pop()
    if kind == "cuda":
        return True
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return kind == "cpu" and (major, minor) >= (2, 4)


def build_adamw(groups: List[Dict], lr: float, betas, eps: float, fused: Optional[bool] = None) -> torch.optim.AdamW:
    """torch AdamW over ``groups``; ``fused=None`` uses the fused kernel where it is supported.

    The fused kernel does the same update (decoupled weight decay, bias correction) in one pass
    over each parameter instead of a dozen elementwise ops: on the 2-core CPU it steps MiniLM's
    22.7M parameters in 15 ms instead of 78 ms (benchmarks/RESULTS.md)."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = fused_adamw_supported(params)
    elif fused and not fused_adamw_supported(params):
        devices = sorted({str(p.device) for p in params})
        raise ValueError(f"optim.fused: true, but torch {torch.__version__} has no fused AdamW for parameters on "
                         f"{devices}; set optim.fused to null (auto) or false")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **({"fused": True} if fused else {}))


class Engine(abc.ABC):
    """What the trainer calls on an engine, in the order of one training step::

        weighting = engine.wrap_weighting(weighting)      # once, at set-up
        engine.backward(loss)                             # grad_accum times (through the weighting)
        if engine.all_true(finite) and isfinite(engine.clip_grad_norm()):
            engine.optimizer_step()
        else:
            engine.skip_step()

    The methods with a body are right for one process; an engine over several ranks overrides them.
    """

    rank = 0
    world_size = 1
    is_main = True
    model: nn.Module

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss`` (already divided by the accumulation steps)."""

    @abc.abstractmethod
    def clip_grad_norm(self) -> float:
        """Finish the step's gradient and clip it; returns the norm before clipping (inf/nan when not finite)."""

    @abc.abstractmethod
    def optimizer_step(self) -> None:
        """Optimizer step, LR scheduler step, gradients cleared."""

    @abc.abstractmethod
    def skip_step(self) -> None:
        """Drop the step's gradients without updating; the LR schedule still advances."""

    @property
    @abc.abstractmethod
    def lr(self) -> float:
        """The learning rate of the first parameter group for the coming step."""

    @abc.abstractmethod
    def save_checkpoint(self, directory, client_state: Dict) -> None:
        """Write a resumable checkpoint of the engine's state and the trainer's ``client_state``."""

    @abc.abstractmethod
    def load_checkpoint(self, directory) -> Dict:
        """Restore what :meth:`save_checkpoint` wrote; returns the trainer's client state."""

    def wrap_weighting(self, weighting):
        """The loss weighting to use with this engine (an engine whose gradients live in shards
        supplies its own gradient surgery)."""
        return weighting

    def all_true(self, flag: bool) -> bool:
        """True only if ``flag`` is true on every rank (so that all ranks skip a step together)."""
        return bool(flag)

    def rank_mean(self, values: Dict[str, float]) -> Dict[str, float]:
        """The mean over ranks of each value (the keys are the same on every rank)."""
        return dict(values)

    def full_parameters(self) -> contextlib.AbstractContextManager:
        """A context in which the model's parameters are whole tensors, for saving; entered on every rank."""
        return contextlib.nullcontext()


class LocalEngine(Engine):
    """Single-process engine: gradients accumulate in ``.grad``; ``step`` clips, steps and zeroes."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, grad_clip: float = 0.0):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def clip_grad_norm(self) -> float:
        """Clip to ``grad_clip`` (if > 0); returns the norm before clipping (inf/nan when not finite)."""
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def optimizer_step(self) -> None:
        """Optimizer step, scheduler step, zero grads."""
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.zero_grad()

    def step(self) -> float:
        """Clip, then :meth:`optimizer_step`; returns the pre-clip gradient norm."""
        norm = self.clip_grad_norm()
        self.optimizer_step()
        return norm

    def skip_step(self) -> None:
        """Drop the accumulated gradients of a step that produced a non-finite loss."""
        self.zero_grad()
        if self.scheduler is not None:  # the schedule advances: the skipped step keeps its lr slot
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> Dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def save_checkpoint(self, directory, client_state: Dict) -> None:
        save_local_checkpoint(f"{directory}/checkpoint.pt", self, client_state)

    def load_checkpoint(self, directory) -> Dict:
        return load_local_checkpoint(f"{directory}/checkpoint.pt", self)

    def load_state_dict(self, state: Dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])


def save_local_checkpoint(path, engine: LocalEngine, client_state: Dict) -> None:
    """One file holding model, optimizer, scheduler and the trainer's client state, written atomically."""
    from .pretrained import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"engine": engine.state_dict(), "client": client_state}, tmp)


def load_local_checkpoint(path, engine: LocalEngine) -> Dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume: no checkpoint at {path}") from None
    except Exception as e:
        raise ValueError(f"--resume: {path} cannot be read ({e})") from None
    engine.load_state_dict(state["engine"])
    return state["client"]

