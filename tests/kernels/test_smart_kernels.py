"""SMART kernels (kernels/smart.py) vs their plain-torch references.

Every test runs with ``MINBERT_KERNEL_POISON=1`` (kernel outputs start as NaN), so an element a
kernel forgets to write fails the comparison. Tolerance rule: the kernel's max error against the
float64 reference must be <= 2x plain torch's (the reference run in the kernel's precision) plus
a tiny floor relative to the magnitude. On CPU the kernels run in Triton's interpreter.
"""
import functools
import importlib
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

from minbert.kernels import _dispatch
from minbert.kernels.smart import (
    binary_to_two_class_logits,
    smart_noise_reference,
    smart_perturb_step_reference,
    symmetric_kl_reference,
)

smart_mod = importlib.import_module("minbert.kernels.smart")


def _via_cuda(fn):
    """On a CUDA machine the tests' CPU inputs run through the compiled kernels on the GPU.

    CPU tensors go to the GPU (autograd follows the copies back to the CPU leaves), the result
    comes back to the device the inputs were on, and the references stay on the CPU. ``smart_noise``
    without a device argument (or with the CPU) draws on the GPU. Elsewhere ``fn`` is returned
    as is: the kernels then run in Triton's interpreter on the CPU tensors themselves.
    """
    if not torch.cuda.is_available():
        return fn

    def to_gpu(x):
        return x.to("cuda") if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x

    @functools.wraps(fn)
    def run(*args, **kwargs):
        origin = next((x.device for x in list(args) + list(kwargs.values()) if isinstance(x, torch.Tensor)), None)
        if "device" in kwargs or fn.__name__ == "smart_noise":
            origin = torch.device(kwargs.get("device") or "cpu")
            if origin.type == "cpu":
                kwargs["device"] = "cuda"
        out = fn(*map(to_gpu, args), **{k: to_gpu(v) for k, v in kwargs.items()})
        return out.to(origin) if origin is not None else out

    return run


# the Triton entry points under test (validation-error tests below call the originals)
smart_perturb_step = _via_cuda(smart_mod.smart_perturb_step)
symmetric_kl = _via_cuda(smart_mod.symmetric_kl)
smart_noise = _via_cuda(smart_mod.smart_noise)

FLOOR = 1e-6  # relative to the reference's magnitude (float32/16 comparisons)
FLOOR64 = 1e-12  # float64 kernel vs float64 reference


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv(smart_mod.POISON_ENV, "1")
    yield


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_2x(kernel, plain, oracle, what, floor=FLOOR):
    """max|kernel - oracle| <= 2·max|plain - oracle| + floor·max|oracle| (+ a denormal floor)."""
    oracle = oracle.double()
    assert torch.isfinite(kernel).all(), f"{what}: kernel output has NaN/Inf"
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    err_k = (kernel.double() - oracle).abs().max().item() if oracle.numel() else 0.0
    err_t = (plain.double() - oracle).abs().max().item() if oracle.numel() else 0.0
    bound = 2 * err_t + floor * scale + 1e-30
    assert err_k <= bound, (
        f"{what}: kernel error {err_k:.3e} > bound {bound:.3e} (torch error {err_t:.3e}, scale {scale:.3e})"
    )


def _assert_close64(kernel, ref, what):
    assert kernel.dtype == ref.dtype, what
    assert torch.isfinite(kernel).all(), f"{what}: kernel output has NaN/Inf"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (kernel - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= FLOOR64 * scale + 1e-300, f"{what}: float64 error {err:.3e} (scale {scale:.3e})"


# =====================================================================================
# smart_perturb_step
# =====================================================================================


def _token_mask(kind, B, L, gen):
    """(B, L) mask. pad: right padding, row 0 full; holes: arbitrary 0/1 ints, last row all padding."""
    if kind == "none":
        return None
    if kind == "pad":
        lengths = torch.randint(1, L + 1, (B,), generator=gen)
        lengths[0] = L
        return torch.arange(L)[None, :] < lengths[:, None]
    m = (torch.rand(B, L, generator=gen) < 0.6).to(torch.int64)
    m[0, 0] = 1
    m[-1] = 0
    return m


def _perturb_inputs(B, L, H, dtype, gen):
    """δ with per-token scales in [0.1, 2] and g with per-token scales over 6 decades."""
    f64 = torch.float64
    d = torch.randn(B, L, H, generator=gen, dtype=f64) * (0.1 + 1.9 * torch.rand(B, L, 1, generator=gen, dtype=f64))
    g = torch.randn(B, L, H, generator=gen, dtype=f64) * 10.0 ** (6 * torch.rand(B, L, 1, generator=gen, dtype=f64) - 3)
    return d.to(dtype), g.to(dtype)


def _epsilon(rule, norm, level, d, eta):
    """ε that puts the boundary in the middle of the data, so both sides of Π are exercised."""
    if rule == "mtdnn":
        return 1e-5
    if norm == "inf":
        return 0.8
    dims = (-1,) if level == "token" else (-2, -1)
    return torch.linalg.vector_norm(d.double(), dim=dims).median().item() + 0.5 * eta


PERTURB_CASES = [
    # (B, L, H, mask kind)
    (3, 7, 37, "pad"),
    (2, 13, 384, "holes"),
    (3, 13, 37, "none"),
    (1, 1, 1, "none"),
]
RULE_NORM_LEVEL = [(r, n, lv) for r in ("projection", "mtdnn") for n in ("inf", "l2") for lv in ("token", "sequence")]


@pytest.mark.parametrize("B,L,H,mask_kind", PERTURB_CASES)
@pytest.mark.parametrize("rule,norm,level", RULE_NORM_LEVEL)
def test_perturb_float64_matches_reference(triton_backend, B, L, H, mask_kind, rule, norm, level):
    gen = _gen(B * 1000 + L * 10 + H)
    d, g = _perturb_inputs(B, L, H, torch.float64, gen)
    mask = _token_mask(mask_kind, B, L, gen)
    eta = 0.7
    eps = _epsilon(rule, norm, level, d, eta)
    out = smart_perturb_step(d, g, eta, eps, norm=norm, rule=rule, token_mask=mask, norm_level=level)
    ref = smart_perturb_step_reference(d, g, eta, eps, norm=norm, rule=rule, token_mask=mask, norm_level=level)
    _assert_close64(out, ref, f"{rule}/{norm}/{level}")
    if mask is not None:
        assert (out[mask == 0] == 0).all()
    # the data really exercises the rule: projection clamps/rescales some tokens but not all
    if rule == "projection" and norm == "inf" and H > 1:
        assert (out.abs() == eps).any() and (out.abs() < eps).any()
    if rule == "projection" and norm == "l2" and level == "token" and H > 1:
        n = torch.linalg.vector_norm(out, dim=-1)
        assert (n > eps * (1 - 1e-9)).any() and (n[n > 0] < eps * (1 - 1e-3)).any()


@pytest.mark.parametrize("rule,norm,level", RULE_NORM_LEVEL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_low_precision_within_2x_torch(triton_backend, rule, norm, level, dtype):
    B, L, H = 3, 7, 37
    gen = _gen(7)
    d, g = _perturb_inputs(B, L, H, dtype, gen)
    mask = _token_mask("pad", B, L, gen)
    eta = 0.7
    eps = _epsilon(rule, norm, level, d, eta)
    out = smart_perturb_step(d, g, eta, eps, norm=norm, rule=rule, token_mask=mask, norm_level=level)
    assert out.dtype == dtype and out.shape == d.shape
    plain = smart_perturb_step_reference(d, g, eta, eps, norm=norm, rule=rule, token_mask=mask, norm_level=level)
    oracle = smart_perturb_step_reference(
        d.double(), g.double(), eta, eps, norm=norm, rule=rule, token_mask=mask, norm_level=level
    )
    _assert_2x(out, plain, oracle, f"{dtype} {rule}/{norm}/{level}")


@pytest.mark.parametrize("norm", ["inf", "l2"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_perturb_projection_is_scale_invariant_in_g(triton_backend, norm, level):
    """g/‖g‖ is the same for g and 1e-30·g: float32 squares of 1e-30 underflow, the scaled norms don't."""
    gen = _gen(3)
    d, g = _perturb_inputs(2, 5, 37, torch.float32, gen)
    g = g / g.abs().amax(dim=-1, keepdim=True)  # 1e-30 · g stays a normal float32
    eps = 0.8 if norm == "inf" else 2.0
    for fn in (smart_perturb_step, smart_perturb_step_reference):
        big = fn(d, g, 0.5, eps, norm=norm, token_mask=None, norm_level=level)
        tiny = fn(d, g * 1e-30, 0.5, eps, norm=norm, token_mask=None, norm_level=level)
        assert torch.isfinite(tiny).all()
        torch.testing.assert_close(tiny, big, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule,norm,level", RULE_NORM_LEVEL)
def test_perturb_zero_gradient_and_zero_epsilon_are_finite(triton_backend, rule, norm, level):
    """‖g‖ = 0 (projection: direction 0) and ‖δ'‖ + ε = 0 (mtdnn with ε = 0) give no NaN."""
    gen = _gen(5)
    d, g = _perturb_inputs(2, 4, 9, torch.float64, gen)
    g[0] = 0.0  # a whole sequence with zero gradient
    g[1, 1] = 0.0  # one token
    d[1, 1] = 0.0
    for eps in (0.0, 0.5):
        out = smart_perturb_step(d, g, 0.3, eps, norm=norm, rule=rule, norm_level=level)
        ref = smart_perturb_step_reference(d, g, 0.3, eps, norm=norm, rule=rule, norm_level=level)
        _assert_close64(out, ref, f"{rule}/{norm}/{level} eps={eps}")
    if rule == "projection" and norm == "inf":
        torch.testing.assert_close(out[0], d[0].clamp(-0.5, 0.5), rtol=0, atol=0)  # zero step: just Π(δ)
    if rule == "mtdnn":
        zero_d = torch.zeros_like(d)
        out = smart_perturb_step(zero_d, torch.zeros_like(g), 0.3, 0.0, norm=norm, rule=rule, norm_level=level)
        assert torch.equal(out, zero_d)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("rule", ["projection", "mtdnn"])
def test_perturb_padded_tokens_are_ignored(triton_backend, rule, level):
    """Padding is zero in the output and never read: NaN or huge values there change nothing."""
    gen = _gen(11)
    d, g = _perturb_inputs(3, 6, 37, torch.float32, gen)
    mask = _token_mask("pad", 3, 6, gen)
    mask[1, 3:] = False
    clean = smart_perturb_step(d, g, 0.4, 1.0, norm="l2", rule=rule, token_mask=mask, norm_level=level)
    d2, g2 = d.clone(), g.clone()
    d2[~mask] = float("nan")
    g2[~mask] = 1e30
    dirty = smart_perturb_step(d2, g2, 0.4, 1.0, norm="l2", rule=rule, token_mask=mask, norm_level=level)
    assert torch.equal(clean, dirty)
    assert (dirty[~mask] == 0).all()
    ref = smart_perturb_step_reference(d2, g2, 0.4, 1.0, norm="l2", rule=rule, token_mask=mask, norm_level=level)
    assert torch.isfinite(ref).all() and (ref[~mask] == 0).all()


def test_perturb_rules_semantics(triton_backend):
    """projection stays in the ε-ball; mtdnn's output has unit norm per token (up to ε)."""
    gen = _gen(13)
    d, g = _perturb_inputs(2, 5, 37, torch.float64, gen)
    eps = 0.3
    inf_out = smart_perturb_step(d, g, 1.0, eps, norm="inf")
    assert inf_out.abs().max() <= eps
    l2_out = smart_perturb_step(d, g, 1.0, eps, norm="l2")
    assert torch.linalg.vector_norm(l2_out, dim=-1).max() <= eps * (1 + 1e-12)
    seq_out = smart_perturb_step(d, g, 1.0, eps, norm="l2", norm_level="sequence")
    assert torch.linalg.vector_norm(seq_out, dim=(-2, -1)).max() <= eps * (1 + 1e-12)
    m_inf = smart_perturb_step(d, g, 0.1, 1e-12, norm="inf", rule="mtdnn")
    torch.testing.assert_close(m_inf.abs().amax(-1), torch.ones(2, 5, dtype=torch.float64))
    m_l2 = smart_perturb_step(d, g, 0.1, 1e-12, norm="l2", rule="mtdnn", norm_level="sequence")
    torch.testing.assert_close(torch.linalg.vector_norm(m_l2, dim=(-2, -1)), torch.ones(2, dtype=torch.float64))
    # projection with a tiny step and large ε is the plain normalised ascent step
    small = smart_perturb_step(d, g, 1e-3, 1e9, norm="l2")
    torch.testing.assert_close(small, d + 1e-3 * g / torch.linalg.vector_norm(g, dim=-1, keepdim=True))


def test_perturb_non_contiguous_and_grad_inputs(triton_backend):
    gen = _gen(17)
    d, g = _perturb_inputs(2, 37, 5, torch.float32, gen)
    d_t = d.transpose(1, 2)  # (2, 5, 37) non-contiguous
    g_t = g.transpose(1, 2).requires_grad_(True)
    for level in ("token", "sequence"):
        out = smart_perturb_step(d_t, g_t, 0.5, 0.7, norm_level=level)
        assert not out.requires_grad and out.is_contiguous()
        same = smart_perturb_step(d_t.contiguous(), g_t.detach().contiguous(), 0.5, 0.7, norm_level=level)
        assert torch.equal(out, same)


# =====================================================================================
# symmetric_kl
# =====================================================================================


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
    gen = _gen(zlib.crc32(repr((shape, reduction)).encode()))
    p, q = _kl_inputs(shape, torch.float64, gen)
    weight = torch.rand(shape[:-1], generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else None
    out, dp, dq = _loss_and_grads(symmetric_kl, p, q, reduction, weight)
    ref, rdp, rdq = _loss_and_grads(symmetric_kl_reference, p, q, reduction, weight)
    assert out.shape == ref.shape == (shape[:-1] if reduction == "none" else ())
    _assert_close64(out, ref, f"loss {reduction}")
    _assert_close64(dp, rdp, f"d/dp {reduction}")
    _assert_close64(dq, rdq, f"d/dq {reduction}")
    # and against the independent textbook formula
    nv, ndp, ndq = _loss_and_grads(lambda a, b, r: _reduce(_naive_sym_kl(a, b), a.shape, r), p, q, reduction, weight)
    for got, want, what in ((out, nv, "loss"), (dp, ndp, "d/dp"), (dq, ndq, "d/dq")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{what} vs log_softmax formula")


@pytest.mark.parametrize("C,block_c", [(37, 8), (1000, 64), (5, 2)])
def test_symmetric_kl_chunked_columns(triton_backend, C, block_c):
    """Rows longer than one column block: the online log-sum-exp loop over chunks."""
    gen = _gen(C)
    p, q = _kl_inputs((4, C), torch.float64, gen)
    p.requires_grad_(True)
    q.requires_grad_(True)
    rows = _via_cuda(smart_mod._SymmetricKLFunction.apply)(p, q, block_c)
    w = torch.rand(4, generator=gen, dtype=torch.float64)
    dp, dq = torch.autograd.grad((rows * w).sum(), (p, q))
    ref = symmetric_kl_reference(p, q, "none")
    rdp, rdq = torch.autograd.grad((ref * w).sum(), (p, q))
    _assert_close64(rows.detach(), ref.detach(), "loss")
    _assert_close64(dp, rdp, "d/dp")
    _assert_close64(dq, rdq, "d/dq")


@pytest.mark.parametrize("near", [None, 1e-2, 1e-5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_symmetric_kl_low_precision_within_2x_torch(triton_backend, near, dtype, reduction):
    gen = _gen(23)
    p, q = _kl_inputs((33, 5), dtype, gen, near=near)
    weight = torch.rand(33, generator=gen, dtype=torch.float64).to(dtype) if reduction == "none" else None
    out, dp, dq = _loss_and_grads(symmetric_kl, p, q, reduction, weight)
    plain, pdp, pdq = _loss_and_grads(symmetric_kl_reference, p, q, reduction, weight)
    w64 = weight.double() if weight is not None else None
    oracle, odp, odq = _loss_and_grads(symmetric_kl_reference, p.double(), q.double(), reduction, w64)
    assert out.dtype == dp.dtype == dq.dtype == dtype
    floor = FLOOR if dtype == torch.float32 else 1e-3
    _assert_2x(out, plain, oracle, f"loss {dtype} near={near}", floor)
    _assert_2x(dp, pdp, odp, f"d/dp {dtype} near={near}", floor)
    _assert_2x(dq, pdq, odq, f"d/dq {dtype} near={near}", floor)


def test_symmetric_kl_keeps_precision_for_nearly_equal_logits(triton_backend):
    """SMART's regime: logits differ by ~1e-6. The textbook float32 formula loses every digit of
    the loss there; the expm1/log1p formulation keeps ~1e-6 relative precision."""
    gen = _gen(29)
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
    gen = _gen(31)
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
            _assert_2x(got, base, want, f"{fn.__name__} {what} {dtype}", floor)
        assert out[0] == 0


def _naive_sym_kl_red(p, q, reduction):
    return _reduce(_naive_sym_kl(p, q), p.shape, reduction)


def test_symmetric_kl_one_side_detached(triton_backend):
    """SMART's use: the clean prediction is detached; only the perturbed side gets a gradient."""
    gen = _gen(37)
    p, q = _kl_inputs((9, 5), torch.float64, gen)
    p.requires_grad_(True)
    out = symmetric_kl(p, q)
    (dp,) = torch.autograd.grad(out, p)
    p2 = p.detach().clone().requires_grad_(True)
    (rdp,) = torch.autograd.grad(symmetric_kl_reference(p2, q), p2)
    _assert_close64(dp, rdp, "d/dp")
    q.requires_grad_(True)
    (dq,) = torch.autograd.grad(symmetric_kl(p.detach(), q, "sum"), q)
    q2 = q.detach().clone().requires_grad_(True)
    (rdq,) = torch.autograd.grad(symmetric_kl_reference(p.detach(), q2, "sum"), q2)
    _assert_close64(dq, rdq, "d/dq")


def test_symmetric_kl_non_contiguous(triton_backend):
    gen = _gen(41)
    base_p = torch.randn(5, 14, generator=gen, dtype=torch.float64)
    base_q = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    p = base_p[:, ::2].requires_grad_(False)  # (5, 7), column stride 2
    q = base_q.t()  # (5, 7) transposed
    out, dp, dq = _loss_and_grads(symmetric_kl, p, q, "sum")
    ref, rdp, rdq = _loss_and_grads(symmetric_kl_reference, p.contiguous(), q.contiguous(), "sum")
    _assert_close64(out, ref, "loss")
    _assert_close64(dp, rdp, "d/dp")
    _assert_close64(dq, rdq, "d/dq")


def test_binary_to_two_class_logits_gives_bernoulli_symmetric_kl(triton_backend):
    gen = _gen(43)
    zp = (torch.randn(11, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    zq = (torch.randn(11, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    two = binary_to_two_class_logits(zp)
    assert two.shape == (11, 2) and (two[:, 0] == 0).all() and torch.equal(two[:, 1], zp)
    out = symmetric_kl(two, binary_to_two_class_logits(zq), "none")
    sp, sq = torch.sigmoid(zp), torch.sigmoid(zq)
    expected = (sp - sq) * (zp - zq)
    _assert_close64(out.detach(), expected.detach(), "Bernoulli symmetric KL")
    dzp, dzq = torch.autograd.grad(out.sum(), (zp, zq))
    want_p = sp * (1 - sp) * (zp - zq) + (sp - sq)
    _assert_close64(dzp, want_p.detach(), "d/dz_p")
    _assert_close64(dzq, -(sq * (1 - sq) * (zp - zq)).detach() - (sp - sq).detach(), "d/dz_q")


# =====================================================================================
# smart_noise
# =====================================================================================


@pytest.mark.parametrize("wraps", [True, False], ids=["int64-wrap", "16-bit-split"])
def test_philox_reference_matches_known_answer_vectors(monkeypatch, wraps):
    """Random123's Philox4x32-10 known-answer tests for the plain-torch generator, through both
    of its 32x32-bit multiplication paths."""
    if wraps and not smart_mod._int64_mul_wraps(torch.device("cpu")):
        pytest.skip("int64 products do not wrap on this CPU build")
    monkeypatch.setitem(smart_mod._WRAPS, "cpu", wraps)
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for ctr, key, want in kat:
        got = smart_mod._philox4x32(*[torch.tensor([c]) for c in ctr], key[0], key[1])
        assert [int(x) for x in got] == list(want)


NOISE_CASES = [
    # (shape, seed, mask kind)
    ((3, 13, 37), 0, "pad"),
    ((2, 7, 64), 1234, "holes"),
    ((1, 5, 33), 2**40 + 7, "none"),
]


@pytest.mark.parametrize("shape,seed,mask_kind", NOISE_CASES)
@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_noise_matches_reference(triton_backend, device, shape, seed, mask_kind, distribution):
    gen = _gen(seed % 1000)
    mask = _token_mask(mask_kind, shape[0], shape[1], gen)
    mask = mask.to(device) if mask is not None else None
    out = smart_noise(shape, 0.25, seed, token_mask=mask, distribution=distribution, device=device)
    ref = smart_noise_reference(shape, 0.25, seed, token_mask=mask, distribution=distribution, device=device)
    assert out.shape == shape and out.dtype == torch.float32 and out.device.type == device.type
    assert not torch.isnan(out).any()
    if distribution == "uniform":
        assert torch.equal(out, ref)  # bit-identical: integer Philox + exact float32 ops
    else:
        # Box-Muller's log/sqrt/cos may differ by a few ulp (GPU fast math: a little more)
        atol = 1e-6 if device.type == "cpu" else 1e-4
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol * 0.25)
    if mask is not None:
        assert (out[mask.bool() == 0] == 0).all()


def test_noise_reference_chunking(triton_backend, monkeypatch):
    """The CPU reference runs Philox in chunks; chunk borders must not change a single value."""
    mask = _token_mask("pad", 3, 7, _gen(1))
    out = smart_noise((3, 7, 37), 0.5, 77, token_mask=mask, distribution="uniform")
    monkeypatch.setattr(smart_mod, "_CPU_CHUNK", 100)  # 777 elements -> 8 chunks, the last partial
    assert torch.equal(smart_noise_reference((3, 7, 37), 0.5, 77, token_mask=mask, distribution="uniform"), out)


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_noise_statistics_and_determinism(triton_backend, distribution):
    shape, sigma = (4, 16, 512), 0.5
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[1, 9:] = False
    a = smart_noise(shape, sigma, 99, token_mask=mask, distribution=distribution)
    real = a[mask]  # (n_real, H)
    n = real.numel()
    std = sigma if distribution == "normal" else sigma / math.sqrt(3)
    assert abs(real.mean().item()) < 5 * std / math.sqrt(n)
    assert abs(real.std().item() / std - 1) < 0.02
    assert (real != 0).float().mean() > 0.999
    assert (a[~mask] == 0).all()
    if distribution == "uniform":
        assert real.min() >= -sigma and real.max() < sigma
        assert real.min() < -0.99 * sigma and real.max() > 0.99 * sigma
    else:
        kurt = ((real - real.mean()) ** 4).mean() / real.var() ** 2
        assert abs(kurt.item() - 3) < 0.15
    assert torch.equal(a, smart_noise(shape, sigma, 99, token_mask=mask, distribution=distribution))
    b = smart_noise(shape, sigma, 100, token_mask=mask, distribution=distribution)
    assert (a[mask] == b[mask]).float().mean() < 1e-3
    assert abs(torch.corrcoef(torch.stack([a[mask].flatten(), b[mask].flatten()]))[0, 1].item()) < 0.03
    # linear in σ (a power of two: exact in float32)
    assert torch.equal(smart_noise(shape, 2 * sigma, 99, token_mask=mask, distribution=distribution), 2 * a)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_noise_dtypes(triton_backend, dtype):
    out = smart_noise((2, 3, 40), 1e-5, 7, dtype=dtype, distribution="uniform")
    ref = smart_noise_reference((2, 3, 40), 1e-5, 7, dtype=dtype, distribution="uniform")
    assert out.dtype == dtype and torch.equal(out, ref)
    assert smart_noise((0, 3, 40), 1.0, 7).shape == (0, 3, 40)
    assert (smart_noise((2, 3, 40), 0.0, 7) == 0).all()


# =====================================================================================
# poisoning, dispatch, validation
# =====================================================================================


def test_poison_flag_fills_outputs_with_nan(monkeypatch):
    """The launchers' allocator really poisons (so the comparisons above would see unwritten
    elements), and does not when the flag is off."""
    poisoned = smart_mod._empty((3, 4), torch.float32, "cpu")
    assert torch.isnan(poisoned).all()
    monkeypatch.setenv(smart_mod.POISON_ENV, "0")
    calls = []
    real_full = torch.full
    monkeypatch.setattr(torch, "full", lambda *a, **k: calls.append(a) or real_full(*a, **k))
    smart_mod._empty((3, 4), torch.float32, "cpu")
    assert not calls


def test_poisoned_outputs_are_fully_written(triton_backend):
    """With poisoned buffers every op's output, including padding and the column/row tails of the
    last block, comes back NaN-free."""
    gen = _gen(47)
    d, g = _perturb_inputs(3, 5, 37, torch.float32, gen)
    mask = _token_mask("holes", 3, 5, gen)
    for level in ("token", "sequence"):
        assert not torch.isnan(smart_perturb_step(d, g, 0.1, 0.2, token_mask=mask, norm_level=level)).any()
    p, q = _kl_inputs((17, 5), torch.float32, gen)
    p.requires_grad_(True)
    q.requires_grad_(True)
    rows = symmetric_kl(p, q, "none")
    assert not torch.isnan(rows).any()
    dp, dq = torch.autograd.grad(rows.sum(), (p, q))
    assert not torch.isnan(dp).any() and not torch.isnan(dq).any()
    assert not torch.isnan(smart_noise((3, 5, 37), 1.0, 3, token_mask=mask)).any()


def test_dispatch_reference_backend_never_launches_kernels(reference_backend, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton path used under MINBERT_KERNEL_BACKEND=reference")

    monkeypatch.setattr(smart_mod, "_perturb_step_triton", boom)
    monkeypatch.setattr(smart_mod._SymmetricKLFunction, "apply", boom)
    monkeypatch.setattr(smart_mod, "_noise_kernel", None)
    gen = _gen(53)
    d, g = _perturb_inputs(2, 3, 8, torch.float64, gen)
    assert torch.equal(smart_mod.smart_perturb_step(d, g, 0.1, 0.2), smart_perturb_step_reference(d, g, 0.1, 0.2))
    p, q = _kl_inputs((4, 3), torch.float64, gen)
    assert torch.equal(smart_mod.symmetric_kl(p, q), symmetric_kl_reference(p, q))
    noise = smart_mod.smart_noise((2, 3, 8), 1.0, 5, distribution="uniform")
    assert torch.equal(noise, smart_noise_reference((2, 3, 8), 1.0, 5, distribution="uniform"))


def test_dispatch_triton_backend_never_uses_torch_path(triton_backend, monkeypatch):
    gen = _gen(59)
    d, g = _perturb_inputs(2, 3, 8, torch.float64, gen)
    p, q = _kl_inputs((4, 3), torch.float64, gen)
    ref_step = smart_perturb_step_reference(d, g, 0.1, 0.2)
    ref_kl = symmetric_kl_reference(p, q)

    def boom(*a, **k):
        raise AssertionError("torch path used under MINBERT_KERNEL_BACKEND=triton")

    monkeypatch.setattr(smart_mod, "_perturb_step_torch", boom)
    monkeypatch.setattr(smart_mod, "_symmetric_kl_torch", boom)
    monkeypatch.setattr(smart_mod, "_noise_torch", boom)
    _assert_close64(smart_perturb_step(d, g, 0.1, 0.2), ref_step, "step")
    _assert_close64(symmetric_kl(p, q), ref_kl, "kl")
    assert smart_noise((2, 3, 8), 1.0, 5).shape == (2, 3, 8)


@pytest.fixture(params=["triton", "reference"])
def any_backend(request):
    request.getfixturevalue(f"{request.param}_backend")
    return request.param


def _d(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


_OK = (2, 3, 4)  # a valid (B, L, H)

PERTURB_ERRORS = [
    (lambda: ((_d(2, 3), _d(2, 3), 0.1, 0.1), {}), ValueError, r"'delta' must have 3 dimensions \(B, L, H\)"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 5), 0.1, 0.1), {}), ValueError, r"'grad' must have shape \(B, L, H\)"),
    (lambda: ((_d(*_OK, dtype=torch.int64), _d(*_OK), 0.1, 0.1), {}), TypeError, r"'delta' must be a floating-point"),
    (lambda: ((_d(*_OK), _d(*_OK, dtype=torch.float64), 0.1, 0.1), {}), TypeError, r"'grad' has dtype torch.float64"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 4, device="meta"), 0.1, 0.1), {}), ValueError, r"'grad' is on meta"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 4), -0.1, 0.1), {}), ValueError, r"'step_size' must be a finite number >= 0"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 4), 0.1, -1e-5), {}), ValueError, r"'epsilon' must be a finite number >= 0"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 4), float("nan"), 0.1), {}), ValueError, r"'step_size' must be a finite"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 4), 0.1, float("inf")), {}), ValueError, r"'epsilon' must be a finite"),
    (lambda: ((_d(*_OK), _d(*_OK), 0.1, 0.1), {"norm": "l1"}), ValueError, r"'norm' must be one of 'inf', 'l2'"),
    (lambda: ((_d(*_OK), _d(*_OK), 0.1, 0.1), {"rule": "pgd"}), ValueError, r"'rule' must be one of"),
    (lambda: ((_d(*_OK), _d(*_OK), 0.1, 0.1), {"norm_level": "batch"}), ValueError, r"'norm_level' must be one of"),
    (lambda: ((_d(*_OK), _d(*_OK), 0.1, 0.1), {"token_mask": _d(2, 4)}), ValueError, r"'token_mask' must have shape"),
    (lambda: ((_d(*_OK), _d(*_OK), 0.1, 0.1), {"token_mask": _d(2, 3, device="meta")}), ValueError, "'token_mask' is"),
    (lambda: ((_d(2, 3, 4), "g", 0.1, 0.1), {}), TypeError, r"'grad' must be a torch.Tensor"),
]


@pytest.mark.parametrize("case", range(len(PERTURB_ERRORS)))
@pytest.mark.parametrize("fn", [smart_mod.smart_perturb_step, smart_perturb_step_reference])
def test_perturb_validation_errors(any_backend, fn, case):
    make, exc, pattern = PERTURB_ERRORS[case]
    args, kwargs = make()
    with pytest.raises(exc, match=fn.__name__ + ".*" + pattern):
        fn(*args, **kwargs)


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
@pytest.mark.parametrize("fn", [smart_mod.symmetric_kl, symmetric_kl_reference])
def test_symmetric_kl_validation_errors(any_backend, fn, case):
    make, exc, pattern = KL_ERRORS[case]
    args, kwargs = make()
    with pytest.raises(exc, match=fn.__name__ + ".*" + pattern):
        fn(*args, **kwargs)


NOISE_ERRORS = [
    (((2, 3, 4), -1e-5, 0), {}, ValueError, r"'sigma' must be a finite number >= 0"),
    (((2, 3, 4), float("nan"), 0), {}, ValueError, r"'sigma' must be a finite"),
    (((2, 3, 4), 0.1, -1), {}, ValueError, r"'seed' must be an int in \[0, 2\*\*63\)"),
    (((2, 3, 4), 0.1, 1.5), {}, ValueError, r"'seed' must be an int"),
    (((2, 3, 4), 0.1, True), {}, ValueError, r"'seed' must be an int"),
    (((2, 3, 4), 0.1, 2**63), {}, ValueError, r"'seed' must be an int"),
    (((2, 3), 0.1, 0), {}, ValueError, r"'shape' must be 3 non-negative ints"),
    (((2, -3, 4), 0.1, 0), {}, ValueError, r"'shape' must be 3 non-negative ints"),
    ((5, 0.1, 0), {}, TypeError, r"'shape' must be a sequence"),
    (((2, 3, 4), 0.1, 0), {"distribution": "laplace"}, ValueError, r"'distribution' must be one of"),
    (((2, 3, 4), 0.1, 0), {"dtype": torch.int32}, TypeError, r"'dtype' must be a floating-point"),
    (((2, 3, 4), 0.1, 0), {"token_mask": torch.ones(3, 2)}, ValueError, r"'token_mask' must have shape \(B, L\)"),
    (((2, 3, 4), 0.1, 0), {"token_mask": torch.ones(2, 3), "device": "meta"}, ValueError, r"'token_mask' is on cpu"),
]


@pytest.mark.parametrize("case", range(len(NOISE_ERRORS)))
@pytest.mark.parametrize("fn", [smart_mod.smart_noise, smart_noise_reference])
def test_noise_validation_errors(any_backend, fn, case):
    args, kwargs, exc, pattern = NOISE_ERRORS[case]
    with pytest.raises(exc, match=fn.__name__ + ".*" + pattern):
        fn(*args, **kwargs)


def test_triton_path_rejects_too_wide_hidden_size(triton_backend, monkeypatch):
    monkeypatch.setattr(smart_mod, "_MAX_FUSED_H", 16)
    with pytest.raises(ValueError, match=r"smart_perturb_step: hidden size H=37 exceeds"):
        smart_perturb_step(_d(1, 2, 37), _d(1, 2, 37), 0.1, 0.1)


def test_dispatch_module_is_shared():
    assert smart_mod.use_triton is _dispatch.use_triton


def test_module_works_without_triton():
    """Without Triton the module still imports and every op runs its reference."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from minbert.kernels import smart as s\n"
        "d = torch.randn(2, 3, 8); g = torch.randn(2, 3, 8)\n"
        "assert torch.equal(s.smart_perturb_step(d, g, 0.1, 0.2), s.smart_perturb_step_reference(d, g, 0.1, 0.2))\n"
        "p = torch.randn(4, 5, requires_grad=True)\n"
        "s.symmetric_kl(p, torch.randn(4, 5)).backward()\n"
        "assert s.smart_noise((2, 3, 8), 1.0, 3).shape == (2, 3, 8)\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env.update(MINBERT_KERNEL_BACKEND="auto", TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
