"""Prediction ensembles of saved models: ``minbert.ensemble`` and ``minbert evaluate/predict --checkpoint A B``."""
import json
from pathlib import Path

import pytest
import torch

from minbert.cli import main
from minbert.ensemble import EnsembleError, average_members
from minbert.metrics import pearson
from minbert.train import train
from minbert.train_config import load_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "train"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _member(ids, outputs, labels=None):
    return {"ids": list(ids), "outputs": outputs, "labels": labels, "preds": None}


def test_classification_averages_probabilities_not_logits():
    # member 0 is sure of class 0; member 1 mildly prefers class 1 by a larger logit margin sum
    a = _member(["x"], [[10.0, 0.0, 0.0]], [0])
    b = _member(["x"], [[0.0, 3.0, 0.0]], [0])
    got = average_members("sst", "single_label_classification", [a, b])
    pa, pb = torch.tensor([10.0, 0, 0]).softmax(0), torch.tensor([0, 3.0, 0]).softmax(0)
    torch.testing.assert_close(torch.tensor(got["outputs"][0]), (pa + pb) / 2)
    assert got["preds"] == [0] and got["labels"] == [0]
    # a case where probability and logit averaging disagree: each member is sure of another class
    a, b = _member(["y"], [[0.0, 3.0, -10.0]]), _member(["y"], [[0.0, -10.0, 2.9]])
    assert torch.tensor([[0.0, 3.0, -10.0], [0.0, -10.0, 2.9]]).mean(0).argmax() == 0  # mean logits: class 0
    assert average_members("sst", "single_label_classification", [a, b])["preds"] == [1]  # p̄ = (0.05, 0.48, 0.47)


def test_binary_and_regression_and_id_alignment():
    a = _member(["p", "q", "r"], [2.0, -1.0, 0.2], [1, 0, 1])
    b = _member(["r", "p", "q"], [-0.6, 1.0, -3.0], [1, 1, 0])  # another order: matched by id
    got = average_members("quora", "binary_classification", [a, b])
    s = torch.sigmoid
    want = [(s(torch.tensor(2.0)) + s(torch.tensor(1.0))) / 2, (s(torch.tensor(-1.0)) + s(torch.tensor(-3.0))) / 2,
            (s(torch.tensor(0.2)) + s(torch.tensor(-0.6))) / 2]
    torch.testing.assert_close(torch.tensor(got["outputs"]), torch.stack(want))
    assert got["ids"] == ["p", "q", "r"] and got["preds"] == [1, 0, int(want[2] > 0.5)] and got["labels"] == [1, 0, 1]
    sts = average_members("sts", "regression", [_member(["p", "q"], [1.0, 4.0]), _member(["q", "p"], [2.0, 3.0])])
    assert sts["preds"] == pytest.approx([2.0, 3.0])
    # one member: its own predictions exactly
    one = average_members("quora", "binary_classification", [a])
    assert one["preds"] == [1, 0, 1]


def test_members_must_score_the_same_examples():
    with pytest.raises(EnsembleError, match=r"member 1 scored other examples than member 0 \(missing e.g. \['q'\], "
                                            r"extra e.g. \['z'\]\)"):
        average_members("sts", "regression", [_member(["p", "q"], [1.0, 2.0]), _member(["p", "z"], [1.0, 2.0])])
    with pytest.raises(EnsembleError, match="no members"):
        average_members("sts", "regression", [])


def _run(tiny_checkpoint, out, seed, tasks="sst,quora,sts"):
    sets = [f"tasks={tasks}", f"model={tiny_checkpoint}", f"data.dir={FIXTURES}", f"output_dir={out}", "quiet=true",
            "max_steps=3", f"seed={seed}", "predict=false", "eval_every=100"]
    sets += [f"tasks.{t}.batch_size=8" for t in tasks.split(",")]
    train(load_config(CONFIGS / "multitask-joint.yaml", sets))
    return out / "best"


def test_cli_ensemble_of_two_runs(tiny_checkpoint, tmp_path, capsys):
    a, b = _run(tiny_checkpoint, tmp_path / "a", 0), _run(tiny_checkpoint, tmp_path / "b", 1)
    capsys.readouterr()
    scores = []
    for dirs in ([a], [b], [a, b]):
        assert main(["evaluate", "--checkpoint", *map(str, dirs), "--data-dir", str(FIXTURES)]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    # one checkpoint: the dev metrics training recorded for it
    info = json.loads((a / "info.json").read_text())["dev"]
    assert scores[0]["overall"] == pytest.approx(info["overall"], abs=1e-6)
    assert scores[2]["ensemble_members"] == 2
    # the ensemble's STS Pearson is that of the mean of the members' prediction files
    assert main(["predict", "--checkpoint", str(a), "--data-dir", str(FIXTURES), "--out", str(tmp_path / "pa")]) == 0
    assert main(["predict", "--checkpoint", str(b), "--data-dir", str(FIXTURES), "--out", str(tmp_path / "pb")]) == 0
    assert main(["predict", "--checkpoint", str(a), str(b), "--data-dir", str(FIXTURES),
                 "--out", str(tmp_path / "ens")]) == 0

    def read(folder):
        rows = (tmp_path / folder / "sts-dev-output.csv").read_text().splitlines()[1:]
        return {r.split(",")[0].strip(): float(r.split(",")[1]) for r in rows}

    pa, pb, ens = read("pa"), read("pb"), read("ens")
    assert ens.keys() == pa.keys() == pb.keys()
    for k in ens:
        assert ens[k] == pytest.approx((pa[k] + pb[k]) / 2, abs=1e-4)
    gold = {r.split("\t")[1].strip(): float(r.split("\t")[-1]) for r in
            (FIXTURES / "sts-dev.csv").read_text().splitlines()[1:] if r.strip()}
    ids = sorted(ens)
    assert scores[2]["sts/pearson"] == pytest.approx(pearson([ens[i] for i in ids], [gold[i] for i in ids]), abs=1e-3)


def test_cli_ensemble_with_a_single_task_specialist(tiny_checkpoint, tmp_path, capsys):
    """A member holding fewer tasks joins only those: SST and Quora stay the multitask model's, STS is
    the mean of both members."""
    a, b = _run(tiny_checkpoint, tmp_path / "a", 0), _run(tiny_checkpoint, tmp_path / "b", 1, tasks="sts")
    capsys.readouterr()
    for args in ([a], [b], [a, b], [b, a]):
        assert main(["predict", "--checkpoint", *map(str, args), "--data-dir", str(FIXTURES),
                     "--out", str(tmp_path / ("pred-" + "-".join(p.parent.name for p in args)))]) == 0
    files = sorted(p.name for p in (tmp_path / "pred-a-b").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "pred-a").iterdir())

    def read(folder, name):
        rows = (tmp_path / f"pred-{folder}" / name).read_text().splitlines()[1:]
        return {r.split(",")[0].strip(): float(r.split(",")[1]) for r in rows}

    for name in ("sst-dev-output.csv", "quora-dev-output.csv"):
        assert read("a-b", name) == read("a", name) == read("b-a", name)
    pa, pb, ens = read("a", "sts-dev-output.csv"), read("b", "sts-dev-output.csv"), read("a-b", "sts-dev-output.csv")
    assert ens.keys() == pa.keys() == pb.keys()
    for k in ens:
        assert ens[k] == pytest.approx((pa[k] + pb[k]) / 2, abs=1e-4)
    assert read("b-a", "sts-dev-output.csv") == pytest.approx(ens, abs=1e-6)
