"""The task registry: the built-in corpora's facts, registration, and a fifth task trained end to end."""
import json
import math

import pytest
import torch

from minbert.tasks import (
    BINARY,
    PROBLEM_TYPES,
    REGRESSION,
    SINGLE_LABEL,
    TASKS,
    Task,
    get_task,
    register,
    registered,
    trainable_tasks,
    unregister,
)
from minbert.train import train
from minbert.train_config import ConfigError, TaskConfig, load_config


def test_builtin_tasks():
    assert trainable_tasks() == ("sst", "cfimdb", "quora", "sts")
    facts = {name: (t.problem_type, t.output_size, t.is_pair, t.default_loss, t.dev_metric, t.prediction_column)
             for name, t in TASKS.items()}
    assert facts == {
        "sst": (SINGLE_LABEL, 5, False, "cross_entropy", "accuracy", "Predicted_Sentiment"),
        "cfimdb": (SINGLE_LABEL, 2, False, "cross_entropy", "accuracy", "Predicted_Sentiment"),
        "quora": (BINARY, 1, True, "bce_with_logits", "accuracy", "Predicted_Is_Paraphrase"),
        "sts": (REGRESSION, 1, True, "mse", "pearson", "Predicted_Similiarity"),
        "nli": (SINGLE_LABEL, 3, True, "cross_entropy", "accuracy", None),
    }
    assert get_task("sst").files == ("ids-sst-train.csv", "ids-sst-dev.csv", "ids-sst-test-student.csv")
    assert get_task("quora").columns == ("id", "sentence1", "sentence2", "is_duplicate")
    assert get_task("nli").files is None and not get_task("nli").trainable
    assert set(PROBLEM_TYPES) == {"single_label_classification", "binary_classification", "regression"}


def test_predict_follows_the_problem_type():
    assert get_task("sst").predict(torch.tensor([[0.1, 2.0, -1.0, 0.0, 0.3]])).tolist() == [1]
    assert get_task("quora").predict(torch.tensor([-0.1, 0.0, 0.2])).tolist() == [0, 0, 1]
    assert get_task("sts").predict(torch.tensor([-1.0, 2.5, 5.5])).tolist() == [0.0, 2.5, 5.0]


def test_task_definitions_are_checked():
    with pytest.raises(ValueError, match="problem_type 'classification' is not one of"):
        Task("t", "classification", ("s",), "y", 2, (0, 1))
    with pytest.raises(ValueError, match="a binary_classification task has num_labels 2, got 3"):
        Task("t", BINARY, ("a", "b"), "y", 3, (0, 2))
    with pytest.raises(ValueError, match="a regression task has num_labels None, got 2"):
        Task("t", REGRESSION, ("s",), "y", 2, (0, 1))
    with pytest.raises(ValueError, match="one or two columns"):
        Task("t", SINGLE_LABEL, ("a", "b", "c"), "y", 2, (0, 1))
    with pytest.raises(ValueError, match="files must name the train, dev, test files"):
        Task("t", SINGLE_LABEL, ("s",), "y", 2, (0, 1), files=("train.tsv",))
    with pytest.raises(ValueError, match="dev_metric 'f1' is not one of"):
        Task("t", SINGLE_LABEL, ("s",), "y", 2, (0, 1), dev_metric="f1")
    with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: sst, cfimdb, quora, sts, nli"):
        get_task("nope")


def test_register_and_unregister():
    toy = Task("toy", SINGLE_LABEL, ("text",), "topic", 3, (0, 2))
    with registered(toy) as task:
        assert get_task("toy") is task and "toy" in trainable_tasks()
        with pytest.raises(ValueError, match="a task named 'toy' is already registered"):
            register(toy)
    assert "toy" not in TASKS
    with pytest.raises(ValueError, match="no task named 'toy'"):
        unregister("toy")
    with pytest.raises(TypeError, match="expected a Task"):
        register("toy")
    with pytest.raises(RuntimeError), registered(toy):
        raise RuntimeError("the block fails")
    assert "toy" not in TASKS  # unregistered on the way out all the same
    with pytest.raises(ConfigError, match="unknown task 'toy'"):
        TaskConfig("toy").validate("tasks.toy")


TOPICS = {0: ["the match ended in a draw", "a late goal won the cup", "the team lost at home"],
          1: ["the market fell sharply", "shares rose after the report", "the bank cut its rates"],
          2: ["the new phone has a fast chip", "a patch fixes the bug", "the laptop battery lasts long"]}


def _write(path, rows, labelled=True):
    header = "\tid\ttext" + ("\ttopic" if labelled else "")
    lines = [header] + [f"{i}\t{ex_id}\t{text}" + (f"\t{label}" if labelled else "")
                        for i, (ex_id, text, label) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_a_fifth_task_trains_from_its_registry_entry_alone(tiny_checkpoint, tmp_path):
    """A 3-class single-sentence task defined by one Task: its files, columns, head size, loss, metric,
    prediction column and predictions all come from the registry."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [(f"toy{label}{k}", text, label) for label, texts in TOPICS.items() for k, text in enumerate(texts)]
    _write(data / "toy-train.tsv", rows + [(f"{i}b", t, y) for i, t, y in rows])  # 18 rows
    _write(data / "toy-dev.tsv", rows)
    _write(data / "toy-test.tsv", rows[:4], labelled=False)
    toy = Task("toy", SINGLE_LABEL, ("text",), "topic", 3, (0, 2),
               files=("toy-train.tsv", "toy-dev.tsv", "toy-test.tsv"), prediction_column="Predicted_Topic")
    out = tmp_path / "run"
    with registered(toy):
        cfg = load_config(None, ["tasks=toy", f"model={tiny_checkpoint}", f"data.dir={data}", f"output_dir={out}",
                                 "quiet=true", "log_every=1", "tasks.toy.batch_size=8", "max_steps=2"])
        result = train(cfg)
    assert "toy" not in TASKS
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
    assert [step for step, _ in losses] == [1, 2] and all(math.isfinite(loss) for _, loss in losses)
    assert all(r["task"] == "toy" for r in records if "task" in r)
    assert 0.0 <= result["toy/accuracy"] <= 1.0 and result["overall"] == result["toy/accuracy"]
    dev = (out / "predictions" / "toy-dev-output.csv").read_text().splitlines()
    assert dev[0] == "id \t Predicted_Topic " and len(dev) == 1 + len(rows)
    assert {line.split(" , ")[1].strip() for line in dev[1:]} <= {"0", "1", "2"}
    test = (out / "predictions" / "toy-test-output.csv").read_text().splitlines()
    assert len(test) == 1 + 4
