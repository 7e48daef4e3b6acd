"""Shared helpers for the DeepSpeed tests: a tiny dropout-free checkpoint, a tiny recipe, and
runners for ``deepspeed --num_gpus 2 --module minbert.distributed.launch`` and the
single-process trainer on the same global batches.

Two ranks with per-rank batch ``B`` see exactly the rows one process with batch ``2B`` sees
(``TaskLoader`` shards every global batch by rows), so with dropout off the two runs must log
the same losses up to float rounding.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "train"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
TIMEOUT = 180  # seconds for one launch (a run takes ~15-25 s on 2 CPU cores)

RECIPE = """
data: {{dir: {data}, bad_rows: skip}}
tasks:
  - {{name: sst, head: linear, head_options: {{dropout: {dropout}}}, max_length: 32, batch_size: {batch}}}
  - {{name: quora, head: linear, head_options: {{dropout: {dropout}}}, max_length: 32, batch_size: {batch}}}
  - {{name: sts, head: linear, head_options: {{dropout: 0.0}}, max_length: 32, batch_size: {batch}}}
schedule: {{kind: joint, epoch_size: largest}}
optim: {{lr: 1.0e-3, head_lr: 3.0e-3, schedule: linear, grad_clip: 1.0}}
epochs: 2
max_steps: 5
log_every: 1
quiet: true
predict: false
save_best: false
"""


def pytest_collection_modifyitems(items):
    if DEEPSPEED.exists():
        return
    skip = pytest.mark.skip(reason=f"the deepspeed launcher is not installed next to {sys.executable}")
    for item in items:
        if "launch" in item.fixturenames:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random 2-layer BERT (hidden 32) with the real vocabulary, dropout off."""
    from minbert import BertConfig, BertModel, default_checkpoint

    folder = tmp_path_factory.mktemp("tiny-bert-ds")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_checkpoint() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def recipe(tmp_path_factory, tiny_ckpt):
    """recipe(batch, dropout=0.0) -> path of a tiny 3-task joint recipe (per-rank batch ``batch``)."""
    folder = tmp_path_factory.mktemp("recipes")

    def make(batch: int, dropout: float = 0.0) -> Path:
        path = folder / f"tiny-b{batch}-d{dropout}.yaml"
        path.write_text(f"model: {tiny_ckpt}\n" + RECIPE.format(data=FIXTURES, batch=batch, dropout=dropout))
        return path

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks share the cores
    return env


@pytest.fixture(scope="session")
def launch():
    """launch(config, ds_config, *args, ranks=2) -> CompletedProcess of the deepspeed launcher."""

    def run(config, ds_config, *args, ranks: int = 2, check: bool = True, timeout: int = TIMEOUT):
        cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module",
               "minbert.distributed.launch", "--config", str(config), "--deepspeed_config", str(ds_config), *map(str, args)]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc

    return run


def run_single(config, *overrides):
    """The single-process trainer on the same recipe (in this process)."""
    from minbert.train import train
    from minbert.train_config import load_config

    train(load_config(config, list(overrides)))


def train_losses(run_dir):
    """{(step, task): loss} of a run's metrics.jsonl (the last record wins, so a resumed run's redo counts)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("split") == "train" and "loss" in r:
            out[(r["step"], r["task"])] = r["loss"]
    return out


def assert_same_losses(want, got, tol=1e-5):
    assert want and want.keys() == got.keys(), (sorted(want), sorted(got))
    bad = {k: (want[k], got[k]) for k in want if not abs(want[k] - got[k]) <= tol}
    assert not bad, f"losses differ by more than {tol}: {bad}"


@pytest.fixture(scope="session")
def run_workers():
    """run_workers(script, out, world=2) -> each rank's ``out/rank<r>.pt``: ``python script out`` started
    as ranks of a gloo group (MASTER_ADDR/PORT, RANK, WORLD_SIZE in the environment)."""

    def run(script, out, world: int = 2):
        port = str(free_port())
        procs = []
        for rank in range(world):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                       WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-3000:]
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]

    return run


@pytest.fixture(scope="session")
def tools():
    """The plain helpers above, for test modules (conftest modules are not importable by name)."""
    import types

    return types.SimpleNamespace(run_single=run_single, train_losses=train_losses,
                                 assert_same_losses=assert_same_losses, repo=REPO, fixtures=FIXTURES)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: launches several DeepSpeed runs (tens of seconds each)")
