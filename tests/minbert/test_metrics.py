"""Metrics on hand-computed cases."""
import warnings

import numpy as np
import pytest
import torch

from minbert.metrics import accuracy, confusion_matrix, overall_score, pearson, task_metric
from minbert.tasks import get_task


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
    assert {t: get_task(t).dev_metric for t in ("sst", "cfimdb", "quora", "sts")} == \
        {"sst": "accuracy", "cfimdb": "accuracy", "quora": "accuracy", "sts": "pearson"}
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
