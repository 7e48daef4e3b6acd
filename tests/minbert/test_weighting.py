"""Loss weighting and gradient surgery."""
import math

import pytest
import torch
import torch.nn as nn

from minbert.weighting import (WEIGHTINGS, build_weighting, combine_gradients, gram_matrix, pcgrad_project,
                               pcgrad_weights)


@pytest.mark.parametrize("t", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcgrad_weights_equal_direct_projection(t, seed):
    g = torch.Generator().manual_seed(seed)
    p = int(torch.randint(3, 200, (1,), generator=g))
    base = torch.randn(p, generator=g, dtype=torch.float64)
    # conflicting gradients: random directions, some pointing against a common one
    grads = torch.stack([(1 if i % 2 else -1) * base + torch.randn(p, generator=g, dtype=torch.float64) for i in range(t)])
    order = torch.randperm(t, generator=g).tolist()
    assert bool((gram_matrix(grads) < 0).any())
    w = pcgrad_weights(gram_matrix(grads), order)
    torch.testing.assert_close(combine_gradients(grads, w), pcgrad_project(grads, order), rtol=1e-10, atol=1e-10)


def test_pcgrad_weights_no_conflict_and_zero_gradient():
    grads = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)
    w = pcgrad_weights(gram_matrix(grads), [2, 0, 1])
    torch.testing.assert_close(w, torch.ones(3, dtype=torch.float64))
    conflict = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    w = pcgrad_weights(gram_matrix(conflict), [0, 1])
    # g1^PC = g1 - (g1.g2/|g2|^2) g2 = g1 + 0.5 g2 ; g2^PC = g2 + g1
    torch.testing.assert_close(w, torch.tensor([2.0, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="permutation"):
        pcgrad_weights(gram_matrix(conflict), [0, 0])


def _two_task_model():
    torch.manual_seed(0)
    shared = nn.Linear(4, 3)
    heads = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})
    x = torch.randn(8, 4)
    return shared, heads, x


def _losses(shared, heads, x):
    h = torch.tanh(shared(x))
    return {"a": heads["a"](h).pow(2).mean(), "b": -heads["b"](h).mean() * 3}


def test_pcgrad_backward_matches_oracle_and_keeps_head_gradients():
    shared, heads, x = _two_task_model()
    params = list(shared.parameters())
    losses = _losses(shared, heads, x)
    per_task = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        per_task.append(torch.cat([g.reshape(-1) for g in grads]))
    head_grads = {t: torch.autograd.grad(losses[t], list(heads[t].parameters()), retain_graph=True) for t in losses}
    w = build_weighting("pcgrad", ["a", "b"], seed=3)
    order = torch.randperm(2, generator=torch.Generator().manual_seed(3)).tolist()
    w.backward(losses, params)
    want = pcgrad_project(torch.stack(per_task).double(), order)
    got = torch.cat([p.grad.reshape(-1) for p in params]).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for t in losses:
        for p, g in zip(heads[t].parameters(), head_grads[t]):
            torch.testing.assert_close(p.grad, g)


def test_pcgrad_order_is_seeded_and_state_round_trips():
    a = build_weighting("pcgrad", ["x", "y", "z"], seed=7)
    b = build_weighting("pcgrad", ["x", "y", "z"], seed=7)
    assert [a.draw_order(3) for _ in range(5)] == [b.draw_order(3) for _ in range(5)]
    state = a.state_dict()
    first = a.draw_order(3)
    a.load_state_dict(state)
    assert a.draw_order(3) == first


def test_uncertainty_matches_formula_and_learns():
    w = build_weighting("uncertainty", ["sst", "sts"], task_kinds={"sst": "classification", "sts": "regression"})
    with torch.no_grad():
        w.log_vars["sst"].fill_(0.3)
        w.log_vars["sts"].fill_(-0.2)
    l1, l2 = torch.tensor(1.5, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    total = w.combine({"sst": l1, "sts": l2})
    want = math.exp(-0.3) * 1.5 + 0.15 + 0.5 * math.exp(0.2) * 0.7 - 0.1
    assert abs(total.item() - want) < 1e-6
    total.backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in w.parameters())


def test_dwa_weights_follow_the_formula():
    w = build_weighting("dwa", ["a", "b"], temperature=2.0)
    w.end_epoch(0, {"a": 1.0, "b": 1.0}, {})
    assert w.weights({"a": 0, "b": 0}) == {"a": 1.0, "b": 1.0}
    w.end_epoch(1, {"a": 0.5, "b": 0.9}, {})
    ra, rb = 0.5, 0.9
    ea, eb = math.exp(ra / 2), math.exp(rb / 2)
    got = w.weights({"a": 0, "b": 0})
    assert abs(got["a"] - 2 * ea / (ea + eb)) < 1e-12 and abs(got["b"] - 2 * eb / (ea + eb)) < 1e-12


def test_dev_score_weights_favour_weaker_tasks():
    w = build_weighting("dev_score", ["sst", "quora", "sts"])
    w.end_epoch(0, {}, {"sst": 0.5, "quora": 0.8, "sts": 0.8})  # sts r=0.8 -> 0.9
    got = w.weights({"sst": 0, "quora": 0, "sts": 0})
    assert abs(sum(got.values()) - 3) < 1e-9
    assert got["sst"] > got["quora"] > got["sts"]
    assert abs(got["sst"] / got["quora"] - 0.5 / 0.2) < 1e-9


def test_equal_and_fixed_on_task_subsets():
    losses = {"b": torch.tensor(2.0)}
    assert build_weighting("equal", ["a", "b"]).combine(losses).item() == 2.0
    assert build_weighting("equal", ["a", "b"], reduction="mean").combine({"a": torch.tensor(1.0), "b": torch.tensor(3.0)}).item() == 2.0
    assert build_weighting("fixed", ["a", "b"], weights={"a": 1.0, "b": 0.25}).combine(losses).item() == 0.5
    with pytest.raises(ValueError, match="missing"):
        build_weighting("fixed", ["a", "b"], weights={"a": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        build_weighting("fixed", ["a", "b"], weights={"a": 1.0, "b": -1})
    with pytest.raises(KeyError, match="unknown tasks"):
        build_weighting("equal", ["a"]).combine({"c": torch.tensor(1.0)})


def _conflicting(shared, x):
    h = torch.tanh(shared(x))
    return {"a": h.sum(), "b": -2 * h.sum() + h.pow(2).sum()}


def test_gse_two_update_contract():
    shared, heads, x = _two_task_model()
    params = list(shared.parameters())
    w = build_weighting("gse", ["a", "b"], seed=0)
    assert w.num_updates == 2
    w.backward(_conflicting(shared, x), params, update_index=0)
    projected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    w.backward(_conflicting(shared, x), params, update_index=1)
    plain = torch.autograd.grad(sum(_conflicting(shared, x).values()), params)
    for p, g in zip(params, plain):
        torch.testing.assert_close(p.grad, g)
    assert any(not torch.allclose(a, b) for a, b in zip(projected, plain))


def test_registry_errors():
    assert set(WEIGHTINGS) == {"equal", "fixed", "uncertainty", "dwa", "dev_score", "pcgrad", "gse"}
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_weighting("nope", ["a"])
    with pytest.raises(ValueError, match="unknown option 'tau'"):
        build_weighting("dwa", ["a"], tau=1)
