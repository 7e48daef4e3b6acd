"""Entry point of a DeepSpeed run: the same trainer as ``minbert train``, one process per rank.

    deepspeed --num_gpus 2 --module minbert.distributed.launch \\
        --config configs/multitask-joint.yaml --deepspeed_config distributed/configs/zero2.json \\
        [--set max_steps=100 ...] [--ds-set zero_optimization.stage=1 ...] [--precision bf16] \\
        [--resume RUN_DIR/checkpoint] [--export DIR]

(``python -m minbert.distributed.launch ...`` without the launcher runs one rank.) On a machine
without GPUs DeepSpeed uses its CPU accelerator: ``--num_gpus 2`` starts two ranks on the CPU,
talking over gloo; on GPUs the same command uses NCCL.

Order of events on every rank: read the recipe and the DeepSpeed JSON, resolve ``"auto"``,
check the batch arithmetic, the ZeRO stage and the weighting against the stage (all before any
process group or model exists, so a bad config fails in a second with exit status 2); join the
process group with a timeout (``--dist-timeout``, default 600 s; a rank that dies or stalls makes
the others fail with a clear message within that time instead of hanging, and the ``deepspeed``
launcher then stops the rest); train; optionally export the final model. Rank 0 alone logs,
writes metrics, plots, predictions and shows the progress bar (the trainer keys all of these on
``rank == 0``); the other ranks only report errors.

Exit status: 0 done, 1 a rank failed (a collective broke or another error), 2 bad configuration
or data, 130 stopped by ``--stop-at-step`` (used by tests to simulate a killed run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minbert.distributed.launch",
                                description="minbert multitask training under DeepSpeed ZeRO")
    p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
                   help="DeepSpeed JSON (distributed/configs/zero2.json) or a shipped name (zero2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--ds-set", action="append", default=[], metavar="KEY=VALUE",
                   help="patch the DeepSpeed JSON, e.g. zero_optimization.stage=1 (repeatable)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="patch bf16/fp16.enabled (auto: fp32 on CPU, bf16 on a GPU that has it, else fp16)")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (RUN_DIR/checkpoint)")
    p.add_argument("--data-dir", help="folder of the CS224N TSV files (data.dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bar; plain log lines")
    p.add_argument("--export", metavar="DIR", help="after training, write the final model (HF encoder + heads) to DIR")
    p.add_argument("--dist-timeout", type=float, default=float(os.environ.get("MINBERT_DIST_TIMEOUT", 600)),
                   help="seconds a collective may wait for the other ranks before failing (default 600)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="resumable checkpoints kept (older tags are deleted)")
    p.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's info logging")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by the deepspeed launcher")
    return p


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _say(rank: int, msg: str) -> None:
    print(f"minbert.distributed.launch [rank {rank}]: {msg}", file=sys.stderr, flush=True)


def _quiet_deepspeed(verbose: bool) -> None:
    if not os.environ.get("DS_ACCELERATOR"):
        os.environ["DS_ACCELERATOR"] = _guess_accelerator()
    if not verbose:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    # DeepSpeed's TorchBackend compiles a shared-memory all-reduce op (deepspeed_shm_comm, ~90 s with
    # ninja on first use) that only its inference path (inference_all_reduce) uses; training uses the
    # gloo/NCCL collectives. Skip building it unless MINBERT_DS_SHM_OP=1.
    if os.environ.get("MINBERT_DS_SHM_OP", "0") != "1":
        import importlib

        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: that finds torch
        if hasattr(ds_torch_comm, "build_shm_op"):
            ds_torch_comm.build_shm_op = lambda: None


def _guess_accelerator() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None),
                              getattr(dist, "DistNetworkError", None)) if k is not None)
    if kinds and isinstance(e, kinds):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "broken pipe"))


# set when a collective failed: the process group's transport threads can then abort the process
# ("terminate called without an active exception") while the interpreter shuts down, which would
# turn exit status 1 into SIGABRT. The command-line entry then leaves with os._exit after flushing.
_GROUP_BROKEN = [False]


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = args.local_rank if args.local_rank is not None else _env_int("LOCAL_RANK", 0)
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if rank != 0:  # only rank 0 logs (data summaries etc.); errors still reach stderr
        logging.getLogger("minbert").setLevel(logging.ERROR)
    # DeepSpeed 0.19 calls torch.distributed functions that torch 2.13 deprecates; nothing to act on here
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

    # 1. everything that can be checked without other ranks -------------------------------------
    from minbert.data import DataError
    from minbert.train import TrainingError, train
    from minbert.train_config import ConfigError, load_config

    from .config import (DeepSpeedConfigError, check_with_deepspeed, load_ds_config, precision_of,
                         resolve_ds_config, zero_stage)
    from .sharded import ShardedPCGradError, ZeRO3UnsupportedError, check_stage3_regularizers, check_supported

    import torch

    overrides = list(args.set)
    if args.data_dir:
        overrides.append(f"data.dir={args.data_dir}")
    if args.quiet:
        overrides.append("quiet=true")
    try:
        _quiet_deepspeed(args.verbose)
        cfg = load_config(args.config, overrides)
        cuda = torch.cuda.is_available()
        if cuda:
            cfg.device = f"cuda:{local_rank}"
        elif str(cfg.device).startswith("cuda"):
            raise ConfigError(f"device: {cfg.device!r} but no GPU is visible; DeepSpeed runs on the CPU accelerator here "
                              f"(--set device=cpu)")
        ds = load_ds_config(args.deepspeed_config, args.ds_set, args.precision)
        ds = resolve_ds_config(ds, cfg, world_size)
        check_supported(zero_stage(ds), cfg.weighting.name)
        check_stage3_regularizers(zero_stage(ds), cfg)
        check_with_deepspeed(ds)
        if args.dist_timeout <= 0:
            raise ConfigError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    except (ConfigError, DeepSpeedConfigError, ZeRO3UnsupportedError, FileNotFoundError) as e:
        _say(rank, f"error: {e}")
        return 2

    # 2. the process group --------------------------------------------------------------------
    import deepspeed
    import torch.distributed as dist

    if "MASTER_ADDR" not in os.environ and "WORLD_SIZE" not in os.environ:  # one rank, no launcher
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    # DeepSpeed creates its own data-parallel groups (torch.distributed.new_group) without a timeout,
    # which gives them torch's default (30 min for gloo): make that default ours, so that a collective
    # in any group fails within --dist-timeout
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    try:
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout,
                                   verbose=args.verbose)
    except Exception as e:  # e.g. the rendezvous never completes
        _say(rank, f"error: could not join the process group within {args.dist_timeout:.0f} s: {e}")
        return 1
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # 3. train ----------------------------------------------------------------------------------
    from .engine import build_engine

    built = []

    def engine_builder(model, groups, make_scheduler, cfg_):
        engine = build_engine(model, groups, make_scheduler, cfg_, ds_config=ds, rank=rank, world_size=world_size,
                              keep_checkpoints=args.keep_checkpoints)
        built.append(engine)
        return engine

    if rank == 0:
        run_dir = Path(cfg.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds, indent=2) + "\n", encoding="utf-8")
        print(f"DeepSpeed ZeRO-{zero_stage(ds)} on {world_size} rank(s) ({'nccl' if cuda else 'gloo'}), "
              f"precision {precision_of(ds)}, "
              f"train_batch_size {ds['train_batch_size']} = {ds['train_micro_batch_size_per_gpu']} × "
              f"{ds['gradient_accumulation_steps']} × {world_size}", flush=True)
    code = 0
    try:
        result = train(cfg, resume=args.resume, engine_builder=engine_builder, rank=rank, world_size=world_size,
                       stop_at_step=args.stop_at_step)
        if args.export:
            from .checkpoint import export_live

            export_live(built[0], cfg, args.export)
        if rank == 0:
            print(json.dumps(result, indent=2, default=float), flush=True)
    except KeyboardInterrupt as e:
        _say(rank, f"stopped: {e}")
        code = 130
    except (ConfigError, DeepSpeedConfigError, ZeRO3UnsupportedError, ShardedPCGradError, DataError, TrainingError, FileNotFoundError) as e:
        _say(rank, f"error: {e}")
        code = 2
    except Exception as e:  # noqa: BLE001 -- every rank must exit non-zero, with a message that says why
        if _is_collective_failure(e):
            _say(rank, f"error: a collective operation failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
                       f"Another rank probably died or stalled (timeout {args.dist_timeout:.0f} s). The last complete "
                       f"checkpoint in {Path(cfg.output_dir) / 'checkpoint'} stays loadable with --resume.")
            _GROUP_BROKEN[0] = True
        else:
            traceback.print_exc()
            _say(rank, f"error: {type(e).__name__}: {e}")
        code = 1
    finally:
        if code == 0 and dist.is_initialized():
            try:  # no barrier: rank 0 may still be writing predictions and plots
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
    return code


def _exit(code: int) -> None:
    if _GROUP_BROKEN[0]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
