"""LoRA fine-tuning of a minbert encoder: adapters on chosen linear layers, merged export, adapter files.

LoRA (Hu et al. 2021, eq. 3) freezes a pretrained weight W0 and learns a low-rank update::

    h = W0 x + b + (alpha / r) · B A x,        A (r, in), B (out, r), r << min(in, out)

A starts random (kaiming-uniform, a = √5, as peft does) and B at zero, so a freshly adapted model
computes exactly what the base model computes.

Module layout and parameter names
---------------------------------
:func:`apply_lora` replaces chosen ``nn.Linear`` modules inside ``encoder.layer.N`` with a
:class:`LoRALinear` *at the same path*. The LoRALinear owns the original ``weight`` and ``bias``
Parameters under the same names, so every Hugging Face name (``encoder.layer.0.attention.self.query.weight``)
is unchanged and the base checkpoint still loads. The adapters are::

    <path>.lora_A.<adapter>    (r, in)     e.g. encoder.layer.0.attention.self.query.lora_A.default
    <path>.lora_B.<adapter>    (out, r)         encoder.layer.0.attention.self.query.lora_B.default

with one adapter named ``default`` (one adapter shared by every task: peft's name), or one adapter
per task, named after the task (``tasks=["sst", "quora", "sts"]`` -> ``lora_A.sst``, ...). Names
depend only on the options, so a model rebuilt by re-running :func:`apply_lora` loads a saved state.

Per-task adapters are separate Parameters (not one stacked (T, r, in) tensor) on purpose: a
batch of task ``sst`` gives the other tasks' adapters no gradient at all (``.grad`` stays None),
so AdamW skips them; a stacked tensor would receive zero gradients for the other tasks, and
AdamW's momentum and weight decay would keep moving adapters whose task is not in the batch.

Which task's adapter runs
-------------------------
``MultitaskModel`` calls ``set_task(name)`` on every module of the encoder before each forward,
and every trainer batch holds one task, so a LoRALinear applies one adapter to the whole call.
This is required rather than a convenience: the encoder may run packed (T, H) token states between
attention calls (``minbert.model.Unpadder``), so per-sequence ids could not be matched to rows.

* one shared adapter: ``set_task`` is a no-op; the adapter serves every task.
* per-task adapters: ``set_task(name)`` selects that task's adapter; ``set_task(None)`` selects
  no adapter (base layer only); an unknown name raises ``ValueError`` (a silent fallback to the
  base model would hide a misconfigured run). A forward before any ``set_task`` raises.
* Rows of different tasks in one call: ``LoRALinear.forward(x, adapter_ids=...)`` (per row of x
  flattened to (N, in), or per sequence for x (B, L, in); -1 = no adapter) runs the fused
  multi-adapter kernel on the adapters stacked in ``tasks`` order.

What is fused
-------------
The forward calls :func:`minbert.kernels.lora.lora_linear` (base matmul and low-rank term in one Triton
kernel on GPU, or in the interpreter; the plain-torch reference otherwise, see kernels/lora.py).
The kernel reads the same x for both terms, so LoRA dropout (``dropout > 0``, training mode)
cannot be fused: then the layer computes ``F.linear(x, W, b) + s · B A dropout(x)`` unfused (the
base term on the clean x, the low-rank term on the dropped x, as peft does). In eval mode, or with
``dropout = 0`` (the default), the fused kernel runs.

Merging
-------
:func:`merge_lora` folds ``s · B A`` into ``weight`` (one adapter: the shared one, or the task
named by ``task=``); the forward is then a plain ``F.linear`` and the adapters are not used (no
gradient reaches them: do not train a merged model). :func:`unmerge_lora` subtracts it again
(exact up to float rounding). While merged, ``state_dict()`` holds the merged weight *and* the
adapters: save full states only unmerged (the trainer never merges). For export use
:func:`merged_state_dict`, which returns HF-named tensors with the adapters folded in and no
``lora_*`` keys, loadable by ``BertModel.from_pretrained`` and ``transformers``.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from minbert.kernels.lora import lora_linear

logger = logging.getLogger(__name__)

__all__ = [
    "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "lora_config", "lora_state_dict",
    "save_adapters", "load_adapters", "read_adapter_config", "merged_state_dict", "count_trainable",
    "lora_parameter_count", "lora_modules", "TARGETS", "TARGET_GROUPS",
]

DEFAULT_ADAPTER = "default"
METADATA_KEY = "minbert.lora"

# Short target names -> path of the nn.Linear inside one encoder layer (encoder.layer.N.<path>).
TARGETS: Dict[str, str] = {
    "query": "attention.self.query",  # H -> H
    "key": "attention.self.key",  # H -> H
    "value": "attention.self.value",  # H -> H
    "attention_output": "attention.output.dense",  # H -> H, after attention (BertSelfOutput.dense)
    "intermediate": "intermediate.dense",  # H -> I (BertIntermediate.dense)
    "output": "output.dense",  # I -> H (BertOutput.dense)
}
# Names that stand for several targets. "dense" = the three dense layers of each encoder layer
# (attention.output.dense, intermediate.dense, output.dense); the pooler's dense is never adapted.
TARGET_GROUPS: Dict[str, Tuple[str, ...]] = {
    "dense": ("attention_output", "intermediate", "output"),
    "all": tuple(TARGETS),
}
_LAYER_PATTERN = re.compile(r"^(first|last|mid)(\d+)$")
_MODULE_PATTERN = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_UNSET = object()


class LoRALinear(nn.Module):
    """A frozen linear layer plus LoRA adapters: ``y = x Wᵀ + b + (alpha / r) · (x Aᵀ) Bᵀ``.

    Args:
        base: the ``nn.Linear`` to wrap; its ``weight`` and ``bias`` Parameters are taken over
            (same objects, same names), so checkpoints keep loading. Their ``requires_grad`` is
            left as it is (:func:`apply_lora` freezes them).
        rank: r >= 1.
        alpha: scaling numerator, > 0; ``scaling = alpha / rank``.
        dropout: LoRA dropout on the low-rank path's input, in [0, 1). When > 0 the training-mode
            forward is unfused (see the module docstring).
        tasks: None for one adapter (``lora_A.default``), or task names for one adapter per task.

    Parameters: ``weight`` (out, in), ``bias`` (out,) or None, ``lora_A.<adapter>`` (r, in),
    ``lora_B.<adapter>`` (out, r).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 tasks: Optional[Sequence[str]] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear: base must be an nn.Linear, got {type(base).__name__}")
        _check_rank_alpha_dropout(rank, alpha, dropout)
        tasks = _check_tasks(tasks)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # (out, in)
        self.register_parameter("bias", base.bias)  # (out,) or None
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.tasks: Optional[Tuple[str, ...]] = tasks
        names = tasks if tasks is not None else (DEFAULT_ADAPTER,)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(rank, self.in_features, **factory)) for n in names})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.empty(self.out_features, rank, **factory)) for n in names})
        self.reset_lora_parameters()
        # per-task mode: the adapter the next calls use (_UNSET until set_task; None = base only)
        self._active = _UNSET if tasks is not None else DEFAULT_ADAPTER
        self.merged: Optional[str] = None  # name of the adapter folded into weight, or None

    # --- set-up -----------------------------------------------------------------------------
    def reset_lora_parameters(self) -> None:
        """A: kaiming-uniform(a=√5) (nn.Linear's and peft's init); B: zeros, so the update starts at 0."""
        for name in self.lora_A:
            nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name])

    @property
    def per_task(self) -> bool:
        return self.tasks is not None

    @property
    def adapter_names(self) -> Tuple[str, ...]:
        return self.tasks if self.tasks is not None else (DEFAULT_ADAPTER,)

    def set_task(self, task: Optional[str]) -> None:
        """Select the adapter for the next calls (see the module docstring for the rules)."""
        if not self.per_task:
            return  # one adapter shared by all tasks
        if task is not None and task not in self.tasks:
            raise ValueError(f"LoRALinear.set_task: no adapter for task {task!r}; this layer has per-task "
                             f"adapters for {list(self.tasks)} (set_task(None) runs the base layer only)")
        if self.merged is not None and task != self.merged:
            raise RuntimeError(f"LoRALinear.set_task: the adapter of task {self.merged!r} is merged into the "
                               f"weight, so task {task!r} cannot run; call unmerge_lora(model) first")
        self._active = task

    @property
    def active_adapter(self) -> Optional[str]:
        """The adapter the next forward applies (None: base layer only)."""
        if self._active is _UNSET:
            raise RuntimeError(
                f"LoRALinear: this layer has per-task adapters for {list(self.tasks)} but no task was selected; "
                "call set_task(name) first (MultitaskModel does this before every batch), or set_task(None) "
                "for the base layer only")
        return self._active

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, adapter_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(..., in) -> (..., out).

        ``adapter_ids`` (per-task mode only) mixes adapters within one call: ids index
        ``self.tasks`` (-1 = no adapter), one per row of x flattened to (N, in), or one per
        sequence for x (B, L, in) -- see :func:`minbert.kernels.lora.lora_linear`.
        """
        if self.merged is not None:
            if adapter_ids is not None:
                raise RuntimeError("LoRALinear: adapter_ids cannot be used while an adapter is merged; "
                                   "call unmerge_lora(model) first")
            return F.linear(x, self.weight, self.bias)
        if adapter_ids is not None:
            if not self.per_task:
                raise ValueError("LoRALinear: adapter_ids needs per-task adapters (apply_lora(..., tasks=[...])); "
                                 "this layer has one shared adapter")
            lora_a = torch.stack([self.lora_A[t] for t in self.tasks])  # (T, r, in)
            lora_b = torch.stack([self.lora_B[t] for t in self.tasks])  # (T, out, r)
        else:
            name = self.active_adapter
            if name is None:
                return F.linear(x, self.weight, self.bias)
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]  # (r, in), (out, r)
        if self.dropout_p > 0 and self.training:
            # unfused: the kernel reads one x for both terms; dropout applies to the low-rank path only
            return F.linear(x, self.weight, self.bias) + _low_rank(self.lora_dropout(x), lora_a, lora_b,
                                                                   self.scaling, adapter_ids)
        return lora_linear(x, self.weight, self.bias, lora_a, lora_b, self.scaling, adapter_ids)

    # --- merging ------------------------------------------------------------------------------
    def delta_weight(self, adapter: Optional[str] = None) -> torch.Tensor:
        """``scaling · B A`` (out, in) of one adapter (by name; None = the shared one), in fp32."""
        if adapter is not None and adapter not in self.lora_A:
            raise ValueError(f"no adapter {adapter!r}; adapters: {list(self.adapter_names)}")
        name = adapter if adapter is not None else self._adapter_name(None)
        a, b = self.lora_A[name], self.lora_B[name]
        return (b.detach().float() @ a.detach().float()) * self.scaling

    def merge(self, task: Optional[str] = None) -> None:
        """Fold one adapter into ``weight`` (per-task mode: ``task`` is required)."""
        if self.merged is not None:
            raise RuntimeError(f"LoRALinear.merge: adapter {self.merged!r} is already merged; unmerge first")
        name = self._adapter_name(task)
        with torch.no_grad():
            self.weight.add_(self.delta_weight(name).to(self.weight.dtype))
        self.merged = name
        if self.per_task:
            self._active = name

    def unmerge(self) -> None:
        """Subtract the merged adapter from ``weight`` again (no-op when nothing is merged)."""
        if self.merged is None:
            return
        with torch.no_grad():
            self.weight.sub_(self.delta_weight(self.merged).to(self.weight.dtype))
        self.merged = None

    def _adapter_name(self, task: Optional[str]) -> str:
        if not self.per_task:
            if task is not None:
                raise ValueError(f"this LoRA model has one shared adapter, so task={task!r} does not apply; "
                                 "pass task=None")
            return DEFAULT_ADAPTER
        if task is None:
            raise ValueError(f"this LoRA model has one adapter per task ({list(self.tasks)}); "
                             "name the task whose adapter to merge: task=...")
        if task not in self.tasks:
            raise ValueError(f"no adapter for task {task!r}; adapters: {list(self.tasks)}")
        return task

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout_p:g}, "
                f"adapters={list(self.adapter_names)}, merged={self.merged}")


def _low_rank(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
              adapter_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``scaling · (x Aᵀ) Bᵀ`` unfused (the dropout path); with ids: each row uses its adapter."""
    if adapter_ids is None:
        return scaling * F.linear(F.linear(x, lora_a), lora_b)  # (..., out)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    n = x2.shape[0]
    ids = adapter_ids.to(torch.int64)
    if ids.numel() != n:
        if x.dim() >= 3 and ids.numel() == x.shape[0]:
            ids = ids[:, None].expand(-1, n // x.shape[0]).reshape(-1)  # per sequence -> per row
        else:
            raise ValueError(f"LoRALinear: adapter_ids must have shape ({n},) or, for 3-D x, ({x.shape[0]},); "
                             f"got {tuple(adapter_ids.shape)} for x of shape {tuple(x.shape)}")
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= lora_a.shape[0]):
        raise ValueError(f"LoRALinear: adapter_ids must lie in [-1, {lora_a.shape[0]}), "
                         f"got values in [{int(ids.min())}, {int(ids.max())}]")
    out = x2.new_zeros(n, lora_b.shape[1])  # (N, out)
    for t in range(lora_a.shape[0]):
        rows = (ids == t).nonzero(as_tuple=True)[0]
        out = out.index_add(0, rows, F.linear(F.linear(x2.index_select(0, rows), lora_a[t]), lora_b[t]))
    return (scaling * out).reshape(*x.shape[:-1], lora_b.shape[1])


# --- validation -------------------------------------------------------------------------------------

def _check_rank_alpha_dropout(rank, alpha, dropout) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be a number in [0, 1), got {dropout!r}")


def _check_tasks(tasks) -> Optional[Tuple[str, ...]]:
    if tasks is None:
        return None
    if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)):
        raise ValueError(f"LoRA tasks must be None or a list of task names, got {tasks!r}")
    if not tasks:
        raise ValueError("LoRA tasks must name at least one task (or be None for one shared adapter)")
    for t in tasks:
        if not isinstance(t, str) or not t or "." in t:
            raise ValueError(f"LoRA task names must be non-empty strings without '.', got {t!r}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"LoRA tasks contain duplicates: {list(tasks)}")
    return tuple(tasks)


def _encoder_model(model: nn.Module) -> nn.Module:
    """The BertModel: ``model`` itself, or ``model.bert`` (a MultitaskModel)."""
    for candidate in (model, getattr(model, "bert", None)):
        if isinstance(candidate, nn.Module) and isinstance(getattr(getattr(candidate, "encoder", None), "layer", None),
                                                             nn.ModuleList):
            return candidate
    raise TypeError(f"LoRA needs a minbert BertModel (a module with encoder.layer) or a model with one at .bert; "
                    f"got {type(model).__name__}")


def _resolve_targets(targets) -> List[str]:
    """Target names -> ordered, de-duplicated paths inside one encoder layer."""
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(f"LoRA targets must be a non-empty list of names, got {targets!r}")
    by_path = {path: name for name, path in TARGETS.items()}
    chosen = set()
    for t in targets:
        if not isinstance(t, str):
            raise ValueError(f"LoRA targets must be strings, got {t!r}")
        if t in TARGET_GROUPS:
            chosen.update(TARGETS[n] for n in TARGET_GROUPS[t])
        elif t in TARGETS:
            chosen.add(TARGETS[t])
        elif t in by_path:
            chosen.add(t)
        else:
            raise ValueError(
                f"unknown LoRA target {t!r}; expected one of {list(TARGETS)} (short names), {list(TARGET_GROUPS)} "
                f"(groups: dense = {list(TARGET_GROUPS['dense'])}) or a path inside encoder.layer.N: "
                f"{list(TARGETS.values())}")
    return [p for p in TARGETS.values() if p in chosen]


def _resolve_layers(layers, num_layers: int) -> List[int]:
    """None/"all", "firstN"/"lastN"/"midN", or a list of indices (negative ones count from the end)."""
    if layers is None or layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        m = _LAYER_PATTERN.match(layers)
        if not m:
            raise ValueError(f"LoRA layers must be None, 'all', 'firstN', 'lastN', 'midN' (e.g. 'last4') or a list "
                             f"of layer indices, got {layers!r}")
        where, n = m.group(1), int(m.group(2))
        if n < 1:
            raise ValueError(f"LoRA layers {layers!r}: the number of layers must be >= 1")
        if n >= num_layers:
            if n > num_layers:
                logger.warning("LoRA layers=%r asks for %d layers but the model has %d; adapting all of them",
                               layers, n, num_layers)
            return list(range(num_layers))
        start = {"first": 0, "last": num_layers - n, "mid": (num_layers - n) // 2}[where]
        return list(range(start, start + n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"LoRA layers must be None, 'firstN'/'lastN'/'midN' or a non-empty list of indices, "
                         f"got {layers!r}")
    out = []
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"LoRA layer indices must be integers, got {i!r} in {list(layers)}")
        if not -num_layers <= i < num_layers:
            raise ValueError(f"LoRA layer index {i} is out of range for a model with {num_layers} layers "
                             f"(valid: 0..{num_layers - 1}, or negative from the end)")
        out.append(i % num_layers)
    if len(set(out)) != len(out):
        raise ValueError(f"LoRA layers contain duplicates: {list(layers)}")
    return sorted(out)


# --- applying, merging ----------------------------------------------------------------------------

def lora_modules(model: nn.Module) -> Iterator[Tuple[str, LoRALinear]]:
    """(path relative to the BertModel, module) of every LoRALinear, in module order."""
    for name, module in _encoder_model(model).named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def apply_lora(model: nn.Module, targets: Union[str, Sequence[str]] = ("query", "key"), rank: int = 4,
               alpha: float = 8, dropout: float = 0.0, layers=None, tasks: Optional[Sequence[str]] = None) -> nn.Module:
    """Put LoRA adapters on chosen linear layers of a BertModel, in place; freeze every base weight.

    Args:
        model: a minbert ``BertModel``, or a model holding one at ``.bert`` (``MultitaskModel``);
            only the BertModel is changed and frozen (heads elsewhere stay as they are).
        targets: which linears of each chosen encoder layer: short names ``query``, ``key``,
            ``value``, ``attention_output`` (attention.output.dense), ``intermediate``
            (intermediate.dense), ``output`` (output.dense); groups ``dense`` (the three dense
            layers: attention.output.dense, intermediate.dense, output.dense; never the pooler)
            and ``all`` (all six); or the paths themselves (``attention.self.query``, ...).
        rank, alpha, dropout: r >= 1, alpha > 0 (scaling alpha / r), LoRA dropout in [0, 1).
        layers: None or ``"all"`` (every layer); ``"firstN"``, ``"lastN"``, ``"midN"`` (N layers at
            the start, the end, or centred: start (L - N) // 2, so mid4 of 6 layers = 1..4 and of 12
            = 4..7; N >= L adapts every layer, with a warning when N > L); or a list of indices.
        tasks: None for one adapter shared by every task, or task names for one adapter each.

    Every parameter of the BertModel (embeddings, LayerNorms, all linears, pooler) gets
    ``requires_grad=False``; only the new ``lora_A`` / ``lora_B`` train. Returns ``model``.
    """
    bert = _encoder_model(model)
    if any(True for _ in lora_modules(bert)):
        raise RuntimeError("apply_lora: this model already has LoRA adapters; apply LoRA once, to a base model")
    _check_rank_alpha_dropout(rank, alpha, dropout)
    tasks = _check_tasks(tasks)
    paths = _resolve_targets(targets)
    num_layers = len(bert.encoder.layer)
    indices = _resolve_layers(layers, num_layers)
    for p in bert.parameters():
        p.requires_grad_(False)
    for i in indices:
        layer = bert.encoder.layer[i]
        for path in paths:
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            base = getattr(parent, attr)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"apply_lora: encoder.layer.{i}.{path} is a {type(base).__name__}, not an nn.Linear")
            setattr(parent, attr, LoRALinear(base, rank, alpha, dropout, tasks))
    return model


def merge_lora(model: nn.Module, task: Optional[str] = None) -> nn.Module:
    """Fold ``scaling · B A`` into each adapted weight; the forward becomes plain F.linear.

    One shared adapter: ``task`` must be None. Per-task adapters: ``task`` names the adapter to
    merge (the model then serves that task only; ``set_task`` to another task raises).
    Raises if an adapter is already merged. Returns ``model``.
    """
    modules = list(lora_modules(model))
    if not modules:
        raise ValueError("merge_lora: the model has no LoRA adapters (apply_lora first)")
    for name, m in modules:
        if m.merged is not None:
            raise RuntimeError(f"merge_lora: {name} already has adapter {m.merged!r} merged; unmerge_lora first")
    for _, m in modules:
        m._adapter_name(task)  # validate before changing any weight
    for _, m in modules:
        m.merge(task)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (weights restored up to float rounding); no-op when nothing is merged."""
    for _, m in lora_modules(model):
        m.unmerge()
    return model


# --- state, files -------------------------------------------------------------------------------

def lora_config(model: nn.Module) -> Optional[Dict]:
    """The options LoRA was applied with (rank, alpha, dropout, targets as layer paths, layers, tasks),
    read from the modules; None when the model has no adapters."""
    modules = list(lora_modules(model))
    if not modules:
        return None
    first = modules[0][1]
    paths, layers = set(), set()
    for name, m in modules:
        match = _MODULE_PATTERN.match(name)
        if match is None:  # cannot happen through apply_lora
            raise RuntimeError(f"LoRA module {name} is not inside encoder.layer.N")
        layers.add(int(match.group(1)))
        paths.add(match.group(2))
        if (m.rank, m.alpha, m.dropout_p, m.tasks) != (first.rank, first.alpha, first.dropout_p, first.tasks):
            raise RuntimeError(f"LoRA modules disagree on their options ({name} vs {modules[0][0]})")
    return {
        "rank": first.rank, "alpha": first.alpha, "dropout": first.dropout_p,
        "targets": [p for p in TARGETS.values() if p in paths] + sorted(paths - set(TARGETS.values())),
        "layers": sorted(layers), "tasks": list(first.tasks) if first.tasks is not None else None,
    }


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the adapter tensors, named relative to the BertModel (``encoder.layer.0.attention.self.query.lora_A.default``)."""
    out = {}
    for name, m in lora_modules(model):
        for adapter in m.adapter_names:
            out[f"{name}.lora_A.{adapter}"] = m.lora_A[adapter].detach()
            out[f"{name}.lora_B.{adapter}"] = m.lora_B[adapter].detach()
    return out


def save_adapters(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the adapters alone as safetensors (atomically), with the LoRA options as metadata."""
    from safetensors.torch import save_file

    from .pretrained import atomic_path

    config = lora_config(model)
    if config is None:
        raise ValueError("save_adapters: the model has no LoRA adapters (apply_lora first)")
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(config)})
    return path


def read_adapter_config(path: Union[str, Path]) -> Dict:
    """The LoRA options stored in an adapter file written by :func:`save_adapters`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path} is not a minbert LoRA adapter file (no {METADATA_KEY!r} metadata)")
    return json.loads(meta[METADATA_KEY])


def load_adapters(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load adapters written by :func:`save_adapters` into ``model``; returns ``model``.

    A model without LoRA first gets :func:`apply_lora` with the file's options (which freezes its
    base weights). A model with LoRA must have the same options; every difference is listed in
    one error. Tensor names and shapes must match exactly (e.g. the same hidden size).
    """
    from safetensors.torch import load_file

    config = read_adapter_config(path)
    existing = lora_config(model)
    if existing is None:
        apply_lora(model, **config)
    else:
        diffs = [f"{k}: file {config.get(k)!r} vs model {existing[k]!r}" for k in existing if config.get(k) != existing[k]]
        if diffs:
            raise ValueError(f"cannot load adapters from {path}: the model's LoRA options differ:\n  " + "\n  ".join(diffs))
    merged = [name for name, m in lora_modules(model) if m.merged is not None]
    if merged:
        raise RuntimeError(f"load_adapters: adapters are merged in {merged[:3]}...; unmerge_lora(model) first")
    tensors = load_file(str(path))
    own = lora_state_dict(model)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in tensors and tensors[k].shape != own[k].shape]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
        if items:
            problems.append(f"{title} tensors:\n  " + "\n  ".join(items))
    if problems:
        raise ValueError(f"cannot load adapters from {path}:\n" + "\n".join(problems))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(tensors[k].to(device=t.device, dtype=t.dtype))
    return model


def merged_state_dict(model: nn.Module, task: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The BertModel's state with adapters folded into the weights and no ``lora_*`` keys.

    HF names only, so ``BertModel.save_pretrained`` / ``transformers`` load it as a plain BERT.
    One shared adapter: merged. Per-task adapters: the adapter of ``task``; with ``task=None``
    the base weights are returned (adapters left out, with a warning) since no single task's
    adapter is the model. A model without LoRA returns its plain state dict. The model is not
    changed.
    """
    bert = _encoder_model(model)
    state = {k: v.detach() for k, v in bert.state_dict().items()}
    for name, m in lora_modules(bert):
        for adapter in m.adapter_names:
            state.pop(f"{name}.lora_A.{adapter}")
            state.pop(f"{name}.lora_B.{adapter}")
        if m.merged is not None:
            if m.per_task and task is not None and task != m.merged:
                raise RuntimeError(f"merged_state_dict: {name} has task {m.merged!r} merged, not {task!r}; "
                                   "unmerge_lora first")
            continue  # the weight already holds the merged adapter
        if m.per_task and task is None:
            continue
        delta = m.delta_weight(task if m.per_task else None)
        state[f"{name}.weight"] = (m.weight.detach().float() + delta).to(m.weight.dtype)
    if task is None and any(m.per_task and m.merged is None for _, m in lora_modules(bert)):
        logger.warning("merged_state_dict: per-task LoRA adapters are not part of the exported weights "
                       "(base weights only); pass task=... to export one task's adapted encoder")
    return state


def count_trainable(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad`` (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def lora_parameter_count(model: nn.Module) -> int:
    """Adapter elements: Σ over adapted layers of r · (in + out) · (number of adapters)."""
    return sum(t.numel() for t in lora_state_dict(model).values())
