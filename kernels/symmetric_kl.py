r"""Symmetric KL divergence between two softmax distributions given by logits, fused forward and backward.

With P = softmax(p), Q = softmax(q) over the last dimension and d = log P - log Q:

    ℓ_s(p, q) = KL(P‖Q) + KL(Q‖P) = Σ_c (P_c - Q_c) d_c
    ∂ℓ_s/∂p = P ⊙ (d - Σ_c P_c d_c) + (P - Q),    ∂ℓ_s/∂q = Q ⊙ (Σ_c Q_c d_c - d) - (P - Q)

SMART's smoothness loss for classification heads (and, through :func:`binary_to_two_class_logits`,
for sigmoid heads). Both kernels walk the columns in blocks with an online log-sum-exp, so any
number of classes works; the backward recomputes the softmaxes from the saved logits. When p ≈ q,
d and P - Q are formed from Δ = p - q with expm1/log1p so the loss keeps full relative precision;
docs/smart.md (section Kernels) has the numerics.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import check_choice, check_same_device, check_same_dtype, check_tensor, use_triton
from ._triton import POISON_ENV, new_output as _empty, tl, triton  # noqa: F401
from ._triton import acc_dtype, cast, interp_bf16, tl_acc

REDUCTIONS = ("batchmean", "sum", "mean", "none")


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _expm1(x):
    """exp(x) - 1 accurate to a few ulp for every x (float32 or float64).

    |x| < 1/4: Taylor series to x^13 in Horner form (truncation < 1e-17 relative);
    otherwise exp(x) - 1, whose relative error is <= ~5 ulp there because |e^x - 1| >= 0.22.
    Only +, *, / by exact constants and exp are used, so it behaves the same in the interpreter
    and on GPUs (libdevice's expm1 is not available in the interpreter).
    """
    small = tl.abs(x) < 0.25
    s = tl.where(small, x, 0.0)
    p = 1.0 + s / 13.0
    p = 1.0 + s * p / 12.0
    p = 1.0 + s * p / 11.0
    p = 1.0 + s * p / 10.0
    p = 1.0 + s * p / 9.0
    p = 1.0 + s * p / 8.0
    p = 1.0 + s * p / 7.0
    p = 1.0 + s * p / 6.0
    p = 1.0 + s * p / 5.0
    p = 1.0 + s * p / 4.0
    p = 1.0 + s * p / 3.0
    p = 1.0 + s * p / 2.0
    return tl.where(small, s * p, tl.exp(x) - 1.0)


@triton.jit
def _log1p(w):
    """log(1 + w) accurate for small |w| (w > -1).

    |w| < 1/4: log1p(w) = 2·atanh(s) = 2(s + s³/3 + ... + s²¹/21), s = w / (2 + w), |s| < 1/7
    (truncation < 1e-18 relative); otherwise log(1 + w), relative error <= ~4 ulp there.
    """
    small = tl.abs(w) < 0.25
    ws = tl.where(small, w, 0.0)
    s = ws / (2.0 + ws)
    s2 = s * s
    t = 1.0 / 21.0 + 0.0 * s2
    t = 1.0 / 19.0 + s2 * t
    t = 1.0 / 17.0 + s2 * t
    t = 1.0 / 15.0 + s2 * t
    t = 1.0 / 13.0 + s2 * t
    t = 1.0 / 11.0 + s2 * t
    t = 1.0 / 9.0 + s2 * t
    t = 1.0 / 7.0 + s2 * t
    t = 1.0 / 5.0 + s2 * t
    t = 1.0 / 3.0 + s2 * t
    t = 1.0 + s2 * t
    return tl.where(small, 2.0 * s * t, tl.log(1.0 + w))


@triton.jit
def _symkl_load(P_ptr, Q_ptr, rows64, row_ok, cols, n_cols, stride_pm, stride_qm, ACC: tl.constexpr):
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    p = tl.load(P_ptr + rows64[:, None] * stride_pm + cols[None, :], mask=ok, other=0.0).to(ACC)
    q = tl.load(Q_ptr + rows64[:, None] * stride_qm + cols[None, :], mask=ok, other=0.0).to(ACC)
    return p, q, col_ok


@triton.jit
def _symkl_row_stats(
    P_ptr, Q_ptr, n_rows, n_cols, stride_pm, stride_qm,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """This program's BLOCK_R rows (ids, int64 ids, bounds mask) and an online pass over their
    columns: per-row max m and log Σ exp(x - m) of p and q, and r.

    log P = (p - m_p) - log Σ e^{p - m_p} (never p - lse_p: lse rounds at the logits' magnitude).
    r = lse_p - lse_q = log Σ_c Q_c e^{Δ_c} with Δ = p - q, computed as
    log1p(Σ_c Q_c expm1(Δ_c)); it is used when max|Δ| <= 1 (``near``), where d = Δ - r keeps
    full relative precision while log P - log Q would cancel (SMART's logits differ by ~1e-5).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    m_p = tl.full([BLOCK_R], float("-inf"), ACC)
    m_q = tl.full([BLOCK_R], float("-inf"), ACC)
    s_p = tl.zeros([BLOCK_R], ACC)
    s_q = tl.zeros([BLOCK_R], ACC)
    t = tl.zeros([BLOCK_R], ACC)  # Σ exp(q - m_q) expm1(Δ)
    amax = tl.zeros([BLOCK_R], ACC)  # max |Δ|
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        p, q, col_ok = _symkl_load(P_ptr, Q_ptr, rows64, row_ok, cols, n_cols, stride_pm, stride_qm, ACC)
        pm = tl.where(col_ok[None, :], p, float("-inf"))
        qm = tl.where(col_ok[None, :], q, float("-inf"))
        new_mp = tl.maximum(m_p, tl.max(pm, axis=1))
        s_p = s_p * tl.exp(m_p - new_mp) + tl.sum(tl.exp(pm - new_mp[:, None]), axis=1)
        m_p = new_mp
        new_mq = tl.maximum(m_q, tl.max(qm, axis=1))
        alpha = tl.exp(m_q - new_mq)
        eq = tl.exp(qm - new_mq[:, None])  # 0 on masked columns
        delta = tl.where(col_ok[None, :], p - q, 0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(delta), axis=1))
        s_q = s_q * alpha + tl.sum(eq, axis=1)
        t = t * alpha + tl.sum(eq * _expm1(tl.minimum(tl.maximum(delta, -1.0), 1.0)), axis=1)
        m_q = new_mq
    ls_p = tl.log(s_p)
    ls_q = tl.log(s_q)
    r = _log1p(t / s_q)
    near = amax <= 1.0
    return rows, rows64, row_ok, m_p, ls_p, m_q, ls_q, r, near


@triton.jit
def _symkl_chunk(
    P_ptr, Q_ptr, rows64, row_ok, c0, n_cols, stride_pm, stride_qm, m_p, ls_p, m_q, ls_q, r, near,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The columns [c0, c0 + BLOCK_C) of this program's rows: column ids and mask, and P, Q,
    d = log P - log Q and P - Q there (all 0 on masked columns).

    P - Q is -P·expm1(-d) where d > 0 and Q·expm1(d) elsewhere: accurate when P ≈ Q and never
    0·∞ when one probability underflows.
    """
    cols = c0 + tl.arange(0, BLOCK_C)
    p, q, col_ok = _symkl_load(P_ptr, Q_ptr, rows64, row_ok, cols, n_cols, stride_pm, stride_qm, ACC)
    lp = (p - m_p[:, None]) - ls_p[:, None]
    lq = (q - m_q[:, None]) - ls_q[:, None]
    P = tl.exp(tl.where(col_ok[None, :], lp, float("-inf")))
    Q = tl.exp(tl.where(col_ok[None, :], lq, float("-inf")))
    d = tl.where(near[:, None], (p - q) - r[:, None], lp - lq)
    d = tl.where(col_ok[None, :], d, 0.0)
    pmq = tl.where(d > 0, -P * _expm1(-tl.maximum(d, 0.0)), Q * _expm1(tl.minimum(d, 0.0)))
    return cols, col_ok, P, Q, d, pmq


@triton.jit
def _symkl_fwd_kernel(
    P_ptr, Q_ptr, LOSS_ptr,
    n_rows, n_cols, stride_pm, stride_qm,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """loss_i = Σ_c (P_ic - Q_ic)(log P_ic - log Q_ic) for BLOCK_R rows of (N, C) logits."""
    rows, rows64, row_ok, m_p, ls_p, m_q, ls_q, r, near = _symkl_row_stats(
        P_ptr, Q_ptr, n_rows, n_cols, stride_pm, stride_qm, ACC, BLOCK_R, BLOCK_C
    )
    loss = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, n_cols, BLOCK_C):
        cols, col_ok, P, Q, d, pmq = _symkl_chunk(P_ptr, Q_ptr, rows64, row_ok, c0, n_cols, stride_pm, stride_qm,
                                                  m_p, ls_p, m_q, ls_q, r, near, ACC, BLOCK_C)
        loss += tl.sum(pmq * d, axis=1)  # every term >= 0
    tl.store(LOSS_ptr + rows, loss, mask=row_ok)


@triton.jit
def _symkl_bwd_kernel(
    P_ptr, Q_ptr, G_ptr, DP_ptr, DQ_ptr,
    n_rows, n_cols, stride_pm, stride_qm, stride_g, stride_dpm, stride_dqm,
    WRITE_DP: tl.constexpr, WRITE_DQ: tl.constexpr, INTERP_BF16: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """∂loss_i/∂p = P ⊙ (d - Σ P d) + (P - Q),  ∂loss_i/∂q = Q ⊙ (Σ Q d - d) - (P - Q), times G_i."""
    rows, rows64, row_ok, m_p, ls_p, m_q, ls_q, r, near = _symkl_row_stats(
        P_ptr, Q_ptr, n_rows, n_cols, stride_pm, stride_qm, ACC, BLOCK_R, BLOCK_C
    )
    ep = tl.zeros([BLOCK_R], ACC)  # Σ P d = KL(P‖Q)
    eq = tl.zeros([BLOCK_R], ACC)  # Σ Q d = -KL(Q‖P)
    for c0 in range(0, n_cols, BLOCK_C):
        cols, col_ok, P, Q, d, pmq = _symkl_chunk(P_ptr, Q_ptr, rows64, row_ok, c0, n_cols, stride_pm, stride_qm,
                                                  m_p, ls_p, m_q, ls_q, r, near, ACC, BLOCK_C)
        ep += tl.sum(P * d, axis=1)
        eq += tl.sum(Q * d, axis=1)
    go = tl.load(G_ptr + rows64 * stride_g, mask=row_ok, other=0.0).to(ACC)  # (BLOCK_R,)
    for c0 in range(0, n_cols, BLOCK_C):
        cols, col_ok, P, Q, d, pmq = _symkl_chunk(P_ptr, Q_ptr, rows64, row_ok, c0, n_cols, stride_pm, stride_qm,
                                                  m_p, ls_p, m_q, ls_q, r, near, ACC, BLOCK_C)
        st = row_ok[:, None] & col_ok[None, :]
        if WRITE_DP:
            dp = go[:, None] * (P * (d - ep[:, None]) + pmq)
            dp_ptrs = DP_ptr + rows64[:, None] * stride_dpm + cols[None, :]
            tl.store(dp_ptrs, cast(dp, DP_ptr.dtype.element_ty, INTERP_BF16), mask=st)
        if WRITE_DQ:
            dq = go[:, None] * (Q * (eq[:, None] - d) - pmq)
            dq_ptrs = DQ_ptr + rows64[:, None] * stride_dqm + cols[None, :]
            tl.store(dq_ptrs, cast(dq, DQ_ptr.dtype.element_ty, INTERP_BF16), mask=st)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _symkl_blocks(n_cols: int, block_c: Optional[int] = None):
    BLOCK_C = block_c or min(triton.next_power_of_2(max(n_cols, 1)), 1024)
    BLOCK_R = max(1, min(256, 2048 // BLOCK_C))
    num_warps = 4 if BLOCK_R * BLOCK_C <= 2048 else 8
    return BLOCK_R, BLOCK_C, num_warps


def _symkl_forward(p2: torch.Tensor, q2: torch.Tensor, block_c: Optional[int] = None) -> torch.Tensor:
    """Per-row symmetric KL of (N, C) logits, in the compute dtype."""
    N, C = p2.shape
    loss = _empty((N,), acc_dtype(p2.dtype), p2.device)
    BLOCK_R, BLOCK_C, num_warps = _symkl_blocks(C, block_c)
    _symkl_fwd_kernel[(triton.cdiv(N, BLOCK_R),)](
        p2, q2, loss, N, C, p2.stride(0), q2.stride(0),
        ACC=tl_acc(p2.dtype), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    return loss


def _symkl_backward(p2, q2, grad_rows, need_p: bool, need_q: bool, block_c: Optional[int] = None):
    N, C = p2.shape
    dp = _empty((N, C), p2.dtype, p2.device) if need_p else None
    dq = _empty((N, C), q2.dtype, q2.device) if need_q else None
    BLOCK_R, BLOCK_C, num_warps = _symkl_blocks(C, block_c)
    _symkl_bwd_kernel[(triton.cdiv(N, BLOCK_R),)](
        p2, q2, grad_rows, dp if need_p else p2, dq if need_q else q2,
        N, C, p2.stride(0), q2.stride(0), grad_rows.stride(0),
        dp.stride(0) if need_p else 0, dq.stride(0) if need_q else 0,
        WRITE_DP=need_p, WRITE_DQ=need_q, INTERP_BF16=interp_bf16(p2),
        ACC=tl_acc(p2.dtype), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    return dp, dq


def _reduce_rows(rows: torch.Tensor, shape, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """rows: (N,) per-row losses -> the requested reduction, in the input dtype."""
    if reduction == "none":
        return rows.reshape(shape[:-1]).to(dtype)
    total = rows.sum()
    if reduction == "batchmean":
        total = total / rows.shape[0]
    elif reduction == "mean":
        total = total / (rows.shape[0] * shape[-1])
    return total.to(dtype)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# --------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------
class _SymmetricKLFunction(torch.autograd.Function):
    """Per-row symmetric KL of (N, C) logits with gradients for both inputs (inputs are recomputed
    in backward instead of saving softmaxes: two (N, C) reads, no extra memory)."""

    @staticmethod
    def forward(ctx, p2, q2, block_c):
        ctx.save_for_backward(p2, q2)
        ctx.block_c = block_c
        return _symkl_forward(p2, q2, block_c)

    @staticmethod
    def backward(ctx, grad_rows):
        p2, q2 = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_p or need_q):
            return None, None, None
        g = grad_rows.to(acc_dtype(p2.dtype))
        if g.dim() != 1 or g.shape[0] != p2.shape[0]:
            g = g.reshape(p2.shape[0]).contiguous()
        dp, dq = _symkl_backward(p2, q2, g, need_p, need_q, ctx.block_c)
        return dp, dq, None


# --------------------------------------------------------------------------------------------
# Public functionals
# --------------------------------------------------------------------------------------------
def _check_symkl_args(op, p_logits, q_logits, reduction):
    check_tensor(p_logits, "p_logits", op, floating=True)
    check_tensor(q_logits, "q_logits", op, floating=True)
    if p_logits.dim() == 0:
        raise ValueError(f"{op}: argument 'p_logits' must have at least 1 dimension (..., C), got a 0-dim tensor")
    if q_logits.shape != p_logits.shape:
        raise ValueError(
            f"{op}: arguments 'p_logits' and 'q_logits' must have the same shape (..., C), "
            f"got {tuple(p_logits.shape)} and {tuple(q_logits.shape)}"
        )
    check_same_dtype(op, p_logits=p_logits, q_logits=q_logits)
    check_same_device(op, p_logits=p_logits, q_logits=q_logits)
    if p_logits.numel() == 0:
        raise ValueError(
            f"{op}: inputs of shape {tuple(p_logits.shape)} are empty; need at least one row and one class"
        )
    check_choice(op, "reduction", reduction, REDUCTIONS)


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    r"""Symmetric KL divergence KL(P‖Q) + KL(Q‖P) between softmax distributions given by logits.

    With P = softmax(p), Q = softmax(q) over the last dimension and d = log P - log Q:

    .. math:: ℓ_s(p, q) = \sum_c (P_c - Q_c)(\log P_c - \log Q_c) = \sum_c (P_c - Q_c)\, d_c

    Gradients (both inputs; Σ P = Σ Q = 1):

    .. math:: ∂ℓ_s/∂p_j = P_j (d_j - \textstyle\sum_c P_c d_c) + (P_j - Q_j), \qquad
              ∂ℓ_s/∂q_j = Q_j (\textstyle\sum_c Q_c d_c - d_j) - (P_j - Q_j)

    Args:
        p_logits: (..., C) floating logits of P (any float dtype; CPU or CUDA); any C >= 1.
        q_logits: (..., C) logits of Q, same shape, dtype and device as ``p_logits``.
        reduction: ``"batchmean"`` (sum / number of rows N = numel / C), ``"sum"``, ``"mean"``
            (sum / (N·C), like ``KLDivLoss(reduction="mean")``) or ``"none"`` (per row, shape
            ``(...)``, i.e. the leading dimensions).

    Returns:
        The loss in the input dtype (computed in float32 for half inputs).

    Numerics: log-probabilities come from log-sum-exp, never from log(softmax), so an underflowing
    probability contributes 0 instead of NaN (logits of ±1e4 give finite values and gradients);
    every term (P_c - Q_c)d_c is >= 0, so there is no cancellation in the sum. When p ≈ q (SMART's
    tiny perturbations), d and P - Q are formed from Δ = p - q with expm1/log1p (see
    ``_symkl_row_stats``), so the loss keeps full relative precision even when it is ~1e-12;
    the textbook log_softmax formula loses most digits there in float32. Logits must be finite
    (±inf gives NaN, as in torch).

    Binary (sigmoid) outputs: a logit z of P(y=1) = σ(z) is the two-class softmax of [0, z],
    so pass ``binary_to_two_class_logits(z)`` for both arguments; the result equals the Bernoulli
    symmetric KL (σ(z_p) - σ(z_q))(z_p - z_q), and gradients flow back to z.

    The Triton path is a ``torch.autograd.Function`` with fused forward and backward kernels
    (backward recomputes the softmaxes from the saved logits); either input may be detached.
    """
    op = "symmetric_kl"
    _check_symkl_args(op, p_logits, q_logits, reduction)
    if not use_triton(p_logits, q_logits, op=op):
        return _symmetric_kl_torch(p_logits, q_logits, reduction)
    rows = _SymmetricKLFunction.apply(_as_rows(p_logits), _as_rows(q_logits), None)  # (N,), N = numel / C
    return _reduce_rows(rows, p_logits.shape, reduction, p_logits.dtype)


def binary_to_two_class_logits(z: torch.Tensor) -> torch.Tensor:
    """(...) floating logits z of a sigmoid output -> (..., 2) two-class logits [0, z], same dtype and device.

    softmax([0, z]) = [1 - σ(z), σ(z)], so :func:`symmetric_kl` of two such tensors is the
    symmetric KL between the Bernoulli distributions; differentiable in z.
    """
    check_tensor(z, "z", "binary_to_two_class_logits", floating=True)
    return torch.stack([torch.zeros_like(z), z], dim=-1)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _symmetric_kl_torch(p_logits, q_logits, reduction):
    acc = acc_dtype(p_logits.dtype)
    p = p_logits.reshape(-1, p_logits.shape[-1]).to(acc)
    q = q_logits.reshape(-1, q_logits.shape[-1]).to(acc)
    lp = torch.log_softmax(p, dim=-1)
    lq = torch.log_softmax(q, dim=-1)
    P, Q = lp.exp(), lq.exp()
    # d = log P - log Q; from Δ = p - q and r = log1p(Σ Q expm1(Δ)) when the logits are close
    delta = p - q
    near = delta.abs().amax(dim=-1, keepdim=True) <= 1.0
    r = torch.log1p((Q * torch.expm1(delta.clamp(-1.0, 1.0))).sum(dim=-1, keepdim=True))
    d = torch.where(near, delta - r, lp - lq)
    # clamps keep the unselected branch finite, so autograd through where() never sees 0·∞
    pmq = torch.where(d > 0, -P * torch.expm1(-d.clamp_min(0.0)), Q * torch.expm1(d.clamp_max(0.0)))
    rows = (pmq * d).sum(dim=-1)
    return _reduce_rows(rows, p_logits.shape, reduction, p_logits.dtype)


def symmetric_kl_reference(
    p_logits: torch.Tensor, q_logits: torch.Tensor, reduction: str = "batchmean"
) -> torch.Tensor:
    """Plain-torch :func:`symmetric_kl` (same formula and numerics, gradients by autograd)."""
    _check_symkl_args("symmetric_kl_reference", p_logits, q_logits, reduction)
    return _symmetric_kl_torch(p_logits, q_logits, reduction)
