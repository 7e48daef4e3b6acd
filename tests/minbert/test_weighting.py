"""Loss weighting and gradient surgery (minbert.weighting)."""
import math

import pytest
import torch
import torch.nn as nn

from minbert.weighting import (WEIGHTINGS, Weighting, build_weighting, combine_gradients, gram_matrix,
                               pcgrad_project, pcgrad_weights)


# --- helpers -------------------------------------------------------------------------------------

def _conflicting_grads(t, p, gen, zero_row=None):
    """(T, P) float64 task gradients where odd and even tasks pull against a common direction."""
    base = torch.randn(p, generator=gen, dtype=torch.float64)
    grads = torch.stack([(1 if i % 2 else -1) * base + 0.7 * torch.randn(p, generator=gen, dtype=torch.float64)
                         for i in range(t)])
    if zero_row is not None:
        grads[zero_row] = 0
    return grads


def _flat(tensors):
    return torch.cat([x.reshape(-1) for x in tensors])


class TinyMultitask(nn.Module):
    """Shared encoder (+ an unused shared 'pooler'), one head per task, and a pair layer used by b and c only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6))
        self.pooler = nn.Linear(6, 6)  # shared but reached by no task: its .grad must stay None
        self.pair = nn.Linear(6, 6)
        self.heads = nn.ModuleDict({"a": nn.Linear(6, 1), "b": nn.Linear(6, 1), "c": nn.Linear(6, 2)})
        self.x = {t: torch.randn(9, 5, generator=torch.Generator().manual_seed(i)) for i, t in enumerate("abc")}

    def shared_parameters(self):
        return list(self.encoder.parameters()) + list(self.pooler.parameters())

    def losses(self, tasks="abc", joint=False):
        """Task losses built to conflict on the encoder; ``joint``: one encoder forward shared by all heads."""
        h_joint = torch.tanh(self.encoder(self.x["a"])) if joint else None
        out = {}
        for t in tasks:
            h = h_joint if joint else torch.tanh(self.encoder(self.x[t]))
            if t == "a":
                out[t] = self.heads["a"](h).pow(2).mean() + h.sum() * 0.3
            elif t == "b":
                out[t] = -3 * self.heads["b"](torch.relu(self.pair(h))).mean() - h.sum() * 0.2
            else:
                out[t] = self.heads["c"](torch.tanh(self.pair(h))).pow(2).mean() + h.pow(2).sum() * 0.1 + h.sum() * 0.5
        return out


def _oracle(model, tasks, order, joint=False, scale=1.0):
    """Direct PCGrad on the encoder's flattened per-task gradients, plus each task's own gradient of the rest."""
    shared = list(model.encoder.parameters())
    losses = model.losses(tasks, joint)
    per_task = torch.stack([_flat(torch.autograd.grad(scale * losses[t], shared, retain_graph=True))
                            for t in tasks]).double()
    heads = {t: torch.autograd.grad(scale * losses[t], list(model.heads[t].parameters()), retain_graph=True)
             for t in tasks}
    pair_users = [t for t in tasks if t in "bc"]
    pair = torch.autograd.grad(scale * sum(losses[t] for t in pair_users), list(model.pair.parameters())) \
        if pair_users else None
    return pcgrad_project(per_task, order), per_task, heads, pair


def _assert_grads(model, tasks, want_shared, heads, pair):
    got = _flat([p.grad for p in model.encoder.parameters()]).double()
    torch.testing.assert_close(got, want_shared, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.pooler.parameters())
    for t in "abc":
        for p, g in zip(model.heads[t].parameters(), heads.get(t, [None] * 2)):
            if t in tasks:
                torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
            else:
                assert p.grad is None
    for p, g in zip(model.pair.parameters(), pair or [None] * 2):
        if pair is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)


def _first_order(seed, t):
    return torch.randperm(t, generator=torch.Generator().manual_seed(seed)).tolist()


# --- the pure PCGrad functions ------------------------------------------------------------------

@pytest.mark.parametrize("t", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcgrad_weights_equal_direct_projection(t, seed):
    gen = torch.Generator().manual_seed(100 * t + seed)
    p = int(torch.randint(3, 300, (1,), generator=gen))
    zero_row = seed % t if seed == 2 and t > 2 else None  # one case per T > 2 with a zero task gradient
    grads = _conflicting_grads(t, p, gen, zero_row)
    gram = gram_matrix(grads)
    assert bool((gram < 0).any()), "the case must contain conflicts"
    for _ in range(3):
        order = torch.randperm(t, generator=gen).tolist()
        w = pcgrad_weights(gram, order)
        assert w.dtype == torch.float64 and w.shape == (t,)
        torch.testing.assert_close(combine_gradients(grads, w), pcgrad_project(grads, order), rtol=1e-10, atol=1e-10)


def test_pcgrad_order_matters_for_three_tasks():
    """The oracle comparison above can fail: different orders give different results here."""
    grads = torch.tensor([[1.0, 0.0, 0.0], [-0.8, 1.0, 0.2], [-0.5, -0.9, 1.0]], dtype=torch.float64)
    results = {tuple(pcgrad_weights(gram_matrix(grads), o).tolist()) for o in ([0, 1, 2], [2, 1, 0], [1, 0, 2])}
    assert len(results) > 1
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        torch.testing.assert_close(combine_gradients(grads, pcgrad_weights(gram_matrix(grads), order)),
                                   pcgrad_project(grads, order), rtol=1e-12, atol=1e-12)


def test_pcgrad_weights_hand_computed_and_no_conflict():
    conflict = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # g1^PC = g1 - (g1.g2/|g2|^2) g2 = g1 + 0.5 g2 ; g2^PC = g2 - (g2.g1/|g1|^2) g1 = g2 + g1
    torch.testing.assert_close(pcgrad_weights(gram_matrix(conflict), [0, 1]), torch.tensor([2.0, 1.5], dtype=torch.float64))
    gen = torch.Generator().manual_seed(5)
    for t in (2, 3, 5):
        grads = torch.rand(t, 17, generator=gen, dtype=torch.float64)  # positive entries: no conflict
        for order in (list(range(t)), list(reversed(range(t)))):
            torch.testing.assert_close(pcgrad_weights(gram_matrix(grads), order), torch.ones(t, dtype=torch.float64))


def test_pcgrad_weights_zero_gradient_is_never_projected_against():
    gen = torch.Generator().manual_seed(3)
    grads = _conflicting_grads(3, 40, gen)
    with_zero = torch.cat([grads, torch.zeros(1, 40, dtype=torch.float64)])
    w3 = pcgrad_weights(gram_matrix(grads), [2, 0, 1])
    w4 = pcgrad_weights(gram_matrix(with_zero), [3, 2, 0, 1])
    assert torch.isfinite(w4).all()
    torch.testing.assert_close(w4[:3], w3, rtol=1e-12, atol=1e-12)
    all_zero = pcgrad_weights(torch.zeros(3, 3), [1, 2, 0])
    torch.testing.assert_close(all_zero, torch.ones(3, dtype=torch.float64))


def test_pcgrad_weights_accepts_float32_gram_and_ignores_autograd():
    grads = _conflicting_grads(3, 25, torch.Generator().manual_seed(8)).float().requires_grad_()
    w = pcgrad_weights(grads @ grads.T, [1, 0, 2])
    assert w.dtype == torch.float64 and not w.requires_grad
    torch.testing.assert_close(w, pcgrad_weights(gram_matrix(grads.detach()), [1, 0, 2]), rtol=1e-5, atol=1e-6)


def test_pcgrad_functions_validate_input():
    with pytest.raises(ValueError, match=r"pcgrad_weights: gram must be a square \(T, T\) matrix, got \(2, 3\)"):
        pcgrad_weights(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match=r"permutation of range\(2\), got \[0, 0\]"):
        pcgrad_weights(torch.eye(2), [0, 0])
    with pytest.raises(ValueError, match="permutation"):
        pcgrad_weights(torch.eye(3), [0, 1])
    with pytest.raises(ValueError, match="pcgrad_project: order"):
        pcgrad_project(torch.ones(2, 4), [1])
    with pytest.raises(ValueError, match=r"gram_matrix: grads must be a floating \(T, P\) tensor"):
        gram_matrix(torch.ones(4))
    with pytest.raises(ValueError, match=r"combine_gradients: weights must have shape \(2,\)"):
        combine_gradients(torch.ones(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match=r"combine_gradients: out must have shape \(4,\)"):
        combine_gradients(torch.ones(2, 4), torch.ones(2), out=torch.empty(3))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_gram_and_combine_in_chunks(chunk):
    gen = torch.Generator().manual_seed(chunk)
    grads64 = torch.randn(4, 61, generator=gen, dtype=torch.float64)
    grads = grads64.float()
    w = torch.randn(4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(gram_matrix(grads, chunk=chunk), grads.double() @ grads.double().T,
                               rtol=1e-12, atol=1e-12)
    want = w @ grads.double()
    got = combine_gradients(grads, w, chunk=chunk)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    aliased = grads.clone()
    combine_gradients(aliased, w, out=aliased[0], chunk=chunk)  # writing into row 0 of the input
    torch.testing.assert_close(aliased[0].double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(aliased[1:], grads[1:], rtol=0, atol=0)


# --- PCGrad.backward ---------------------------------------------------------------------------

@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("tasks", ["abc", "ab", "bc"])
def test_pcgrad_backward_matches_oracle_and_gives_heads_their_own_gradient(tasks, joint):
    model = TinyMultitask()
    seed = 11
    order = _first_order(seed, len(tasks))
    want, per_task, heads, pair = _oracle(model, tasks, order, joint)
    assert bool((gram_matrix(per_task) < 0).any()), "the tasks must conflict on the encoder"
    w = build_weighting("pcgrad", list("abc"), seed=seed)
    info = w.backward(model.losses(tasks, joint), model.shared_parameters())
    _assert_grads(model, tasks, want, heads, pair)
    assert not torch.allclose(want, per_task.sum(0)), "PCGrad must differ from the plain sum here"
    torch.testing.assert_close(torch.tensor([info[f"pcgrad_w/{t}"] for t in tasks], dtype=torch.float64),
                               w.last_weights)


def test_pcgrad_backward_accumulates_and_reduces_by_mean():
    model = TinyMultitask()
    order = _first_order(4, 3)
    want, _, heads, pair = _oracle(model, "abc", order, scale=1 / 3)
    before = {p: torch.full_like(p, 0.25) for p in model.encoder.parameters()}
    for p, g in before.items():
        p.grad = g.clone()
    w = build_weighting("pcgrad", list("abc"), seed=4, reduction="mean")
    w.backward(model.losses(), model.shared_parameters())
    got = _flat([p.grad for p in model.encoder.parameters()]).double()
    torch.testing.assert_close(got, want + 0.25, rtol=1e-5, atol=1e-6)
    for t in "abc":
        for p, g in zip(model.heads[t].parameters(), heads[t]):
            torch.testing.assert_close(p.grad, g)
    for p, g in zip(model.pair.parameters(), pair):
        torch.testing.assert_close(p.grad, g)


def test_pcgrad_takes_one_backward_pass_per_task():
    model = TinyMultitask()
    passes = []

    def count_backward_passes(module, inputs, out):  # one call per backward pass through the encoder output
        out.register_hook(lambda grad: passes.append(1))

    model.encoder.register_forward_hook(count_backward_passes)
    calls = []
    w = build_weighting("pcgrad", list("abc"), seed=0)
    w.backward(model.losses(), model.shared_parameters(), backward=lambda loss: calls.append(loss) or loss.backward())
    assert len(passes) == 3 and not calls
    passes.clear()
    info = w.backward(model.losses("b"), model.shared_parameters(), backward=lambda loss: calls.append(loss) or loss.backward())
    assert len(passes) == 1 and len(calls) == 1 and info == {"pcgrad_w/b": 1.0}


def test_pcgrad_single_task_is_the_plain_gradient():
    model = TinyMultitask()
    loss = model.losses("c")["c"]
    want = torch.autograd.grad(loss, list(model.encoder.parameters()), retain_graph=True)
    w = build_weighting("pcgrad", list("abc"), seed=0)
    state = w.state_dict()["generator"].clone()
    w.backward({"c": loss}, model.shared_parameters())
    for p, g in zip(model.encoder.parameters(), want):
        torch.testing.assert_close(p.grad, g)
    assert torch.equal(w.state_dict()["generator"], state)  # no order drawn


def test_pcgrad_order_is_seeded_and_state_round_trips():
    a = build_weighting("pcgrad", ["x", "y", "z"], seed=7)
    b = build_weighting("pcgrad", ["x", "y", "z"], seed=7)
    c = build_weighting("pcgrad", ["x", "y", "z"], seed=8)
    orders_a = [a.draw_order(3) for _ in range(8)]
    assert orders_a == [b.draw_order(3) for _ in range(8)]
    assert orders_a != [c.draw_order(3) for _ in range(8)]

    def step(weighting):
        model = TinyMultitask()
        weighting.backward(model.losses(), model.shared_parameters())
        return _flat([p.grad for p in model.encoder.parameters()]), weighting.last_weights.clone()

    w = build_weighting("pcgrad", list("abc"), seed=1)
    step(w)
    state = w.state_dict()
    first = [step(w) for _ in range(4)]
    restored = build_weighting("pcgrad", list("abc"), seed=999)
    restored.load_state_dict(state)
    again = [step(restored) for _ in range(4)]
    for (g1, w1), (g2, w2) in zip(first, again):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
        torch.testing.assert_close(w1, w2, rtol=0, atol=0)
    assert len({tuple(wt.tolist()) for _, wt in first}) > 1, "the random order must change the weights"


def test_pcgrad_needs_a_trainable_shared_parameter():
    model = TinyMultitask()
    with pytest.raises(ValueError, match="pcgrad: shared_params holds no parameter that requires grad"):
        build_weighting("pcgrad", list("abc")).backward(model.losses(), [])


# --- GSE ---------------------------------------------------------------------------------------

def test_gse_two_update_contract():
    model = TinyMultitask()
    gse = build_weighting("gse", list("abc"), seed=2)
    pc = build_weighting("pcgrad", list("abc"), seed=2)
    assert gse.num_updates == 2 and pc.num_updates == 1
    order = _first_order(2, 3)
    want, per_task, heads, pair = _oracle(model, "abc", order)
    gse.backward(model.losses(), model.shared_parameters(), update_index=0)
    _assert_grads(model, "abc", want, heads, pair)
    model.zero_grad(set_to_none=True)
    calls = []
    info = gse.backward(model.losses(), model.shared_parameters(), update_index=1,
                        backward=lambda loss: calls.append(1) or loss.backward())
    assert calls == [1] and info == {"weight/a": 1.0, "weight/b": 1.0, "weight/c": 1.0}
    plain = _flat([p.grad for p in model.encoder.parameters()]).double()
    torch.testing.assert_close(plain, per_task.sum(0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, want, rtol=1e-3)
    # the order generator moves once per step, like PCGrad's
    pc.draw_order(3)
    assert torch.equal(gse.state_dict()["generator"], pc.state_dict()["generator"])
    with pytest.raises(ValueError, match=r"gse: update_index must be in range\(2\), got 2"):
        gse.backward(model.losses(), model.shared_parameters(), update_index=2)
    with pytest.raises(ValueError, match=r"pcgrad: update_index must be in range\(1\), got 1"):
        pc.backward(model.losses(), model.shared_parameters(), update_index=1)
    with pytest.raises(ValueError, match=r"equal: update_index must be in range\(1\)"):
        build_weighting("equal", list("abc")).backward(model.losses(), [], update_index=1)


def test_gse_mean_reduction_second_update():
    model = TinyMultitask()
    per_task = torch.stack([_flat(torch.autograd.grad(l, list(model.encoder.parameters())))
                            for l in model.losses("ab").values()]).double()
    build_weighting("gse", list("abc"), reduction="mean").backward(model.losses("ab"), model.shared_parameters(),
                                                                   update_index=1)
    torch.testing.assert_close(_flat([p.grad for p in model.encoder.parameters()]).double(), per_task.mean(0),
                               rtol=1e-5, atol=1e-6)


# --- loss-only methods ------------------------------------------------------------------------

def test_equal_on_task_subsets_and_backward_through_the_engine():
    assert build_weighting("equal", ["a", "b"]).combine({"b": torch.tensor(2.0)}).item() == 2.0
    mean = build_weighting("equal", ["a", "b", "c"], reduction="mean")
    assert mean.combine({"a": torch.tensor(1.0), "c": torch.tensor(4.0)}).item() == 2.5
    assert mean.combine({"c": torch.tensor(4.0)}).item() == 4.0
    x = torch.tensor(3.0, requires_grad=True)
    seen = []
    info = mean.backward({"a": x * 2, "b": x * x}, [x], backward=lambda loss: seen.append(loss) or loss.backward())
    assert len(seen) == 1 and seen[0].item() == pytest.approx(7.5)
    assert x.grad.item() == pytest.approx((2 + 6) / 2) and info == {"weight/a": 0.5, "weight/b": 0.5}
    with pytest.raises(ValueError, match="equal: reduction must be 'sum' or 'mean'"):
        build_weighting("equal", ["a"], reduction="max")


def test_losses_are_checked():
    w = build_weighting("equal", ["a", "b"])
    with pytest.raises(KeyError, match=r"unknown tasks \['c'\]"):
        w.combine({"c": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="no task losses"):
        w.combine({})
    with pytest.raises(ValueError, match=r"the loss of task 'a' must be a scalar tensor, got \(3,\)"):
        w.combine({"a": torch.ones(3)})
    with pytest.raises(ValueError, match="duplicate task names"):
        build_weighting("equal", ["a", "a"])
    with pytest.raises(ValueError, match="at least one task"):
        build_weighting("equal", [])


def test_fixed_weights_and_validation():
    w = build_weighting("fixed", ["a", "b"], weights={"a": 1.0, "b": 0.25})
    assert w.combine({"b": torch.tensor(2.0)}).item() == 0.5
    assert w.combine({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}).item() == 1.5
    for weights, match in [({"a": 1.0}, r"missing \['b'\]"), ({"a": 1, "b": 1, "c": 1}, r"unknown \['c'\]"),
                           ({"a": 1.0, "b": -1}, "'b' must be a finite number >= 0"),
                           ({"a": float("inf"), "b": 1}, "'a' must be a finite number"),
                           ({"a": float("nan"), "b": 1}, "'a' must be a finite number"),
                           ({"a": True, "b": 1}, "'a' must be a finite number"),
                           ({"a": "1", "b": 1}, "'a' must be a finite number"),
                           ({"a": 0, "b": 0.0}, "at least one weight must be > 0"),
                           (None, "weights must be a mapping"), ([1, 2], "weights must be a mapping")]:
        with pytest.raises(ValueError, match=match):
            build_weighting("fixed", ["a", "b"], weights=weights)


def test_uncertainty_matches_formula_and_learns():
    w = build_weighting("uncertainty", ["sst", "sts", "quora"],
                        task_kinds={"sst": "single_label_classification", "sts": "regression"})
    assert w.kinds["quora"] == "single_label_classification"
    s = {"sst": 0.3, "sts": -0.2, "quora": 0.1}
    with torch.no_grad():
        for t, v in s.items():
            w.log_vars[t].fill_(v)
    l1, l2 = torch.tensor(1.5, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    total = w.combine({"sst": l1, "sts": l2})  # a subset: quora absent
    # classification: L/σ² + log σ = exp(-s) L + s/2 ; regression: L/(2σ²) + log σ = ½ exp(-s) L + s/2
    want = math.exp(-0.3) * 1.5 + 0.15 + 0.5 * math.exp(0.2) * 0.7 - 0.1
    assert total.item() == pytest.approx(want, abs=1e-6)
    total.backward()
    grads = {t: w.log_vars[t].grad for t in s}
    assert grads["sst"].item() == pytest.approx(-math.exp(-0.3) * 1.5 + 0.5, abs=1e-6)
    assert grads["sts"].item() == pytest.approx(-0.5 * math.exp(0.2) * 0.7 + 0.5, abs=1e-6)
    assert grads["quora"] is None
    assert l1.grad.item() == pytest.approx(math.exp(-0.3)) and l2.grad.item() == pytest.approx(0.5 * math.exp(0.2))
    assert w.weights({"sst": l1, "sts": l2}) == pytest.approx({"sst": math.exp(-0.3), "sts": 0.5 * math.exp(0.2)})
    assert len(w.parameters()) == 3 and all(isinstance(p, nn.Parameter) for p in w.parameters())
    # an optimizer step moves s towards the optimum s* = log(c L): here sst's s rises (grad < 0)
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    opt.step()
    assert w.log_vars["sst"].item() > 0.3 and w.log_vars["sts"].item() < -0.2
    fresh = build_weighting("uncertainty", ["sst", "sts", "quora"])
    fresh.load_state_dict(w.state_dict())
    assert all(fresh.log_vars[t].item() == w.log_vars[t].item() for t in s)
    with pytest.raises(ValueError, match=r"task_kinds must be problem types \['single_label_classification', "):
        build_weighting("uncertainty", ["a"], task_kinds={"a": "ranking"})
    with pytest.raises(ValueError, match=r"task_kinds names unknown tasks \['b'\]"):
        build_weighting("uncertainty", ["a"], task_kinds={"b": "regression"})
    with pytest.raises(ValueError, match="init"):
        build_weighting("uncertainty", ["a"], init=float("nan"))


def test_dwa_weights_follow_the_formula_over_epochs():
    w = build_weighting("dwa", ["a", "b", "c"], temperature=2.0)
    epochs = [{"a": 1.0, "b": 1.0, "c": 2.0}, {"a": 0.5, "b": 0.9, "c": 1.9},
              {"a": 0.45, "b": 0.6, "c": 1.0}, {"a": 0.44, "b": 0.3, "c": 0.99}]
    for e, losses in enumerate(epochs):
        w.end_epoch(e, losses, {})
        got = w.weights({"a": 0, "b": 0, "c": 0})
        if e == 0:
            assert got == {"a": 1.0, "b": 1.0, "c": 1.0}
            continue
        r = {t: epochs[e][t] / epochs[e - 1][t] for t in "abc"}
        z = sum(math.exp(v / 2) for v in r.values())
        want = {t: 3 * math.exp(r[t] / 2) / z for t in "abc"}
        assert got == pytest.approx(want, abs=1e-12)
        assert sum(got.values()) == pytest.approx(3.0)
    assert w.weights({"b": 0}) == {"b": got["b"]}  # a subset of tasks
    restored = build_weighting("dwa", ["a", "b", "c"])
    restored.load_state_dict(w.state_dict())
    extra = {"a": 0.4, "b": 0.3, "c": 0.5}
    w.end_epoch(4, extra, {})
    restored.end_epoch(4, extra, {})
    assert restored.weights(extra) == w.weights(extra)
    # an epoch without a loss for some task keeps the weights
    before = w.weights(extra)
    w.end_epoch(5, {"a": 0.3, "b": 0.2}, {})
    assert w.weights(extra) == before
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        build_weighting("dwa", ["a"], temperature=0)


def test_dev_score_weights_favour_weaker_tasks():
    w = build_weighting("dev_score", ["sst", "quora", "sts"])
    assert w.weights({"sst": 0}) == {"sst": 1.0}
    w.end_epoch(0, {}, {"sst": 0.5, "quora": 0.8, "sts": 0.6})  # sts is Pearson r: q = (0.6 + 1) / 2 = 0.8
    got = w.weights({"sst": 0, "quora": 0, "sts": 0})
    assert sum(got.values()) == pytest.approx(3.0)
    assert got == pytest.approx({"sst": 3 * 0.5 / 0.9, "quora": 3 * 0.2 / 0.9, "sts": 3 * 0.2 / 0.9})
    # gamma, floor, explicit kinds, NaN as the worst score
    w = build_weighting("dev_score", ["a", "b", "c"], gamma=2.0, floor=0.1,
                        task_kinds={"a": "single_label_classification", "b": "regression"})
    w.end_epoch(0, {}, {"a": 0.99, "b": -0.2, "c": float("nan")})
    m = {"a": 0.1 ** 2, "b": (1 - 0.4) ** 2, "c": 1.0}
    assert w.weights({"a": 0, "b": 0, "c": 0}) == pytest.approx({t: 3 * v / sum(m.values()) for t, v in m.items()})
    before = w.weights({"a": 0, "b": 0, "c": 0})
    w.end_epoch(1, {}, {"a": 0.5})  # a missing task keeps the weights
    assert w.weights({"a": 0, "b": 0, "c": 0}) == before
    restored = build_weighting("dev_score", ["a", "b", "c"])
    restored.load_state_dict(w.state_dict())
    assert restored.weights({"a": 0, "b": 0, "c": 0}) == before
    with pytest.raises(ValueError, match=r"classification task 'a' must lie in \[0, 1\], got 1.5"):
        w.end_epoch(2, {}, {"a": 1.5, "b": 0.0, "c": 0.5})
    with pytest.raises(ValueError, match=r"regression task 'b' must lie in \[-1, 1\]"):
        w.end_epoch(2, {}, {"a": 0.5, "b": -1.5, "c": 0.5})
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        build_weighting("dev_score", ["a"], gamma=-1)
    with pytest.raises(ValueError, match="task_kinds must be"):
        build_weighting("dev_score", ["a"], task_kinds={"a": "ordinal"})


# --- registry ------------------------------------------------------------------------------------

def test_registry_builds_every_method_and_errors_clearly():
    assert set(WEIGHTINGS) == {"equal", "fixed", "uncertainty", "dwa", "dev_score", "pcgrad", "gse"}
    for name, cls in WEIGHTINGS.items():
        options = {"weights": {"a": 1.0, "b": 2.0}} if name == "fixed" else {}
        w = build_weighting(name, ["a", "b"], **options)
        assert isinstance(w, cls) and isinstance(w, Weighting) and w.name == name and w.tasks == ["a", "b"]
        x = torch.tensor(2.0, requires_grad=True)
        w.backward({"a": x * x, "b": 3 * x}, [x])
        assert x.grad is not None and math.isfinite(x.grad.item())
        w.load_state_dict(w.state_dict())
    with pytest.raises(ValueError, match=r"unknown method 'nope'; expected one of \['dev_score', 'dwa'"):
        build_weighting("nope", ["a"])
    with pytest.raises(ValueError, match=r"unknown option 'tau' for 'dwa'; valid options: \['temperature'\]"):
        build_weighting("dwa", ["a"], tau=1)
    with pytest.raises(ValueError, match="pcgrad: seed must be an int"):
        build_weighting("pcgrad", ["a"], seed="1")
