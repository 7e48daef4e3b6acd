"""Memory benchmark (run by hand, not in CI): per-rank model-state bytes of SMART + PCGrad under ZeRO.

    python benchmarks/memory.py [--stages 0 1 2 3] [--steps 3] [--no-smart] [--hidden 768 --layers 12 --heads 12]

Setup (the issue's): a bert-base-sized random-weight encoder (hidden 768, 12 layers, 12 heads,
the real 30522-token vocabulary: 110 M parameters), three tasks (SST, Quora, STS; tiny batches
from ``tests/fixtures/train``), PCGrad over the three tasks, SMART on every task, AdamW, fp32 on
the CPU. One single-process run (the trainer's ``LocalEngine``), then two ranks
(``deepspeed --num_gpus 2``) for each ZeRO stage, each for a few steps.

Measured on every rank, right after the step's gradient is complete (``clip_grad_norm``), as the
maximum over the steps after the first (when the optimizer states exist), by summing the bytes
of the distinct tensor storages in each group -- a storage shared by two groups counts once,
in the first group listed:

* parameters -- the model's parameters (ZeRO-1/2: DeepSpeed's flat parameter buffer, which they
  view; ZeRO-3: each rank's parameter partitions);
* optimizer states -- AdamW's ``exp_avg``/``exp_avg_sq`` and ZeRO's fp32 master partitions (for
  fp32 ZeRO-1/2 the adapter makes those share the parameters' memory, so they count there);
* gradients -- ``p.grad`` and DeepSpeed's gradient buffers and partitions (tensors in optimizer
  attributes whose name mentions ``grad``, the reduce buckets);
* PCGrad task gradients -- single process: the (T, P) stack PCGrad builds; DeepSpeed: the (T, P/N)
  shards of :class:`minbert.distributed.sharded.ShardedPCGrad` plus its pending correction;
* SMART teacher -- MBPP's momentum teacher, one for all tasks (:class:`minbert.smart.MomentumTeacher`):
  the whole θ̃ in a single process, this rank's 1/N slice under DeepSpeed (the all-gathered copy
  lives only during the teacher's forward pass and shows in the peak RSS, not here).

Peak RSS is the process's ``ru_maxrss`` (everything: activations, the Python runtime, transient
copies). ZeRO-3 cannot run PCGrad or SMART (both refuse it at start-up, see
``minbert.distributed.sharded``), so its row uses equal weighting without SMART and is compared
with a single-process run of that set-up.

Writes ``benchmarks/results/memory-cpu.json`` (``memory-cpu-nosmart.json`` with ``--no-smart``) and
prints a markdown table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "train"
MiB = 1024 * 1024
GROUPS = ("parameters", "optimizer", "gradients", "pcgrad", "teacher")


# --- the measuring side (inside each training process) -------------------------------------------

def _storages(obj, depth=3):
    """Tensors inside obj (a tensor, or lists/tuples/dicts of them, a few levels deep)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _storages(v, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for v in obj.values():
            yield from _storages(v, depth - 1)


def _bytes(tensors, seen):
    total = 0
    for t in tensors:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        key = (storage.data_ptr(), storage.device.type)
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


class Meter:
    def __init__(self):
        self.calls = 0
        self.best = None
        self.single_pcgrad_bytes = 0
        self.step_times = []
        self._t = None

    def measure(self, model, optimizer, zero_opt=None, sharded=None):
        self.calls += 1
        now = time.perf_counter()
        if self._t is not None:
            self.step_times.append(now - self._t)
        self._t = now
        if self.calls < 2:  # no optimizer state yet
            return
        seen = set()
        params = list(model.parameters())
        out = {}
        # parameters
        tensors = list(params) + [p.ds_tensor for p in params if hasattr(p, "ds_tensor")]
        if zero_opt is not None:
            for name, value in vars(zero_opt).items():
                if any(k in name for k in ("bit16_groups_flat", "fp16_partitioned_groups_flat", "parallel_partitioned")):
                    tensors += list(_storages(value))
        out["parameters"] = _bytes(tensors, seen)
        # optimizer states (AdamW moments, ZeRO fp32 master partitions)
        inner = getattr(optimizer, "optimizer", optimizer)
        tensors = [t for state in inner.state.values() for t in _storages(state) if t.numel() > 1]
        if zero_opt is not None:
            for name, value in vars(zero_opt).items():
                if "fp32" in name and "grad" not in name:
                    tensors += list(_storages(value))
        out["optimizer"] = _bytes(tensors, seen)
        # gradients
        tensors = [p.grad for p in params if p.grad is not None]
        if zero_opt is not None:
            for name, value in vars(zero_opt).items():
                if "grad" in name.lower() and "hook" not in name.lower():
                    tensors += list(_storages(value))
            for name, value in vars(zero_opt).items():
                if "fp32" in name:
                    tensors += [t.grad for t in _storages(value) if t.grad is not None]
            for bucket in getattr(zero_opt, "ipg_buckets", {}).values():
                tensors += list(_storages(getattr(bucket, "buffer", [])))
        out["gradients"] = _bytes(tensors, seen)
        # PCGrad task gradients
        if sharded is not None:
            pending = sharded.shards.pending if sharded.shards is not None else None
            out["pcgrad"] = sharded.buffer_bytes + (pending.numel() * pending.element_size() if pending is not None else 0)
        else:
            out["pcgrad"] = self.single_pcgrad_bytes
        # SMART teachers
        teachers = []
        for obj in gc.get_objects():
            try:
                is_teacher = type(obj).__name__ == "ParameterEMA"
            except ReferenceError:
                continue
            if is_teacher and obj.shard is not None:
                teachers.append(obj.shard)
        out["teacher"] = _bytes(teachers, seen)
        out["total"] = sum(out[g] for g in GROUPS)
        if self.best is None or out["total"] > self.best["total"]:
            self.best = out


def _install(meter: Meter) -> None:
    import minbert.engine as local_engine
    from minbert.weighting import pcgrad as pcgrad_mod

    original = local_engine.LocalEngine.clip_grad_norm

    def local_clip(self):
        norm = original(self)
        meter.measure(self.model, self.optimizer)
        return norm

    local_engine.LocalEngine.clip_grad_norm = local_clip
    original_tg = pcgrad_mod.PCGrad.task_gradients

    def task_gradients(self, losses, params):
        out = original_tg(self, losses, params)
        buf = out[0] if isinstance(out, tuple) else out  # (T, P)
        meter.single_pcgrad_bytes = max(meter.single_pcgrad_bytes, buf.numel() * buf.element_size())
        return out

    pcgrad_mod.PCGrad.task_gradients = task_gradients
    try:
        import minbert.distributed.engine as ds_engine
    except ImportError:
        return
    original_ds = ds_engine.DeepSpeedEngineAdapter.clip_grad_norm

    def ds_clip(self):
        norm = original_ds(self)
        zero = self.optimizer if self.stage > 0 else None
        meter.measure(self.model, self.optimizer, zero_opt=zero, sharded=self._sharded)
        return norm

    ds_engine.DeepSpeedEngineAdapter.clip_grad_norm = ds_clip


def worker(args) -> int:
    meter = Meter()
    _install(meter)
    rank = int(os.environ.get("RANK", 0))
    t0 = time.perf_counter()
    if args.mode == "single":
        from minbert.train import train
        from minbert.train_config import load_config

        train(load_config(args.recipe, list(args.set)))
        world, stage = 1, None
    else:
        from minbert.distributed.launch import main

        code = main(["--config", args.recipe, "--deepspeed_config", args.deepspeed_config,
                     *[a for s in args.set for a in ("--set", s)]])
        if code != 0:
            return code
        world, stage = int(os.environ.get("WORLD_SIZE", 1)), int(args.deepspeed_config[-1])
    result = {"mode": args.mode, "stage": stage, "rank": rank, "world_size": world, "bytes": meter.best,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "step_seconds": meter.step_times, "wall_seconds": time.perf_counter() - t0}
    Path(args.result).mkdir(parents=True, exist_ok=True)
    (Path(args.result) / f"rank{rank}.json").write_text(json.dumps(result, indent=2))
    return 0


# --- the driver ------------------------------------------------------------------------------------

RECIPE = """
model: {model}
data: {{dir: {data}, bad_rows: skip}}
tasks:
  - {{name: sst, head: linear, max_length: 32, batch_size: {batch}}}
  - {{name: quora, head: linear, max_length: 32, batch_size: {batch}}}
  - {{name: sts, head: linear, max_length: 32, batch_size: {batch}}}
schedule: {{kind: joint, epoch_size: largest}}
weighting: {{name: {weighting}}}
{smart}
optim: {{lr: 2.0e-5, schedule: constant, grad_clip: 1.0}}
epochs: 1
max_steps: {steps}
eval_every: 100000
log_every: 1
quiet: true
predict: false
save_best: false
"""


def _make_checkpoint(folder: Path, hidden: int, layers: int, heads: int) -> None:
    import torch

    from minbert import BertConfig, BertModel, default_checkpoint

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_checkpoint() / name, folder / name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env=None) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    proc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _collect(folder: Path):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def driver(args) -> int:
    import importlib.util

    smart_available = importlib.util.find_spec("minbert.smart") is not None and not args.no_smart
    work = Path(tempfile.mkdtemp(prefix="minbert-memory-"))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    rows = []
    try:
        ckpt = work / "bert-base-random"
        _make_checkpoint(ckpt, args.hidden, args.layers, args.heads)

        def recipe(name, batch, weighting, smart):
            path = work / f"{name}.yaml"
            block = "smart: {lambda_s: 1.0, mu: 1.0}" if smart else ""
            path.write_text(RECIPE.format(model=ckpt, data=FIXTURES, batch=batch, weighting=weighting, smart=block,
                                          steps=args.steps))
            return path

        setups = [("pcgrad", smart_available)]
        if 3 in args.stages:
            setups.append(("equal", False))
        for weighting, smart in setups:
            label = f"{'SMART + ' if smart else ''}{weighting}"
            runs = [("single", None)] + [("zero", s) for s in args.stages
                                         if (s == 3) == (weighting == "equal" and not smart)]
            for mode, stage in runs:
                name = f"{weighting}-{'smart' if smart else 'nosmart'}-{mode}{'' if stage is None else stage}"
                out = work / name
                common = ["--set", f"output_dir={work / ('run-' + name)}"]
                if mode == "single":
                    _run([sys.executable, __file__, "--worker", "--mode", "single", "--recipe",
                          recipe(name, 2 * args.batch, weighting, smart), "--result", out, *common], env=env)
                else:
                    _run([Path(sys.executable).parent / "deepspeed", "--num_gpus", "2", "--master_port", _free_port(),
                          __file__, "--worker", "--mode", "ds", "--recipe", recipe(name, args.batch, weighting, smart),
                          "--deepspeed_config", f"zero{stage}", "--result", out, *common], env=env)
                shutil.rmtree(work / ("run-" + name), ignore_errors=True)
                for r in _collect(out):
                    r["setup"] = label
                    rows.append(r)
                    print(json.dumps({k: r[k] for k in ("setup", "mode", "stage", "rank", "bytes", "peak_rss")}),
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = markdown(rows, args)
    print(table)
    out_file = Path(args.out) if args.out else \
        REPO / "benchmarks" / "results" / f"memory-cpu{'' if smart_available else '-nosmart'}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps({
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
        "cpus": os.cpu_count(), "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads},
        "smart": smart_available, "steps": args.steps, "rows": rows, "table": table}, indent=2) + "\n")
    print(f"\nwritten: {out_file}")
    return 0


def markdown(rows, args) -> str:
    lines = []
    baselines = {r["setup"]: r for r in rows if r["mode"] == "single"}
    lines.append("| setup | run | rank | parameters | optimizer states | gradients | PCGrad task grads | SMART teacher "
                 "| model state | vs single process | peak RSS |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = r["bytes"]
        base = baselines[r["setup"]]["bytes"]["total"]
        run = "single process" if r["mode"] == "single" else f"ZeRO-{r['stage']}, 2 ranks"
        cells = [f"{b[g] / MiB:,.0f}" for g in GROUPS]
        lines.append(f"| {r['setup']} | {run} | {r['rank']} | " + " | ".join(cells) +
                     f" | {b['total'] / MiB:,.0f} | {b['total'] / base:.2f}× | {r['peak_rss'] / MiB:,.0f} |")
    lines.append("")
    lines.append("MiB per rank. Per-rank model state with N ranks, P parameters, T tasks, one shared SMART teacher "
                 "(fp32, AdamW; ZeRO-1/2 fp32 masters share the parameters' memory):")
    lines.append("single 4P + 8P + 4P + 4TP + 4P (parameters, AdamW moments, gradients, task gradients, teacher); "
                 "ZeRO-0 4P + 8P + 4P + 4TP/N + 4P/N; ZeRO-1 and ZeRO-2 4P + 8P/N + 4P/N + 4TP/N + 4P/N (ZeRO-1 holds "
                 "full local gradients only until the boundary reduction); ZeRO-3 4P/N + 12P/N + 4P/N (fp32 masters "
                 "separate; no PCGrad/SMART). As N grows only the 4P parameters stay whole on every rank.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2, help="rows per task per rank (single process: twice this)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--no-smart", action="store_true")
    p.add_argument("--out", help="result file (default benchmarks/results/memory-cpu[-nosmart].json)")
    # worker mode (started by the driver)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["single", "ds"], help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--deepspeed_config", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.steps < 2:
        p.error("--steps must be >= 2 (optimizer states appear after the first step)")
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
