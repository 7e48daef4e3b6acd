"""Training configuration: one set of dataclasses, read from YAML, patched by ``--set key=value``.

Every key is validated before any training starts. An unknown key or a bad value raises
:class:`ConfigError` naming the key (``optim.lr``, ``tasks.sst.head``, ...).

Tasks are a list in YAML and are addressed by name in overrides: ``--set tasks.sst.batch_size=16``.
``--set tasks=sst,sts`` keeps only those tasks (with the recipe's settings for them, else defaults).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from .tasks import get_task, trainable_tasks


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid."""


FINETUNE_MODES = ("full-model", "last-linear-layer", "lora")
POOLINGS = ("cls", "pooler", "mean")
# The cross-encoder member of ``pair_encoding: hybrid``: its head, pooling and length, and the weight
# of the bi-encoder member in the combined output (``w * bi + (1 - w) * cross``). max_length None: 2x
# the task's max_length.
HYBRID_DEFAULTS = {"head": "linear", "head_options": {}, "pooling": "cls", "max_length": None, "weight": 0.5}


@dataclass
class SmartConfig:
    """A ``smart:`` block: the global one (every task) or ``tasks.<name>.smart`` (one task's overrides).

    The fields are the options of :class:`minbert.smart.SMART`, which checks their values; ``None``
    means not given here (the global block's value, else SMART's default). ``enabled: false`` turns
    SMART off (for one task, under a global block). :meth:`TrainConfig.smart_for` merges the two.
    """

    enabled: Optional[bool] = None  # None: true
    lambda_s: Optional[float] = None
    mu: Optional[float] = None
    steps: Optional[int] = None
    sigma: Optional[float] = None
    step_size: Optional[float] = None
    epsilon: Optional[float] = None
    norm: Optional[str] = None
    rule: Optional[str] = None
    norm_level: Optional[str] = None
    dropout: Optional[str] = None
    beta: Optional[float] = None
    layer: Optional[int] = None
    noise: Optional[str] = None
    r3f_distribution: Optional[str] = None

    def given(self) -> Dict[str, Any]:
        """The options this block sets, as written in YAML."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def options(self) -> Dict[str, Any]:
        """The keyword arguments of :class:`minbert.smart.SMART` (every given option but ``enabled``)."""
        return {k: v for k, v in self.given().items() if k != "enabled"}


@dataclass
class TaskConfig:
    """One task: files, encoding, head and loss (``name`` is a trainable task of :mod:`minbert.tasks`)."""

    name: str
    train_file: Optional[str] = None  # relative to data.dir unless absolute; default: the task's files
    dev_file: Optional[str] = None
    test_file: Optional[str] = None
    max_length: int = 128
    batch_size: int = 32
    pooling: str = "cls"  # cls | pooler | mean
    pair_encoding: str = "cross"  # cross | bi | hybrid (pair tasks only)
    # pair_encoding: hybrid - the bi-encoder head above plus a cross-encoder member; keys in HYBRID_DEFAULTS
    hybrid: Dict[str, Any] = field(default_factory=dict)
    head: str = "linear"
    head_options: Dict[str, Any] = field(default_factory=dict)
    loss: Optional[str] = None  # default: the task's default_loss
    loss_options: Dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0  # used by the "fixed" weighting
    aux_losses: List[Dict[str, Any]] = field(default_factory=list)  # e.g. [{name: simcse_unsup, weight: 0.1}]
    smart: Optional[SmartConfig] = None  # per-task SMART overrides (see TrainConfig.smart_for)
    max_train_examples: Optional[int] = None  # subsample (seeded) for quick runs
    max_dev_examples: Optional[int] = None
    swap_pairs: bool = False  # augmentation (pair tasks): each epoch a seeded half of the pairs is swapped
    symmetric_eval: bool = False  # pair tasks: predict from the mean output of (a, b) and (b, a)

    def validate(self, prefix: str) -> None:
        if self.name not in trainable_tasks():
            raise ConfigError(f"{prefix}.name: unknown task {self.name!r}; expected one of {sorted(trainable_tasks())}")
        _positive_int(f"{prefix}.max_length", self.max_length)
        _positive_int(f"{prefix}.batch_size", self.batch_size)
        _choice(f"{prefix}.pooling", self.pooling, POOLINGS)
        _choice(f"{prefix}.pair_encoding", self.pair_encoding, ("cross", "bi", "hybrid"))
        self._validate_hybrid(prefix)
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight < 0:
            raise ConfigError(f"{prefix}.weight must be a finite number >= 0, got {self.weight!r}")
        for key in ("max_train_examples", "max_dev_examples"):
            if getattr(self, key) is not None:
                _positive_int(f"{prefix}.{key}", getattr(self, key))
        for key in ("swap_pairs", "symmetric_eval"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{prefix}.{key} must be true or false, got {getattr(self, key)!r}")
            if getattr(self, key) and not self.is_pair:
                raise ConfigError(f"{prefix}.{key}: task {self.name!r} has one sentence per row; swapping needs "
                                  f"a pair task ({_pair_tasks()})")

    def _validate_hybrid(self, prefix: str) -> None:
        if not isinstance(self.hybrid, dict):
            raise ConfigError(f"{prefix}.hybrid must be a mapping, got {type(self.hybrid).__name__}")
        if self.pair_encoding == "hybrid" and not self.is_pair:
            raise ConfigError(f"{prefix}.pair_encoding: 'hybrid' needs a pair task ({_pair_tasks()}); "
                              f"task {self.name!r} has one sentence per row")
        if self.hybrid and self.pair_encoding != "hybrid":
            raise ConfigError(f"{prefix}.hybrid is set but pair_encoding is {self.pair_encoding!r}; "
                              "set pair_encoding: hybrid or drop it")
        unknown = sorted(k for k in self.hybrid if k not in HYBRID_DEFAULTS)
        if unknown:
            raise ConfigError(f"{prefix}.hybrid.{unknown[0]}: unknown key; valid keys: {sorted(HYBRID_DEFAULTS)}")
        h = self.hybrid_options
        _choice(f"{prefix}.hybrid.pooling", h["pooling"], POOLINGS)
        _positive_int(f"{prefix}.hybrid.max_length", h["max_length"])
        if not isinstance(h["head"], str):
            raise ConfigError(f"{prefix}.hybrid.head must be a head name, got {h['head']!r}")
        if not isinstance(h["head_options"], dict):
            raise ConfigError(f"{prefix}.hybrid.head_options must be a mapping, got {h['head_options']!r}")
        w = h["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:
            raise ConfigError(f"{prefix}.hybrid.weight must be a number in [0, 1], got {w!r}")

    @property
    def hybrid_options(self) -> Dict[str, Any]:
        """The cross-encoder member of a hybrid pair task, defaults filled in (max_length: 2x the task's)."""
        out = dict(HYBRID_DEFAULTS, max_length=2 * self.max_length)
        out.update(self.hybrid)
        return out

    @property
    def kind(self) -> str:
        """The task's problem type (:data:`minbert.tasks.PROBLEM_TYPES`)."""
        return get_task(self.name).problem_type

    @property
    def is_pair(self) -> bool:
        return get_task(self.name).is_pair

    @property
    def loss_name(self) -> str:
        return self.loss or get_task(self.name).default_loss

    def collate(self, tokenizer, evaluation: bool = False):
        """This task's collate function (``evaluation``: with the swapped pairs when ``symmetric_eval``)."""
        from .data import make_collate

        return make_collate(tokenizer, self.name, self.max_length, self.pair_encoding,
                            symmetric=evaluation and self.symmetric_eval,
                            cross_max_length=self.hybrid_options["max_length"])

    def files(self, data_dir: Union[str, Path]) -> Dict[str, Optional[Path]]:
        defaults = get_task(self.name).files or (None, None, None)
        out = {}
        for split, given, default in zip(("train", "dev", "test"), (self.train_file, self.dev_file, self.test_file), defaults):
            name = given if given is not None else default
            out[split] = None if name in (None, "", "none") else (Path(data_dir) / name)
        return out


@dataclass
class DataConfig:
    dir: str = "../shared/data/cs224n"
    bad_rows: str = "error"  # error | skip
    bucket_by_length: bool = False
    source: str = "tsv"  # tsv | hub (Hugging Face datasets, needs internet)

    def validate(self, prefix: str) -> None:
        _choice(f"{prefix}.bad_rows", self.bad_rows, ("error", "skip"))
        _choice(f"{prefix}.source", self.source, ("tsv", "hub"))


@dataclass
class OptimConfig:
    lr: float = 2e-5
    head_lr: Optional[float] = None  # defaults to lr
    weight_decay: float = 0.01  # never applied to biases and LayerNorm weights
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "linear"  # constant | linear | exponential
    warmup_ratio: float = 0.0
    gamma: float = 0.9  # exponential decay per epoch
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    layer_decay: float = 1.0  # layer-wise lr decay: encoder depth d gets lr * layer_decay^(L + 1 - d)
    fused: Optional[bool] = None  # torch's fused AdamW kernel: null = where supported (CUDA; CPU on torch >= 2.4)

    def validate(self, prefix: str) -> None:
        if isinstance(self.layer_decay, bool) or not isinstance(self.layer_decay, (int, float)) \
                or not 0 < self.layer_decay <= 1:
            raise ConfigError(f"{prefix}.layer_decay must be a number in (0, 1], got {self.layer_decay!r}")
        for key in ("lr", "eps"):
            _positive_float(f"{prefix}.{key}", getattr(self, key))
        if self.head_lr is not None:
            _positive_float(f"{prefix}.head_lr", self.head_lr)
        for key in ("weight_decay", "grad_clip"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{prefix}.{key} must be a finite number >= 0, got {value!r}")
        _choice(f"{prefix}.schedule", self.schedule, ("constant", "linear", "exponential"))
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{prefix}.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"{prefix}.gamma must be in (0, 1], got {self.gamma!r}")
        _positive_int(f"{prefix}.grad_accum", self.grad_accum)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{prefix}.betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass
class ScheduleConfig:
    kind: str = "joint"  # joint | round_robin | random | proportional | staged
    epoch_size: Union[str, int] = "smallest"  # smallest | largest | <steps>
    multiplier: float = 1.0
    order: Optional[List[str]] = None
    options: Dict[str, Any] = field(default_factory=dict)  # e.g. stages for "staged", alpha for "proportional"

    def validate(self, prefix: str) -> None:
        if isinstance(self.epoch_size, str):
            _choice(f"{prefix}.epoch_size", self.epoch_size, ("smallest", "largest"))
        else:
            _positive_int(f"{prefix}.epoch_size", self.epoch_size)
        _positive_float(f"{prefix}.multiplier", self.multiplier)


@dataclass
class WeightingConfig:
    name: str = "equal"  # equal | fixed | uncertainty | dwa | dev_score | pcgrad | gse
    options: Dict[str, Any] = field(default_factory=dict)


AUTOCAST_MODES = (None, "bf16")  # fp16 would need a loss scaler; DeepSpeed's engine has its own fp16


@dataclass
class TrainConfig:
    model: Optional[str] = None  # checkpoint folder or hub name; None = embedded default
    attn_implementation: str = "torch"
    finetune: str = "full-model"  # full-model | last-linear-layer | lora
    lora: Dict[str, Any] = field(default_factory=dict)  # options of minbert.lora.apply_lora
    tasks: List[TaskConfig] = field(default_factory=lambda: [TaskConfig("sst"), TaskConfig("quora"), TaskConfig("sts")])
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    smart: Optional[SmartConfig] = None  # SMART for all tasks (see minbert.smart); per-task in tasks.X.smart
    epochs: int = 1
    max_steps: Optional[int] = None  # stop early (quick runs, tests)
    eval_every: Optional[int] = None  # steps between dev evaluations; None = once per epoch
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    output_dir: str = "runs/default"
    quiet: bool = False
    nan_patience: int = 5  # consecutive non-finite losses before stopping
    save_best: bool = True
    # besides best/: keep the k best evaluated models by dev overall as top/step-<N>/ (0 = none), for
    # snapshot ensembles (``minbert evaluate --checkpoint RUN/top/step-A RUN/top/step-B ...``)
    save_top_k: int = 0
    save_every: Optional[int] = None  # steps between resumable checkpoints; None = once per epoch
    predict: bool = True  # write dev/test prediction files for the best model at the end
    ema: Optional[float] = None  # β of a moving average of the weights used for evaluation (e.g. 0.999)
    # mixed precision: null = fp32; "bf16" = torch.autocast(bfloat16) around every forward and loss
    # (fp32 master weights and optimizer state; task outputs and losses in fp32). See minbert.evaluate.autocast_context.
    autocast: Optional[str] = None

    def validate(self) -> "TrainConfig":
        if self.ema is not None and (isinstance(self.ema, bool) or not isinstance(self.ema, (int, float))
                                     or not 0 < self.ema < 1):
            raise ConfigError(f"ema must be a number in (0, 1) (the moving average's β, e.g. 0.999) or null, "
                              f"got {self.ema!r}")
        _choice("attn_implementation", self.attn_implementation, ("torch", "math", "triton"))
        _choice("autocast", self.autocast, AUTOCAST_MODES)
        _choice("finetune", self.finetune, FINETUNE_MODES)
        if self.lora:
            import inspect

            from .lora import apply_lora

            valid = {p for p in inspect.signature(apply_lora).parameters if p not in ("model", "tasks")} | {"per_task"}
            unknown = sorted(k for k in self.lora if k not in valid)
            if unknown:
                raise ConfigError(f"unknown config key 'lora.{unknown[0]}'; valid keys here: {sorted(valid)}")
        if not self.tasks:
            raise ConfigError("tasks: at least one task is required")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks: duplicate task names in {names}")
        for t in self.tasks:
            t.validate(f"tasks.{t.name}")
        self.data.validate("data")
        self.optim.validate("optim")
        self.schedule.validate("schedule")
        if self.schedule.order is not None:
            unknown = [n for n in self.schedule.order if n not in names]
            if unknown:
                raise ConfigError(f"schedule.order names tasks that are not configured: {unknown} (tasks: {names})")
        _positive_int("epochs", self.epochs)
        for key in ("max_steps", "eval_every", "save_every"):
            if getattr(self, key) is not None:
                _positive_int(key, getattr(self, key))
        _positive_int("log_every", self.log_every)
        _positive_int("nan_patience", self.nan_patience)
        if not isinstance(self.save_top_k, int) or isinstance(self.save_top_k, bool) or self.save_top_k < 0:
            raise ConfigError(f"save_top_k must be an integer >= 0, got {self.save_top_k!r}")
        return self

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def smart_for(self, task: str) -> Optional[SmartConfig]:
        """SMART's options for ``task``: the global ``smart:`` block overridden key by key by
        ``tasks.<task>.smart``; None when neither is given or the result says ``enabled: false``."""
        own = self.task(task).smart
        if self.smart is None and own is None:
            return None
        merged = SmartConfig(**{**(self.smart.given() if self.smart else {}), **(own.given() if own else {})})
        return None if merged.enabled is False else merged

    def to_dict(self) -> Dict[str, Any]:
        """Plain data for YAML; a ``smart:`` block keeps only the options it gives."""
        out = dataclasses.asdict(self)
        for data, block in [(out, self.smart)] + [(d, t.smart) for d, t in zip(out["tasks"], self.tasks)]:
            data["smart"] = block.given() if block is not None else None
        return out


# --- building from dicts / YAML with validation -----------------------------------------------

def _pair_tasks() -> str:
    return ", ".join(name for name in trainable_tasks() if get_task(name).is_pair)


def _positive_int(key, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def _positive_float(key, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a positive number, got {value!r}")


def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not valid; expected one of {list(choices)}")


def _coerce(key: str, value: Any, annotation) -> Any:
    """Check/convert a YAML value against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not fit any of {args}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return _build(annotation, value, key)
    if origin in (list, List):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_coerce(f"{key}[{i}]", v, args[0] if args else Any) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _build(cls, data: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {sorted(fields)}")
        if cls is TrainConfig and key == "tasks":
            kwargs[key] = _build_tasks(value)
            continue
        kwargs[key] = _coerce(full, value, hints[key])
    if cls is TaskConfig and "name" not in kwargs:
        raise ConfigError(f"{prefix or 'task'}: every task needs a 'name'")
    return cls(**kwargs)


def _build_tasks(value) -> List[TaskConfig]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"tasks must be a list of task names or mappings, got {type(value).__name__}")
    tasks = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise ConfigError(f"tasks[{i}] must be a task name or a mapping, got {item!r}")
        tasks.append(_build(TaskConfig, item, f"tasks.{item.get('name', i)}"))
    return tasks


def _set_path(data: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if part == "tasks" and i == 0:
            tasks = node.setdefault("tasks", [{"name": t.name} for t in TrainConfig().tasks])
            name = parts[1]
            match = [t for t in tasks if (t if isinstance(t, str) else t.get("name")) == name]
            if not match:
                raise ConfigError(f"--set {key}: no task named {name!r} is configured "
                                  f"(tasks: {[t if isinstance(t, str) else t.get('name') for t in tasks]})")
            idx = tasks.index(match[0])
            if isinstance(tasks[idx], str):
                tasks[idx] = {"name": tasks[idx]}
            node = tasks[idx]
            rest = parts[2:]
            for sub in rest[:-1]:
                node = node.setdefault(sub, {})
            if not rest:
                raise ConfigError(f"--set {key}: name a field of the task, e.g. tasks.{name}.batch_size=16")
            node[rest[-1]] = value
            return
        if not isinstance(node.get(part, {}), dict):
            node[part] = {}
        node = node.setdefault(part, {})
        if node is None:
            node = {}
    node[parts[-1]] = value


def _select_tasks(current, value) -> List[Any]:
    """``--set tasks=sst,sts``: keep those tasks, with the recipe's settings where it has them."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"--set tasks expects a comma-separated list of task names, got {value!r}")
    current = current if isinstance(current, list) else [{"name": t.name} for t in TrainConfig().tasks]
    by_name = {}
    for item in current:
        name = item if isinstance(item, str) else item.get("name") if isinstance(item, dict) else None
        by_name[name] = item
    return [copy.deepcopy(by_name.get(v, v)) if isinstance(v, str) else v for v in value]


def parse_override(text: str):
    """``key=value`` with a YAML value (``optim.lr=3e-5``, ``tasks=sst,sts``, ``smart={}``)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)
    return key, value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    """Read a YAML recipe (or the defaults), apply ``key=value`` overrides, validate everything."""
    data: Dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data = copy.deepcopy(data)
    for text in overrides or []:
        key, value = parse_override(text)
        if key == "tasks":
            data["tasks"] = _select_tasks(data.get("tasks"), value)
            continue
        _set_path(data, key, value)
    try:
        cfg = _build(TrainConfig, data)
        return cfg.validate()
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None

