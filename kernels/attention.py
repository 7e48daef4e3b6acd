"""Fused bidirectional attention for BERT: padding-aware, with dropout on the attention probabilities.

    O = dropout_p( softmax(softmax_scale · Q K^T + M) ) V,     M_ij = -inf where key j is padding

computed FlashAttention-style: an online softmax over the key blocks that hold real tokens, nothing
of size L x L stored, the dropout mask regenerated from counter-based Philox in the backward
(counter layout in ``attention_dropout.py``). The backward is FlashAttention-2's, deterministic
(no atomics). docs/attention.md has the derivation of the forward, the backward and the dropout.

Limits: head dims 16, 32, 64, 128; fp32 / fp16 / bf16 (fp32 accumulation; fp32 dots are IEEE
unless ``torch.backends.cuda.matmul.allow_tf32`` is on); any L >= 1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._dispatch import check_number, check_same_device, check_same_dtype, check_seed, check_tensor, use_triton
from ._triton import POISON_ENV, new_output as _new_output, tl, triton  # noqa: F401
from ._triton import cast, device_ctx, dot, interp_bf16  # bf16 under the interpreter
from .attention_dropout import attention_dropout_mask, needs_int64_counters

OP = "attention"
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, KeyMask_ptr, BlockTable_ptr, BlockCount_ptr, O_ptr, LSE_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_mb, stride_ml, stride_tb,
    H, L, qk_scale, p_drop, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFSET_64: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """One program = one (batch, head, query block); loops over the live key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L

    q_base = Q_ptr + b * stride_qb + h * stride_qh
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)

    if OFFSET_64:
        row_base = (pid_bh.to(tl.int64) * L + offs_m) * L  # dropout counter of (i, j=0)
    else:
        row_base = (pid_bh * L + offs_m) * L

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of S (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(S - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running sum of exp2(S - m) Z V

    if HAS_MASK:
        n_blocks = tl.load(BlockCount_ptr + b)  # key blocks with >= 1 real key
    else:
        n_blocks = tl.cdiv(L, BLOCK_N)
    for it in range(0, n_blocks):
        if HAS_MASK:
            start_n = tl.load(BlockTable_ptr + b * stride_tb + it) * BLOCK_N
        else:
            start_n = it * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        if HAS_MASK:
            key_ok = tl.load(KeyMask_ptr + b * stride_mb + offs_n * stride_ml, mask=offs_n < L, other=0) != 0
        else:
            key_ok = offs_n < L
        # padded keys are never read, so garbage (even NaN) there cannot leak into O
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                    mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)

        s = dot(q, tl.trans(k), DOT_PRECISION, INTERP_BF16) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        # a live block has a real key, so m_new is finite and no inf - inf arises
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = tl.rand(seed, row_base[:, None] + offs_n[None, :]) >= p_drop
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + dot(cast(p, v.dtype, INTERP_BF16), v, DOT_PRECISION, INTERP_BF16)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]  # rows without a real key: acc == 0 -> O == 0
    if HAS_DROPOUT:
        o = o * inv_keep
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))  # +inf -> P == 0 in backward
    o_base = O_ptr + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
             cast(o, O_ptr.dtype.element_ty, INTERP_BF16), mask=row_ok[:, None])
    tl.store(LSE_ptr + pid_bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O_ptr, DO_ptr, Delta_ptr,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    H, L,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta_i = rowsum(dO_i * O_i) in fp32, (B*H, L)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    o = tl.load(O_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta_ptr + pid_bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, KeyMask_ptr, BlockLive_ptr, LSE_ptr, Delta_ptr, DK_ptr, DV_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    stride_mb, stride_ml, stride_lb,
    H, L, sm_scale, qk_scale, p_drop, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFSET_64: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """One program = one (batch, head, key block): dK, dV, looping over all query blocks.

    Works on the transposed tile S^T (BLOCK_N, BLOCK_M) so dV = P~^T dO and dK = dS^T Q are
    plain dots. A key block made only of padding runs no iteration and stores zeros.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < L
    if HAS_MASK:
        key_ok = tl.load(KeyMask_ptr + b * stride_mb + offs_n * stride_ml, mask=col_ok, other=0) != 0
        live = tl.load(BlockLive_ptr + b * stride_lb + pid_n)
        row_end = tl.where(live != 0, L, 0)
    else:
        key_ok = col_ok
        row_end = L

    k = tl.load(K_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
    v = tl.load(V_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    do_base = DO_ptr + b * stride_dob + h * stride_doh
    stat_base = pid_bh.to(tl.int64) * L

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, row_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = offs_m < L
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
        do = tl.load(do_base + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
        lse = tl.load(LSE_ptr + stat_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta_ptr + stat_base + offs_m, mask=row_ok, other=0.0)

        s_t = dot(k, tl.trans(q), DOT_PRECISION, INTERP_BF16) * qk_scale  # (BLOCK_N, BLOCK_M)
        s_t = tl.where(key_ok[:, None], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])  # P^T, undropped
        dp_t = dot(v, tl.trans(do), DOT_PRECISION, INTERP_BF16)  # (dO V^T)^T
        if HAS_DROPOUT:
            if OFFSET_64:
                counter = (pid_bh.to(tl.int64) * L + offs_m[None, :]) * L + offs_n[:, None]
            else:
                counter = (pid_bh * L + offs_m[None, :]) * L + offs_n[:, None]
            keep = tl.rand(seed, counter) >= p_drop
            pd_t = tl.where(keep, p_t, 0.0)  # P~^T * (1 - p); scaled once after the loop
            dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
        else:
            pd_t = p_t
        dv += dot(cast(pd_t, do.dtype, INTERP_BF16), do, DOT_PRECISION, INTERP_BF16)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += dot(cast(ds_t, q.dtype, INTERP_BF16), q, DOT_PRECISION, INTERP_BF16)

    if HAS_DROPOUT:
        dv = dv * inv_keep
    dk = dk * sm_scale
    tl.store(DK_ptr + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :] * stride_dkd,
             cast(dk, DK_ptr.dtype.element_ty, INTERP_BF16), mask=col_ok[:, None])
    tl.store(DV_ptr + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvl + offs_d[None, :] * stride_dvd,
             cast(dv, DV_ptr.dtype.element_ty, INTERP_BF16), mask=col_ok[:, None])


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, KeyMask_ptr, BlockTable_ptr, BlockCount_ptr, LSE_ptr, Delta_ptr, DQ_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_mb, stride_ml, stride_tb,
    H, L, sm_scale, qk_scale, p_drop, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFSET_64: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """One program = one (batch, head, query block): dQ = scale * sum over live key blocks of dS K."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(Q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(DO_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    stat_base = pid_bh.to(tl.int64) * L
    lse = tl.load(LSE_ptr + stat_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta_ptr + stat_base + offs_m, mask=row_ok, other=0.0)
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    if OFFSET_64:
        row_base = (pid_bh.to(tl.int64) * L + offs_m) * L
    else:
        row_base = (pid_bh * L + offs_m) * L

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_MASK:
        n_blocks = tl.load(BlockCount_ptr + b)
    else:
        n_blocks = tl.cdiv(L, BLOCK_N)
    for it in range(0, n_blocks):
        if HAS_MASK:
            start_n = tl.load(BlockTable_ptr + b * stride_tb + it) * BLOCK_N
        else:
            start_n = it * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if HAS_MASK:
            key_ok = tl.load(KeyMask_ptr + b * stride_mb + offs_n * stride_ml, mask=offs_n < L, other=0) != 0
        else:
            key_ok = offs_n < L
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                    mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        s = dot(q, tl.trans(k), DOT_PRECISION, INTERP_BF16) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = dot(do, tl.trans(v), DOT_PRECISION, INTERP_BF16)  # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:
            keep = tl.rand(seed, row_base[:, None] + offs_n[None, :]) >= p_drop
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += dot(cast(ds, k.dtype, INTERP_BF16), k, DOT_PRECISION, INTERP_BF16)

    dq = dq * sm_scale
    tl.store(DQ_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :] * stride_dqd,
             cast(dq, DQ_ptr.dtype.element_ty, INTERP_BF16), mask=row_ok[:, None])



# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _config(L: int, D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes and launch options. One BLOCK_N serves the forward, dQ and dK/dV kernels so
    they share the live-key-block table. GPU values: the forward's were swept on an H100 (see
    below), the backward's are untuned starting points; fp32 with D = 128 gets smaller tiles so its
    staged K/V buffers fit."""
    fit = max(16, _next_pow2(L))
    if device.type != "cuda":  # interpreter: big blocks mean fewer (slow) Python-level steps
        b = min(64, fit)
        return dict(BLOCK_M=b, BLOCK_N=b, BWD_BLOCK_M=b, fwd_warps=4, bwd_warps=4, fwd_stages=1, bwd_stages=1)
    wide = dtype == torch.float32 and D == 128
    # forward BLOCK_M 64 (not 128) for D <= 64: on an H100 (2026-11-25, bf16, padding, dropout 0.1)
    # it took the forward from 67 to 55 us at (32, 12, 128, 64) and from 139 to 117 us at
    # (8, 12, 512, 64); benchmarks/gpu_profile.py --sweep has the grid
    return dict(
        BLOCK_M=min(64 if wide or D <= 64 else 128, fit),
        BLOCK_N=min(64, fit),
        BWD_BLOCK_M=min(32 if wide else 64, fit),
        fwd_warps=4 if D <= 64 else 8,
        bwd_warps=4 if D <= 64 else 8,
        fwd_stages=3 if D <= 64 else 2,
        bwd_stages=1 if wide else 2,
    )


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _key_block_table(key_mask: torch.Tensor, block_n: int):
    """Per (batch, key block): live flag (any real key), and the live block indices packed first.

    Returns ``live`` (B, NB) int8, ``table`` (B, NB) int32 (live blocks in ascending order, then
    the dead ones) and ``count`` (B,) int32. Exact for arbitrary masks, not only right padding.
    """
    B, L = key_mask.shape
    nb = triton.cdiv(L, block_n)
    valid = F.pad(key_mask != 0, (0, nb * block_n - L))  # (B, NB * BLOCK_N)
    live = valid.view(B, nb, block_n).any(-1)  # (B, NB)
    count = live.sum(1, dtype=torch.int32).contiguous()
    table = torch.argsort((~live).to(torch.int8), dim=1, stable=True).to(torch.int32).contiguous()
    return live.to(torch.int8).contiguous(), table, count


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def _attn_fwd(q, k, v, key_mask, dropout_p: float, softmax_scale: float, seed: int):
    """Launch the forward. Returns O (B, H, L, D), LSE (B, H, L) fp32 base-2, and the block table."""
    B, H, L, D = q.shape
    cfg = _config(L, D, q.dtype, q.device)
    o = _new_output((B, H, L, D), q.dtype, q.device)
    lse = _new_output((B, H, L), torch.float32, q.device)
    has_mask = key_mask is not None
    if has_mask:
        live, table, count = _key_block_table(key_mask, cfg["BLOCK_N"])
        mask_arg, mask_strides, table_stride = key_mask, _strides(key_mask), table.stride(0)
    else:
        live = table = count = None
        mask_arg, mask_strides, table_stride = q, (0, 0), 0  # placeholders, never read
    has_dropout = dropout_p > 0.0
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * H)
    with device_ctx(q.device):
        _attn_fwd_kernel[grid](
            q, k, v, mask_arg, table if has_mask else q, count if has_mask else q, o, lse,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            *mask_strides, table_stride,
            H, L, softmax_scale * _LOG2E, float(dropout_p), 1.0 / (1.0 - dropout_p), int(seed),
            HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            HAS_MASK=has_mask, HAS_DROPOUT=has_dropout, OFFSET_64=needs_int64_counters(B, H, L),
            DOT_PRECISION=_dot_precision(q.dtype), INTERP_BF16=interp_bf16(q),
            num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"],
        )
    return o, lse, (live, table, count)


def _attn_bwd(do, q, k, v, o, lse, key_mask, live, table, count, dropout_p: float, softmax_scale: float, seed: int):
    """Launch the deterministic backward: Delta, then dK/dV per key block, then dQ per query block."""
    B, H, L, D = q.shape
    cfg = _config(L, D, q.dtype, q.device)
    delta = _new_output((B, H, L), torch.float32, q.device)
    dq = _new_output(q.shape, q.dtype, q.device)
    dk = _new_output(k.shape, k.dtype, k.device)
    dv = _new_output(v.shape, v.dtype, v.device)
    has_mask = key_mask is not None
    mask_arg = key_mask if has_mask else q
    mask_strides = _strides(key_mask) if has_mask else (0, 0)
    has_dropout = dropout_p > 0.0
    common = dict(
        HEAD_DIM=D, HAS_MASK=has_mask, HAS_DROPOUT=has_dropout, OFFSET_64=needs_int64_counters(B, H, L),
        DOT_PRECISION=_dot_precision(q.dtype), INTERP_BF16=interp_bf16(q), num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"],
    )
    scalars = (H, L, softmax_scale, softmax_scale * _LOG2E, float(dropout_p), 1.0 / (1.0 - dropout_p), int(seed))
    with device_ctx(q.device):
        bm = cfg["BWD_BLOCK_M"]
        _attn_bwd_preprocess_kernel[(triton.cdiv(L, bm), B * H)](
            o, do, delta, *_strides(o), *_strides(do), H, L, HEAD_DIM=D, BLOCK_M=bm,
        )
        _attn_bwd_dkdv_kernel[(triton.cdiv(L, cfg["BLOCK_N"]), B * H)](
            q, k, v, do, mask_arg, live if has_mask else q, lse, delta, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            *mask_strides, live.stride(0) if has_mask else 0,
            *scalars, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], **common,
        )
        _attn_bwd_dq_kernel[(triton.cdiv(L, bm), B * H)](
            q, k, v, do, mask_arg, table if has_mask else q, count if has_mask else q, lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            *mask_strides, table.stride(0) if has_mask else 0,
            *scalars, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], **common,
        )
    return dq, dk, dv



# --------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------
class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, dropout_p, softmax_scale, seed):
        o, lse, (live, table, count) = _attn_fwd(q, k, v, key_mask, dropout_p, softmax_scale, seed)
        ctx.save_for_backward(q, k, v, o, lse, key_mask, live, table, count)
        ctx.dropout_p, ctx.softmax_scale, ctx.seed = dropout_p, softmax_scale, seed
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, key_mask, live, table, count = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(do, q, k, v, o, lse, key_mask, live, table, count,
                               ctx.dropout_p, ctx.softmax_scale, ctx.seed)
        return dq, dk, dv, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public functional
# --------------------------------------------------------------------------------------------
def _check_inputs(op, q, k, v, key_padding_mask, dropout_p, softmax_scale, seed):
    """Common validation; returns (dropout_p, softmax_scale, seed) normalised."""
    dims = "(B, H, L, D)"
    check_tensor(q, "q", op, ndim=4, dims=dims, floating=True)
    check_tensor(k, "k", op, ndim=4, dims=dims, floating=True)
    check_tensor(v, "v", op, ndim=4, dims=dims, floating=True)
    check_same_device(op, q=q, k=k, v=v)
    check_same_dtype(op, q=q, k=k, v=v)
    B, H, L, D = q.shape
    check_tensor(k, "k", op, shape=(B, H, L, D), dims=dims)
    check_tensor(v, "v", op, shape=(B, H, L, D), dims=dims)
    if key_padding_mask is not None:
        check_tensor(key_padding_mask, "key_padding_mask", op, shape=(B, L), dims="(B, L)", device=q.device)
        if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
            raise TypeError(
                f"{op}: argument 'key_padding_mask' must be bool or integer (1/True = real token), "
                f"got dtype {key_padding_mask.dtype}"
            )
    dropout_p = check_number(op, "dropout_p", dropout_p, 0.0, 1.0, hi_open=True)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    else:
        softmax_scale = check_number(op, "softmax_scale", softmax_scale, 0.0, None, hi_open=False)
        if softmax_scale == 0.0:
            raise ValueError(f"{op}: argument 'softmax_scale' must be > 0, got {softmax_scale!r}")
    return dropout_p, softmax_scale, check_seed(op, seed)


def _check_kernel_inputs(op, q):
    if q.dtype not in KERNEL_DTYPES:
        allowed = ", ".join(str(d) for d in KERNEL_DTYPES)
        raise TypeError(f"{op}: the Triton kernel needs q, k, v with dtype in ({allowed}), got {q.dtype}")
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{op}: head dim D = {D} (last dimension of q, k, v of shape (B, H, L, D)) is not supported "
            f"by the Triton kernel; supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}"
        )


def _as_byte_mask(key_padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, L) uint8 view of the mask, nonzero = real token."""
    if key_padding_mask is None:
        return None
    m = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
    return m.view(torch.uint8)


def _draw_seed() -> int:
    """A dropout seed from torch's default CPU generator, so ``torch.manual_seed`` reproduces runs."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """Bidirectional attention ``softmax(scale * Q K^T + mask) V`` with inverted dropout on the probabilities.

    Args:
        q, k, v: (B, H, L, D) floating tensors on one device (CPU or CUDA), one dtype. The kernel
            takes float32 / float16 / bfloat16 with D in (16, 32, 64, 128); any strides.
        key_padding_mask: optional (B, L) bool or 0/1 integer tensor on q's device, True/1 = real
            token. Padded keys get zero weight; a query whose keys are all padded returns zeros
            (and zero gradients).
        dropout_p: Python float in [0, 1); kept probabilities are scaled by 1 / (1 - p).
        softmax_scale: Python float > 0; defaults to 1 / sqrt(D).
        seed: Python int in [0, 2**63), the Philox key of the dropout mask (counters (b, h, i, j),
            see :func:`attention_dropout_mask`); drawn from torch's default CPU generator when None
            and dropout_p > 0.

    Returns:
        (B, H, L, D) tensor of q's dtype. Runs the Triton kernel on CUDA (or on CPU under
        ``TRITON_INTERPRET=1``), else :func:`attention_reference` (see ``_dispatch.py``).
    """
    dropout_p, softmax_scale, seed = _check_inputs(OP, q, k, v, key_padding_mask, dropout_p, softmax_scale, seed)
    if not use_triton(q, op=OP):
        return attention_reference(q, k, v, key_padding_mask, dropout_p, softmax_scale, seed)
    _check_kernel_inputs(OP, q)
    if dropout_p > 0.0 and seed is None:
        seed = _draw_seed()
    if q.numel() == 0:
        return attention_reference(q, k, v, key_padding_mask, 0.0, softmax_scale)
    return _AttentionFunction.apply(q, k, v, _as_byte_mask(key_padding_mask), dropout_p, softmax_scale,
                                    0 if seed is None else seed)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    seed: Optional[int] = None,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain-torch attention, the CPU fallback and the test oracle (any floating dtype, any D).

    Dropout: with ``dropout_mask`` (B, H, L, L) bool, kept probabilities are ``P * Z / (1 - p)``;
    otherwise with ``seed`` the kernel's exact mask comes from :func:`attention_dropout_mask`;
    otherwise ``torch.nn.functional.dropout`` draws one.
    """
    op = "attention_reference"
    dropout_p, softmax_scale, seed = _check_inputs(op, q, k, v, key_padding_mask, dropout_p, softmax_scale, seed)
    B, H, L, D = q.shape
    if dropout_mask is not None:
        check_tensor(dropout_mask, "dropout_mask", op, shape=(B, H, L, L), dims="(B, H, L, L)",
                     dtypes=(torch.bool,), device=q.device)
        if dropout_p == 0.0:
            raise ValueError(f"{op}: argument 'dropout_mask' was given but dropout_p is 0")
    scores = torch.matmul(q, k.transpose(-2, -1)) * softmax_scale  # (B, H, L, L)
    if key_padding_mask is not None:
        real = (key_padding_mask != 0)[:, None, None, :]  # (B, 1, 1, L)
        # finfo.min (not -inf) keeps an all-padded row finite; it is zeroed below
        scores = scores.masked_fill(~real, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if key_padding_mask is not None:
        probs = probs.masked_fill(~real.any(-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        if dropout_mask is None and seed is not None:
            dropout_mask = attention_dropout_mask(seed, (B, H, L, L), dropout_p, q.device)
        if dropout_mask is None:
            probs = F.dropout(probs, dropout_p, training=True)
        else:
            probs = probs.masked_fill(~dropout_mask, 0.0) * (1.0 / (1.0 - dropout_p))
    return torch.matmul(probs, v)  # (B, H, L, D)
