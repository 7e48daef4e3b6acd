"""DeepSpeed checkpoints -> the consolidated fp32 model, in minbert's model folder format.

A DeepSpeed checkpoint (``RUN_DIR/checkpoint/<tag>/``) holds the module weights once
(``mp_rank_00_model_states.pt``) and each rank's ZeRO partition of the fp32 master weights and
optimizer states (``*_optim_states.pt``). :func:`consolidated_state_dict` rebuilds the full fp32
state dict: for ZeRO stages 1-3 (and any bf16/fp16 run) from the fp32 partitions with
DeepSpeed's ``zero_to_fp32`` utilities, for fp32 ZeRO-0 from the module weights, which are the
fp32 weights themselves. It runs on one process, without a process group.

:func:`export_hf` writes the folder :func:`minbert.run_dir.save_model_dir` writes: ``encoder/`` in
the Hugging Face format (``config.json`` + ``model.safetensors``, loadable by
``minbert.BertModel.from_pretrained`` and ``transformers.BertModel.from_pretrained``), the heads
in ``multitask.safetensors``, the recipe and the tokenizer, so ``minbert evaluate/predict`` take it.

    python -m minbert.distributed.checkpoint RUN_DIR/checkpoint OUT_DIR [--tag step1200]

:func:`export_live` does the same from a running engine at the end of training (``--export``);
under ZeRO-3 it gathers the partitioned parameters on every rank first.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch


def latest_tag(checkpoint_dir) -> str:
    checkpoint_dir = Path(checkpoint_dir)
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} holds no DeepSpeed checkpoint (no 'latest' file)")
    return latest.read_text().strip()


def _model_states(tag_dir: Path) -> Dict:
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) or sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states file (mp_rank_00_model_states.pt)")
    return torch.load(files[0], map_location="cpu", weights_only=False)


def consolidated_state_dict(checkpoint_dir, tag: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """(fp32 state dict of the whole trained module, the trainer's client state) of a DeepSpeed checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or latest_tag(checkpoint_dir)
    tag_dir = checkpoint_dir / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{tag_dir} does not exist")
    states = _model_states(tag_dir)
    ds_config = states.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    low_precision = any((ds_config.get(k) or {}).get("enabled") is True for k in ("bf16", "fp16"))
    client = {k: v for k, v in states.items() if k not in ("module", "optimizer", "lr_scheduler", "ds_config",
                                                         "ds_version", "buffer_names", "param_shapes",
                                                         "frozen_param_shapes", "shared_params",
                                                         "frozen_param_fragments")}
    if stage == 0 and not low_precision:
        state = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag))
        # buffers (e.g. position ids) are not optimizer state; take them from the module file
        for k, v in (states.get("module") or {}).items():
            if k not in state:
                state[k] = v
    return state, client


def _rebuild(cfg):
    from minbert.pretrained import resolve_checkpoint
    from minbert.bert_config import BertConfig
    from minbert.finetune import set_trainable
    from minbert.model import BertModel
    from minbert.multitask import MultitaskModel

    folder = resolve_checkpoint(cfg.model)
    bert_cfg = BertConfig.from_json_file(folder / "config.json", attn_implementation=cfg.attn_implementation)
    model = MultitaskModel(BertModel(bert_cfg), cfg.tasks)
    set_trainable(model, cfg)
    return model


def export_hf(checkpoint_dir, out_dir, tag: Optional[str] = None, run_dir=None) -> Path:
    """Write the consolidated fp32 model of a DeepSpeed checkpoint as a minbert model folder."""
    from minbert.tokenizer import Tokenizer
    from minbert.run_dir import save_model_dir
    from minbert.train_config import load_config

    checkpoint_dir = Path(checkpoint_dir)
    run_dir = Path(run_dir) if run_dir else checkpoint_dir.parent
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}/config.yaml is missing: pass --run-dir, the run folder the checkpoint belongs to")
    cfg = load_config(run_dir / "config.yaml")
    tag = tag or latest_tag(checkpoint_dir)
    state, client = consolidated_state_dict(checkpoint_dir, tag)
    model = _rebuild(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{checkpoint_dir / tag}: the checkpoint does not match the recipe's model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    tokenizer = Tokenizer.from_pretrained(cfg.model)
    save_model_dir(Path(out_dir), model.eval(), cfg, tokenizer,
                   {"exported_from": str(checkpoint_dir / tag), "step": client.get("step")})
    return Path(out_dir)


def export_live(adapter, cfg, out_dir) -> Optional[Path]:
    """Write the engine's current model (all ranks call this; rank 0 writes)."""
    import torch.distributed as dist

    from minbert.tokenizer import Tokenizer
    from minbert.run_dir import save_model_dir

    model = adapter.model
    ctx = contextlib.nullcontext()
    if adapter.stage == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    written = None
    with ctx, torch.no_grad():
        if adapter.is_main:
            state = {k: v.detach().float().clone() if v.is_floating_point() else v.clone()
                     for k, v in model.state_dict().items()}
    if adapter.is_main:
        clone = _rebuild(cfg)
        clone.load_state_dict(state)
        save_model_dir(Path(out_dir), clone.eval(), cfg, Tokenizer.from_pretrained(cfg.model),
                       {"exported_from": "live engine", "zero_stage": adapter.stage})
        written = Path(out_dir)
    if dist.is_initialized() and adapter.world_size > 1:
        dist.barrier()
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minbert.distributed.checkpoint",
                                description="export a DeepSpeed checkpoint as a minbert/Hugging Face model folder")
    p.add_argument("checkpoint", help="RUN_DIR/checkpoint (the folder with the 'latest' file)")
    p.add_argument("out", help="output model folder")
    p.add_argument("--tag", help="checkpoint tag (default: the one in 'latest')")
    p.add_argument("--run-dir", help="the run folder holding config.yaml (default: the checkpoint's parent)")
    args = p.parse_args(argv)
    try:
        out = export_hf(args.checkpoint, args.out, tag=args.tag, run_dir=args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out} (encoder/ is a Hugging Face BERT folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
