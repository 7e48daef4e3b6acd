"""Losses against direct per-example formulas written out by hand in float64, plus validation."""
import math

import pytest
import torch
import torch.nn.functional as F

from minbert.losses import (
    LOSSES,
    bce_with_logits,
    build_loss,
    cosine_embedding,
    cosine_labels,
    cross_entropy,
    loss_options,
    mnrl,
    mse,
    simcse_sup,
    cosent,
    simcse_unsup,
)

D = 6


def _cos(x, y):
    return (x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum())


def _emb(b, scale=True, dtype=torch.float64):
    """Embeddings with unequal norms, so a dot product in place of the cosine would show."""
    x = torch.randn(b, D, dtype=dtype)
    if scale:
        x = x * torch.linspace(0.3, 4.0, b, dtype=dtype).unsqueeze(1)
    return x.requires_grad_(True)


def infonce_loop(anchor, candidates_per_anchor, positive_index, scale):
    """−(1/B) Σ_i log( exp(s·cos(a_i, c_i,p)) / Σ_j exp(s·cos(a_i, c_j)) ), one term at a time."""
    total = 0.0
    for i in range(anchor.shape[0]):
        logits = [scale * _cos(anchor[i], c) for c in candidates_per_anchor]
        den = sum(torch.exp(z) for z in logits)
        total = total - torch.log(torch.exp(logits[positive_index(i)]) / den)
    return total / anchor.shape[0]


def assert_loss_and_grads_match(fn, ref, inputs, rtol=1e-9, atol=1e-12):
    got = fn(*inputs)
    want = ref(*inputs)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    g_got = torch.autograd.grad(got, inputs)
    g_want = torch.autograd.grad(want, inputs)
    for name, a, b in zip(range(len(inputs)), g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=lambda m: f"input {name}: {m}")


# --- contrastive losses vs loop formulas -----------------------------------------------------

@pytest.mark.parametrize("b,tau", [(1, 0.05), (5, 0.05), (7, 0.5)])
def test_simcse_unsup_matches_loop(b, tau):
    z1, z2 = _emb(b), _emb(b)

    def ref(z1, z2):  # Gao et al. 2021 eq. 4
        return infonce_loop(z1, list(z2), lambda i: i, 1.0 / tau)

    assert_loss_and_grads_match(lambda a, c: simcse_unsup(a, c, temperature=tau), ref, (z1, z2))
    if b == 1:  # one sentence: its only candidate is its positive
        assert float(simcse_unsup(z1, z2).detach()) == pytest.approx(0.0, abs=1e-12)
    assert simcse_unsup(z1, z2, temperature=tau).dtype == torch.float64


def test_simcse_unsup_is_asymmetric_in_its_targets():
    # Swapping the views changes the loss in general (rows are z1, columns z2): catches a transposed target.
    z1, z2 = _emb(5), _emb(5)
    z2b = z2.detach().clone()
    z2b[0] = 3 * z1.detach()[0]  # a very good positive for row 0
    assert simcse_unsup(z1, z2b) < simcse_unsup(z1, z2)


@pytest.mark.parametrize("b", [1, 4, 6])
def test_simcse_sup_matches_loop_with_hard_negatives(b):
    a, p, n = _emb(b), _emb(b), _emb(b)
    tau = 0.05

    def ref(a, p, n):  # Gao et al. 2021 eq. 5: denominators over all positives and all hard negatives
        return infonce_loop(a, list(p) + list(n), lambda i: i, 1.0 / tau)

    assert_loss_and_grads_match(lambda x, y, z: simcse_sup(x, y, z, temperature=tau), ref, (a, p, n))
    # Without hard negatives it reduces to the in-batch loss over positives only.
    torch.testing.assert_close(simcse_sup(a, p), simcse_unsup(a, p))
    # Hard negatives only add terms to the denominator: the loss can only grow.
    assert simcse_sup(a, p, n) > simcse_sup(a, p)


def test_simcse_sup_negative_mask_leaves_out_missing_hard_negatives():
    """Rows without a contradiction hypothesis: their h⁻ column is in no denominator (and gets no gradient)."""
    a, p, n = _emb(5), _emb(5), _emb(5)
    has = torch.tensor([True, False, True, True, False])
    tau = 0.1

    def ref(a, p, n):
        return infonce_loop(a, list(p) + [n[j] for j in range(5) if has[j]], lambda i: i, 1.0 / tau)

    assert_loss_and_grads_match(lambda x, y, z: simcse_sup(x, y, z, temperature=tau, negative_mask=has), ref, (a, p, n))
    g = torch.autograd.grad(simcse_sup(a, p, n, temperature=tau, negative_mask=has), n)[0]
    assert bool((g[~has] == 0).all()) and bool((g[has] != 0).any())
    torch.testing.assert_close(simcse_sup(a, p, n, negative_mask=torch.ones(5, dtype=torch.bool)), simcse_sup(a, p, n))
    with pytest.raises(ValueError, match=r"negative_mask must be a bool tensor of shape \(5,\)"):
        simcse_sup(a, p, n, negative_mask=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("scale", [20.0, 1.0])
def test_mnrl_matches_loop(scale):
    a, p = _emb(5), _emb(5)

    def ref(a, p):  # Henderson et al. 2017: L = −(1/B) Σ_i [S(a_i, p_i) − log Σ_j exp S(a_i, p_j)]
        total = 0.0
        for i in range(a.shape[0]):
            s = torch.stack([scale * _cos(a[i], p[j]) for j in range(p.shape[0])])
            total = total - (s[i] - torch.log(torch.exp(s).sum()))
        return total / a.shape[0]

    assert_loss_and_grads_match(lambda x, y: mnrl(x, y, scale=scale), ref, (a, p))


def test_mnrl_with_hard_negatives_matches_loop():
    a, p, n = _emb(4), _emb(4), _emb(4)
    assert_loss_and_grads_match(lambda x, y, z: mnrl(x, y, negative=z),
                                lambda x, y, z: infonce_loop(x, list(y) + list(z), lambda i: i, 20.0), (a, p, n))


def test_contrastive_losses_float32_close_to_float64():
    a, p, n = (_emb(8, dtype=torch.float64).detach() for _ in range(3))
    for fn, args in ((simcse_unsup, (a, p)), (simcse_sup, (a, p, n)), (mnrl, (a, p))):
        exact = fn(*args)
        approx = fn(*(t.float() for t in args))
        assert approx.dtype == torch.float32
        assert abs(float(approx) - float(exact)) <= 1e-5 * max(1.0, abs(float(exact))), fn.__name__


def test_gradcheck_contrastive_losses():
    a, p, n = _emb(3), _emb(3), _emb(3)
    assert torch.autograd.gradcheck(lambda x, y, z: simcse_sup(x, y, z, temperature=0.5), (a, p, n))
    assert torch.autograd.gradcheck(lambda x, y: mnrl(x, y, scale=2.0), (a, p))


# --- cosine embedding loss -----------------------------------------------------------------------

@pytest.mark.parametrize("margin", [0.0, 0.3, -0.2])
def test_cosine_embedding_matches_loop_and_torch(margin):
    u, v = _emb(6), _emb(6)
    y = torch.tensor([1, -1, 1, -1, -1, 1])

    def ref(u, v):
        terms = [1 - _cos(u[i], v[i]) if y[i] > 0 else torch.clamp(_cos(u[i], v[i]) - margin, min=0)
                 for i in range(len(y))]
        return sum(terms) / len(terms)

    assert_loss_and_grads_match(lambda a, b: cosine_embedding(a, b, y, margin=margin), ref, (u, v))
    torch.testing.assert_close(cosine_embedding(u, v, y, margin=margin),
                               torch.nn.CosineEmbeddingLoss(margin=margin)(u, v, y))


def test_cosine_labels_from_paraphrase_and_threshold():
    assert cosine_labels(torch.tensor([0.0, 1.0, 1.0])).tolist() == [-1, 1, 1]
    assert cosine_labels(torch.tensor([1, 0])).tolist() == [1, -1]
    assert cosine_labels(torch.tensor([-1, 1])).tolist() == [-1, 1]
    assert cosine_labels(torch.tensor([0.2, 2.5, 4.8]), threshold=2.5).tolist() == [-1, 1, 1]
    u, v = _emb(3).detach(), _emb(3).detach()
    torch.testing.assert_close(cosine_embedding(u, v, torch.tensor([0.0, 1.0, 0.0])),
                               cosine_embedding(u, v, torch.tensor([-1, 1, -1])))
    torch.testing.assert_close(cosine_embedding(u, v, torch.tensor([1.0, 3.9, 0.4]), threshold=2.5),
                               cosine_embedding(u, v, torch.tensor([-1, 1, -1])))
    with pytest.raises(ValueError, match=r"±1 or 0/1 labels.*threshold="):
        cosine_embedding(u, v, torch.tensor([0.5, 3.0, 1.0]))


# --- task losses ---------------------------------------------------------------------------------

def test_task_losses_match_torch_and_formulas():
    logits, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 4, 2, 2])
    manual = -sum(math.log(math.exp(float(logits[i, y[i]])) / float(torch.exp(logits[i]).sum())) for i in range(4)) / 4
    assert float(cross_entropy(logits, y)) == pytest.approx(manual, rel=1e-12)
    torch.testing.assert_close(cross_entropy(logits, y, label_smoothing=0.1), F.cross_entropy(logits, y, label_smoothing=0.1))
    z, t = torch.randn(5, dtype=torch.float64), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    manual = -sum(float(t[i]) * math.log(sig(float(z[i]))) + (1 - float(t[i])) * math.log(1 - sig(float(z[i])))
                  for i in range(5)) / 5
    assert float(bce_with_logits(z, t)) == pytest.approx(manual, rel=1e-12)
    assert float(bce_with_logits(z, t.long())) == pytest.approx(manual, rel=1e-12)  # 0/1 integers too
    torch.testing.assert_close(bce_with_logits(z, t, pos_weight=3.0),
                               F.binary_cross_entropy_with_logits(z, t, pos_weight=torch.tensor(3.0, dtype=torch.float64)))
    s, g = torch.randn(5, dtype=torch.float64), 5 * torch.rand(5, dtype=torch.float64)
    assert float(mse(s, g)) == pytest.approx(float(((s - g) ** 2).mean()), rel=1e-12)


@pytest.mark.parametrize("b", [2, 7])
def test_cosent_matches_loop(b):
    out = torch.randn(b, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 0.2, 2.6], dtype=torch.float64)[:b]  # a tie (1.0, 1.0)

    def ref(o):
        total = torch.ones((), dtype=o.dtype)
        for i in range(b):
            for j in range(b):
                if target[i] > target[j]:
                    total = total + torch.exp(4.0 * (o[j] - o[i]))
        return torch.log(total)

    assert_loss_and_grads_match(lambda o: cosent(o, target, scale=4.0), ref, (out,))
    # only the order of the targets counts, and a perfectly ordered, well separated output costs ~0
    torch.testing.assert_close(cosent(out, target), cosent(out, 3 * target + 1))
    assert float(cosent(10 * target, target)) < 1e-6
    assert float(cosent(out[:1].detach(), target[:1])) == 0.0  # one example: no ordered pair
    with pytest.raises(TypeError, match="cosent: argument 'target' must be a floating-point tensor"):
        cosent(out, torch.arange(b))
    with pytest.raises(ValueError, match="scale"):
        build_loss("cosent", scale=0)


def test_task_loss_errors():
    with pytest.raises(TypeError, match="cross_entropy: argument 'target' must have dtype"):
        cross_entropy(torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"class 5, outside \[0, C\) = \[0, 5\)"):
        cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match=r"cross_entropy: argument 'output' must have 2 dimensions \(B, C\)"):
        cross_entropy(torch.randn(3), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"bce_with_logits: argument 'target' must have shape \(B,\)"):
        bce_with_logits(torch.randn(3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels in \[0, 1\]"):
        bce_with_logits(torch.randn(2), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match=r"bce_with_logits: argument 'output' must have 1 dimensions \(B,\)"):
        bce_with_logits(torch.randn(2, 1), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="mse: argument 'target' must be a floating-point"):
        mse(torch.randn(2), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="mse: argument 'output' must be a floating-point"):
        mse(torch.tensor([1, 2]), torch.randn(2))


def test_embedding_loss_errors():
    a = torch.randn(4, D)
    with pytest.raises(ValueError, match=r"simcse_unsup: argument 'z2' must have shape \(B, D\)"):
        simcse_unsup(a, torch.randn(3, D))
    with pytest.raises(ValueError, match=r"simcse_unsup: argument 'z1' must have 2 dimensions"):
        simcse_unsup(torch.randn(4), torch.randn(4))
    with pytest.raises(TypeError, match="simcse_sup: argument 'hard_negative' has dtype torch.float64"):
        simcse_sup(a, a.clone(), a.double())
    with pytest.raises(TypeError, match="mnrl: argument 'anchor' must be a floating-point"):
        mnrl(torch.ones(4, D, dtype=torch.long), torch.ones(4, D, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature' must be a finite number > 0"):
        simcse_unsup(a, a, temperature=0.0)
    with pytest.raises(ValueError, match="empty batch"):
        mnrl(torch.randn(0, D), torch.randn(0, D))
    with pytest.raises(ValueError, match=r"margin must be a number in \[-1, 1\]"):
        cosine_embedding(a, a, torch.ones(4), margin=2.0)


# --- registry ------------------------------------------------------------------------------------

def test_build_loss_registry():
    assert set(LOSSES) == {"cross_entropy", "bce_with_logits", "mse", "cosine_embedding", "simcse_unsup",
                           "simcse_sup", "mnrl", "cosent"}
    loss = build_loss("simcse_unsup", temperature=0.1)
    assert loss.inputs == ("z1", "z2") and loss.kind == "embedding"
    z1, z2 = torch.randn(4, D), torch.randn(4, D)
    torch.testing.assert_close(loss(z1, z2), simcse_unsup(z1, z2, temperature=0.1))
    assert build_loss("mse").inputs == ("output", "target") and build_loss("mse").kind == "task"
    assert build_loss("simcse_sup").inputs == ("anchor", "positive", "hard_negative")
    assert loss_options("mnrl") == ("scale",)
    with pytest.raises(ValueError, match=r"unknown loss 'simcse'; valid losses: \[.*'simcse_sup', 'simcse_unsup'\]"):
        build_loss("simcse")
    with pytest.raises(ValueError, match=r"loss 'simcse_unsup': unknown option 'tau'; valid options: \['temperature'\]"):
        build_loss("simcse_unsup", tau=0.05)
    with pytest.raises(ValueError, match="'temperature' must be a finite number > 0"):
        build_loss("simcse_sup", temperature=-1)
    with pytest.raises(ValueError, match="'scale' must be a finite number > 0"):
        build_loss("mnrl", scale=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss("cross_entropy", label_smoothing=1.0)
