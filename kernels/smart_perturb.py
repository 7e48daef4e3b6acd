r"""SMART's ascent step on the embedding perturbation δ (B, L, H), fused into one pass over δ and g.

    projection (SMART):  δ ← Π_{‖δ‖ ≤ ε}(δ + η g / ‖g‖)
    mtdnn (MT-DNN):      δ ← (δ + η g) / (‖δ + η g‖ + ε)

with ‖·‖ the ∞- or 2-norm per token (over H) or per sequence (over the real tokens' L×H block), and
δ = 0 on padded tokens. The per-token kernel reads δ and g once and writes δ once; the per-sequence
path runs two passes (per-token statistics, then the update with per-sequence coefficients).
docs/smart.md (section Kernels) has the derivations.

Scalars: Triton passes Python floats to kernels as float32, so η and ε travel as three float32
parts whose float64 sum is exactly the Python value (``_split_f64``); float32/16 kernels
effectively use float32(x).
"""
from __future__ import annotations

import math
import struct
from typing import Optional

import torch

from ._dispatch import (
    check_choice,
    check_nonnegative,
    check_same_device,
    check_same_dtype,
    check_tensor,
    check_token_mask,
    use_triton,
)
from ._triton import POISON_ENV, new_output as _empty, tl, triton  # noqa: F401
from ._triton import acc_dtype, cast, interp_bf16, tl_acc, token_mask_u8

NORMS = ("inf", "l2")
RULES = ("projection", "mtdnn")
NORM_LEVELS = ("token", "sequence")

_MAX_FUSED_H = 16384  # the perturbation kernels hold one token's H values in registers


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_amax_sumsq(x):
    """Per-row max|x| and Σ (x / max|x|)² of a (BLOCK_T, BLOCK_H) block (masked entries are 0).

    ‖x‖₂ = amax · sqrt(sumsq). Scaling by the row max first keeps the sum of squares from
    underflowing (SMART's gradients are tiny) or overflowing. sumsq is 0 for an all-zero row.
    """
    amax = tl.max(tl.abs(x), axis=1)  # (BLOCK_T,)
    safe = tl.where(amax > 0, amax, 1.0)
    xs = x / safe[:, None]
    return amax, tl.sum(xs * xs, axis=1)


@triton.jit
def _f64_scalar(hi, mid, lo, ACC: tl.constexpr):
    """A host float passed as three float32 parts (``_split_f64``), in the compute dtype."""
    return tl.cast(hi, ACC) + tl.cast(mid, ACC) + tl.cast(lo, ACC)


@triton.jit
def _load_tokens(
    D_ptr, G_ptr, M_ptr, n_tokens, H, stride_dt, stride_gt,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """This program's BLOCK_T tokens (rows of H values) of δ and g in the compute dtype.

    Padded tokens are never read: their δ and g are 0. Returns the token ids (int32 and int64),
    the column ids, the row and column bounds masks and the two (BLOCK_T, BLOCK_H) blocks.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) token ids in [0, B*L)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < n_tokens
    real = row_ok
    if HAS_MASK:
        real = real & (tl.load(M_ptr + rows, mask=row_ok, other=0) != 0)
    col_ok = cols < H
    rows64 = rows.to(tl.int64)
    ld = real[:, None] & col_ok[None, :]
    d = tl.load(D_ptr + rows64[:, None] * stride_dt + cols[None, :], mask=ld, other=0.0).to(ACC)
    g = tl.load(G_ptr + rows64[:, None] * stride_gt + cols[None, :], mask=ld, other=0.0).to(ACC)
    return rows, rows64, cols, row_ok, col_ok, d, g


@triton.jit
def _store_tokens(OUT_ptr, rows64, cols, row_ok, col_ok, stride_ot, out, INTERP_BF16: tl.constexpr):
    """Write the (BLOCK_T, BLOCK_H) block ``out`` as rows of OUT (padded tokens included)."""
    o_ptrs = OUT_ptr + rows64[:, None] * stride_ot + cols[None, :]
    tl.store(o_ptrs, cast(out, OUT_ptr.dtype.element_ty, INTERP_BF16), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _perturb_token_kernel(
    D_ptr, G_ptr, M_ptr, OUT_ptr,
    n_tokens, H,
    stride_dt, stride_gt, stride_ot,
    eta_hi, eta_mid, eta_lo, eps_hi, eps_mid, eps_lo,
    HAS_MASK: tl.constexpr, RULE_MTDNN: tl.constexpr, NORM_L2: tl.constexpr, INTERP_BF16: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Per-token step: each program updates BLOCK_T tokens (rows of H values) in one pass."""
    rows, rows64, cols, row_ok, col_ok, d, g = _load_tokens(
        D_ptr, G_ptr, M_ptr, n_tokens, H, stride_dt, stride_gt, HAS_MASK, ACC, BLOCK_T, BLOCK_H
    )
    eta = _f64_scalar(eta_hi, eta_mid, eta_lo, ACC)
    eps = _f64_scalar(eps_hi, eps_mid, eps_lo, ACC)

    if RULE_MTDNN:
        # δ' = δ + η g ;  δ ← δ' / (‖δ'‖ + ε)   (ε only guards the division)
        dp = d + eta * g
        if NORM_L2:
            amax, ss = _row_amax_sumsq(dp)
            n = amax * tl.sqrt(ss)
        else:
            n = tl.max(tl.abs(dp), axis=1)
        den = n + eps
        den = tl.where(den > 0, den, 1.0)  # δ' = 0 there
        out = dp / den[:, None]
    else:
        # δ' = δ + η g/‖g‖ ;  δ ← Π_{‖δ‖≤ε}(δ')
        gmax, gss = _row_amax_sumsq(g)
        gs = g / tl.where(gmax > 0, gmax, 1.0)[:, None]  # g / ‖g‖∞, in [-1, 1]
        if NORM_L2:
            gs = gs / tl.sqrt(tl.where(gss > 0, gss, 1.0))[:, None]  # g / ‖g‖₂
        dp = d + eta * gs
        if NORM_L2:
            amax, ss = _row_amax_sumsq(dp)
            n = amax * tl.sqrt(ss)
            scale = tl.where(n > eps, eps / tl.where(n > 0, n, 1.0), 1.0)  # min(1, ε/‖δ'‖₂)
            out = dp * scale[:, None]
        else:
            out = tl.minimum(tl.maximum(dp, -eps), eps)
    _store_tokens(OUT_ptr, rows64, cols, row_ok, col_ok, stride_ot, out, INTERP_BF16)


@triton.jit
def _perturb_seq_stats_kernel(
    D_ptr, G_ptr, M_ptr, S_ptr,
    n_tokens, H,
    stride_dt, stride_gt,
    eta_hi, eta_mid, eta_lo,
    HAS_MASK: tl.constexpr, RULE_MTDNN: tl.constexpr, NORM_L2: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Pass 1 of the per-sequence step: five per-token statistics, S is (B*L, 5), 0 on padding.

    projection: [max|g|, Σ(g/max|g|)², max|δ|, Σ(δ/max|δ|)², Σ(δ/max|δ|)(g/max|g|)]
    mtdnn:      [0, 0, max|δ'|, Σ(δ'/max|δ'|)², 0] with δ' = δ + η g
    """
    rows, rows64, cols, row_ok, col_ok, d, g = _load_tokens(
        D_ptr, G_ptr, M_ptr, n_tokens, H, stride_dt, stride_gt, HAS_MASK, ACC, BLOCK_T, BLOCK_H
    )
    zero = tl.zeros([BLOCK_T], dtype=ACC)
    if RULE_MTDNN:
        eta = _f64_scalar(eta_hi, eta_mid, eta_lo, ACC)
        s0 = zero
        s1 = zero
        s2, s3 = _row_amax_sumsq(d + eta * g)
        s4 = zero
    else:
        s0, s1 = _row_amax_sumsq(g)
        s2, s3 = _row_amax_sumsq(d)
        gs = g / tl.where(s0 > 0, s0, 1.0)[:, None]
        ds = d / tl.where(s2 > 0, s2, 1.0)[:, None]
        s4 = tl.sum(ds * gs, axis=1)
    base = S_ptr + rows64 * 5
    tl.store(base + 0, s0, mask=row_ok)
    tl.store(base + 1, s1, mask=row_ok)
    tl.store(base + 2, s2, mask=row_ok)
    tl.store(base + 3, s3, mask=row_ok)
    tl.store(base + 4, s4, mask=row_ok)


@triton.jit
def _perturb_seq_apply_kernel(
    D_ptr, G_ptr, M_ptr, A_ptr, C_ptr, OUT_ptr,
    n_tokens, L, H,
    stride_dt, stride_gt, stride_ot,
    HAS_MASK: tl.constexpr, CLAMP: tl.constexpr, INTERP_BF16: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Pass 2 of the per-sequence step: δ ← clamp(δ + a_b g, ±c_b) or (δ + a_b g) / c_b.

    a_b, c_b are per-sequence scalars (B,) computed from pass 1's statistics.
    """
    rows, rows64, cols, row_ok, col_ok, d, g = _load_tokens(
        D_ptr, G_ptr, M_ptr, n_tokens, H, stride_dt, stride_gt, HAS_MASK, ACC, BLOCK_T, BLOCK_H
    )
    seq = rows // L
    a = tl.load(A_ptr + seq, mask=row_ok, other=0.0)  # (BLOCK_T,)
    c = tl.load(C_ptr + seq, mask=row_ok, other=1.0)
    dp = d + a[:, None] * g
    if CLAMP:
        out = tl.minimum(tl.maximum(dp, -c[:, None]), c[:, None])
    else:
        out = dp / c[:, None]
    _store_tokens(OUT_ptr, rows64, cols, row_ok, col_ok, stride_ot, out, INTERP_BF16)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _split_f64(x: float):
    """(hi, mid, lo) float32 values with hi + mid + lo == x exactly in float64 (3 x 24 >= 53 bits;
    exact for |x| >= 1e-29, below that lo falls into float32's subnormal range).

    Triton passes Python floats to kernels as float32; float64 kernels rebuild x from the three
    parts, float32 kernels get hi (= float32(x)) since mid and lo are below its rounding unit."""
    parts = []
    rest = x
    for _ in range(3):
        part = _to_f32(rest)
        parts.append(part)
        rest = rest - part
    return tuple(parts)


def _to_f32(x: float) -> float:
    """x rounded to the nearest float32 (host side, no tensor: this runs on every kernel call)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32's range: inf, as torch's cast gives
        return math.copysign(math.inf, x)


def _perturb_blocks(H: int):
    BLOCK_H = triton.next_power_of_2(max(H, 1))
    BLOCK_T = max(1, min(16, 4096 // BLOCK_H))
    num_warps = 4 if BLOCK_T * BLOCK_H <= 2048 else 8
    return BLOCK_T, BLOCK_H, num_warps


def _perturb_step_triton(delta, grad, step_size, epsilon, norm, rule, token_mask, norm_level):
    """Launch the per-token kernel, or the two per-sequence passes. Inputs are validated."""
    B, L, H = delta.shape
    if H > _MAX_FUSED_H:
        raise ValueError(
            f"smart_perturb_step: hidden size H={H} exceeds the Triton kernel's limit of {_MAX_FUSED_H}; "
            "set MINBERT_KERNEL_BACKEND=reference to use the torch path"
        )
    n_tokens = B * L
    out = _empty((B, L, H), delta.dtype, delta.device)
    if n_tokens == 0 or H == 0:
        return out.zero_()
    d2 = delta.reshape(n_tokens, H)  # (B*L, H)
    g2 = grad.reshape(n_tokens, H)  # (B*L, H)
    d2 = d2 if d2.stride(-1) == 1 else d2.contiguous()
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    o2 = out.view(n_tokens, H)  # (B*L, H)
    mask = token_mask_u8(token_mask, n_tokens, delta.device)  # (B*L,) uint8
    acc = acc_dtype(delta.dtype)
    ACC = tl_acc(delta.dtype)
    BLOCK_T, BLOCK_H, num_warps = _perturb_blocks(H)
    grid = (triton.cdiv(n_tokens, BLOCK_T),)
    eta3 = _split_f64(step_size)
    eps3 = _split_f64(epsilon)
    mtdnn = rule == "mtdnn"
    l2 = norm == "l2"

    if norm_level == "token":
        _perturb_token_kernel[grid](
            d2, g2, mask, o2, n_tokens, H,
            d2.stride(0), g2.stride(0), o2.stride(0),
            *eta3, *eps3,
            HAS_MASK=token_mask is not None, RULE_MTDNN=mtdnn, NORM_L2=l2, INTERP_BF16=interp_bf16(out),
            ACC=ACC, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, num_warps=num_warps,
        )
        return out

    # norm_level == "sequence": per-token statistics, combined per sequence in float64
    stats = _empty((n_tokens, 5), acc, delta.device)  # (B*L, 5)
    _perturb_seq_stats_kernel[grid](
        d2, g2, mask, stats, n_tokens, H,
        d2.stride(0), g2.stride(0), *eta3,
        HAS_MASK=token_mask is not None, RULE_MTDNN=mtdnn, NORM_L2=l2,
        ACC=ACC, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, num_warps=num_warps,
    )
    a, c = _sequence_coefficients(stats.view(B, L, 5).double(), step_size, epsilon, rule, norm)  # (B,), (B,)
    _perturb_seq_apply_kernel[grid](
        d2, g2, mask, a.to(acc).contiguous(), c.to(acc).contiguous(), o2, n_tokens, L, H,
        d2.stride(0), g2.stride(0), o2.stride(0),
        HAS_MASK=token_mask is not None, CLAMP=(rule == "projection" and norm == "inf"),
        INTERP_BF16=interp_bf16(out), ACC=ACC, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, num_warps=num_warps,
    )
    return out


def _sequence_coefficients(S: torch.Tensor, eta: float, eps: float, rule: str, norm: str):
    """Per-sequence (a, c) for pass 2 from the (B, L, 5) float64 statistics of pass 1.

    projection, inf: a = η/‖g‖∞, c = ε (clamp bound).
    projection, l2:  a = η/‖g‖₂ and ‖δ'‖₂² = ‖δ‖² + 2a⟨δ, g⟩ + a²‖g‖² (expanded so δ and g
                     are read once), c = max(1, ‖δ'‖₂/ε).
    mtdnn:           a = η, c = ‖δ + ηg‖ + ε (1 where that is 0).
    """
    if rule == "projection":
        if norm == "inf":
            gn = S[..., 0].amax(dim=1)
        else:
            gn = (S[..., 0].square() * S[..., 1]).sum(dim=1).sqrt()
        a = torch.where(gn > 0, eta / torch.where(gn > 0, gn, 1.0), 0.0)
        if norm == "inf":
            return a, torch.full_like(a, eps)
        g2 = gn.square()
        d2 = (S[..., 2].square() * S[..., 3]).sum(dim=1)
        dg = (S[..., 2] * S[..., 0] * S[..., 4]).sum(dim=1)
        n = (d2 + 2 * a * dg + a.square() * g2).clamp_min(0).sqrt()
        c = torch.where(n > eps, n / eps if eps > 0 else torch.full_like(n, math.inf), 1.0)
        return a, c
    if norm == "inf":
        n = S[..., 2].amax(dim=1)
    else:
        n = (S[..., 2].square() * S[..., 3]).sum(dim=1).sqrt()
    c = n + eps
    return torch.full_like(n, eta), torch.where(c > 0, c, 1.0)


# --------------------------------------------------------------------------------------------
# Public functional (not differentiable: the ascent step is outside the autograd graph, so
# there is no autograd.Function)
# --------------------------------------------------------------------------------------------
def _check_perturb_args(op, delta, grad, step_size, epsilon, norm, rule, token_mask, norm_level):
    check_tensor(delta, "delta", op, ndim=3, dims="(B, L, H)", floating=True)
    B, L, H = delta.shape
    check_tensor(grad, "grad", op, shape=(B, L, H), dims="(B, L, H)", floating=True)
    check_same_dtype(op, delta=delta, grad=grad)
    check_same_device(op, delta=delta, grad=grad)
    check_token_mask(op, token_mask, B, L, delta.device)
    check_nonnegative(op, step_size=step_size, epsilon=epsilon)
    check_choice(op, "norm", norm, NORMS)
    check_choice(op, "rule", rule, RULES)
    check_choice(op, "norm_level", norm_level, NORM_LEVELS)


def smart_perturb_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    step_size: float,
    epsilon: float,
    norm: str = "inf",
    rule: str = "projection",
    token_mask: Optional[torch.Tensor] = None,
    norm_level: str = "token",
) -> torch.Tensor:
    r"""One SMART ascent step on the embedding perturbation δ, fused into one pass.

    Args:
        delta: (B, L, H) floating tensor, the current perturbation δ (any float dtype, CPU or CUDA).
        grad: (B, L, H) g = ∇_δ ℓ_s(f(x + δ), f(x)), same dtype and device as ``delta``.
        step_size: η >= 0, a Python number.
        epsilon: ε >= 0 (ball radius for ``projection``, division guard for ``mtdnn``).
        norm: ``"inf"`` or ``"l2"``.
        rule: ``"projection"`` or ``"mtdnn"`` (below).
        token_mask: optional (B, L) bool / integer / float mask on ``delta``'s device, True or
            non-zero = real token.
        norm_level: ``"token"`` (norms over H, per token) or ``"sequence"`` (over the L×H block
            of each sequence, real tokens only).

    Returns:
        The new δ, (B, L, H), dtype and device of ``delta``; exactly 0 on padded tokens.

    Rules (‖·‖ is ``norm`` taken per token or per sequence):

    * ``"projection"`` -- SMART's projected normalised ascent (Jiang et al. 2020, Alg. 1):

      .. math:: δ ← Π_{‖δ‖ ≤ ε}\big(δ + η\, g / ‖g‖\big)

      ∞-norm: Π is the element-wise clamp to [-ε, ε]. 2-norm: δ' ↦ δ' · min(1, ε/‖δ'‖₂).
      The step has length η whatever the gradient's scale, and δ stays inside the ε-ball.
      If ‖g‖ = 0 the direction is taken as 0 (g/‖g‖ := 0) -- an exact guard instead of adding a
      tiny constant to ‖g‖, so even gradients of 1e-30 keep a unit-norm direction. The kernels
      compute 2-norms as max|x| · ‖x / max|x|‖₂ (the reference accumulates in float64), which
      neither underflows nor overflows.
    * ``"mtdnn"`` -- mt-dnn's ``perturbation.py`` rule (Liu et al., MT-DNN):

      .. math:: δ' = δ + η\, g, \qquad δ ← δ' / (‖δ'‖ + ε)

      i.e. the raw step is rescaled to unit norm (∞-norm by default: every token's largest
      |entry| becomes ≈ 1; with ``norm="l2"`` the 2-norm becomes ≈ 1). ε only guards the
      division, g is not normalised and there is no ε-ball: the new δ's size is ~1 regardless of
      ε, and the caller scales it. Where ‖δ'‖ + ε = 0 (so δ' = 0) the output is 0.

    The difference: ``projection`` bounds δ by ε and steps a fixed length η; ``mtdnn`` uses η only
    as the relative weight of g against the old δ and returns a unit-norm direction.

    Padded tokens are never read: they contribute nothing to per-sequence norms (even if they
    hold NaN) and their output is 0. NaN/Inf in a real token's δ or g propagates into the output
    (the SMART loop checks the gradient for non-finite values before calling this).

    Not differentiable: this operates on detached tensors (the ascent step is outside the
    autograd graph); ``delta``/``grad`` requiring grad are read as plain values and the output
    does not require grad. The per-sequence Triton path runs two passes (statistics, then the
    update); ‖δ'‖₂ there is expanded as ‖δ‖² + 2a⟨δ,g⟩ + a²‖g‖² in float64.

    Dispatch (``_dispatch.use_triton``): CUDA -> Triton, CPU with ``TRITON_INTERPRET=1`` -> Triton
    interpreter, else :func:`smart_perturb_step_reference`.
    """
    op = "smart_perturb_step"
    _check_perturb_args(op, delta, grad, step_size, epsilon, norm, rule, token_mask, norm_level)
    delta, grad = delta.detach(), grad.detach()
    if use_triton(delta, grad, op=op):
        return _perturb_step_triton(delta, grad, float(step_size), float(epsilon), norm, rule, token_mask, norm_level)
    return _perturb_step_torch(delta, grad, float(step_size), float(epsilon), norm, rule, token_mask, norm_level)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _small_norm(x: torch.Tensor, norm: str, dims) -> torch.Tensor:
    """‖x‖ over ``dims`` (keepdim). The 2-norm of float32/16 values accumulates in float64, so
    the squares of tiny gradients (1e-30) neither underflow nor, for huge ones, overflow."""
    if norm == "inf":
        return x.abs().amax(dim=dims, keepdim=True)
    wide = torch.float64
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=wide).to(x.dtype)


def _perturb_step_torch(delta, grad, eta, eps, norm, rule, token_mask, norm_level):
    acc = acc_dtype(delta.dtype)
    d = delta.to(acc)
    g = grad.to(acc)
    keep = None if token_mask is None else (token_mask != 0)[..., None]  # (B, L, 1)
    dims = (-1,) if norm_level == "token" else (-2, -1)
    if keep is not None and norm_level == "sequence":  # padding must not enter the norms
        d = torch.where(keep, d, 0.0)
        g = torch.where(keep, g, 0.0)
    if rule == "projection":
        gn = _small_norm(g, norm, dims)  # (B, L, 1) or (B, 1, 1)
        coef = torch.where(gn > 0, eta / torch.where(gn > 0, gn, 1.0), 0.0)  # η/‖g‖, 0 if g = 0
        dp = torch.addcmul(d, g, coef)
        if norm == "inf":
            out = dp.clamp_(-eps, eps)
        else:
            n = _small_norm(dp, "l2", dims)
            out = dp.mul_(torch.where(n > eps, eps / torch.where(n > 0, n, 1.0), 1.0))
    else:
        dp = torch.add(d, g, alpha=eta)
        den = _small_norm(dp, norm, dims) + eps
        out = dp.div_(torch.where(den > 0, den, 1.0))
    if keep is not None:
        out = out.masked_fill_(~keep, 0.0)
    return out.to(delta.dtype)


def smart_perturb_step_reference(delta: torch.Tensor, grad: torch.Tensor, step_size: float, epsilon: float,
                                 norm: str = "inf", rule: str = "projection", token_mask: Optional[torch.Tensor] = None,
                                 norm_level: str = "token") -> torch.Tensor:
    """Plain-torch :func:`smart_perturb_step` (same arguments, same result; see its docstring).

    Computes in float32 for half inputs and in the input dtype otherwise (2-norms accumulate in
    float64), with the per-sequence norms taken directly (not expanded as in the Triton path).
    """
    op = "smart_perturb_step_reference"
    _check_perturb_args(op, delta, grad, step_size, epsilon, norm, rule, token_mask, norm_level)
    return _perturb_step_torch(
        delta.detach(), grad.detach(), float(step_size), float(epsilon), norm, rule, token_mask, norm_level
    )
