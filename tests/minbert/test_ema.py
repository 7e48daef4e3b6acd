"""minbert.ema.ParameterEMA (weight averaging for evaluation, SMART's teacher) and the trainer's ``ema``."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minbert.ema import ParameterEMA
from minbert.train import train
from minbert.train_config import ConfigError, load_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "train"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def small_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    net[0].bias.requires_grad_(False)
    return net


def test_warmup_decay_and_closed_form():
    net = small_net()
    ema = ParameterEMA(0.9, warmup=True)
    ema.ensure(net)
    history = [{n: p.detach().double().clone() for n, p in net.named_parameters() if p.requires_grad}]
    betas = []
    for _ in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        history.append({n: p.detach().double().clone() for n, p in net.named_parameters() if p.requires_grad})
        betas.append(ema.decay())
        ema.update(net)
    assert betas == [min(0.9, (1 + t) / (10 + t)) for t in range(6)] and betas[0] == pytest.approx(0.1)
    for name in history[0]:
        want = history[0][name]
        for beta, theta in zip(betas, history[1:]):
            want = beta * want + (1 - beta) * theta[name]
        torch.testing.assert_close(ema.tensors()[name].double(), want, rtol=1e-6, atol=1e-6)
    assert "0.bias" not in ema.tensors()  # frozen parameters are not averaged


def test_swapped_in_evaluates_the_average_and_restores_the_weights():
    net = small_net()
    ema = ParameterEMA(0.5)
    ema.ensure(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        net[1].weight.add_(1.0)
    ema.update(net)
    trained = {n: p.detach().clone() for n, p in net.named_parameters()}
    with ema.swapped_in(net):
        torch.testing.assert_close(net[1].weight, before["1.weight"] + 0.5)
        assert torch.equal(net[0].bias, before["0.bias"])
    for n, p in net.named_parameters():
        assert torch.equal(p, trained[n]), n  # bit for bit


def test_low_precision_weights_are_averaged_in_float32():
    net = small_net().to(torch.bfloat16)
    ema = ParameterEMA(0.999, dtype=torch.float32)
    ema.ensure(net)
    assert ema.shard.dtype == torch.float32
    start = ema.tensors()["1.weight"].clone()
    with torch.no_grad():
        net[1].weight.add_(1.0)
    ema.update(net)
    # a 1e-3 step survives in float32 (bfloat16 storage would round most of it away)
    torch.testing.assert_close(ema.tensors()["1.weight"] - start, torch.full_like(start, 1e-3), rtol=0.02, atol=1e-5)


def _overrides(ckpt, out, *extra):
    return [f"model={ckpt}", f"data.dir={FIXTURES}", f"output_dir={out}", "quiet=true", "log_every=1",
            "predict=false", "tasks=sst,sts", *[f"tasks.{t}.batch_size=8" for t in ("sst", "sts")], *extra]


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_trainer_keeps_the_averaged_weights_as_best_and_resumes(tiny_checkpoint, tmp_path):
    common = ["ema=0.9", "max_steps=5", "epochs=2", "save_every=2", "eval_every=100"]
    full = tmp_path / "full"
    train(load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, full, *common)))
    # the best model (evaluated once, at the end) holds θ̄, the checkpoint θ and θ̄'s state
    state = torch.load(full / "checkpoint" / "checkpoint.pt", weights_only=False)
    client, trained = state["client"], state["engine"]["model"]
    assert client["ema"]["updates"] == 5
    averaged = dict(zip(client["ema"]["names"], torch.split(client["ema"]["shard"],
                                                            [math.prod(s) for s in client["ema"]["shapes"]])))
    best = load_file(str(full / "best" / "multitask.safetensors"))
    name = "bert.encoder.layer.1.output.dense.weight"
    torch.testing.assert_close(best[name].reshape(-1), averaged[name], rtol=0, atol=0)
    assert not torch.equal(trained[name].reshape(-1), averaged[name])  # training goes on from θ
    # resume: the same losses and the same final dev metrics (computed with θ̄)
    cut = tmp_path / "cut"
    cfg = load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, cut, *common))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stop_at_step=3)
    train(cfg, resume=str(cut / "checkpoint"))
    pick = lambda rows: {(r["step"], r["task"], r.get("split")): r.get("loss", r.get("overall"))  # noqa: E731
                         for r in rows if r["step"] >= 3 and ("loss" in r or "overall" in r)}
    assert pick(_records(full)) == pick(_records(cut))


def test_ema_config_is_checked():
    with pytest.raises(ConfigError, match=r"ema must be a number in \(0, 1\)"):
        load_config(CONFIGS / "multitask-joint.yaml", ["ema=1.0"])
