"""Dev scores of a saved model's ``pair_encoding: hybrid`` tasks at several member weights.

    python benchmarks/hybrid_members.py runs/quality-<run>/best [--weights 0 0.3 0.5 0.7 1]

A hybrid head outputs ``w · bi + (1 − w) · cross``; both members are trained on their own losses,
so w only changes the prediction. w = 1 is the bi-encoder member alone, w = 0 the cross-encoder
member alone. The weight the run was trained and selected with is marked; the others are for
information (choosing w on the dev set would make the dev score optimistic).
"""
import argparse
import json
import sys
from pathlib import Path

from minbert import data as data_lib
from minbert.heads import HybridHead
from minbert.metrics import task_metric
from minbert.evaluate import predict
from minbert.run_dir import load_model_dir

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 1.0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "cs224n"))
    args = parser.parse_args(argv)
    model, cfg, tok = load_model_dir(args.model_dir)
    rows = {}
    for task in cfg.tasks:
        head = model.heads[task.name]
        if not isinstance(head, HybridHead):
            continue
        dev = data_lib.read_task_file(task.files(args.data_dir)["dev"], task.name, bad_rows="skip")
        loader = data_lib.TaskLoader(dev.examples, 64, task.collate(tok, evaluation=True), shuffle=False)
        trained = head.weight
        for w in sorted(set(args.weights) | {trained}):
            head.weight = w
            out = predict(model, loader, "cpu", cfg.autocast)
            metric = task_metric(task.name, out["preds"], out["labels"])
            rows.setdefault(task.name, []).append({"weight": w, "trained": w == trained, **metric})
        head.weight = trained
    if not rows:
        print(f"{args.model_dir}: no task uses pair_encoding: hybrid", file=sys.stderr)
        return 1
    for name, results in rows.items():
        print(f"{name}: w = weight of the bi-encoder member")
        for r in results:
            score = r.get("pearson", r.get("accuracy"))
            print(f"  w = {r['weight']:.2f}  {score:.4f}{'  (trained)' if r['trained'] else ''}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
