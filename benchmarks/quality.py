"""Quality benchmark (run by hand, not in CI): multitask fine-tuning on the real CS224N data.

    python benchmarks/quality.py --config configs/multitask-joint.yaml [--set key=value ...] [--name RUN]
    python benchmarks/quality.py --ensemble RUN1 RUN2/top/step-N ... [--name NAME]

Trains the recipe with the embedded checkpoint on ``../shared/data/cs224n`` (or ``--data-dir``),
then writes ``benchmarks/results/quality-<recipe or --name>-<date>.json`` with the best dev metrics, the
train/dev gap on SST, the wall time and the exact command, and prints a markdown row for
``benchmarks/RESULTS.md``. ``--ensemble`` scores saved models of earlier runs together (:mod:`minbert.ensemble`): ``RUN`` is
that run's best model, ``RUN/top/step-N`` one of its snapshots (``--set save_top_k=K``); members may
hold different tasks (single-task specialists). It counts each run's training wall time once, plus
the scoring.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def sst_train_accuracy(run_dir: Path, cfg, limit: int = 2000) -> float:
    """Accuracy of the best model on (a seeded sample of) the SST training split: the train side of the gap."""
    from minbert import data as data_lib
    from minbert.metrics import accuracy
    from minbert.evaluate import predict
    from minbert.run_dir import load_model_dir

    model, mcfg, tok = load_model_dir(run_dir / "best")
    task = mcfg.task("sst")
    td = data_lib.read_task_file(task.files(cfg.data.dir)["train"], "sst", bad_rows=cfg.data.bad_rows)
    examples = td.examples[:limit]
    loader = data_lib.TaskLoader(examples, 64, data_lib.make_collate(tok, "sst", task.max_length), shuffle=False)
    out = predict(model, loader, "cpu", mcfg.autocast)
    return accuracy(out["preds"], out["labels"])


def _cpu() -> str:
    """The CPU's model name and whether it has AMX (bf16 matmuls are much faster with it), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")),
                 platform.machine())
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{model} ({', '.join(bf16) or 'no bf16 instructions'})"


def _provenance(argv) -> dict:
    """The machine and the exact command of a result file."""
    return {"machine": f"{_cpu()}, {torch.get_num_threads()} threads",
            "command": "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}


def _latest_result(run: str) -> dict:
    files = sorted((REPO / "benchmarks" / "results").glob(f"quality-{run}-????-??-??.json"))
    if not files:
        raise SystemExit(f"--ensemble: no benchmarks/results/quality-{run}-<date>.json; train it first with --name {run}")
    return json.loads(files[-1].read_text())


def _member(spec: str):
    """``RUN`` (runs/quality-RUN/best) or ``RUN/PATH`` (a folder inside that run, e.g. ``RUN/top/step-3066``,
    a snapshot kept by ``save_top_k``): (run name, model folder)."""
    run, _, sub = spec.partition("/")
    return run, REPO / "runs" / f"quality-{run}" / (sub or "best")


def ensemble(args, argv) -> int:
    """Score the ensemble of earlier runs (``minbert.ensemble``) and record it like a run.

    Snapshots of one run count that run's training time once."""
    from minbert.ensemble import score_checkpoints
    from minbert.evaluate import score

    specs = [_member(spec) for spec in args.ensemble]
    runs = list(dict.fromkeys(run for run, _ in specs))
    members = {run: _latest_result(run) for run in runs}
    t0 = time.perf_counter()
    _, scored = score_checkpoints([str(d) for _, d in specs], ("dev",), data_dir=args.data_dir, bad_rows="skip")
    scoring = time.perf_counter() - t0
    dev = score({task: r for (task, _), r in scored.items()})
    name = args.name or "ensemble-" + "+".join(args.ensemble).replace("/", "_")
    wall = sum(m["wall_time_s"] for m in members.values()) + scoring
    record = {
        "recipe": name, "date": datetime.date.today().isoformat(), **_provenance(argv),
        "members": [{"run": run, "model": str(d.relative_to(REPO)), "command": members[run]["command"],
                     "dev": json.loads((d / "info.json").read_text())["dev"]} for run, d in specs],
        "training_wall_time_s": {run: members[run]["wall_time_s"] for run in runs},
        "scoring_wall_time_s": round(scoring, 1), "wall_time_s": round(wall, 1), "dev": dev,
    }
    out = REPO / "benchmarks" / "results" / f"quality-{name}-{record['date']}.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    print(f"| {name} | {dev.get('sst/accuracy', float('nan')):.3f} | {dev.get('quora/accuracy', float('nan')):.3f} | "
          f"{dev.get('sts/pearson', float('nan')):.3f} | {dev['overall']:.3f} | | {wall / 60:.1f} min |")
    return 0


def main(argv=None) -> int:
    from minbert.train import train
    from minbert.train_config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--ensemble", nargs="+", metavar="RUN",
                        help="instead of training: the ensemble of earlier runs of this script (their --name): "
                             "RUN = runs/quality-RUN/best, RUN/PATH = a folder of that run (RUN/top/step-N); "
                             "its wall time is each run's once (from the result files) plus this scoring")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "cs224n"))
    parser.add_argument("--name", help="label of the run and its result file (default: the recipe's file name)")
    args = parser.parse_args(argv)
    if (args.config is None) == (args.ensemble is None):
        parser.error("give --config (train a recipe) or --ensemble RUN RUN ... (score earlier runs together)")
    if args.ensemble:
        return ensemble(args, argv)
    recipe = args.name or Path(args.config).stem
    day = datetime.date.today().isoformat()
    run_dir = REPO / "runs" / f"quality-{recipe}"
    overrides = [f"data.dir={args.data_dir}", f"output_dir={run_dir}", "quiet=true", *args.set]
    cfg = load_config(args.config, overrides)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    info = json.loads((run_dir / "best" / "info.json").read_text())
    dev = info["dev"]
    record = {
        "recipe": recipe,
        "date": day,
        **_provenance(argv),
        "wall_time_s": round(wall, 1),
        "best_step": info["step"],
        "dev": dev,
        "final": {k: v for k, v in result.items() if isinstance(v, float)},
    }
    if "sst" in [t.name for t in cfg.tasks]:
        record["sst_train_accuracy"] = sst_train_accuracy(run_dir, cfg)
        record["sst_train_dev_gap"] = record["sst_train_accuracy"] - dev.get("sst/accuracy", float("nan"))
    out = REPO / "benchmarks" / "results" / f"quality-{recipe}-{day}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    row = (f"| {recipe} | {dev.get('sst/accuracy', float('nan')):.3f} | {dev.get('quora/accuracy', float('nan')):.3f} | "
           f"{dev.get('sts/pearson', float('nan')):.3f} | {dev['overall']:.3f} | "
           f"{record.get('sst_train_dev_gap', float('nan')):.3f} | {wall / 60:.1f} min |")
    print(json.dumps(record, indent=2))
    print("| recipe | SST acc | Quora acc | STS r | overall | SST train-dev gap | wall |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
