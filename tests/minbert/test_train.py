"""The multitask trainer end to end on a tiny random checkpoint and tiny fixture files."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from minbert import BertModel
from minbert.cli import main
from minbert.run_dir import load_model_dir
from minbert.train import TrainingError, train
from minbert.train_config import ConfigError, load_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "train"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _overrides(ckpt, out, *extra, tasks=None, configured=("sst", "quora", "sts")):
    """Overrides for a tiny run; ``tasks`` (names) first replaces the recipe's task list, else
    ``configured`` names the recipe's own tasks (each gets a batch of 8)."""
    names = tasks or configured
    return ([f"tasks={','.join(tasks)}"] if tasks else []) + [
        f"model={ckpt}", f"data.dir={FIXTURES}", f"output_dir={out}", "quiet=true", "log_every=1",
        *[f"tasks.{t}.batch_size=8" for t in names], *extra]


def _train_records(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "train" and "loss" in r]


def test_cli_end_to_end_two_steps(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    sets = [arg for o in _overrides(tiny_checkpoint, out, "max_steps=2") for arg in ("--set", o)]
    code = main(["train", "--config", str(CONFIGS / "multitask-joint.yaml"), *sets])
    assert code == 0
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "sst_confusion.png", "checkpoint/checkpoint.pt",
                 "best/multitask.safetensors", "best/encoder/model.safetensors", "best/train_config.yaml",
                 "predictions/sst-dev-output.csv", "predictions/sst-test-output.csv",
                 "predictions/quora-dev-output.csv", "predictions/sts-dev-output.csv"):
        assert (out / name).is_file(), name
    records = _train_records(out)
    assert {r["task"] for r in records} == {"sst", "quora", "sts"}
    assert max(r["step"] for r in records) == 2
    assert all(math.isfinite(r["loss"]) for r in records)
    head = (out / "predictions" / "sst-dev-output.csv").read_text().splitlines()
    assert head[0].startswith("id \t Predicted_Sentiment") and len(head) == 11
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # evaluate the saved model through the CLI
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "best"), "--data-dir", str(FIXTURES)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"sst/accuracy", "quora/accuracy", "sts/pearson", "overall"}


def test_best_checkpoint_reloads_to_the_same_predictions(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / "round-robin.yaml", _overrides(tiny_checkpoint, out, "max_steps=3"))
    train(cfg)
    model, cfg2, tok = load_model_dir(out / "best")
    assert cfg2.tasks[0].name == "sst"
    first = (out / "predictions" / "quora-dev-output.csv").read_text()
    assert main(["predict", "--checkpoint", str(out / "best"), "--data-dir", str(FIXTURES),
                 "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "quora-dev-output.csv").read_text() == first


def test_seeded_runs_are_reproducible(tiny_checkpoint, tmp_path):
    losses = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        cfg = load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, out, "max_steps=3", "predict=false"))
        train(cfg)
        losses.append([(r["step"], r["task"], r["loss"]) for r in _train_records(out)])
    assert losses[0] == losses[1]


def test_resume_continues_the_same_run(tiny_checkpoint, tmp_path):
    common = ["max_steps=5", "save_every=2", "predict=false", "schedule.kind=random"]
    full = tmp_path / "full"
    train(load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, full, *common)))
    cut = tmp_path / "cut"
    cfg = load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, cut, *common))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stop_at_step=3)  # killed before step 3 (0-based); last checkpoint: top of step 2
    train(cfg, resume=str(cut / "checkpoint"))
    want = {(r["step"], r["task"]): r["loss"] for r in _train_records(full) if r["step"] >= 3}
    got = {(r["step"], r["task"]): r["loss"] for r in _train_records(cut) if r["step"] >= 3}
    assert want and got == want


def test_keep_top_k_ranks_by_overall_and_keeps_earlier_ties():
    from minbert.run_dir import keep_top_k

    top = []
    assert [keep_top_k(top, 2, o, s) for o, s in [(0.5, 10), (0.7, 20), (0.6, 30), (0.6, 40), (0.8, 50)]] == \
        [True, True, True, False, True]
    assert top == [[0.8, 50], [0.7, 20]]
    assert not keep_top_k(top, 2, 0.9, 50)  # the same step evaluated again is not kept twice


def test_save_top_k_keeps_the_best_evaluated_models(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / "multitask-joint.yaml",
                      _overrides(tiny_checkpoint, out, "max_steps=6", "eval_every=1", "save_top_k=2", "predict=false"))
    train(cfg)
    evals = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("split") == "dev":
            evals[r["step"]] = r["overall"]
    assert sorted(evals) == [1, 2, 3, 4, 5, 6]
    want = sorted(evals, key=lambda s: (-evals[s], s))[:2]
    assert sorted(p.name for p in (out / "top").iterdir()) == sorted(f"step-{s}" for s in want)
    for s in want:
        info = json.loads((out / "top" / f"step-{s}" / "info.json").read_text())
        assert info["step"] == s and info["dev"]["overall"] == pytest.approx(evals[s])
    best = json.loads((out / "best" / "info.json").read_text())
    assert best["step"] == want[0]
    # a snapshot is a model folder like best/: it reloads and scores what training recorded
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "top" / f"step-{want[1]}"), "--data-dir", str(FIXTURES)]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] == pytest.approx(evals[want[1]], abs=1e-6)


def test_save_top_k_survives_a_resume(tiny_checkpoint, tmp_path):
    common = ["max_steps=6", "eval_every=1", "save_every=1", "save_top_k=2", "predict=false"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, full, *common)))
    cfg = load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, cut, *common))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stop_at_step=4)
    train(cfg, resume=str(cut / "checkpoint"))
    assert sorted(p.name for p in (cut / "top").iterdir()) == sorted(p.name for p in (full / "top").iterdir())


def test_save_top_k_must_be_a_count():
    with pytest.raises(ConfigError, match="save_top_k must be an integer >= 0"):
        load_config(CONFIGS / "multitask-joint.yaml", ["save_top_k=-1"])


SIMCSE_SUP = "tasks.sts.aux_losses=[{name: simcse_sup, file: nli-train.csv, batch_size: 4, weight: 0.5}]"


def test_supervised_simcse_trains_from_an_nli_file_and_resumes(tiny_checkpoint, tmp_path, capsys):
    """simcse_sup reads premise/hypothesis/label triples from data.dir, logs what it could not use,
    adds its term to the host task's loss, and its batch position survives a resume."""
    common = ["max_steps=5", "epochs=2", "save_every=2", "predict=false", "quiet=false", SIMCSE_SUP]
    full = tmp_path / "full"
    train(load_config(CONFIGS / "simcse.yaml", _overrides(tiny_checkpoint, full, *common, tasks=("sts",))))
    log = capsys.readouterr().out
    assert "simcse_sup (sts): " in log and "11 triples, 1 entailment pairs without a contradiction" in log
    assert "12 neutral rows not used" in log
    records = _train_records(full)
    assert len(records) == 5 and all(math.isfinite(r["simcse_sup"]) and r["simcse_sup"] > 0 for r in records)
    cut = tmp_path / "cut"
    cfg = load_config(CONFIGS / "simcse.yaml", _overrides(tiny_checkpoint, cut, *common, tasks=("sts",)))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stop_at_step=3)
    train(cfg, resume=str(cut / "checkpoint"))
    want = {r["step"]: (r["loss"], r["simcse_sup"]) for r in _train_records(full) if r["step"] >= 3}
    got = {r["step"]: (r["loss"], r["simcse_sup"]) for r in _train_records(cut) if r["step"] >= 3}
    assert sorted(want) == [3, 4, 5] and got == want


def test_supervised_simcse_bad_options_name_the_problem(tiny_checkpoint, tmp_path):
    for option, message in (("", "simcse_sup needs option 'file'"),
                            ("file: missing.csv", "missing.csv"),
                            ("file: nli-train.csv, batch_size: 1", "batch_size must be an integer >= 2")):
        aux = f"tasks.sts.aux_losses=[{{name: simcse_sup{', ' + option if option else ''}}}]"
        with pytest.raises((ValueError, FileNotFoundError, ConfigError), match=message):
            train(load_config(CONFIGS / "simcse.yaml",
                              _overrides(tiny_checkpoint, tmp_path / "bad", "max_steps=1", aux, tasks=("sts",))))


def test_symmetric_eval_predicts_from_the_mean_of_both_orders(tiny_checkpoint):
    from minbert import Tokenizer
    from minbert import data as data_lib
    from minbert.multitask import MultitaskModel
    from minbert.evaluate import predict
    from minbert.train_config import TaskConfig

    torch.manual_seed(0)
    task = TaskConfig(name="quora", symmetric_eval=True)
    model = MultitaskModel(BertModel.from_pretrained(tiny_checkpoint), [task]).eval()
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    examples = data_lib.read_task_file(FIXTURES / "quora-dev.csv", "quora").examples[:12]
    got = predict(model, data_lib.TaskLoader(examples, 5, task.collate(tok, evaluation=True), shuffle=False), "cpu")
    with torch.no_grad():
        plain = model(task.collate(tok)(examples))
        swapped = model(task.collate(tok)([dataclasses.replace(e, text_a=e.text_b, text_b=e.text_a) for e in examples]))
    assert not torch.allclose(plain, swapped)  # a cross-encoder is not symmetric by itself
    assert got["preds"] == (0.5 * (plain + swapped) > 0).long().tolist()
    assert task.collate(tok).symmetric is False  # training batches are never doubled
    with pytest.raises(ConfigError, match="tasks.sst.symmetric_eval: task .sst. has one sentence per row"):
        load_config(CONFIGS / "multitask-joint.yaml", ["tasks.sst.symmetric_eval=true"])


def _nan_loss_after(monkeypatch, bad_steps):
    import minbert.build as build_mod

    real = build_mod.build_loss
    calls = {"n": 0}

    def build(name, **options):
        loss = real(name, **options)

        def wrapped(output, target):
            calls["n"] += 1
            value = loss(output, target)
            return value * float("nan") if calls["n"] in bad_steps else value

        return wrapped

    monkeypatch.setattr(build_mod, "build_loss", build)


def test_nan_loss_is_skipped_and_counted(tiny_checkpoint, tmp_path, monkeypatch):
    _nan_loss_after(monkeypatch, bad_steps={2})
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(tiny_checkpoint, out, "max_steps=4", "predict=false", tasks=["sst"]))
    before = {k: v.clone() for k, v in BertModel.from_pretrained(tiny_checkpoint).state_dict().items()}
    train(cfg)
    events = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    skips = [e for e in events if e.get("event") == "nonfinite_skip"]
    assert len(skips) == 1 and skips[0]["step"] == 1
    model, _, _ = load_model_dir(out / "best")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.bert.state_dict().items())


def test_nan_patience_stops_with_clear_error(tiny_checkpoint, tmp_path, monkeypatch):
    _nan_loss_after(monkeypatch, bad_steps=set(range(1, 100)))
    cfg = load_config(None, _overrides(tiny_checkpoint, tmp_path / "run", "max_steps=10", "nan_patience=3", tasks=["sst"]))
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss"):
        train(cfg)


def test_last_linear_layer_freezes_the_encoder(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / "baseline-linear.yaml", _overrides(tiny_checkpoint, out, "max_steps=3", "predict=false"))
    train(cfg)
    model, _, _ = load_model_dir(out / "best")
    base = BertModel.from_pretrained(tiny_checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), model.bert.state_dict().values()))


@pytest.mark.parametrize("recipe", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_runs_two_steps(recipe, tiny_checkpoint, tmp_path):
    """Each recipe in configs/ trains end to end."""
    path = CONFIGS / f"{recipe}.yaml"
    configured = [t.name for t in load_config(path).tasks]
    cfg = load_config(path, _overrides(tiny_checkpoint, tmp_path / "run", "max_steps=2", "predict=false",
                                       "epochs=1", configured=configured))
    result = train(cfg)
    assert math.isfinite(result["best_overall"])


# ---- configuration ---------------------------------------------------------------------------

def test_unknown_keys_and_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(None, ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match="optim.lr must be a positive number"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="tasks.sst.pooling"):
        load_config(None, ["tasks.sst.pooling=max"])
    with pytest.raises(ConfigError, match="no task named 'cola'"):
        load_config(None, ["tasks.cola.batch_size=3"])
    with pytest.raises(ConfigError, match="schedule.order names tasks that are not configured"):
        load_config(None, ["schedule.order=[sst,cola]"])
    with pytest.raises(ConfigError, match="epochs must be a positive integer"):
        load_config(None, ["epochs=0"])


def test_overrides_apply_and_tasks_can_be_selected():
    cfg = load_config(CONFIGS / "multitask-joint.yaml", ["optim.lr=3e-5", "tasks.sts.batch_size=16", "tasks=sst,sts"])
    assert [t.name for t in cfg.tasks] == ["sst", "sts"]
    assert cfg.optim.lr == 3e-5
    cfg = load_config(CONFIGS / "multitask-joint.yaml", ["tasks.sts.batch_size=16"])
    assert cfg.task("sts").batch_size == 16 and cfg.task("sts").pair_encoding == "bi"


def test_cli_reports_config_errors_before_training(tmp_path, capsys):
    assert main(["train", "--set", "optim.nope=1", "--set", f"output_dir={tmp_path}/x"]) == 2
    assert "unknown config key 'optim.nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["fixed", "uncertainty", "dwa", "dev_score", "pcgrad", "gse"])
def test_every_weighting_trains(method, tiny_checkpoint, tmp_path):
    """Joint steps (all tasks every step) through each weighting method, two epochs of 3 steps."""
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / "multitask-joint.yaml",
                      _overrides(tiny_checkpoint, out, f"weighting.name={method}", "epochs=2", "predict=false",
                                 "schedule.epoch_size=smallest", "eval_every=null"))
    before = BertModel.from_pretrained(tiny_checkpoint).state_dict()
    result = train(cfg)
    assert math.isfinite(result["best_overall"])
    model, _, _ = load_model_dir(out / "best")
    assert any(not torch.equal(before[k], v) for k, v in model.bert.state_dict().items())
