"""symmetric_kl (kernels/symmetric_kl.py): loss and both gradients vs the plain-torch reference and the
textbook log_softmax formula, in float64 and by the 2x rule (kernel_checks.py), near-equal and extreme logits."""
import importlib
import zlib

import pytest
import torch
from kernel_checks import FLOOR, FLOOR64, assert_2x, assert_close64, assert_raises_named, seeded, via_cuda
from kernel_checks import zeros as _d

from minbert.kernels.symmetric_kl import binary_to_two_class_logits, symmetric_kl_reference

kl_mod = importlib.import_module("minbert.kernels.symmetric_kl")

# the Triton entry point under test (validation-error tests below call the original)
symmetric_kl = via_cuda(kl_mod.symmetric_kl)

pytestmark = pytest.mark.usefixtures("poison")


def _naive_sym_kl(p, q):
    """Independent oracle: the textbook formula with log_softmax, per row."""
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1)


def _reduce(rows, shape, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / rows.numel()
    return rows.sum() / (rows.numel() * shape[-1])


def _kl_inputs(shape, dtype, gen, spread=3.0, near=None):
    p = torch.randn(*shape, generator=gen, dtype=torch.float64) * spread
    if near is None:
        q = torch.randn(*shape, generator=gen, dtype=torch.float64) * spread
    else:
        q = p + near * torch.randn(*shape, generator=gen, dtype=torch.float64)
    return p.to(dtype), q.to(dtype)


def _loss_and_grads(fn, p, q, reduction, weight=None):
    p = p.detach().clone().requires_grad_(True)
    q = q.detach().clone().requires_grad_(True)
    loss = fn(p, q, reduction)
    total = (loss * weight).sum() if weight is not None else loss.sum()
    dp, dq = torch.autograd.grad(total, (p, q))
    return loss.detach(), dp, dq


KL_SHAPES = [(7, 5), (3, 4, 37), (6, 1), (5, 2), (2, 1000), (5,)]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


@pytest.mark.parametrize("shape", KL_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_symmetric_kl_float64_forward_and_both_gradients(triton_backend, shape, reduction):
    gen = seeded(zlib.crc32(repr((shape, reduction)).encode()))
    p, q = _kl_inputs(shape, torch.float64, gen)
    weight = torch.rand(shape[:-1], generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else None
    out, dp, dq = _loss_and_grads(symmetric_kl, p, q, reduction, weight)
    ref, rdp, rdq = _loss_and_grads(symmetric_kl_reference, p, q, reduction, weight)
    assert out.shape == ref.shape == (shape[:-1] if reduction == "none" else ())
    assert_close64(out, ref, f"loss {reduction}")
    assert_close64(dp, rdp, f"d/dp {reduction}")
    assert_close64(dq, rdq, f"d/dq {reduction}")
    # and against the independent textbook formula
    nv, ndp, ndq = _loss_and_grads(lambda a, b, r: _reduce(_naive_sym_kl(a, b), a.shape, r), p, q, reduction, weight)
    for got, want, what in ((out, nv, "loss"), (dp, ndp, "d/dp"), (dq, ndq, "d/dq")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{what} vs log_softmax formula")


@pytest.mark.parametrize("C,block_c", [(37, 8), (1000, 64), (5, 2)])
def test_symmetric_kl_chunked_columns(triton_backend, C, block_c):
    """Rows longer than one column block: the online log-sum-exp loop over chunks."""
    gen = seeded(C)
    p, q = _kl_inputs((4, C), torch.float64, gen)
    p.requires_grad_(True)
    q.requires_grad_(True)
    rows = via_cuda(kl_mod._SymmetricKLFunction.apply)(p, q, block_c)
    w = torch.rand(4, generator=gen, dtype=torch.float64)
    dp, dq = torch.autograd.grad((rows * w).sum(), (p, q))
    ref = symmetric_kl_reference(p, q, "none")
    rdp, rdq = torch.autograd.grad((ref * w).sum(), (p, q))
    assert_close64(rows.detach(), ref.detach(), "loss")
    assert_close64(dp, rdp, "d/dp")
    assert_close64(dq, rdq, "d/dq")


@pytest.mark.parametrize("near", [None, 1e-2, 1e-5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_symmetric_kl_low_precision_within_2x_torch(triton_backend, near, dtype, reduction):
    gen = seeded(23)
    p, q = _kl_inputs((33, 5), dtype, gen, near=near)
    weight = torch.rand(33, generator=gen, dtype=torch.float64).to(dtype) if reduction == "none" else None
    out, dp, dq = _loss_and_grads(symmetric_kl, p, q, reduction, weight)
    plain, pdp, pdq = _loss_and_grads(symmetric_kl_reference, p, q, reduction, weight)
    w64 = weight.double() if weight is not None else None
    oracle, odp, odq = _loss_and_grads(symmetric_kl_reference, p.double(), q.double(), reduction, w64)
    assert out.dtype == dp.dtype == dq.dtype == dtype
    floor = FLOOR if dtype == torch.float32 else 1e-3
    assert_2x(out, plain, oracle, f"loss {dtype} near={near}", floor)
    assert_2x(dp, pdp, odp, f"d/dp {dtype} near={near}", floor)
    assert_2x(dq, pdq, odq, f"d/dq {dtype} near={near}", floor)


def test_symmetric_kl_keeps_precision_for_nearly_equal_logits(triton_backend):
    """SMART's regime: logits differ by ~1e-6. The textbook float32 formula loses every digit of
    the loss there; the expm1/log1p formulation keeps ~1e-6 relative precision."""
    gen = seeded(29)
    p = torch.randn(64, 5, generator=gen, dtype=torch.float64) * 3
    q = p + 1e-6 * torch.randn(64, 5, generator=gen, dtype=torch.float64)
    p32, q32 = p.float(), q.float()
    oracle = _naive_sym_kl(p32.double(), q32.double())
    rel = lambda x: ((x.double() - oracle).abs() / oracle.abs()).max().item()  # noqa: E731
    assert rel(symmetric_kl(p32, q32, "none")) < 1e-4
    assert rel(symmetric_kl_reference(p32, q32, "none")) < 1e-4
    assert rel(_naive_sym_kl(p32, q32)) > 1e-2  # the data does exercise the cancellation


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_symmetric_kl_extreme_logits_are_finite(triton_backend, dtype):
    """Logits of ±1e4: probabilities underflow to 0, the loss and gradients stay finite and as
    accurate as torch's log_softmax formula (run in the compute precision) -- 2x rule."""
    gen = seeded(31)
    sign = torch.randint(0, 2, (6, 5), generator=gen).double() * 2 - 1
    p = (1e4 * sign).to(dtype)
    q = (1e4 * torch.randn(6, 5, generator=gen, dtype=torch.float64)).clamp(-6e4, 6e4).to(dtype)
    q[0] = p[0]  # identical rows: loss exactly 0
    q[1] = -p[1]
    oracle, odp, odq = _loss_and_grads(_naive_sym_kl_red, p.double(), q.double(), "none")
    assert oracle[1:].min() > 1e3  # the probabilities really underflow (rows 1.. are far apart)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    plain = [t.to(dtype) for t in _loss_and_grads(_naive_sym_kl_red, p.to(acc), q.to(acc), "none")]
    floor = FLOOR64 if dtype == torch.float64 else FLOOR
    for fn in (symmetric_kl, symmetric_kl_reference):
        out, dp, dq = _loss_and_grads(fn, p, q, "none")
        for got, base, want, what in zip((out, dp, dq), plain, (oracle, odp, odq), ("loss", "d/dp", "d/dq")):
            assert_2x(got, base, want, f"{fn.__name__} {what} {dtype}", floor)
        assert out[0] == 0


def _naive_sym_kl_red(p, q, reduction):
    return _reduce(_naive_sym_kl(p, q), p.shape, reduction)


def test_symmetric_kl_one_side_detached(triton_backend):
    """SMART's use: the clean prediction is detached; only the perturbed side gets a gradient."""
    gen = seeded(37)
    p, q = _kl_inputs((9, 5), torch.float64, gen)
    p.requires_grad_(True)
    out = symmetric_kl(p, q)
    (dp,) = torch.autograd.grad(out, p)
    p2 = p.detach().clone().requires_grad_(True)
    (rdp,) = torch.autograd.grad(symmetric_kl_reference(p2, q), p2)
    assert_close64(dp, rdp, "d/dp")
    q.requires_grad_(True)
    (dq,) = torch.autograd.grad(symmetric_kl(p.detach(), q, "sum"), q)
    q2 = q.detach().clone().requires_grad_(True)
    (rdq,) = torch.autograd.grad(symmetric_kl_reference(p.detach(), q2, "sum"), q2)
    assert_close64(dq, rdq, "d/dq")


def test_symmetric_kl_non_contiguous(triton_backend):
    gen = seeded(41)
    base_p = torch.randn(5, 14, generator=gen, dtype=torch.float64)
    base_q = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    p = base_p[:, ::2].requires_grad_(False)  # (5, 7), column stride 2
    q = base_q.t()  # (5, 7) transposed
    out, dp, dq = _loss_and_grads(symmetric_kl, p, q, "sum")
    ref, rdp, rdq = _loss_and_grads(symmetric_kl_reference, p.contiguous(), q.contiguous(), "sum")
    assert_close64(out, ref, "loss")
    assert_close64(dp, rdp, "d/dp")
    assert_close64(dq, rdq, "d/dq")


def test_binary_to_two_class_logits_gives_bernoulli_symmetric_kl(triton_backend):
    gen = seeded(43)
    zp = (torch.randn(11, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    zq = (torch.randn(11, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    two = binary_to_two_class_logits(zp)
    assert two.shape == (11, 2) and (two[:, 0] == 0).all() and torch.equal(two[:, 1], zp)
    out = symmetric_kl(two, binary_to_two_class_logits(zq), "none")
    sp, sq = torch.sigmoid(zp), torch.sigmoid(zq)
    expected = (sp - sq) * (zp - zq)
    assert_close64(out.detach(), expected.detach(), "Bernoulli symmetric KL")
    dzp, dzq = torch.autograd.grad(out.sum(), (zp, zq))
    want_p = sp * (1 - sp) * (zp - zq) + (sp - sq)
    assert_close64(dzp, want_p.detach(), "d/dz_p")
    assert_close64(dzq, -(sq * (1 - sq) * (zp - zq)).detach() - (sp - sq).detach(), "d/dz_q")


def test_poisoned_outputs_are_fully_written(triton_backend):
    """With poisoned buffers the loss and both gradients, including the column/row tails of the last
    block, come back NaN-free."""
    p, q = _kl_inputs((17, 5), torch.float32, seeded(47))
    p.requires_grad_(True)
    q.requires_grad_(True)
    rows = symmetric_kl(p, q, "none")
    assert not torch.isnan(rows).any()
    dp, dq = torch.autograd.grad(rows.sum(), (p, q))
    assert not torch.isnan(dp).any() and not torch.isnan(dq).any()


def test_dispatch_reference_backend_never_launches_kernels(reference_backend, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton path used under MINBERT_KERNEL_BACKEND=reference")

    monkeypatch.setattr(kl_mod._SymmetricKLFunction, "apply", boom)
    p, q = _kl_inputs((4, 3), torch.float64, seeded(53))
    assert torch.equal(kl_mod.symmetric_kl(p, q), symmetric_kl_reference(p, q))


def test_dispatch_triton_backend_never_uses_torch_path(triton_backend, monkeypatch):
    p, q = _kl_inputs((4, 3), torch.float64, seeded(59))
    ref_kl = symmetric_kl_reference(p, q)

    def boom(*a, **k):
        raise AssertionError("torch path used under MINBERT_KERNEL_BACKEND=triton")

    monkeypatch.setattr(kl_mod, "_symmetric_kl_torch", boom)
    assert_close64(symmetric_kl(p, q), ref_kl, "kl")


KL_ERRORS = [
    (lambda: ((_d(3, 5), _d(3, 4)), {}), ValueError, r"same shape \(\.\.\., C\)"),
    (lambda: ((_d(3, 5), _d(3, 5, dtype=torch.float64)), {}), TypeError, r"'q_logits' has dtype torch.float64"),
    (lambda: ((_d(3, 5, dtype=torch.int32),) * 2, {}), TypeError, r"'p_logits' must be a floating-point"),
    (lambda: ((_d(3, 5), _d(3, 5, device="meta")), {}), ValueError, r"'q_logits' is on meta"),
    (lambda: ((torch.tensor(1.0), torch.tensor(2.0)), {}), ValueError, r"at least 1 dimension"),
    (lambda: ((_d(0, 5), _d(0, 5)), {}), ValueError, r"are empty"),
    (lambda: ((_d(3, 5), _d(3, 5)), {"reduction": "avg"}), ValueError, r"'reduction' must be one of"),
]


@pytest.mark.parametrize("case", range(len(KL_ERRORS)))
@pytest.mark.parametrize("fn", [kl_mod.symmetric_kl, symmetric_kl_reference])
def test_symmetric_kl_validation_errors(any_backend, fn, case):
    make, exc, pattern = KL_ERRORS[case]
    assert_raises_named(fn, exc, pattern, *make())
