"""Plots: PNG files for the training curves and confusion matrices."""
import json
import math

import numpy as np
import pytest
import torch

from minbert.metrics import confusion_matrix
from minbert.plots import plot_confusion, plot_curves
from minbert.prediction_files import append_jsonl, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
