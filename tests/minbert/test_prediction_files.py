"""CS224N prediction files and metrics.jsonl: exact text, round trips, atomic writes, errors."""
import os

import numpy as np
import pytest
import torch

from minbert.prediction_files import append_jsonl, prediction_columns, read_jsonl, read_predictions, write_predictions


# --- prediction files --------------------------------------------------------------------------

def test_prediction_file_exact_text(tmp_path):
    path = write_predictions(tmp_path / "sst-dev-output.csv", "sst", ["a1", "b2"], torch.tensor([3, 0]))
    assert path.read_text(encoding="utf-8") == "id \t Predicted_Sentiment \na1 , 3 \nb2 , 0 \n"
    write_predictions(tmp_path / "q.csv", "quora", ["x"], [1.0])
    assert (tmp_path / "q.csv").read_text() == "id \t Predicted_Is_Paraphrase \nx , 1 \n"
    write_predictions(tmp_path / "s.csv", "sts", ["p", "q"], np.array([3.25, 0.5]))
    assert (tmp_path / "s.csv").read_text() == "id \t Predicted_Similiarity \np , 3.25 \nq , 0.5 \n"
    write_predictions(tmp_path / "c.csv", "cfimdb", [], [])
    assert (tmp_path / "c.csv").read_text() == "id \t Predicted_Sentiment \n"


@pytest.mark.parametrize("task, preds", [
    ("sst", [0, 4, 2, 1]),
    ("cfimdb", [1, 0, 0, 1]),
    ("quora", [0, 1, 1, 0]),
    ("sts", [0.0, 4.999999, 2.123456789012345, 1e-07]),
])
def test_prediction_round_trip(tmp_path, task, preds):
    ids = ["3d9a0f", "b7c1e2", "000aa1", "ffee42"]
    path = tmp_path / "sub" / f"{task}.csv"  # the folder is created
    write_predictions(path, task, ids, preds)
    back = read_predictions(path)
    assert back.ids == ids
    assert back.preds == preds
    assert back.column == prediction_columns()[task]
    assert all(type(p) is type(q) for p, q in zip(back.preds, preds))


def test_read_predictions_parses_the_cs224n_starter_output(tmp_path):
    """The starter code writes numpy scalars with f"{p} , {s} \\n"; the reader accepts it."""
    path = tmp_path / "sts-dev-output.csv"
    with open(path, "w") as f:
        f.write("id \t Predicted_Similiarity \n")
        for p, s in zip(["a", "b"], np.array([1.5, 2.0], dtype=np.float32)):
            f.write(f"{p} , {s} \n")
    assert read_predictions(path) == (["a", "b"], [1.5, 2.0], "Predicted_Similiarity")


def test_write_predictions_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous file intact and no temporary file behind."""
    path = tmp_path / "sst.csv"
    write_predictions(path, "sst", ["a"], [1])
    before = path.read_text()
    with pytest.raises(ValueError, match="prediction 1 must be a class label"):
        write_predictions(path, "sst", ["a", "b"], [1, 2.5])
    assert path.read_text() == before

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_predictions(path, "sst", ["a", "b"], [1, 2])
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sst.csv"]


@pytest.mark.parametrize("task, ids, preds, match", [
    ("mnli", ["a"], [1], "unknown task 'mnli'"),
    ("sst", ["a", "b"], [1], "2 ids but 1 predictions"),
    ("sst", ["a,b"], [1], "without surrounding spaces, commas"),
    ("sst", [""], [1], "must be non-empty"),
    ("sts", ["a"], [float("nan")], "prediction 0 is nan"),
    ("sts", ["a"], ["3.0"], "must be a number"),
    ("quora", ["a"], [0.5], "must be a class label"),
])
def test_write_predictions_errors(tmp_path, task, ids, preds, match):
    with pytest.raises(ValueError, match=match):
        write_predictions(tmp_path / "x.csv", task, ids, preds)
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("text, match", [
    ("", "empty prediction file"),
    ("id , Predicted_Sentiment \n", "1: bad header"),
    ("id \t Predicted_Something \n", "1: bad header"),
    ("id \t Predicted_Sentiment \na , 1 , 2 \n", "2: expected '<id> , <prediction>'"),
    ("id \t Predicted_Sentiment \na , 1 \nb , x \n", "3: prediction 'x' is not a number"),
])
def test_read_predictions_errors(tmp_path, text, match):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_predictions(path)


# --- jsonl -------------------------------------------------------------------------------------

def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    records = [
        {"step": 10, "epoch": 0, "split": "train", "task": "sst", "loss": 1.25},
        {"step": 100, "split": "dev", "task": "sts", "pearson": np.float64(0.5), "n": np.int64(3),
         "t": torch.tensor(2.0)},
    ]
    for rec in records:
        append_jsonl(path, rec)
    back = read_jsonl(path)
    assert back[0] == records[0]
    assert back[1] == {"step": 100, "split": "dev", "task": "sts", "pearson": 0.5, "n": 3, "t": 2.0}
    assert path.read_text().count("\n") == 2
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        append_jsonl(path, {"x": object()})
    with pytest.raises(ValueError, match="must be a dict"):
        append_jsonl(path, [1, 2])


def test_read_jsonl_bad_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')  # killed mid-write
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        assert read_jsonl(path) == [{"step": 1}, {"step": 2, "loss": 0.5}]
    path.write_text('{"step": 1}\n{oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="1: expected a JSON object"):
        read_jsonl(path)
