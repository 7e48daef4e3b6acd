"""``autocast: bf16``: mixed-precision training and evaluation (fp32 weights, bf16 matmuls, fp32 outputs)."""
import json
import warnings
from pathlib import Path

import pytest
import torch

from minbert import BertModel, Tokenizer
from minbert import data as data_lib
from minbert.multitask import MultitaskModel
from minbert.smart import SMART
from minbert.evaluate import autocast_context
from minbert.run_dir import load_model_dir
from minbert.train import train
from minbert.train_config import ConfigError, TaskConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "train"
CONFIGS = ROOT / "configs"


def _overrides(ckpt, out, *extra):
    return [f"model={ckpt}", f"data.dir={FIXTURES}", f"output_dir={out}", "quiet=true", "log_every=1",
            "predict=false", *[f"tasks.{t}.batch_size=8" for t in ("sst", "quora", "sts")], *extra]


def _losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r["task"]): r["loss"] for r in rows if r.get("split") == "train" and "loss" in r}


def test_autocast_config_is_checked():
    assert load_config(CONFIGS / "multitask-joint.yaml", ["autocast=bf16"]).autocast == "bf16"
    assert load_config(CONFIGS / "multitask-joint.yaml").autocast is None
    with pytest.raises(ConfigError, match=r"autocast: 'fp16' is not valid; expected one of \[None, 'bf16'\]"):
        load_config(CONFIGS / "multitask-joint.yaml", ["autocast=fp16"])


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(ConfigError, match="needs a GPU with bfloat16 support; Tesla T4 has none"):
        autocast_context("bf16", "cuda")
    assert isinstance(autocast_context(None, "cuda"), type(autocast_context(None, "cpu")))


@pytest.mark.parametrize("pair_encoding", ["cross", "hybrid"])
def test_outputs_are_fp32_and_close_to_the_fp32_model(tiny_checkpoint, pair_encoding):
    torch.manual_seed(0)
    head = "linear" if pair_encoding == "cross" else "sbert"
    task = TaskConfig(name="sts", pooling="mean", pair_encoding=pair_encoding, head=head, max_length=24)
    model = MultitaskModel(BertModel.from_pretrained(tiny_checkpoint), [task]).eval()
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    batch = task.collate(tok)(data_lib.read_task_file(FIXTURES / "sts-dev.csv", "sts").examples[:7])
    with torch.no_grad():
        want = model(batch)
        with autocast_context("bf16", "cpu"):
            got = model(batch)
    assert want.dtype == got.dtype == torch.float32 and got.shape == want.shape == (7,)
    # the matmuls did run in bf16 (8 significant bits): not equal to fp32, but within its rounding
    assert not torch.equal(got, want)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.05 * scale, (got, want)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_training_is_finite_reproducible_and_resumes(tiny_checkpoint, tmp_path):
    common = ["autocast=bf16", "max_steps=6", "epochs=2", "save_every=2", "eval_every=3", "tasks.quora.max_length=32",
              "tasks.sts.pair_encoding=hybrid", "tasks.sts.hybrid={max_length: 32}"]
    a, b, cut = tmp_path / "a", tmp_path / "b", tmp_path / "cut"
    result = train(load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, a, *common)))
    assert all(v == v for k, v in result.items() if isinstance(v, float))  # no NaN metric
    train(load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, b, *common)))
    losses = _losses(a)
    assert len(losses) == 6 * 3 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses == _losses(b)  # seeded CPU runs are reproducible under autocast too
    # resuming continues the same run
    cfg = load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, cut, *common))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stop_at_step=4)
    train(cfg, resume=str(cut / "checkpoint"))
    assert {k: v for k, v in _losses(cut).items() if k[0] > 4} == {k: v for k, v in losses.items() if k[0] > 4}
    # master weights stay fp32; the saved model records the precision it was selected in
    model, saved_cfg, _ = load_model_dir(a / "best")
    assert saved_cfg.autocast == "bf16" and all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_steps_differ_from_fp32_steps(tiny_checkpoint, tmp_path):
    """autocast reaches the training forward (the losses change by bf16 rounding, not more)."""
    common = ["max_steps=2", "tasks=sst", "eval_every=100"]
    train(load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, tmp_path / "f", *common)))
    train(load_config(CONFIGS / "multitask-joint.yaml",
                      _overrides(tiny_checkpoint, tmp_path / "h", *common, "autocast=bf16")))
    fp32, bf16 = _losses(tmp_path / "f"), _losses(tmp_path / "h")
    assert fp32.keys() == bf16.keys()
    assert fp32 != bf16
    for k in fp32:
        assert bf16[k] == pytest.approx(fp32[k], rel=0.02), k


@pytest.mark.parametrize("options,warns", [({}, True), ({"rule": "mtdnn"}, False), ({"lambda_s": 0.0}, False)])
def test_smart_warns_when_its_perturbation_is_below_bf16_resolution(tiny_checkpoint, options, warns):
    task = TaskConfig(name="sst", pooling="mean", head="linear", max_length=16)
    model = MultitaskModel(BertModel.from_pretrained(tiny_checkpoint), [task]).train()
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    batch = task.collate(tok)(data_lib.read_task_file(FIXTURES / "ids-sst-dev.csv", "sst").examples[:4])
    smart = SMART(task="sst", kind="single_label_classification", **options)
    smart.bind([smart])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # warned once, not per step
            with autocast_context("bf16", "cpu"):
                smart.before_forward(model, batch)
                out = model(batch)
                terms = smart(model, batch, out)
            assert all(torch.isfinite(t) for t in terms.values())
            smart.after_step(model)
    below = [w for w in caught if "below torch.bfloat16's resolution" in str(w.message)]
    assert len(below) == (1 if warns else 0), [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:  # and never without autocast
        warnings.simplefilter("always")
        fresh = SMART(task="sst", kind="single_label_classification", **options)
        fresh.bind([fresh])
        fresh.before_forward(model, batch)
        fresh(model, batch, model(batch))
    assert not [w for w in caught if "resolution" in str(w.message)]


def test_lora_training_under_autocast(tiny_checkpoint, tmp_path):
    """LoRA's fused linear casts its inputs as F.linear does under autocast (fp32 adapters, bf16 matmuls)."""
    cfg = load_config(CONFIGS / "lora-last4.yaml", _overrides(tiny_checkpoint, tmp_path, "max_steps=3", "autocast=bf16",
                                                              "lora.layers=[0, 1]"))
    result = train(cfg)
    assert all(v == v for k, v in result.items() if isinstance(v, float))
    assert len(_losses(tmp_path)) == 3 and all(v == v for v in _losses(tmp_path).values())


@pytest.mark.parametrize("attn", ["triton", "math"])
def test_attention_providers_under_autocast(tiny_checkpoint, triton_backend, attn):
    """Every attention provider takes the bf16 q, k, v autocast hands it, forward and backward."""
    torch.manual_seed(0)
    task = TaskConfig(name="sst", pooling="mean", head="linear", max_length=16)
    model = MultitaskModel(BertModel.from_pretrained(tiny_checkpoint, attn_implementation=attn), [task]).train()
    ref = MultitaskModel(BertModel.from_pretrained(tiny_checkpoint, attn_implementation="torch"), [task]).train()
    ref.load_state_dict(model.state_dict())
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    batch = task.collate(tok)(data_lib.read_task_file(FIXTURES / "ids-sst-dev.csv", "sst").examples[:3])
    outs = []
    for m in (model, ref):
        m.eval()  # no dropout: the providers draw different masks
        with autocast_context("bf16", "cpu"):
            out = m(batch)
        out.sum().backward()
        outs.append((out.detach(), m.bert.encoder.layer[0].attention.self.query.weight.grad))
    (got, got_grad), (want, want_grad) = outs
    assert got.dtype == torch.float32 and got_grad.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())
    torch.testing.assert_close(got_grad, want_grad, rtol=0.1, atol=0.1 * want_grad.abs().max().item())
