"""Golden runs: per-step training losses of four recipes, bit for bit, as recorded before the restructure.

Each case trains 3 steps on the tiny random checkpoint (``tiny_checkpoint``) and the fixture files with
batches of 8, and compares every logged (step, task) loss, and SMART's two terms where the recipe has
them, as exact float hex. Refactors must leave these unchanged; a change in behaviour that is meant
must record new values here and say why in its commit.
"""
import json
from pathlib import Path

import pytest

from minbert.train import train
from minbert.train_config import load_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "train"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"

CASES = {  # case: (recipe, extra overrides)
    "multitask-joint": ("multitask-joint", []),
    "smarter": ("smarter", []),
    "lora-qk-r4": ("lora-qk-r4", []),
    "pcgrad": ("multitask-joint", ["weighting.name=pcgrad"]),
}

# (step, task, loss[, smart, bregman]) as float.hex(), recorded before the restructure, under MKL_CBWR=AUTO,STRICT (tests/conftest.py).
GOLDEN = {
    'multitask-joint': [
        (1, 'sst', '0x1.a4c1b80000000p+0'),
        (1, 'quora', '0x1.b4b0020000000p-1'),
        (1, 'sts', '0x1.f982820000000p+1'),
        (2, 'sst', '0x1.98e7940000000p+0'),
        (2, 'quora', '0x1.b48c5c0000000p-1'),
        (2, 'sts', '0x1.d3263e0000000p+1'),
        (3, 'sst', '0x1.9ac3fa0000000p+0'),
        (3, 'quora', '0x1.184a860000000p-1'),
        (3, 'sts', '0x1.0e20000000000p+2'),
    ],
    'smarter': [
        (1, 'sst', '0x1.dfb9760000000p+0', '0x1.8d89280000000p-8', '0x1.0b19560000000p-7'),
        (2, 'quora', '0x1.1819600000000p-1', '0x1.8f85f20000000p-8', '0x1.9195a00000000p-6'),
        (3, 'quora', '0x1.6419c00000000p-1', '0x1.dabca80000000p-9', '0x1.28be5e0000000p-6'),
    ],
    'lora-qk-r4': [
        (1, 'sst', '0x1.d3d1280000000p+0'),
        (2, 'quora', '0x1.10e3640000000p-1'),
        (3, 'quora', '0x1.66f5ac0000000p-1'),
    ],
    'pcgrad': [
        (1, 'sst', '0x1.a4c1b80000000p+0'),
        (1, 'quora', '0x1.b4b0020000000p-1'),
        (1, 'sts', '0x1.f982820000000p+1'),
        (2, 'sst', '0x1.98fad60000000p+0'),
        (2, 'quora', '0x1.b497fc0000000p-1'),
        (2, 'sts', '0x1.d333f80000000p+1'),
        (3, 'sst', '0x1.9ab6ac0000000p+0'),
        (3, 'quora', '0x1.18483e0000000p-1'),
        (3, 'sts', '0x1.0e21980000000p+2'),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_step_losses_are_bit_identical(case, tiny_checkpoint, tmp_path):
    recipe, extra = CASES[case]
    out = tmp_path / case
    overrides = [f"model={tiny_checkpoint}", f"data.dir={FIXTURES}", f"output_dir={out}", "quiet=true",
                 "log_every=1", "max_steps=3", *[f"tasks.{t}.batch_size=8" for t in ("sst", "quora", "sts")], *extra]
    train(load_config(CONFIGS / f"{recipe}.yaml", overrides))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = [(r["step"], r["task"], *[float(r[k]).hex() for k in ("loss", "smart", "bregman") if k in r])
           for r in rows if r.get("split") == "train" and "loss" in r]
    assert got == GOLDEN[case]
