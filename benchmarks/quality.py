"""Quality benchmark (run by hand, not in CI): multitask fine-tuning on the real CS224N data.

    python benchmarks/quality.py --config configs/multitask-joint.yaml [--set key=value ...]

Trains the recipe with the embedded checkpoint on ``../shared/data/cs224n`` (or ``--data-dir``),
then writes ``benchmarks/results/quality-<recipe or --name>-<date>.json`` with the best dev metrics, the
train/dev gap on SST, the wall time and the exact command, and prints a markdown row for
``benchmarks/RESULTS.md``.
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
    from minbert.train import load_model_dir, predict

    model, mcfg, tok = load_model_dir(run_dir / "best")
    task = mcfg.task("sst")
    td = data_lib.read_task_file(task.files(cfg.data.dir)["train"], "sst", bad_rows=cfg.data.bad_rows)
    examples = td.examples[:limit]
    loader = data_lib.TaskLoader(examples, 64, data_lib.make_collate(tok, "sst", task.max_length), shuffle=False)
    out = predict(model, loader, "cpu", mcfg.autocast)
    return accuracy(out["preds"], out["labels"])


def main(argv=None) -> int:
    from minbert.train import train
    from minbert.train_config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "cs224n"))
    parser.add_argument("--name", help="label of the run and its result file (default: the recipe's file name)")
    args = parser.parse_args(argv)
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
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "command": "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
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
