"""Task schedules: which tasks train at each optimizer step.

One small class per schedule, all behind :class:`TaskSampler`, so the trainer never branches
on a schedule's name::

    sampler = build_task_sampler("round_robin", ["sst", "quora", "sts"], batches_per_epoch)
    for step in range(total_steps):
        for task in sampler.tasks_for_step(step):   # losses computed at this optimizer step
            ...

=================  ==========================================================================
``joint``          every task every step (the losses are summed by the loss weighting; with the
                   ``fixed`` weighting this *is* the fixed-weights schedule)
``round_robin``    one task per step, cycling through ``order``
``random``         one task per step, drawn uniformly
``proportional``   one task per step, ``P(t) ∝ size_t ** alpha`` (size = batches per epoch) or
                   ``∝ weights[t] ** alpha``; ``alpha = 1 / temperature`` (1: proportional,
                   0: uniform)
``staged``         a list of stages run one after the other, each its own schedule over a subset
                   of the tasks for some epochs, e.g. Quora alone for 1 epoch, then joint
=================  ==========================================================================

``tasks_for_step(step)`` is a pure function of ``(seed, step)``: random draws come from a
stable hash (BLAKE2b) of the seed and the step, not from a generator carried across steps. A
resumed run, or every rank of a distributed run, gets the same tasks at the same step with no
state to save; ``state_dict`` only records the configuration so a resume can check it.

Epoch size
----------
Each task ``t`` has ``b_t`` batches per epoch and gets a share ``p_t`` of the steps (1 for
``joint``; ``1/T`` for ``random``; its share of ``order`` for ``round_robin``; its probability for
``proportional``). Seeing task ``t`` once takes ``b_t / p_t`` steps (in expectation for the random
schedules). ``epoch_size``:

* ``"smallest"`` (default): ``min_t b_t / p_t`` steps, an epoch ends when the first task runs out
  (the smallest task for uniform shares: ``T × min b`` for one task per step, ``min b`` for joint);
* ``"largest"``: ``max_t b_t / p_t`` steps, the last task to run out is seen once; the other
  tasks' data loaders cycle (they restart from a reshuffled epoch when exhausted);
* an int: that many steps.

``multiplier`` scales the result (e.g. 3 for "3× the iterations"), rounded up to whole steps.
For ``proportional`` with ``alpha = 1`` every task runs out together: both sizes are ``Σ b``.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import struct
from typing import Any, Dict, List, Optional, Sequence, Union

__all__ = [
    "TaskSampler", "JointSampler", "RoundRobinSampler", "RandomSampler", "ProportionalSampler",
    "StagedSampler", "TASK_SAMPLERS", "build_task_sampler",
]

EpochSize = Union[str, int, None]
_EPOCH_SIZES = ("smallest", "largest")


# --- stable per-step randomness ----------------------------------------------------------------

def _stable_uniform(seed: int, step: int, salt: int = 0) -> float:
    """A uniform number in [0, 1) that depends only on ``(seed, step, salt)``.

    BLAKE2b of the three integers (signed 64-bit), 53 bits kept: the same on every platform,
    process and Python version (unlike ``hash()``, which is salted per process).
    """
    digest = hashlib.blake2b(struct.pack("<qqq", seed, step, salt), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def _mix_seed(seed: int, index: int) -> int:
    """A derived seed (e.g. one per stage), stable and within the signed 64-bit range."""
    digest = hashlib.blake2b(struct.pack("<qq", seed, index), digest_size=8, person=b"minbert-stage").digest()
    return int.from_bytes(digest, "little") >> 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ceil(x: float) -> int:
    """Ceiling that forgives float round-off (``3 × (1/3) × 7`` is 7 steps, not 8)."""
    return int(math.ceil(x - 1e-9 * max(1.0, abs(x))))


# --- task samplers -----------------------------------------------------------------------------

class TaskSampler:
    """Which tasks' losses are computed at each optimizer step.

    Args:
        tasks: task names (unique).
        batches_per_epoch: ``{task: number of training batches in one pass over its data}``;
            every task in ``tasks`` must be present with an int > 0.
        seed: seeds the draws of the random schedules (any int in the signed 64-bit range).
        epoch_size: ``"smallest"`` (default, also for None), ``"largest"`` or an int number of
            steps; see the module docstring.
        multiplier: scales the epoch size (> 0).
        order: task order (default: ``tasks``); must name every task once (``round_robin`` also
            accepts repeats, to visit a task more often).
        weights: ``{task: weight > 0}``, only for the schedules that draw by weight
            (``proportional``).

    Attributes:
        steps_per_epoch: optimizer steps in one epoch of this schedule.
        total_steps: steps of the whole schedule when the schedule fixes it (``staged``), else
            None (the trainer uses ``steps_per_epoch × epochs``).
    """

    kind = ""
    uses_weights = False
    allows_repeats = False
    total_steps: Optional[int] = None

    def __init__(
        self,
        tasks: Sequence[str],
        batches_per_epoch: Dict[str, int],
        seed: int = 0,
        *,
        epoch_size: EpochSize = "smallest",
        multiplier: float = 1.0,
        order: Optional[Sequence[str]] = None,
        weights: Optional[Dict[str, float]] = None,
    ) -> None:
        name = self._name()
        self.tasks = _check_tasks(name, tasks)
        self.batches_per_epoch = _check_batches(name, self.tasks, batches_per_epoch)
        if not _is_int(seed) or not -(2 ** 63) <= seed < 2 ** 63:
            raise ValueError(f"{name}: seed must be an int in the signed 64-bit range, got {seed!r}")
        self.seed = seed
        self.order = _check_order(name, self.tasks, order, self.allows_repeats)
        if weights is not None and not self.uses_weights:
            raise ValueError(f"{name}: option 'weights' is not used by the {self.kind!r} schedule "
                             f"(it is for 'proportional')")
        self.weights = None if weights is None else _check_weights(name, self.tasks, weights)
        self.epoch_size = _check_epoch_size(name, epoch_size)
        if not _is_number(multiplier) or not math.isfinite(multiplier) or multiplier <= 0:
            raise ValueError(f"{name}: multiplier must be a finite number > 0, got {multiplier!r}")
        self.multiplier = float(multiplier)
        self.steps_per_epoch = self._epoch_steps()

    # -- subclass hooks --------------------------------------------------------------------------

    def shares(self) -> Dict[str, float]:
        """Expected fraction of the steps at which each task's loss is computed."""
        raise NotImplementedError

    def tasks_for_step(self, step: int) -> List[str]:
        """Tasks whose losses are computed at global optimizer step ``step`` (>= 0)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------

    def _name(self) -> str:
        return f"task schedule {self.kind!r}"

    def _check_step(self, step: int) -> int:
        if not _is_int(step) or step < 0:
            raise ValueError(f"{self._name()}: step must be an int >= 0, got {step!r}")
        return step

    def _epoch_steps(self) -> int:
        if _is_int(self.epoch_size):
            base = float(self.epoch_size)
        else:
            shares = self.shares()
            needed = [self.batches_per_epoch[t] / shares[t] for t in self.tasks]
            base = min(needed) if self.epoch_size == "smallest" else max(needed)
        return max(1, _ceil(base * self.multiplier))

    def epoch_for_step(self, step: int) -> int:
        """The epoch ``step`` belongs to (0-based)."""
        return self._check_step(step) // self.steps_per_epoch

    def config(self) -> Dict[str, Any]:
        return {
            "kind": self.kind, "tasks": list(self.tasks), "batches_per_epoch": dict(self.batches_per_epoch),
            "seed": self.seed, "epoch_size": self.epoch_size, "multiplier": self.multiplier,
            "order": list(self.order), "weights": None if self.weights is None else dict(self.weights),
        }

    def state_dict(self) -> Dict[str, Any]:
        """The configuration and the resulting epoch size. The draws are a function of
        ``(seed, step)``, so nothing else needs saving; :meth:`load_state_dict` checks that a
        resumed run schedules the same way."""
        return {**self.config(), "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Check that ``state`` (from :meth:`state_dict`) describes this schedule.

        Raises ``ValueError`` naming the first key that differs (a different kind, task list,
        order, seed or dataset size would silently change which task trains at a resumed step).
        """
        mine = self.state_dict()
        missing = [k for k in mine if k not in state]
        if missing:
            raise ValueError(f"{self._name()}: load_state_dict: state lacks keys {missing}")
        for key, value in mine.items():
            if _normalise(state[key]) != _normalise(value):
                raise ValueError(f"{self._name()}: load_state_dict: the saved schedule has {key}="
                                 f"{state[key]!r} but this one has {key}={value!r}; resume with the same "
                                 f"schedule settings and data")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(tasks={self.tasks}, order={self.order}, seed={self.seed}, "
                f"epoch_size={self.epoch_size!r}, multiplier={self.multiplier}, "
                f"steps_per_epoch={self.steps_per_epoch})")


def _normalise(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


class JointSampler(TaskSampler):
    """Every task at every step (losses combined by the loss weighting).

    With the ``equal`` weighting this is the plain joint sum of the task losses; with the
    ``fixed`` weighting it is the fixed-weights schedule. ``order`` sets the order in which the
    task losses are computed within a step.
    """

    kind = "joint"

    def shares(self) -> Dict[str, float]:
        return {t: 1.0 for t in self.tasks}

    def tasks_for_step(self, step: int) -> List[str]:
        self._check_step(step)
        return list(self.order)


class RoundRobinSampler(TaskSampler):
    """One task per step, cycling through ``order``: step ``s`` trains ``order[s % len(order)]``.

    ``order`` may repeat a task to visit it more often (``[quora, sst, quora, sts]``).
    """

    kind = "round_robin"
    allows_repeats = True

    def shares(self) -> Dict[str, float]:
        return {t: self.order.count(t) / len(self.order) for t in self.tasks}

    def tasks_for_step(self, step: int) -> List[str]:
        return [self.order[self._check_step(step) % len(self.order)]]


class _DrawSampler(TaskSampler):
    """One task per step, drawn with fixed probabilities from a per-step stable hash."""

    def probabilities(self) -> Dict[str, float]:
        raise NotImplementedError

    def shares(self) -> Dict[str, float]:
        return self.probabilities()

    def _cumulative(self) -> List[float]:
        cached = getattr(self, "_cdf", None)
        if cached is None:
            probs = self.probabilities()
            cached, acc = [], 0.0
            for t in self.order:
                acc += probs[t]
                cached.append(acc)
            cached[-1] = 1.0  # no gap above the last bucket from round-off
            self._cdf = cached
        return cached

    def tasks_for_step(self, step: int) -> List[str]:
        u = _stable_uniform(self.seed, self._check_step(step))
        index = min(bisect.bisect_right(self._cumulative(), u), len(self.order) - 1)
        return [self.order[index]]


class RandomSampler(_DrawSampler):
    """One task per step, uniformly at random (``1/T`` each)."""

    kind = "random"

    def probabilities(self) -> Dict[str, float]:
        return {t: 1.0 / len(self.tasks) for t in self.tasks}


class ProportionalSampler(_DrawSampler):
    """One task per step with ``P(t) ∝ s_t ** alpha``.

    ``s_t`` is ``weights[t]`` when given, else the task's batches per epoch (dataset size).
    ``alpha`` (default 1) flattens the distribution: 0 is uniform; ``temperature`` is the same
    knob written ``alpha = 1 / temperature`` (give one or the other).
    """

    kind = "proportional"
    uses_weights = True

    def __init__(self, tasks, batches_per_epoch, seed=0, *, alpha: Optional[float] = None,
                 temperature: Optional[float] = None, **kwargs) -> None:
        name = self._name()
        if alpha is not None and temperature is not None:
            raise ValueError(f"{name}: give 'alpha' or 'temperature' (alpha = 1 / temperature), not both")
        if temperature is not None:
            if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
                raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature!r}")
            alpha = 1.0 / temperature
        if alpha is None:
            alpha = 1.0
        if not _is_number(alpha) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"{name}: alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        super().__init__(tasks, batches_per_epoch, seed, **kwargs)

    def probabilities(self) -> Dict[str, float]:
        source = self.weights if self.weights is not None else self.batches_per_epoch
        # normalise before the power so large sizes cannot overflow
        top = max(float(source[t]) for t in self.tasks)
        raw = {t: (float(source[t]) / top) ** self.alpha for t in self.tasks}
        total = sum(raw.values())
        return {t: v / total for t, v in raw.items()}

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "alpha": self.alpha}


class StagedSampler(TaskSampler):
    """Stages run one after the other, each with its own schedule, tasks and number of epochs.

    ``stages`` is a list of dicts: ``tasks`` (default: all tasks), ``schedule`` (a non-staged kind,
    default ``"joint"``), ``epochs`` (int >= 1, default 1) and optionally that schedule's options
    (``epoch_size``, ``multiplier``, ``order``, ``weights``, ``alpha``, ``temperature``).
    ``epoch_size`` and ``multiplier`` default to the ones given to the staged sampler; ``order``
    defaults to the staged sampler's order restricted to the stage's tasks. Every task must be
    trained by some stage. Example (Quora first for one epoch, then joint over all tasks)::

        stages = [{"tasks": ["quora"], "schedule": "joint", "epochs": 1},
                  {"schedule": "joint", "epochs": 2}]

    Each stage's epoch is sized on its own tasks (``stage_steps_per_epoch``). ``total_steps`` is
    the length of the whole schedule; ``epoch_starts`` lists the first step of every epoch of
    every stage, and ``epoch_for_step`` counts epochs across stages. ``steps_per_epoch`` (one
    number, for code that needs one) is the mean epoch length, ``total_steps // total epochs``.
    Steps at or beyond ``total_steps`` raise.
    """

    kind = "staged"
    _STAGE_KEYS = ("tasks", "schedule", "epochs", "epoch_size", "multiplier", "order", "weights",
                   "alpha", "temperature")

    def __init__(self, tasks, batches_per_epoch, seed=0, *, stages: Optional[Sequence[Dict[str, Any]]] = None,
                 epoch_size: EpochSize = "smallest", multiplier: float = 1.0,
                 order: Optional[Sequence[str]] = None, weights: Optional[Dict[str, float]] = None) -> None:
        name = self._name()
        self.tasks = _check_tasks(name, tasks)
        self.batches_per_epoch = _check_batches(name, self.tasks, batches_per_epoch)
        if not _is_int(seed) or not -(2 ** 63) <= seed < 2 ** 63:
            raise ValueError(f"{name}: seed must be an int in the signed 64-bit range, got {seed!r}")
        self.seed = seed
        self.order = _check_order(name, self.tasks, order, False)
        if weights is not None:
            raise ValueError(f"{name}: give 'weights' inside the stage that uses them, not to the staged schedule")
        self.weights = None
        self.epoch_size = _check_epoch_size(name, epoch_size)
        if not _is_number(multiplier) or not math.isfinite(multiplier) or multiplier <= 0:
            raise ValueError(f"{name}: multiplier must be a finite number > 0, got {multiplier!r}")
        self.multiplier = float(multiplier)
        if stages is None or isinstance(stages, (str, dict)) or not isinstance(stages, Sequence) or not stages:
            raise ValueError(f"{name}: option 'stages' must be a non-empty list of stages such as "
                             f"[{{tasks: [quora], schedule: joint, epochs: 1}}, {{schedule: joint, epochs: 1}}], "
                             f"got {stages!r}")
        self.stages_config = [dict(s) if isinstance(s, dict) else s for s in stages]
        self.samplers: List[TaskSampler] = []
        self.stage_epochs: List[int] = []
        trained = set()
        for i, stage in enumerate(self.stages_config):
            where = f"{name}: stages[{i}]"
            if not isinstance(stage, dict):
                raise ValueError(f"{where} must be a mapping with keys {self._STAGE_KEYS}, got {stage!r}")
            unknown = [k for k in stage if k not in self._STAGE_KEYS]
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown}; expected some of {list(self._STAGE_KEYS)}")
            kind = stage.get("schedule", "joint")
            if kind == "staged":
                raise ValueError(f"{where}: a stage cannot itself be 'staged'")
            if kind not in TASK_SAMPLERS:
                raise ValueError(f"{where}: unknown schedule {kind!r}; expected one of "
                                 f"{[k for k in TASK_SAMPLERS if k != 'staged']}")
            epochs = stage.get("epochs", 1)
            if not _is_int(epochs) or epochs < 1:
                raise ValueError(f"{where}: epochs must be an int >= 1, got {epochs!r}")
            stage_tasks = stage.get("tasks", list(self.tasks))
            if isinstance(stage_tasks, str) or not isinstance(stage_tasks, Sequence):
                raise ValueError(f"{where}: tasks must be a list of task names, got {stage_tasks!r}")
            outside = [t for t in stage_tasks if t not in self.tasks]
            if outside:
                raise ValueError(f"{where}: tasks {outside} are not among the configured tasks {self.tasks}")
            options = {k: stage[k] for k in ("epoch_size", "multiplier", "order", "weights", "alpha", "temperature")
                       if k in stage}
            options.setdefault("epoch_size", self.epoch_size)
            options.setdefault("multiplier", self.multiplier)
            if "order" not in options:
                options["order"] = [t for t in self.order if t in stage_tasks]
            try:
                stage_batches = {t: self.batches_per_epoch[t] for t in stage_tasks}
                sampler = build_task_sampler(kind, list(stage_tasks), stage_batches, seed=_mix_seed(seed, i), **options)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            self.samplers.append(sampler)
            self.stage_epochs.append(epochs)
            trained.update(stage_tasks)
        untrained = [t for t in self.tasks if t not in trained]
        if untrained:
            raise ValueError(f"{name}: tasks {untrained} are in no stage; add them to a stage or drop them")
        self.stage_steps_per_epoch = [s.steps_per_epoch for s in self.samplers]
        self.stage_starts = [0]
        for spe, epochs in zip(self.stage_steps_per_epoch, self.stage_epochs):
            self.stage_starts.append(self.stage_starts[-1] + spe * epochs)
        self.total_steps = self.stage_starts.pop()
        stages = zip(self.stage_starts, self.stage_steps_per_epoch, self.stage_epochs)
        self.epoch_starts = [start + k * spe for start, spe, epochs in stages for k in range(epochs)]
        self.steps_per_epoch = max(1, self.total_steps // len(self.epoch_starts))

    def shares(self) -> Dict[str, float]:
        counts = {t: 0.0 for t in self.tasks}
        for sampler, spe, epochs in zip(self.samplers, self.stage_steps_per_epoch, self.stage_epochs):
            for t, p in sampler.shares().items():
                counts[t] += p * spe * epochs
        return {t: c / self.total_steps for t, c in counts.items()}

    def _check_step(self, step: int) -> int:
        super()._check_step(step)
        if step >= self.total_steps:
            raise ValueError(f"{self._name()}: step {step} is past the end of the schedule "
                             f"(total_steps = {self.total_steps})")
        return step

    def stage_for_step(self, step: int) -> int:
        """Index of the stage that ``step`` belongs to."""
        return bisect.bisect_right(self.stage_starts, self._check_step(step)) - 1

    def epoch_for_step(self, step: int) -> int:
        return bisect.bisect_right(self.epoch_starts, self._check_step(step)) - 1

    def tasks_for_step(self, step: int) -> List[str]:
        i = self.stage_for_step(step)
        return self.samplers[i].tasks_for_step(step - self.stage_starts[i])

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "stages": [s.state_dict() for s in self.samplers],
                "stage_epochs": list(self.stage_epochs)}

    def __repr__(self) -> str:
        return (f"StagedSampler(stages={[(s.kind, s.tasks, e) for s, e in zip(self.samplers, self.stage_epochs)]}, "
                f"stage_steps_per_epoch={self.stage_steps_per_epoch}, total_steps={self.total_steps})")


def _check_tasks(name: str, tasks: Sequence[str]) -> List[str]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"{name}: tasks must be a non-empty list of task names, got {tasks!r}")
    bad = [t for t in tasks if not isinstance(t, str) or not t]
    if bad:
        raise ValueError(f"{name}: task names must be non-empty strings, got {bad}")
    dupes = sorted({t for t in tasks if list(tasks).count(t) > 1})
    if dupes:
        raise ValueError(f"{name}: duplicate tasks {dupes} in {list(tasks)}")
    return list(tasks)


def _check_batches(name: str, tasks: List[str], batches_per_epoch: Dict[str, int]) -> Dict[str, int]:
    if not isinstance(batches_per_epoch, dict):
        raise ValueError(f"{name}: batches_per_epoch must be a dict {{task: batches}}, got {batches_per_epoch!r}")
    missing = [t for t in tasks if t not in batches_per_epoch]
    if missing:
        raise ValueError(f"{name}: batches_per_epoch lacks tasks {missing} (has {sorted(batches_per_epoch)})")
    for t in tasks:
        b = batches_per_epoch[t]
        if not _is_int(b) or b < 1:
            raise ValueError(f"{name}: batches_per_epoch[{t!r}] must be an int >= 1 (an empty training set "
                             f"cannot be scheduled), got {b!r}")
    return {t: int(batches_per_epoch[t]) for t in tasks}


def _missing_tasks(name: str, field: str, given: List[str], tasks: List[str]) -> List[str]:
    """Refuses names in ``given`` that are not among ``tasks``; returns the tasks ``given`` leaves out."""
    unknown = [t for t in given if t not in tasks]
    if unknown:
        raise ValueError(f"{name}: '{field}' refers to tasks {unknown} that are not among the tasks {tasks}")
    return [t for t in tasks if t not in given]


def _check_order(name: str, tasks: List[str], order: Optional[Sequence[str]], allows_repeats: bool) -> List[str]:
    if order is None:
        return list(tasks)
    if isinstance(order, str) or not isinstance(order, Sequence) or not order:
        raise ValueError(f"{name}: order must be a non-empty list of task names, got {order!r}")
    missing = _missing_tasks(name, "order", list(order), tasks)
    if missing:
        raise ValueError(f"{name}: order {list(order)} leaves out tasks {missing}; every task must appear")
    if not allows_repeats and len(set(order)) != len(order):
        raise ValueError(f"{name}: order {list(order)} repeats a task; only 'round_robin' accepts repeats")
    return list(order)


def _check_weights(name: str, tasks: List[str], weights: Dict[str, float]) -> Dict[str, float]:
    if not isinstance(weights, dict):
        raise ValueError(f"{name}: weights must be a dict {{task: weight}}, got {weights!r}")
    missing = _missing_tasks(name, "weights", list(weights), tasks)
    if missing:
        raise ValueError(f"{name}: weights lack tasks {missing}")
    for t, w in weights.items():
        if not _is_number(w) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"{name}: weights[{t!r}] must be a finite number > 0, got {w!r}")
    return {t: float(weights[t]) for t in tasks}


def _check_epoch_size(name: str, epoch_size: EpochSize) -> Union[str, int]:
    if epoch_size is None:
        return "smallest"
    if isinstance(epoch_size, str):
        if epoch_size not in _EPOCH_SIZES:
            raise ValueError(f"{name}: epoch_size must be 'smallest', 'largest' or an int >= 1, got {epoch_size!r}")
        return epoch_size
    if not _is_int(epoch_size) or epoch_size < 1:
        raise ValueError(f"{name}: epoch_size must be 'smallest', 'largest' or an int >= 1, got {epoch_size!r}")
    return epoch_size


TASK_SAMPLERS: Dict[str, type] = {
    "joint": JointSampler,
    "round_robin": RoundRobinSampler,
    "random": RandomSampler,
    "proportional": ProportionalSampler,
    "staged": StagedSampler,
}

_COMMON_OPTIONS = ("epoch_size", "multiplier", "order")
_KIND_OPTIONS = {
    "joint": (),
    "round_robin": (),
    "random": (),
    "proportional": ("weights", "alpha", "temperature"),
    "staged": ("stages",),
}


def build_task_sampler(kind: str, tasks: Sequence[str], batches_per_epoch: Dict[str, int], seed: int = 0,
                       **options: Any) -> TaskSampler:
    """Build the sampler registered as ``kind`` in :data:`TASK_SAMPLERS`.

    ``options``: ``epoch_size``, ``multiplier``, ``order`` for every kind, plus ``weights`` /
    ``alpha`` / ``temperature`` for ``proportional`` and ``stages`` for ``staged``. Options set to
    None take their defaults. Unknown kinds and options raise ``ValueError`` naming them.
    """
    if kind not in TASK_SAMPLERS:
        raise ValueError(f"unknown task schedule {kind!r}; expected one of {list(TASK_SAMPLERS)}")
    allowed = _COMMON_OPTIONS + _KIND_OPTIONS[kind]
    unknown = sorted(k for k in options if k not in allowed)
    if unknown:
        raise ValueError(f"task schedule {kind!r}: unknown options {unknown}; it accepts {list(allowed)}")
    options = {k: v for k, v in options.items() if v is not None}
    return TASK_SAMPLERS[kind](tasks, batches_per_epoch, seed, **options)
