"""Metrics on hand-computed cases, CS224N prediction files, metrics.jsonl and plots."""
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch

from minbert.metrics import (
    PREDICTION_COLUMNS,
    TASK_METRIC,
    accuracy,
    append_jsonl,
    confusion_matrix,
    overall_score,
    pearson,
    plot_confusion,
    plot_curves,
    read_jsonl,
    read_predictions,
    task_metric,
    write_predictions,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- accuracy, pearson, overall, confusion -----------------------------------------------------

def test_accuracy_hand_computed():
    assert accuracy([0, 1, 2, 3], [0, 1, 0, 3]) == 0.75
    assert accuracy([1, 0, 0], [1.0, 0.0, 1.0]) == pytest.approx(2 / 3)  # quora labels written as 0.0/1.0
    assert accuracy(torch.tensor([4, 4]), np.array([4, 3])) == 0.5
    assert accuracy([2], [2]) == 1.0 and accuracy([2], [1]) == 0.0


def test_pearson_matches_numpy_corrcoef():
    rng = np.random.default_rng(0)
    for n in (2, 3, 17, 1000):
        x = rng.normal(size=n)
        y = 0.3 * x + rng.normal(size=n)
        assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # hand-computed: x = (1, 2, 3, 4), y = (1, 3, 2, 4): cov 4/ sqrt(5 * 5) = 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-15)


def test_pearson_is_float64():
    """float32 inputs with a large offset: a float32 computation loses most digits."""
    rng = np.random.default_rng(1)
    x = (1000.0 + rng.normal(size=5000) * 1e-2).astype(np.float32)
    y = (x.astype(np.float64) + rng.normal(size=5000) * 1e-2).astype(np.float32)
    ref = np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1]
    assert pearson(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(ref, abs=1e-10)


def test_pearson_constant_input_warns_and_returns_zero():
    with pytest.warns(RuntimeWarning, match="pred constant"):
        assert pearson([2.5, 2.5, 2.5], [1.0, 2.0, 3.0]) == 0.0
    with pytest.warns(RuntimeWarning, match="gold constant"):
        assert pearson([1.0, 2.0], [0.1, 0.1]) == 0.0
    with pytest.warns(RuntimeWarning, match="pred and gold constant"):
        assert pearson([0.1] * 3, [0.1] * 3) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pearson([0.1, 0.1, 0.2], [1.0, 2.0, 3.0])  # not constant: no warning


def test_overall_score_formula():
    assert overall_score(0.5, 0.8, 0.6) == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert overall_score(1.0, 1.0, 1.0) == 1.0
    assert overall_score(0.0, 0.0, -1.0) == 0.0
    assert overall_score(0.49, 0.82, 0.88) == pytest.approx((0.49 + (0.88 + 1) / 2 + 0.82) / 3)
    # the argument order is (sst, quora, sts): swapping quora and sts changes the score
    assert overall_score(0.5, 0.2, 0.9) != overall_score(0.5, 0.9, 0.2)


def test_confusion_matrix():
    cm = confusion_matrix([0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 0], 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[1, 0, 1],  # gold 0: predicted 0 once, 2 once
                                       [0, 1, 0],
                                       [0, 1, 2]])
    assert cm.sum() == 6 and np.trace(cm) / cm.sum() == accuracy([0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(confusion_matrix(torch.tensor([4]), [1.0], 5)[1], [0, 0, 0, 0, 1])


def test_task_metric():
    assert TASK_METRIC == {"sst": "accuracy", "cfimdb": "accuracy", "quora": "accuracy", "sts": "pearson"}
    assert task_metric("sst", [1, 2, 3], [1, 2, 4]) == {"accuracy": pytest.approx(2 / 3)}
    assert task_metric("quora", [1, 0], [1.0, 1.0]) == {"accuracy": 0.5}
    assert task_metric("cfimdb", [1, 0], [1, 0]) == {"accuracy": 1.0}
    assert task_metric("sts", [1.0, 2.0, 3.0, 4.0], [1, 3, 2, 4]) == {"pearson": pytest.approx(0.8)}
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        task_metric("mnli", [1], [1])
    with pytest.raises(ValueError, match=r"task_metric\('sts'\): pearson: 'pred' has 2 values but 'gold' has 3"):
        task_metric("sts", [1.0, 2.0], [1.0, 2.0, 3.0])


def test_predict_from_output():
    from minbert.multitask import predict_from_output

    logits = torch.tensor([[0.1, 2.0, -1.0, 0.0, 0.3], [3.0, 0.0, 0.0, 0.0, 0.0]])
    assert predict_from_output("sst", logits).tolist() == [1, 0]
    assert predict_from_output("quora", torch.tensor([-0.1, 0.0, 0.2])).tolist() == [0, 0, 1]
    # STS scores are clamped to the label range 0-5 (5·cos can reach -5), inside it they pass unchanged
    raw = torch.tensor([-1.25, 0.0, 2.5, 4.99, 5.3])
    assert predict_from_output("sts", raw).tolist() == pytest.approx([0.0, 0.0, 2.5, 4.99, 5.0])
    # ... which never moves a score away from any gold score in the range
    gold = torch.linspace(0, 5, 11)
    assert ((predict_from_output("sts", raw)[:, None] - gold).abs() <= (raw[:, None] - gold).abs()).all()


@pytest.mark.parametrize("call, match", [
    (lambda: accuracy([1, 2], [1]), "'pred' has 2 values but 'gold' has 1"),
    (lambda: accuracy([], []), "empty"),
    (lambda: accuracy([[1, 2]], [[1, 2]]), r"must be 1-D \(N,\)"),
    (lambda: accuracy(["a"], ["a"]), "must hold numbers"),
    (lambda: pearson([1.0], [2.0]), "at least 2 values"),
    (lambda: pearson([1.0, float("nan")], [1.0, 2.0]), "'pred' holds NaN or Inf at index 1"),
    (lambda: pearson([1.0, 2.0], [1.0, float("inf")]), "'gold' holds NaN or Inf"),
    (lambda: overall_score(1.2, 0.5, 0.5), r"'sst_acc' must be a number in \[0, 1\]"),
    (lambda: overall_score(0.5, 0.5, -1.5), r"'sts_pearson' must be a number in \[-1, 1\]"),
    (lambda: overall_score(0.5, float("nan"), 0.5), "'quora_acc'"),
    (lambda: confusion_matrix([0, 5], [0, 1], 5), r"'pred' holds label 5, outside \[0, 5\)"),
    (lambda: confusion_matrix([0, 1], [-1, 1], 5), "'gold' holds label -1"),
    (lambda: confusion_matrix([0.5], [0], 2), "non-integer labels"),
    (lambda: confusion_matrix([0], [0], 0), "num_classes must be an int >= 1"),
])
def test_metric_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


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
    assert back.column == PREDICTION_COLUMNS[task]
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


# --- plots -------------------------------------------------------------------------------------

def curve_records():
    records = []
    for step in range(10, 201, 10):
        for task in ("sst", "quora", "sts"):
            records.append({"step": step, "epoch": step / 200, "split": "train", "task": task,
                            "loss": 2.0 / (1 + step / 50), "lr": 1e-5})
    for step in (100, 200):
        for task, metric, value in (("sst", "accuracy", 0.4), ("quora", "accuracy", 0.7), ("sts", "pearson", 0.6)):
            records.append({"step": step, "epoch": step / 200, "split": "dev", "task": task, metric: value + step / 1e3,
                            "overall": 0.6 + step / 1e3})
    records.append({"step": 50, "split": "train", "event": "nonfinite_skip", "consecutive": 1, "total": 1})
    return records


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    assert sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")) == []


def test_plot_curves_png(tmp_path):
    path = plot_curves(curve_records(), tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    assert_png(path)
    # dev-only and train-only records plot too
    assert_png(plot_curves([r for r in curve_records() if r["split"] == "dev"], tmp_path / "dev.png"))
    assert_png(plot_curves([r for r in curve_records() if r.get("task") == "sst" and r["split"] == "train"],
                           tmp_path / "train.png"))


def test_plot_curves_reads_back_from_jsonl(tmp_path):
    for rec in curve_records():
        append_jsonl(tmp_path / "metrics.jsonl", rec)
    assert_png(plot_curves(read_jsonl(tmp_path / "metrics.jsonl"), tmp_path / "curves.png"))


def test_plot_curves_panel_per_task(tmp_path, monkeypatch):
    """One panel per task (plus one for the overall score), each with its train and dev lines."""
    import matplotlib.figure

    seen = {}
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        main_axes = [ax for ax in fig.axes if ax.get_title()]
        seen["titles"] = [ax.get_title() for ax in main_axes]
        seen["labels"] = [[line.get_label() for a in fig.axes if a.get_position().bounds == ax.get_position().bounds
                           for line in a.get_lines()] for ax in main_axes]
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    plot_curves(curve_records(), tmp_path / "c.png")
    assert seen["titles"][:3] == ["sst", "quora", "sts"] and seen["titles"][3].startswith("overall")
    assert seen["labels"][0] == ["train loss", "dev accuracy"]
    assert seen["labels"][2] == ["train loss", "dev pearson"]
    assert seen["labels"][3] == ["dev overall"]


def test_plot_curves_nothing_to_plot(tmp_path):
    with pytest.raises(ValueError, match="no train loss or dev metric records"):
        plot_curves([{"step": 1, "split": "train", "event": "nonfinite_skip"}], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_plot_confusion_png(tmp_path):
    cm = confusion_matrix([0, 1, 2, 3, 4, 4, 3], [0, 1, 2, 4, 4, 3, 3], 5)
    assert_png(plot_confusion(cm, ["0", "1", "2", "3", "4"], tmp_path / "sst_confusion.png"))
    assert_png(plot_confusion(torch.tensor([[3, 1], [0, 2]]), ["neg", "pos"], tmp_path / "cf.png"))
    with pytest.raises(ValueError, match="2 labels for a 5x5 matrix"):
        plot_confusion(cm, ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"square \(C, C\)"):
        plot_confusion(np.zeros((2, 3)), ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="finite counts >= 0"):
        plot_confusion(np.array([[1, -1], [0, 0]]), ["a", "b"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_plot_json_records_with_nan_are_skipped(tmp_path):
    """A NaN loss logged as NaN (json writes it) does not break the plot."""
    records = curve_records() + [{"step": 205, "split": "train", "task": "sst", "loss": float("nan")}]
    append_jsonl(tmp_path / "m.jsonl", records[-1])
    assert math.isnan(json.loads((tmp_path / "m.jsonl").read_text())["loss"])  # NaN round-trips as NaN
    assert_png(plot_curves(records, tmp_path / "c.png"))
