"""An exponential moving average of a model's trainable parameters, sharded across ranks.

    θ̄ ← (1 − β_t) θ + β_t θ̄        after every optimizer step

Two users:

* SMART's MBPP teacher θ̃ (:mod:`minbert.smart`, fixed β_t = β): one copy for all tasks, read
  through :meth:`ParameterEMA.tensors` by ``torch.func.functional_call`` for the teacher's pass.
* Weight averaging for evaluation (``ema: β`` in the training config; Polyak & Juditsky 1992):
  the trainer evaluates, keeps as best and predicts with θ̄ (:meth:`ParameterEMA.swapped_in`)
  while training continues from θ. With ``warmup=True`` the decay follows TensorFlow's
  ``ExponentialMovingAverage(num_updates=t)``: β_t = min(β, (1 + t) / (10 + t)), so that the
  average does not hold on to the pre-trained weights for the first ~1/(1 − β) steps.

Storage: one flat buffer over the trainable parameters (``requires_grad``) in
``named_parameters`` order. Under ``torch.distributed`` with N > 1 ranks (DeepSpeed ZeRO 0-2,
whose parameters are whole on every rank) each rank keeps only its 1/N slice, updates it from its
own copy of θ, and all-gathers the whole average only while it is used; the persistent per-rank
cost is P/N values instead of P. ZeRO-3 partitions the parameters themselves and is refused.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

import torch


class ParameterEMA:
    """θ̄, the EMA of the trainable parameters (see the module docstring).

    ``dtype``: the storage dtype (default: the parameters'; use float32 to average bf16 weights).
    """

    def __init__(self, beta: float, where: str = "ema", warmup: bool = False, dtype: Optional[torch.dtype] = None):
        if not 0 <= beta <= 1:
            raise ValueError(f"{where}: beta must be in [0, 1], got {beta!r}")
        self.beta = beta
        self.where = where
        self.warmup = warmup
        self.dtype = dtype
        self.updates = 0
        self.names: Optional[List[str]] = None
        self.shapes: List[torch.Size] = []
        self.offsets: List[int] = []
        self.numel = 0
        self.rank, self.world = 0, 1
        self.lo = self.hi = 0
        self._per_rank = 0
        self.shard: Optional[torch.Tensor] = None  # (hi - lo,) this rank's slice of the flat average

    # --- layout -------------------------------------------------------------------------------
    @staticmethod
    def _trainable(model) -> Dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def _layout(self, params: Dict[str, torch.Tensor]) -> None:
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1 and self.dtype is None:
            raise RuntimeError(f"{self.where}: the moving average needs trainable parameters of one dtype, got "
                               f"{sorted(str(d) for d in dtypes)}")
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.offsets, total = [], 0
        for p in params.values():
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        per_rank = -(-total // self.world)  # padded: every rank holds per_rank elements
        self.lo = min(self.rank * per_rank, total)
        self.hi = min(self.lo + per_rank, total)
        self._per_rank = per_rank

    def _segments(self, params: Dict[str, torch.Tensor]):
        """(flat view of θ's piece, start in the shard, length) for each parameter overlapping [lo, hi)."""
        for (name, p), off in zip(params.items(), self.offsets):
            a, b = max(off, self.lo), min(off + p.numel(), self.hi)
            if a < b:
                yield p.detach().reshape(-1)[a - off:b - off], a - self.lo, b - a

    def _check(self, params: Dict[str, torch.Tensor]) -> None:
        if list(params) != self.names or [p.shape for p in params.values()] != self.shapes:
            raise RuntimeError(f"{self.where}: the moving average holds {len(self.names)} tensors but the model "
                               f"has {len(params)} trainable parameters with other names or shapes "
                               f"(was the fine-tune mode changed?)")

    # --- state --------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.shard is not None

    def ensure(self, model) -> None:
        """Create θ̄ = θ at the first call; afterwards check the layout and follow θ's device."""
        params = self._trainable(model)
        if not params:
            raise RuntimeError(f"{self.where}: the model has no trainable parameters to average")
        first = next(iter(params.values()))
        dtype = self.dtype or first.dtype
        if self.shard is None:
            if any(hasattr(p, "ds_id") for p in params.values()):  # DeepSpeed ZeRO-3 partitions the tensors
                raise RuntimeError(f"{self.where}: the moving average needs whole parameter tensors; DeepSpeed "
                                   "ZeRO stage 3 partitions them. Use ZeRO stage 0-2")
            self._layout(params)
            self.shard = torch.empty(self.hi - self.lo, dtype=dtype, device=first.device)
            with torch.no_grad():
                for src, start, n in self._segments(params):
                    self.shard[start:start + n].copy_(src)
            return
        self._check(params)
        if self.shard.device != first.device or self.shard.dtype != dtype:
            self.shard = self.shard.to(device=first.device, dtype=dtype)

    def decay(self) -> float:
        """β_t of the next update."""
        if not self.warmup:
            return self.beta
        return min(self.beta, (1 + self.updates) / (10 + self.updates))

    def update(self, model) -> None:
        """θ̄ ← (1 − β_t) θ + β_t θ̄ on this rank's slice (a no-op until :meth:`ensure` created θ̄)."""
        if self.shard is None:
            return
        params = self._trainable(model)
        self._check(params)
        segments = list(self._segments(params))
        weight = 1.0 - self.decay()
        with torch.no_grad():
            torch._foreach_lerp_([self.shard[s:s + n] for _, s, n in segments],
                                 [src.to(self.shard.dtype) for src, _, _ in segments], weight)
        self.updates += 1

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The whole θ̄ as ``{name: tensor}``: views of the shard with one rank, else views of a
        freshly all-gathered buffer (free it by dropping the dict)."""
        if self.shard is None:
            raise RuntimeError(f"{self.where}: the moving average does not exist yet (no update so far)")
        if self.world == 1:
            flat = self.shard
        else:
            flat = self.shard.new_empty(self._per_rank * self.world)
            local = self.shard.new_zeros(self._per_rank)
            local[:self.shard.numel()].copy_(self.shard)
            torch.distributed.all_gather(list(flat.chunk(self.world)), local)
        return {n: flat[o:o + s.numel()].view(s) for n, s, o in zip(self.names, self.shapes, self.offsets)}

    @contextlib.contextmanager
    def swapped_in(self, model) -> Iterator[None]:
        """Inside the block the model's trainable parameters hold θ̄; θ is restored on exit."""
        params = self._trainable(model)
        self._check(params)
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, t in self.tensors().items():
                params[n].copy_(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> Optional[Dict[str, Any]]:
        """This rank's slice and its place (rank-local state: each rank saves its own)."""
        if self.shard is None:
            return None
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "rank": self.rank,
                "world": self.world, "shard": self.shard.detach().clone(), "updates": self.updates}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if state is None:
            self.shard = None
            self.updates = 0
            return
        if "shard" not in state:  # a whole average {name: tensor} (older checkpoints): rebuild the layout
            self._layout(state)
            flat = torch.cat([t.detach().reshape(-1) for t in state.values()])
            self.shard = flat[self.lo:self.hi].clone()
            return
        self.names = list(state["names"])
        self.shapes = [torch.Size(s) for s in state["shapes"]]
        self._layout({n: torch.empty(s, device="meta") for n, s in zip(self.names, self.shapes)})
        if (self.rank, self.world) != (state["rank"], state["world"]):
            raise ValueError(f"{self.where}: this slice was saved by rank {state['rank']} of {state['world']}, "
                             f"but this is rank {self.rank} of {self.world}; resume with the same number of ranks")
        self.shard = state["shard"].detach().clone()
        self.updates = int(state.get("updates", 0))
