"""Encoder gradient norm of each task's loss on one batch (run by hand, not in CI).

    python benchmarks/task_gradients.py [--config configs/multitask-staged.yaml] [--data-dir DIR]

With equal weighting the joint step sums the task losses, so a task whose loss has a much larger
gradient sets the direction of every shared update (and, with clipping, the step size). This
prints ||∇_encoder loss|| for the first 32 training rows of each task at the embedded checkpoint,
for the task's configured loss and for the alternatives worth comparing (MSE vs CoSENT on STS).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    from minbert import BertModel, Tokenizer
    from minbert import data as data_lib
    from minbert.losses import build_loss
    from minbert.multitask import MultitaskModel
    from minbert.train_config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "multitask-staged.yaml"))
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "cs224n"))
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config(args.config, [f"data.dir={args.data_dir}"])
    tok = Tokenizer.from_pretrained(cfg.model)
    model = MultitaskModel(BertModel.from_pretrained(cfg.model), cfg.tasks)
    cases = [(t.name, t.loss_name, dict(t.loss_options)) for t in cfg.tasks]
    if "sts" in [t.name for t in cfg.tasks]:
        cases += [("sts", name, opts) for name, opts in (("mse", {}), ("cosent", {"scale": 4.0}))
                  if name != cfg.task("sts").loss_name]
    print("| task | loss | loss value | encoder gradient norm |")
    print("|---|---|---:|---:|")
    for name, loss_name, options in cases:
        task = cfg.task(name)
        td = data_lib.read_task_file(task.files(cfg.data.dir)["train"], name, bad_rows="skip")
        batch = task.collate(tok)(td.examples[:args.rows])
        model.zero_grad()
        loss = build_loss(loss_name, **options)(model(batch), batch.labels)
        loss.backward()
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.bert.parameters() if p.grad is not None))
        print(f"| {name} | {loss_name} {options or ''} | {float(loss.detach()):.3f} | {float(norm):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
