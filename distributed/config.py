"""The DeepSpeed JSON: reading, patching, resolving ``"auto"`` and checking it before training.

The JSON file (``distributed/configs/zero*.json``) is the single source of truth for the engine;
command-line flags only patch it (``--ds-set zero_optimization.stage=1``, ``--precision bf16``).
Values the recipe already fixes may be written as ``"auto"`` and are filled in from it:

==================================  ==========================================================
``train_micro_batch_size_per_gpu``  the tasks' ``batch_size`` (rows per rank per task; the
                                    largest when tasks differ)
``gradient_accumulation_steps``     ``optim.grad_accum``
``train_batch_size``                micro-batch × accumulation × world size
``gradient_clipping``               ``optim.grad_clip``
``optimizer.params.*``              ``optim.lr``, ``optim.betas``, ``optim.eps``, ``optim.weight_decay``
``bf16.enabled`` / ``fp16.enabled``  fp32 on CPU; bf16 on a GPU that has it, else fp16
==================================  ==========================================================

Explicit values are checked against the recipe and against each other, so a mistake stops the
run with a message naming the key before any model is built:

* ``train_batch_size`` must equal ``train_micro_batch_size_per_gpu × gradient_accumulation_steps ×
  world size`` (the arithmetic DeepSpeed asserts much later, with a terser message);
* an explicit micro-batch must equal every task's ``batch_size`` and explicit accumulation steps
  must equal ``optim.grad_accum`` (the trainer, not DeepSpeed, draws the batches);
* ``zero_optimization.stage`` must be 0, 1, 2 or 3.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union


AUTO = "auto"
STAGES = (0, 1, 2, 3)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed JSON is unreadable, inconsistent, or disagrees with the recipe."""


def config_path(name_or_path: Union[str, Path]) -> Path:
    """A JSON path, or the name of a shipped config (``zero2`` -> ``distributed/configs/zero2.json``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix == ".json" else f"{path.name}.json")
    if not path.exists() and shipped.is_file():  # also finds distributed/configs/X.json from another folder
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    raise DeepSpeedConfigError(f"--deepspeed_config: {name_or_path} does not exist (shipped configs: {names})")


def load_ds_config(source: Union[str, Path, Dict[str, Any]], patches: Iterable[str] = (),
                   precision: Optional[str] = None) -> Dict[str, Any]:
    """Read the JSON (a path, a shipped name, or a dict) and apply ``key=value`` patches."""
    if isinstance(source, dict):
        ds = copy.deepcopy(source)
        where = "DeepSpeed config"
    else:
        path = config_path(source)
        where = str(path)
        try:
            ds = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DeepSpeedConfigError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise DeepSpeedConfigError(f"{where}: expected a JSON object at the top level")
    for text in patches:
        key, value = _parse_patch(text)
        _set_path(ds, key, value)
    if precision is not None:
        if precision not in PRECISIONS:
            raise DeepSpeedConfigError(f"--precision: {precision!r} is not one of {list(PRECISIONS)}")
        if precision != "auto":
            ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
            ds.setdefault("fp16", {})["enabled"] = precision == "fp16"
        else:
            ds.setdefault("bf16", {})["enabled"] = AUTO
            ds.setdefault("fp16", {})["enabled"] = AUTO
    zero_stage(ds)  # an unknown stage fails here, before anything else
    return ds


def zero_stage(ds: Dict[str, Any]) -> int:
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DeepSpeedConfigError(f"zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in STAGES:
        raise DeepSpeedConfigError(f"zero_optimization.stage: {stage!r} is not a ZeRO stage; expected one of {list(STAGES)}")
    return stage


def offloads_optimizer(ds: Dict[str, Any]) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return isinstance(off, dict) and off.get("device", "none") not in (None, "none")


def resolve_ds_config(ds: Dict[str, Any], cfg, world_size: int, cuda: Optional[bool] = None,
                      bf16_supported: Optional[bool] = None) -> Dict[str, Any]:
    """Fill every ``"auto"`` from the recipe ``cfg`` and check the batch arithmetic.

    Returns a new dict that DeepSpeed accepts as is (no ``"auto"`` left).
    """
    ds = copy.deepcopy(ds)
    zero_stage(ds)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise DeepSpeedConfigError(f"world size must be a positive integer, got {world_size!r}")
    sizes = {t.name: t.batch_size for t in cfg.tasks}
    recipe_micro = max(sizes.values())
    accum = cfg.optim.grad_accum

    micro = ds.get("train_micro_batch_size_per_gpu", AUTO)
    gas = ds.get("gradient_accumulation_steps", AUTO)
    total = ds.get("train_batch_size", AUTO)
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas),
                       ("train_batch_size", total)):
        if value != AUTO and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DeepSpeedConfigError(f"{key} must be a positive integer or \"auto\", got {value!r}")
    if micro == AUTO:
        micro = recipe_micro
    else:
        wrong = {t: b for t, b in sizes.items() if b != micro}
        if wrong:
            raise DeepSpeedConfigError(
                f"train_micro_batch_size_per_gpu={micro} disagrees with the recipe's per-rank batch sizes "
                f"{ {t: b for t, b in sizes.items()} } (tasks.<name>.batch_size is the number of rows each rank "
                f"takes per task); set it to \"auto\" or --set tasks.<name>.batch_size={micro}")
    if gas == AUTO:
        gas = accum
    elif gas != accum:
        raise DeepSpeedConfigError(
            f"gradient_accumulation_steps={gas} disagrees with the recipe's optim.grad_accum={accum}; "
            f"set it to \"auto\" or --set optim.grad_accum={gas}")
    if total == AUTO:
        total = micro * gas * world_size
    elif total != micro * gas * world_size:
        raise DeepSpeedConfigError(
            f"train_batch_size={total} is not train_micro_batch_size_per_gpu ({micro}) × "
            f"gradient_accumulation_steps ({gas}) × world size ({world_size}) = {micro * gas * world_size}; "
            f"fix one of them or write \"auto\"")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = total

    clip = ds.get("gradient_clipping", AUTO)
    if clip == AUTO:
        clip = float(cfg.optim.grad_clip)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise DeepSpeedConfigError(f"gradient_clipping must be a number >= 0 or \"auto\", got {clip!r}")
    ds["gradient_clipping"] = float(clip)

    if "optimizer" in ds:
        opt = ds["optimizer"]
        if not isinstance(opt, dict) or "type" not in opt:
            raise DeepSpeedConfigError("optimizer must be an object with a \"type\" (e.g. \"AdamW\") and \"params\"")
        params = opt.setdefault("params", {})
        recipe = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                  "weight_decay": cfg.optim.weight_decay}
        for key, value in list(params.items()):
            if value == AUTO:
                if key not in recipe:
                    raise DeepSpeedConfigError(f"optimizer.params.{key}: \"auto\" is only understood for {sorted(recipe)}")
                params[key] = recipe[key]
        if "scheduler" in ds:
            raise DeepSpeedConfigError("scheduler: the recipe's optim.schedule drives the learning rate; "
                                       "remove the DeepSpeed \"scheduler\" block")

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
        if bf16_supported is None:
            bf16_supported = bool(cuda and torch.cuda.is_bf16_supported())
    for key in ("bf16", "fp16"):
        block = ds.get(key)
        if block is not None and not isinstance(block, dict):
            raise DeepSpeedConfigError(f"{key} must be an object like {{\"enabled\": true}}, got {block!r}")
    bf16 = (ds.get("bf16") or {}).get("enabled", False)
    fp16 = (ds.get("fp16") or {}).get("enabled", False)
    if bf16 == AUTO:
        bf16 = bool(cuda and bf16_supported)
    if fp16 == AUTO:
        fp16 = bool(cuda and not bf16_supported and not bf16)
    if bf16 and fp16:
        raise DeepSpeedConfigError("bf16.enabled and fp16.enabled are both true; pick one precision")
    if not cuda and fp16:
        raise DeepSpeedConfigError("fp16.enabled: fp16 training needs a GPU; on the CPU use fp32 (or bf16)")
    if bf16:
        ds.setdefault("bf16", {})["enabled"] = True
    elif "bf16" in ds:
        ds["bf16"]["enabled"] = False
    if fp16:
        ds.setdefault("fp16", {})["enabled"] = True
    elif "fp16" in ds:
        ds["fp16"]["enabled"] = False

    if fp16 and getattr(cfg, "autocast", None):
        raise DeepSpeedConfigError(
            f"autocast: {cfg.autocast!r} with fp16.enabled: the engine would hold fp16 weights while autocast "
            f"runs the forward in {cfg.autocast}; pick one precision (--precision bf16, or --set autocast=null)")

    left = list(_find_auto(ds))
    if left:
        raise DeepSpeedConfigError(f"\"auto\" is not understood for {left[0]}; write a value")
    return ds


def precision_of(ds: Dict[str, Any]) -> str:
    if (ds.get("bf16") or {}).get("enabled") is True:
        return "bf16"
    if (ds.get("fp16") or {}).get("enabled") is True:
        return "fp16"
    return "fp32"


def check_with_deepspeed(ds: Dict[str, Any]) -> None:
    """Let DeepSpeed parse the resolved dict now (its own validation), not halfway through start-up.

    Before the process group exists DeepSpeed assumes one rank, so the (already checked) batch
    arithmetic is handed to it for a world of one.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = copy.deepcopy(ds)
    probe["train_batch_size"] = probe["train_micro_batch_size_per_gpu"] * probe["gradient_accumulation_steps"]
    try:
        DeepSpeedConfig(probe)
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise DeepSpeedConfigError(f"DeepSpeed rejected the config: {e}") from None


# --- helpers -----------------------------------------------------------------------------------

def _parse_patch(text: str):
    """``key=value`` with a YAML value, parsed exactly like the recipe's ``--set`` overrides."""
    from minbert.train_config import ConfigError, parse_override

    try:
        return parse_override(text)
    except ConfigError as e:
        raise DeepSpeedConfigError(str(e).replace("--set", "--ds-set")) from None


def _set_path(ds: Dict[str, Any], key: str, value: Any) -> None:
    node = ds
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DeepSpeedConfigError(f"--ds-set {key}: {part} is {child!r}, not an object")
        node = child
    node[parts[-1]] = value


def _find_auto(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _find_auto(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _find_auto(v, f"{prefix}[{i}]")
    elif node == AUTO:
        yield prefix
