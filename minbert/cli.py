"""The ``minbert`` command.

    minbert train --config configs/multitask-joint.yaml [--set optim.lr=3e-5 ...] [--resume RUN_DIR/checkpoint]
    minbert evaluate --checkpoint RUN_DIR/best [RUN2/best ...] [--data-dir DIR]
    minbert predict --checkpoint RUN_DIR/best [RUN2/best ...] [--data-dir DIR] [--out DIR]
    minbert encode --input sentences.txt --output embeddings.npy [--model DIR] [--pooling mean]

Configuration problems (unknown keys, bad values, missing files) are reported before any training.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args) -> int:
    from .train import train
    from .train_config import load_config

    overrides = list(args.set or [])
    if args.bad_rows:
        overrides.append(f"data.bad_rows={args.bad_rows}")
    if args.data_dir:
        overrides.append(f"data.dir={args.data_dir}")
    if args.quiet:
        overrides.append("quiet=true")
    cfg = load_config(args.config, overrides)
    result = train(cfg, resume=args.resume)
    print(json.dumps(result, indent=2, default=float))
    return 0


def _scored(args, splits):
    """Per (task, split): the prediction of one model, or the ensemble of several (``--checkpoint A B``)."""
    from .ensemble import score_checkpoints

    return score_checkpoints(args.checkpoint, splits, data_dir=args.data_dir, bad_rows=args.bad_rows,
                             device=args.device)


def _evaluate(args) -> int:
    from .evaluate import score

    _, scored = _scored(args, ("dev",))
    metrics = score({task: r for (task, _), r in scored.items()})
    if len(args.checkpoint) > 1:
        metrics["ensemble_members"] = len(args.checkpoint)
    print(json.dumps(metrics, indent=2))
    return 0


def _predict(args) -> int:
    from .evaluate import write_results

    _, scored = _scored(args, ("dev", "test"))
    out = Path(args.out or Path(args.checkpoint[0]).parent / ("predictions" if len(args.checkpoint) == 1
                                                              else "ensemble-predictions"))
    for name, path in write_results(scored, out).items():
        print(f"{name}: {path}")
    return 0


def _encode(args) -> int:
    import numpy as np
    import torch

    from .model import BertModel
    from .pooling import pool
    from .tokenizer import Tokenizer

    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"--input: {path} does not exist")
    sentences = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            sentences.append(line.strip())
    if not sentences:
        raise ValueError(f"--input: {path} holds no sentences")
    tok = Tokenizer.from_pretrained(args.model)
    model = BertModel.from_pretrained(args.model).eval()
    chunks = []
    with torch.no_grad():
        for i in range(0, len(sentences), args.batch_size):
            batch = tok(sentences[i:i + args.batch_size], max_length=args.max_length)
            out = model(**batch)
            chunks.append(pool(out.last_hidden_state, batch["attention_mask"], args.pooling,
                               pooler_output=out.pooler_output).numpy())
    emb = np.concatenate(chunks)
    np.save(args.output, emb)
    print(f"encoded {len(sentences)} sentences from {path} -> {args.output} {emb.shape}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minbert", description="Multitask fine-tuning of BERT encoders")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune on the configured tasks")
    p.add_argument("--config", help="YAML recipe (configs/*.yaml); defaults if omitted")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (RUN_DIR/checkpoint)")
    p.add_argument("--data-dir", help="folder of the CS224N TSV files (data.dir)")
    p.add_argument("--bad-rows", choices=["error", "skip"], help="stop at the first bad row, or skip and count them")
    p.add_argument("--quiet", action="store_true", help="no progress bar; plain log lines")
    p.set_defaults(func=_train)

    for name, func, text in (("evaluate", _evaluate, "dev metrics of a saved model"),
                             ("predict", _predict, "write dev/test prediction files (CS224N format)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True, nargs="+", metavar="DIR",
                       help="a model folder written by training (RUN_DIR/best); several: their ensemble "
                            "(class probabilities, Quora probabilities and STS scores averaged)")
        p.add_argument("--data-dir", help="folder of the CS224N TSV files")
        p.add_argument("--bad-rows", choices=["error", "skip"])
        p.add_argument("--device", default="cpu")
        if name == "predict":
            p.add_argument("--out", help="output folder (default: next to the checkpoint, predictions/)")
        p.set_defaults(func=func)

    p = sub.add_parser("encode", help="encode a file of sentences (one per line) into an .npy matrix")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded checkpoint)")
    p.add_argument("--pooling", default="mean", choices=["cls", "pooler", "mean"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.set_defaults(func=_encode)
    return parser


def main(argv=None) -> int:
    from .data import DataError
    from .ensemble import EnsembleError
    from .train import TrainingError
    from .train_config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, TrainingError, FileNotFoundError, EnsembleError) as e:
        print(f"minbert {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
