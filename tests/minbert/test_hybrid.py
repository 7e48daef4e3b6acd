"""``pair_encoding: hybrid``: a bi-encoder and a cross-encoder member in one model, trained on their own losses."""
import json
import math
from pathlib import Path

import pytest
import torch

from minbert import BertModel, Tokenizer
from minbert import data as data_lib
from minbert.heads import HybridFeatures, HybridHead, PairFeatures, SentenceFeatures, build_head
from minbert.losses import build_loss
from minbert.multitask import MultitaskModel
from minbert.run_dir import load_model_dir
from minbert.train import train
from minbert.train_config import ConfigError, TaskConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "train"
H = 16


def _sentence(b, L, grad=True):
    mask = torch.ones(b, L, dtype=torch.long)
    mask[0, L - 2:] = 0  # padding in the first row
    return SentenceFeatures(torch.randn(b, L, H, requires_grad=grad), mask, torch.randn(b, H, requires_grad=grad))


def _features(b=5):
    return HybridFeatures(PairFeatures(_sentence(b, 6), _sentence(b, 4)), _sentence(b, 9))


@pytest.mark.parametrize("kind,bi_name,cross_name,weight", [("regression", "cosine", "linear", 0.5),
                                                             ("binary_classification", "sbert", "mlp", 0.7),
                                                             ("single_label_classification", "sbert", "linear", 0.0)])
def test_hybrid_head_output_and_member_loss(kind, bi_name, cross_name, weight):
    torch.manual_seed(0)
    n = 3 if kind == "single_label_classification" else None
    bi, cross = build_head(bi_name, H, kind, num_classes=n), build_head(cross_name, H, kind, num_classes=n)
    head = HybridHead(bi, cross, weight).eval()
    f = _features()
    out = head(f)
    want_bi, want_cross = bi(f.pair), cross(f.cross)
    assert out.shape == want_bi.shape and torch.allclose(out, weight * want_bi + (1 - weight) * want_cross)
    target = {"regression": torch.rand(5) * 5, "binary_classification": torch.randint(0, 2, (5,)),
              "single_label_classification": torch.randint(0, 3, (5,))}[kind]
    base = build_loss({"regression": "mse", "binary_classification": "bce_with_logits",
                       "single_label_classification": "cross_entropy"}[kind])
    loss = head.wrap_loss(base)(out, target)
    want = 0.5 * (base(want_bi, target) + base(want_cross, target))
    assert torch.allclose(loss, want)
    # each member is trained on its own loss: the gradient reaches both, whatever the output weight
    loss.backward()
    for leaf in (f.pair.a.pooled, f.pair.b.pooled, f.cross.pooled):
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    assert f.pair.a.hidden.grad is None or f.pair.a.hidden.grad[0, -2:].abs().sum() == 0


def test_hybrid_loss_must_follow_its_forward_and_members_must_fit():
    head = HybridHead(build_head("cosine", H, "regression"), build_head("linear", H, "regression"))
    loss = head.wrap_loss(build_loss("mse"))
    with pytest.raises(RuntimeError, match="latest forward"):
        loss(torch.zeros(5), torch.zeros(5))
    out = head(_features())
    head(_features())  # a second forward (SMART's perturbed pass) replaces the kept members
    with pytest.raises(RuntimeError, match="latest forward"):
        loss(out, torch.zeros(5))
    with pytest.raises(ValueError, match="bi-encoder member must be a pair head"):
        HybridHead(build_head("linear", H, "regression"), build_head("linear", H, "regression"))
    with pytest.raises(ValueError, match="cross-encoder member must be a single-sequence head"):
        HybridHead(build_head("cosine", H, "regression"), build_head("sbert", H, "regression"))
    with pytest.raises(ValueError, match="members disagree"):
        HybridHead(build_head("sbert", H, "single_label_classification", num_classes=5),
                   build_head("linear", H, "regression"))
    with pytest.raises(ValueError, match=r"weight must be a number in \[0, 1\], got 1.5"):
        HybridHead(build_head("cosine", H, "regression"), build_head("linear", H, "regression"), 1.5)
    with pytest.raises(TypeError, match="needs HybridFeatures"):
        head(PairFeatures(_sentence(5, 6), _sentence(5, 4)))


def test_hybrid_config_is_validated_and_names_the_key():
    def load(*sets):
        return load_config(ROOT / "configs" / "multitask-joint.yaml", list(sets))

    cfg = load("tasks.sts.pair_encoding=hybrid", "tasks.sts.hybrid={weight: 0.7}")
    sts = cfg.tasks[2]
    assert sts.hybrid_options == {"head": "linear", "head_options": {}, "pooling": "cls", "max_length": 128,
                                  "weight": 0.7}
    for sets, match in [
        (["tasks.sst.pair_encoding=hybrid"], "tasks.sst.pair_encoding: 'hybrid' needs a pair task"),
        (["tasks.sts.hybrid={weight: 0.7}"], "tasks.sts.hybrid is set but pair_encoding is 'bi'"),
        (["tasks.sts.pair_encoding=hybrid", "tasks.sts.hybrid={size: 3}"], r"tasks.sts.hybrid.size: unknown key"),
        (["tasks.sts.pair_encoding=hybrid", "tasks.sts.hybrid={weight: 2}"], r"tasks.sts.hybrid.weight must be"),
        (["tasks.sts.pair_encoding=hybrid", "tasks.sts.hybrid={pooling: max}"], r"tasks.sts.hybrid.pooling"),
        (["tasks.sts.pair_encoding=hybrid", "tasks.sts.hybrid={max_length: 0}"], r"tasks.sts.hybrid.max_length"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load(*sets)


def test_hybrid_model_combines_a_bi_and_a_cross_encoder(tiny_checkpoint):
    torch.manual_seed(0)
    task = TaskConfig(name="sts", pooling="mean", pair_encoding="hybrid", head="cosine", max_length=16,
                      hybrid={"max_length": 24, "weight": 0.25})
    model = MultitaskModel(BertModel.from_pretrained(tiny_checkpoint), [task]).eval()
    assert isinstance(model.heads["sts"], HybridHead)
    assert {"heads.sts.cross.proj.weight", "heads.sts.cross.proj.bias"} <= set(model.state_dict())
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    examples = data_lib.read_task_file(FIXTURES / "sts-dev.csv", "sts").examples[:6]
    batch = task.collate(tok)(examples)
    with torch.no_grad():
        got = model(batch)
        bi_task = TaskConfig(name="sts", pooling="mean", pair_encoding="bi", head="cosine", max_length=16)
        cross_task = TaskConfig(name="sts", pooling="cls", pair_encoding="cross", head="linear", max_length=24)
        bi_out = model.heads["sts"].bi(model.features(bi_task.collate(tok)(examples)))
        cross_batch = cross_task.collate(tok)(examples)
        out = model.bert(cross_batch.input_ids, attention_mask=cross_batch.attention_mask,
                         token_type_ids=cross_batch.token_type_ids)
        cross_out = model.heads["sts"].cross(SentenceFeatures.from_encoder(out.last_hidden_state,
                                                                           cross_batch.attention_mask, "cls"))
    torch.testing.assert_close(got, 0.25 * bi_out + 0.75 * cross_out, rtol=1e-5, atol=1e-5)
    # SMART perturbs every encoder input: three for a hybrid pair (a, b and the cross-encoded pair)
    inputs = model.embed(batch)
    assert [tuple(t.shape[:2]) for t in inputs] == [tuple(batch.input_ids.shape), tuple(batch.input_ids_b.shape),
                                                    tuple(batch.cross.input_ids.shape)]
    with torch.no_grad():
        torch.testing.assert_close(model(batch, inputs=inputs), got)


def _overrides(ckpt, out, *extra):
    return [f"model={ckpt}", f"data.dir={FIXTURES}", f"output_dir={out}", "quiet=true", "log_every=1",
            *[f"tasks.{t}.batch_size=8" for t in ("sst", "quora", "sts")], "tasks.sts.pair_encoding=hybrid",
            "tasks.quora.pair_encoding=hybrid", "tasks.quora.head=sbert", *extra]


def test_hybrid_tasks_train_with_smart_resume_and_reload(tiny_checkpoint, tmp_path):
    """SMARTer with hybrid STS and Quora: trains, resumes to the same losses, and the best model reloads."""
    common = ["max_steps=6", "save_every=3", "eval_every=3", "schedule.kind=round_robin"]
    full = tmp_path / "full"
    train(load_config(ROOT / "configs" / "smarter.yaml", _overrides(tiny_checkpoint, full, *common)))
    rows = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    losses = {(r["step"], r["task"]): r["loss"] for r in rows if r.get("split") == "train" and "loss" in r}
    assert {t for _, t in losses} == {"sst", "quora", "sts"} and all(math.isfinite(v) for v in losses.values())
    cut = tmp_path / "cut"
    cfg = load_config(ROOT / "configs" / "smarter.yaml", _overrides(tiny_checkpoint, cut, *common))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stop_at_step=4)
    train(cfg, resume=str(cut / "checkpoint"))
    rows = [json.loads(l) for l in (cut / "metrics.jsonl").read_text().splitlines()]
    got = {(r["step"], r["task"]): r["loss"] for r in rows if r.get("split") == "train" and "loss" in r}
    assert {k: v for k, v in got.items() if k[0] >= 4} == {k: v for k, v in losses.items() if k[0] >= 4}
    model, cfg2, tok = load_model_dir(full / "best")
    assert isinstance(model.heads["sts"], HybridHead) and cfg2.tasks[2].pair_encoding == "hybrid"
    first = (full / "predictions" / "sts-dev-output.csv").read_text()
    from minbert.cli import main

    assert main(["predict", "--checkpoint", str(full / "best"), "--data-dir", str(FIXTURES),
                 "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "sts-dev-output.csv").read_text() == first
