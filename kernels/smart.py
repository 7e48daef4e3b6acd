"""SMART kernels: the fused perturbation step, the symmetric KL and in-kernel Philox noise.

SMART (Jiang et al., ACL 2020) regularises fine-tuning with an adversarial smoothness term

    R_s(θ) = 1/n Σ_i  max_{‖δ_i‖ ≤ ε}  ℓ_s( f(x_i + δ_i; θ), f(x_i; θ) ),

where δ lives on the embedding-layer output (B, L, H). The inner max is approximated by K
projected ascent steps from δ₀ ~ N(0, σ²I). This module holds the element-wise work of that
loop, each op as Triton kernels + launcher + public functional + a plain-torch ``*_reference``
(the CPU fallback and the test oracle):

* :func:`smart_perturb_step` -- one ascent step on δ: normalise g, step, project/rescale, zero
  the padded tokens; one read of δ and g and one write of δ.
* :func:`symmetric_kl` -- ℓ_s for classification: KL(P‖Q) + KL(Q‖P) from logits, fused forward
  and backward with gradients for *both* inputs.
* :func:`smart_noise` -- δ₀ (and R3F's noise) drawn in-kernel with Triton's Philox generator.

Dispatch follows ``_dispatch.use_triton``: CUDA tensors run the kernels, CPU tensors run them
under Triton's interpreter when ``TRITON_INTERPRET=1``, otherwise the references run.
``MINBERT_KERNEL_POISON=1`` makes every launcher allocate its outputs NaN-filled, so an element
a kernel forgets to write shows up in the tests.

Scalars and float64: Triton passes Python floats to kernels as float32. The step size and ε are
therefore passed as three float32 parts whose float64 sum is exactly the Python value
(``_split_f64``); float32/16 kernels effectively use float32(x).
"""
from __future__ import annotations

import math
import struct
from typing import Optional, Sequence

import torch

from ._dispatch import (
    canonical_device,
    check_nonnegative,
    check_same_device,
    check_same_dtype,
    check_tensor,
    use_triton,
)

from ._triton import POISON_ENV, new_output as _empty, tl, triton  # noqa: F401


NORMS = ("inf", "l2")
RULES = ("projection", "mtdnn")
NORM_LEVELS = ("token", "sequence")
REDUCTIONS = ("batchmean", "sum", "mean", "none")
DISTRIBUTIONS = ("normal", "uniform")

_MAX_FUSED_H = 16384  # the perturbation kernels hold one token's H values in registers
_MAX_SEED = 2**63


# =====================================================================================
# Shared Triton helpers
# =====================================================================================


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
def _bf16_rtne(x, RTNE_BF16: tl.constexpr):
    """With RTNE_BF16 (set only under Triton's CPU interpreter, whose float32 -> bfloat16 cast
    truncates), round x to the nearest-even bfloat16 value in the bits, as GPUs' cast does; the
    following ``.to(tl.bfloat16)`` is then exact. Otherwise x is returned unchanged."""
    if RTNE_BF16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x


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


# =====================================================================================
# 1. smart_perturb_step
# =====================================================================================


@triton.jit
def _perturb_token_kernel(
    D_ptr, G_ptr, M_ptr, OUT_ptr,
    n_tokens, H,
    stride_dt, stride_gt, stride_ot,
    eta_hi, eta_mid, eta_lo, eps_hi, eps_mid, eps_lo,
    HAS_MASK: tl.constexpr, RULE_MTDNN: tl.constexpr, NORM_L2: tl.constexpr, RTNE_BF16: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Per-token step: each program updates BLOCK_T tokens (rows of H values) in one pass."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) token ids in [0, B*L)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < n_tokens
    real = row_ok
    if HAS_MASK:
        real = real & (tl.load(M_ptr + rows, mask=row_ok, other=0) != 0)
    col_ok = cols < H
    rows64 = rows.to(tl.int64)
    ld = real[:, None] & col_ok[None, :]  # padded tokens are never read: they become 0
    d = tl.load(D_ptr + rows64[:, None] * stride_dt + cols[None, :], mask=ld, other=0.0).to(ACC)
    g = tl.load(G_ptr + rows64[:, None] * stride_gt + cols[None, :], mask=ld, other=0.0).to(ACC)
    eta = tl.cast(eta_hi, ACC) + tl.cast(eta_mid, ACC) + tl.cast(eta_lo, ACC)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_mid, ACC) + tl.cast(eps_lo, ACC)

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

    st = row_ok[:, None] & col_ok[None, :]
    o_ptrs = OUT_ptr + rows64[:, None] * stride_ot + cols[None, :]
    tl.store(o_ptrs, _bf16_rtne(out, RTNE_BF16).to(OUT_ptr.dtype.element_ty), mask=st)


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
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
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
    zero = tl.zeros([BLOCK_T], dtype=ACC)
    if RULE_MTDNN:
        eta = tl.cast(eta_hi, ACC) + tl.cast(eta_mid, ACC) + tl.cast(eta_lo, ACC)
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
    HAS_MASK: tl.constexpr, CLAMP: tl.constexpr, RTNE_BF16: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Pass 2 of the per-sequence step: δ ← clamp(δ + a_b g, ±c_b) or (δ + a_b g) / c_b.

    a_b, c_b are per-sequence scalars (B,) computed from pass 1's statistics.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
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
    seq = rows // L
    a = tl.load(A_ptr + seq, mask=row_ok, other=0.0)  # (BLOCK_T,)
    c = tl.load(C_ptr + seq, mask=row_ok, other=1.0)
    dp = d + a[:, None] * g
    if CLAMP:
        out = tl.minimum(tl.maximum(dp, -c[:, None]), c[:, None])
    else:
        out = dp / c[:, None]
    st = row_ok[:, None] & col_ok[None, :]
    o_ptrs = OUT_ptr + rows64[:, None] * stride_ot + cols[None, :]
    tl.store(o_ptrs, _bf16_rtne(out, RTNE_BF16).to(OUT_ptr.dtype.element_ty), mask=st)


# ----------------------------------------------------------------------------- host side


def _rtne_bf16(t: torch.Tensor) -> bool:
    """bfloat16 output on the CPU, i.e. under the interpreter, whose float32 -> bfloat16 cast truncates."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype: float64 stays float64, every other float type computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


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


def _mask_u8(token_mask: Optional[torch.Tensor], n_tokens: int, device) -> torch.Tensor:
    """(B, L) mask as a flat uint8 tensor of 0/1 (True / non-zero = real token)."""
    if token_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=device)  # never read (HAS_MASK=False)
    m = token_mask if token_mask.dtype == torch.bool else token_mask != 0
    return m.reshape(n_tokens).contiguous().view(torch.uint8)


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
    mask = _mask_u8(token_mask, n_tokens, delta.device)  # (B*L,) uint8
    acc = _acc_dtype(delta.dtype)
    ACC = _tl_acc(delta.dtype)
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
            HAS_MASK=token_mask is not None, RULE_MTDNN=mtdnn, NORM_L2=l2, RTNE_BF16=_rtne_bf16(out),
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
        HAS_MASK=token_mask is not None, CLAMP=(rule == "projection" and norm == "inf"), RTNE_BF16=_rtne_bf16(out),
        ACC=ACC, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, num_warps=num_warps,
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


def _check_perturb_args(op, delta, grad, step_size, epsilon, norm, rule, token_mask, norm_level):
    check_tensor(delta, "delta", op, ndim=3, dims="(B, L, H)", floating=True)
    B, L, H = delta.shape
    check_tensor(grad, "grad", op, shape=(B, L, H), dims="(B, L, H)", floating=True)
    check_same_dtype(op, delta=delta, grad=grad)
    check_same_device(op, delta=delta, grad=grad)
    _check_token_mask(op, token_mask, B, L, delta.device)
    check_nonnegative(op, step_size=step_size, epsilon=epsilon)
    _check_choice(op, "norm", norm, NORMS)
    _check_choice(op, "rule", rule, RULES)
    _check_choice(op, "norm_level", norm_level, NORM_LEVELS)


def _check_token_mask(op, token_mask, B, L, device: torch.device):
    """``device``: the other inputs' device, with its index (a tensor's ``.device``, or ``canonical_device``)."""
    if token_mask is None:
        return
    check_tensor(token_mask, "token_mask", op, shape=(B, L), dims="(B, L)")
    if token_mask.is_complex():
        raise TypeError(f"{op}: argument 'token_mask' must be bool, integer or float 0/1, got dtype {token_mask.dtype}")
    if token_mask.device != device:
        raise ValueError(
            f"{op}: argument 'token_mask' is on {token_mask.device} but the other inputs are on {device}; "
            "they must match"
        )


def _check_choice(op, name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{op}: argument '{name}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")


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
        delta: (B, L, H) current perturbation δ.
        grad: (B, L, H) g = ∇_δ ℓ_s(f(x + δ), f(x)), same dtype and device as ``delta``.
        step_size: η >= 0.
        epsilon: ε >= 0 (ball radius for ``projection``, division guard for ``mtdnn``).
        norm: ``"inf"`` or ``"l2"``.
        rule: ``"projection"`` or ``"mtdnn"`` (below).
        token_mask: optional (B, L) bool / integer / float mask, True or non-zero = real token.
        norm_level: ``"token"`` (norms over H, per token) or ``"sequence"`` (over the L×H block
            of each sequence, real tokens only).

    Returns:
        The new δ, (B, L, H), dtype of ``delta``; exactly 0 on padded tokens.

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
    """
    op = "smart_perturb_step"
    _check_perturb_args(op, delta, grad, step_size, epsilon, norm, rule, token_mask, norm_level)
    delta, grad = delta.detach(), grad.detach()
    if use_triton(delta, grad, op=op):
        return _perturb_step_triton(delta, grad, float(step_size), float(epsilon), norm, rule, token_mask, norm_level)
    return _perturb_step_torch(delta, grad, float(step_size), float(epsilon), norm, rule, token_mask, norm_level)


def _small_norm(x: torch.Tensor, norm: str, dims) -> torch.Tensor:
    """‖x‖ over ``dims`` (keepdim). The 2-norm of float32/16 values accumulates in float64, so
    the squares of tiny gradients (1e-30) neither underflow nor, for huge ones, overflow."""
    if norm == "inf":
        return x.abs().amax(dim=dims, keepdim=True)
    wide = torch.float64
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=wide).to(x.dtype)


def _perturb_step_torch(delta, grad, eta, eps, norm, rule, token_mask, norm_level):
    acc = _acc_dtype(delta.dtype)
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


def smart_perturb_step_reference(
    delta: torch.Tensor,
    grad: torch.Tensor,
    step_size: float,
    epsilon: float,
    norm: str = "inf",
    rule: str = "projection",
    token_mask: Optional[torch.Tensor] = None,
    norm_level: str = "token",
) -> torch.Tensor:
    """Plain-torch :func:`smart_perturb_step` (same arguments, same result; see its docstring).

    Computes in float32 for half inputs and in the input dtype otherwise (2-norms accumulate in
    float64), with the per-sequence norms taken directly (not expanded as in the Triton path).
    """
    op = "smart_perturb_step_reference"
    _check_perturb_args(op, delta, grad, step_size, epsilon, norm, rule, token_mask, norm_level)
    return _perturb_step_torch(
        delta.detach(), grad.detach(), float(step_size), float(epsilon), norm, rule, token_mask, norm_level
    )


# =====================================================================================
# 2. symmetric_kl
# =====================================================================================


@triton.jit
def _symkl_load(P_ptr, Q_ptr, rows64, row_ok, cols, n_cols, stride_pm, stride_qm, ACC: tl.constexpr):
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    p = tl.load(P_ptr + rows64[:, None] * stride_pm + cols[None, :], mask=ok, other=0.0).to(ACC)
    q = tl.load(Q_ptr + rows64[:, None] * stride_qm + cols[None, :], mask=ok, other=0.0).to(ACC)
    return p, q, col_ok


@triton.jit
def _symkl_row_stats(
    P_ptr, Q_ptr, rows64, row_ok, n_cols, stride_pm, stride_qm,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Online pass over the columns: per-row max m and log Σ exp(x - m) of p and q, and r.

    log P = (p - m_p) - log Σ e^{p - m_p} (never p - lse_p: lse rounds at the logits' magnitude).
    r = lse_p - lse_q = log Σ_c Q_c e^{Δ_c} with Δ = p - q, computed as
    log1p(Σ_c Q_c expm1(Δ_c)); it is used when max|Δ| <= 1 (``near``), where d = Δ - r keeps
    full relative precision while log P - log Q would cancel (SMART's logits differ by ~1e-5).
    """
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
    return m_p, ls_p, m_q, ls_q, r, near


@triton.jit
def _symkl_terms(p, q, col_ok, m_p, ls_p, m_q, ls_q, r, near):
    """P, Q, d = log P - log Q and P - Q for one chunk (all 0 on masked columns).

    P - Q is -P·expm1(-d) where d > 0 and Q·expm1(d) elsewhere: accurate when P ≈ Q and never
    0·∞ when one probability underflows.
    """
    lp = (p - m_p[:, None]) - ls_p[:, None]
    lq = (q - m_q[:, None]) - ls_q[:, None]
    P = tl.exp(tl.where(col_ok[None, :], lp, float("-inf")))
    Q = tl.exp(tl.where(col_ok[None, :], lq, float("-inf")))
    d = tl.where(near[:, None], (p - q) - r[:, None], lp - lq)
    d = tl.where(col_ok[None, :], d, 0.0)
    pmq = tl.where(d > 0, -P * _expm1(-tl.maximum(d, 0.0)), Q * _expm1(tl.minimum(d, 0.0)))
    return P, Q, d, pmq


@triton.jit
def _symkl_fwd_kernel(
    P_ptr, Q_ptr, LOSS_ptr,
    n_rows, n_cols, stride_pm, stride_qm,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """loss_i = Σ_c (P_ic - Q_ic)(log P_ic - log Q_ic) for BLOCK_R rows of (N, C) logits."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    m_p, ls_p, m_q, ls_q, r, near = _symkl_row_stats(
        P_ptr, Q_ptr, rows64, row_ok, n_cols, stride_pm, stride_qm, ACC, BLOCK_R, BLOCK_C
    )
    loss = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        p, q, col_ok = _symkl_load(P_ptr, Q_ptr, rows64, row_ok, cols, n_cols, stride_pm, stride_qm, ACC)
        P, Q, d, pmq = _symkl_terms(p, q, col_ok, m_p, ls_p, m_q, ls_q, r, near)
        loss += tl.sum(pmq * d, axis=1)  # every term >= 0
    tl.store(LOSS_ptr + rows, loss, mask=row_ok)


@triton.jit
def _symkl_bwd_kernel(
    P_ptr, Q_ptr, G_ptr, DP_ptr, DQ_ptr,
    n_rows, n_cols, stride_pm, stride_qm, stride_g, stride_dpm, stride_dqm,
    WRITE_DP: tl.constexpr, WRITE_DQ: tl.constexpr, RTNE_BF16: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """∂loss_i/∂p = P ⊙ (d - Σ P d) + (P - Q),  ∂loss_i/∂q = Q ⊙ (Σ Q d - d) - (P - Q), times G_i."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    m_p, ls_p, m_q, ls_q, r, near = _symkl_row_stats(
        P_ptr, Q_ptr, rows64, row_ok, n_cols, stride_pm, stride_qm, ACC, BLOCK_R, BLOCK_C
    )
    ep = tl.zeros([BLOCK_R], ACC)  # Σ P d = KL(P‖Q)
    eq = tl.zeros([BLOCK_R], ACC)  # Σ Q d = -KL(Q‖P)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        p, q, col_ok = _symkl_load(P_ptr, Q_ptr, rows64, row_ok, cols, n_cols, stride_pm, stride_qm, ACC)
        P, Q, d, pmq = _symkl_terms(p, q, col_ok, m_p, ls_p, m_q, ls_q, r, near)
        ep += tl.sum(P * d, axis=1)
        eq += tl.sum(Q * d, axis=1)
    go = tl.load(G_ptr + rows64 * stride_g, mask=row_ok, other=0.0).to(ACC)  # (BLOCK_R,)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        p, q, col_ok = _symkl_load(P_ptr, Q_ptr, rows64, row_ok, cols, n_cols, stride_pm, stride_qm, ACC)
        P, Q, d, pmq = _symkl_terms(p, q, col_ok, m_p, ls_p, m_q, ls_q, r, near)
        st = row_ok[:, None] & col_ok[None, :]
        if WRITE_DP:
            dp = go[:, None] * (P * (d - ep[:, None]) + pmq)
            dp_ptrs = DP_ptr + rows64[:, None] * stride_dpm + cols[None, :]
            tl.store(dp_ptrs, _bf16_rtne(dp, RTNE_BF16).to(DP_ptr.dtype.element_ty), mask=st)
        if WRITE_DQ:
            dq = go[:, None] * (Q * (eq[:, None] - d) - pmq)
            dq_ptrs = DQ_ptr + rows64[:, None] * stride_dqm + cols[None, :]
            tl.store(dq_ptrs, _bf16_rtne(dq, RTNE_BF16).to(DQ_ptr.dtype.element_ty), mask=st)


# ----------------------------------------------------------------------------- host side


def _symkl_blocks(n_cols: int, block_c: Optional[int] = None):
    BLOCK_C = block_c or min(triton.next_power_of_2(max(n_cols, 1)), 1024)
    BLOCK_R = max(1, min(256, 2048 // BLOCK_C))
    num_warps = 4 if BLOCK_R * BLOCK_C <= 2048 else 8
    return BLOCK_R, BLOCK_C, num_warps


def _symkl_forward(p2: torch.Tensor, q2: torch.Tensor, block_c: Optional[int] = None) -> torch.Tensor:
    """Per-row symmetric KL of (N, C) logits, in the compute dtype."""
    N, C = p2.shape
    loss = _empty((N,), _acc_dtype(p2.dtype), p2.device)
    BLOCK_R, BLOCK_C, num_warps = _symkl_blocks(C, block_c)
    _symkl_fwd_kernel[(triton.cdiv(N, BLOCK_R),)](
        p2, q2, loss, N, C, p2.stride(0), q2.stride(0),
        ACC=_tl_acc(p2.dtype), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps,
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
        WRITE_DP=need_p, WRITE_DQ=need_q, RTNE_BF16=_rtne_bf16(p2),
        ACC=_tl_acc(p2.dtype), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    return dp, dq


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
        g = grad_rows.to(_acc_dtype(p2.dtype))
        if g.dim() != 1 or g.shape[0] != p2.shape[0]:
            g = g.reshape(p2.shape[0]).contiguous()
        dp, dq = _symkl_backward(p2, q2, g, need_p, need_q, ctx.block_c)
        return dp, dq, None


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
    _check_choice(op, "reduction", reduction, REDUCTIONS)


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


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    r"""Symmetric KL divergence KL(P‖Q) + KL(Q‖P) between softmax distributions given by logits.

    With P = softmax(p), Q = softmax(q) over the last dimension and d = log P - log Q:

    .. math:: ℓ_s(p, q) = \sum_c (P_c - Q_c)(\log P_c - \log Q_c) = \sum_c (P_c - Q_c)\, d_c

    Gradients (both inputs; Σ P = Σ Q = 1):

    .. math:: ∂ℓ_s/∂p_j = P_j (d_j - \textstyle\sum_c P_c d_c) + (P_j - Q_j), \qquad
              ∂ℓ_s/∂q_j = Q_j (\textstyle\sum_c Q_c d_c - d_j) - (P_j - Q_j)

    Args:
        p_logits, q_logits: (..., C) logits of the same shape, dtype and device; any C >= 1.
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
    """(...) logits z of a sigmoid output -> (..., 2) two-class logits [0, z].

    softmax([0, z]) = [1 - σ(z), σ(z)], so :func:`symmetric_kl` of two such tensors is the
    symmetric KL between the Bernoulli distributions; differentiable in z.
    """
    check_tensor(z, "z", "binary_to_two_class_logits", floating=True)
    return torch.stack([torch.zeros_like(z), z], dim=-1)


def _symmetric_kl_torch(p_logits, q_logits, reduction):
    acc = _acc_dtype(p_logits.dtype)
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


# =====================================================================================
# 3. smart_noise
# =====================================================================================


@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(
    OUT_ptr, M_ptr, n_elements, H, seed, sigma,
    HAS_MASK: tl.constexpr, UNIFORM: tl.constexpr, OFFSETS_64: tl.constexpr, RTNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """OUT[i] = σ·z_i with z_i = randn(seed, i) or 2·rand(seed, i) - 1 (Philox4x32-10 at counter i),
    0 where the token i // H is padding."""
    pid = tl.program_id(0)
    if OFFSETS_64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elements
    if UNIFORM:
        z = tl.rand(seed, offs) * 2.0 - 1.0
    else:
        z = tl.randn(seed, offs)
    z = z * sigma
    if HAS_MASK:
        keep = tl.load(M_ptr + offs // H, mask=ok, other=0) != 0
        z = tl.where(keep, z, 0.0)
    tl.store(OUT_ptr + offs, _bf16_rtne(z, RTNE_BF16).to(OUT_ptr.dtype.element_ty), mask=ok)


def _check_noise_args(op, shape, sigma, seed, token_mask, distribution, device, dtype):
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{op}: argument 'shape' must be a sequence (B, L, H), got {type(shape).__name__}") from None
    if len(dims) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in dims):
        raise ValueError(f"{op}: argument 'shape' must be 3 non-negative ints (B, L, H), got {shape!r}")
    check_nonnegative(op, sigma=sigma)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"{op}: argument 'seed' must be an int in [0, 2**63), got {seed!r}")
    _check_choice(op, "distribution", distribution, DISTRIBUTIONS)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{op}: argument 'dtype' must be a floating-point torch.dtype, got {dtype!r}")
    if device is None:
        device = token_mask.device if isinstance(token_mask, torch.Tensor) else torch.empty(0).device
    device = canonical_device(device)
    _check_token_mask(op, token_mask, dims[0], dims[1], device)
    return dims, device


def smart_noise(
    shape: Sequence[int],
    sigma: float,
    seed: int,
    token_mask: Optional[torch.Tensor] = None,
    distribution: str = "normal",
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random perturbation δ₀ of shape (B, L, H) drawn in-kernel, 0 on padded tokens.

    ``"normal"``: N(0, σ²) (SMART's δ₀ ~ N(0, σ²I); R3F's normal noise).
    ``"uniform"``: U(-σ, σ) (R3F's uniform noise).

    Element i of the flattened (B, L, H) tensor is a pure function of (seed, i): Triton's
    Philox4x32-10 at counter i with key ``seed`` (``tl.randn`` / ``tl.rand``). Values are made
    in float32, multiplied by float32(σ), zeroed on padded tokens and cast to ``dtype``. Nothing is
    drawn from torch's generator: the caller supplies the seed (e.g. a step counter mixed with a
    base seed); the same seed gives identical noise, different seeds independent streams.

    Reproducibility (``smart_noise_reference`` runs the same Philox in plain torch integer ops):
    ``"uniform"`` is bit-identical between the kernel and the reference. ``"normal"`` applies
    Box-Muller (log, sqrt, cos) to the same uniforms, so it matches the reference to a few float32
    ulp (transcendental functions differ between numpy, torch and GPU fast-math), not bit for bit.

    Args:
        shape: (B, L, H).
        sigma: σ >= 0.
        seed: int in [0, 2**63).
        token_mask: optional (B, L) mask, True / non-zero = real token.
        distribution: ``"normal"`` or ``"uniform"``.
        device: output device (default: ``token_mask``'s device, else torch's default device).
        dtype: floating output dtype.
    """
    op = "smart_noise"
    (B, L, H), device = _check_noise_args(op, shape, sigma, seed, token_mask, distribution, device, dtype)
    out = _empty((B, L, H), dtype, device)
    if not use_triton(out, op=op):
        return _noise_torch((B, L, H), float(sigma), seed, token_mask, distribution, device, dtype)
    n = out.numel()
    if n == 0:
        return out
    mask = _mask_u8(token_mask, B * L, device)
    BLOCK = 1024
    _noise_kernel[(triton.cdiv(n, BLOCK),)](
        out, mask, n, H, seed, float(sigma),
        HAS_MASK=token_mask is not None, UNIFORM=distribution == "uniform",
        OFFSETS_64=n + BLOCK >= 2**31, RTNE_BF16=_rtne_bf16(out), BLOCK=BLOCK, num_warps=4,
    )
    return out


# Philox4x32-10 constants (Salmon et al., SC'11), as in triton.language.random
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_M32 = 0xFFFFFFFF


_WRAPS = {}


def _int64_mul_wraps(device: torch.device) -> bool:
    """Whether int64 products wrap modulo 2**64 on this device (checked once per device type)."""
    key = device.type
    if key not in _WRAPS:
        x = torch.tensor([_M32], dtype=torch.int64, device=device) * _M32  # 0xFFFFFFFE00000001 mod 2**64
        _WRAPS[key] = bool(((x >> 32) & _M32).item() == 0xFFFFFFFE and (x & _M32).item() == 1)
    return _WRAPS[key]


def _mulhilo32(a: int, x: torch.Tensor):
    """(high, low) 32-bit halves of a * x for a < 2**32 and an int64 tensor x of values < 2**32.

    The 64-bit product is taken modulo 2**64 by int64 wrap-around where the device does that
    (checked by ``_int64_mul_wraps``); otherwise a is split into 16-bit halves so every partial
    product stays below 2**63."""
    if _int64_mul_wraps(x.device):
        prod = x * a
        return (prod >> 32) & _M32, prod & _M32
    t_lo = x * (a & 0xFFFF)  # < 2**48
    t_hi = x * (a >> 16)  # < 2**48
    mid = t_lo + ((t_hi & 0xFFFF) << 16)  # < 2**49
    return (t_hi >> 16) + (mid >> 32), mid & _M32


def _philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 counters, with a 64-bit key (k0 low, k1 high)."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """triton.language.random.uint_to_uniform_float for uint32 values in int64: float32 in [0, 1)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x
    return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=x.device)


def _noise_values(offs: torch.Tensor, seed: int, distribution: str) -> torch.Tensor:
    """float32 N(0, 1) or U(-1, 1) values for the element indices ``offs`` (int64), as the kernel."""
    zero = torch.zeros_like(offs)
    r0, r1, _, _ = _philox4x32(offs & _M32, offs >> 32, zero, zero, seed & _M32, (seed >> 32) & _M32)
    u1 = _uint32_to_uniform(r0)
    if distribution == "uniform":
        return u1 * 2.0 - 1.0
    f32, device = torch.float32, offs.device
    u2 = _uint32_to_uniform(r1)
    u1 = torch.maximum(u1, torch.tensor(1.0e-7, dtype=f32, device=device))
    th = torch.tensor(6.283185307179586, dtype=f32, device=device) * u2
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(th)


_CPU_CHUNK = 1 << 16  # elements per Philox pass on the CPU (keeps the int64 temporaries in cache)


def _noise_torch(shape, sigma, seed, token_mask, distribution, device, dtype):
    B, L, H = shape
    n = B * L * H
    z = torch.empty(n, dtype=torch.float32, device=device)
    chunk = _CPU_CHUNK if device.type == "cpu" else max(n, 1)
    for start in range(0, n, chunk):
        offs = torch.arange(start, min(n, start + chunk), dtype=torch.int64, device=device)
        z[start:start + offs.numel()] = _noise_values(offs, seed, distribution)
    z = (z * torch.tensor(sigma, dtype=torch.float32, device=device)).reshape(B, L, H)
    if token_mask is not None:
        z = z.masked_fill_(~(token_mask != 0)[..., None], 0.0)
    return z.to(dtype)


def smart_noise_reference(
    shape: Sequence[int],
    sigma: float,
    seed: int,
    token_mask: Optional[torch.Tensor] = None,
    distribution: str = "normal",
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain-torch :func:`smart_noise`: the same Philox4x32-10 stream in int64 tensor arithmetic.

    Bit-identical to the kernel for ``"uniform"``; for ``"normal"`` equal up to a few float32 ulp
    of the Box-Muller transcendentals (see :func:`smart_noise`).
    """
    op = "smart_noise_reference"
    (B, L, H), device = _check_noise_args(op, shape, sigma, seed, token_mask, distribution, device, dtype)
    return _noise_torch((B, L, H), float(sigma), seed, token_mask, distribution, device, dtype)
