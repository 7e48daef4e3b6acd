"""Fused LoRA linear layer, with one adapter or one adapter per row (multi-task batches).

LoRA (Hu et al. 2021, eq. 3) adds a trainable low-rank update to a frozen linear map::

    h = W0 x + dW x = W0 x + B A x,          scaled by  s = alpha / r

so for a row-major batch X (N, in), weight W (out, in), A (r, in), B (out, r)::

    Y = X W^T + b + s (X A^T) B^T                                            (1)

Backward, with G = dY B (N, r) and XA = X A^T (N, r)::

    dX = dY W + s (dY B) A          = dY W + s G A                           (2)
    dA = s (dY B)^T X               = s G^T X            (r, in)             (3)
    dB = s dY^T (X A^T)             = s dY^T XA          (out, r)            (4)
    dW = dY^T X,  db = sum_rows dY  (only when the frozen weight/bias require grad)

Multi-adapter form (one adapter per task, tasks mixed in one batch): A (T, r, in), B (T, out, r)
and an adapter id per row; row i uses A[id_i], B[id_i], and id -1 means "base layer only".
Equations (1)-(4) hold per adapter, with (3)/(4) summed over that adapter's rows only.

Kernels: the forward (eq. 1) and dX (eq. 2, also storing G) each run as one kernel that feeds
every loaded X / dY tile to both the base and the low-rank dot; dA and dB (eq. 3/4) share one
split-K kernel with a deterministic torch reduction of the partials. Multi-adapter rows are grouped
by adapter into whole row blocks (segment layout, ``_lora_layout.py``). docs/lora.md explains
what is fused and why.

All products accumulate in fp32; inputs may be float32, float16 or bfloat16 (float64 and other
dtypes run the torch reference). For float32, ``tl.dot`` uses TF32 exactly when torch does
(``torch.backends.cuda.matmul.allow_tf32``). Under ``torch.autocast`` the inputs are cast as ``F.linear``'s
are (x, W, b, A, B to the autocast dtype) and the result comes out in that dtype; without autocast all
tensors must share one dtype.
"""
import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._dispatch import (autocast_dtype, autocast_inputs, check_same_device, check_same_dtype, check_tensor,
                        use_triton)
from ._lora_layout import Layout, check_id_range, layout_for, per_row_ids
from ._triton import POISON_ENV, new_output as _empty, tl, triton  # noqa: F401
from ._triton import cast as _cast, interp_bf16 as _interp_bf16, mma as _mma  # bf16 under the interpreter

OP = "lora_linear"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _block_rows(pid_m, ROW_ptr, M, BLOCK_M: tl.constexpr, MULTI: tl.constexpr):
        """Rows (BM,) int64 of row block ``pid_m`` and their mask.

        Single adapter: rows ``pid_m*BM + [0, BM)``. Multi-adapter: rows come from the padded
        segment layout, where -1 marks padding.
        """
        offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if MULTI:
            rows = tl.load(ROW_ptr + offs)
            row_mask = rows >= 0
        else:
            rows = offs
            row_mask = offs < M
        return tl.where(row_mask, rows, 0).to(tl.int64), row_mask

    @triton.jit
    def _block_adapter(pid_m, BLOCK_ADAPTER_ptr, MULTI: tl.constexpr):
        """Adapter of row block ``pid_m``: -1 = no adapter, -2 = past the end of the layout."""
        if MULTI:
            aid = tl.load(BLOCK_ADAPTER_ptr + pid_m).to(tl.int32)
        else:
            aid = (pid_m * 0).to(tl.int32)
        return aid

    @triton.jit
    def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """Grouped program order: GROUP_M row blocks share weight tiles while they sit in L2."""
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _lora_fwd_kernel(
        X_ptr, W_ptr, BIAS_ptr, A_ptr, B_ptr, Y_ptr, XA_ptr, ROW_ptr, BLOCK_ADAPTER_ptr,
        M, N, K, R, num_pid_m, scaling,
        stride_xm, stride_xk,
        stride_wn, stride_wk,
        stride_at, stride_ar, stride_ak,
        stride_bt, stride_bn, stride_br,
        stride_ym, stride_yn,
        stride_xam, stride_xar,
        HAS_BIAS: tl.constexpr, MULTI: tl.constexpr, STORE_XA: tl.constexpr,
        R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """Y = X W^T + b + s (X A^T) B^T for one (BM, BN) tile, eq. (1).

        X (M, K), W (N, K), A (T, R, K), B (T, N, R), Y (M, N), XA (M, R) fp32.
        """
        pid = tl.program_id(0)
        pid_m, pid_n = _swizzle(pid, num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
        aid = _block_adapter(pid_m, BLOCK_ADAPTER_ptr, MULTI)
        if aid < -1:  # block past the end of the segment layout
            return
        rows, row_mask = _block_rows(pid_m, ROW_ptr, M, BLOCK_M, MULTI)  # (BM,)
        r_eff = tl.where(aid >= 0, R, 0)  # rank of this block's update: 0 for "no adapter" rows
        aid_safe = tl.maximum(aid, 0).to(tl.int64)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        offs_k = tl.arange(0, BLOCK_K)  # (BK,)
        offs_r = tl.arange(0, R_PAD)  # (R_PAD,)
        n_mask = offs_n < N
        r_mask = offs_r < r_eff

        x_ptrs = X_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
        w_ptrs = W_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BK, BN) = W^T tile
        a_ptrs = A_ptr + aid_safe * stride_at + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak  # (BK, R_PAD)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # X W^T
        xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)  # X A^T, the low-rank intermediate
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc = _mma(x, w, acc, PRECISION, INTERP_BF16)
            xa = _mma(x, a, xa, PRECISION, INTERP_BF16)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            a_ptrs += BLOCK_K * stride_ak

        # epilogue: + s (X A^T) B^T (+ b), then the only store of Y
        b_ptrs = B_ptr + aid_safe * stride_bt + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # (R_PAD, BN)
        b = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(_cast(xa * scaling, b.dtype, INTERP_BF16), b, acc, PRECISION, INTERP_BF16)
        if HAS_BIAS:
            bias = tl.load(BIAS_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += bias[None, :]
        y_ptrs = Y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, _cast(acc, Y_ptr.dtype.element_ty, INTERP_BF16), mask=row_mask[:, None] & n_mask[None, :])

        if STORE_XA:
            if pid_n == 0:
                xa_ptrs = XA_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar
                tl.store(xa_ptrs, xa, mask=row_mask[:, None] & (offs_r < R)[None, :])

    @triton.jit
    def _lora_bwd_dx_kernel(
        DY_ptr, W_ptr, A_ptr, B_ptr, DX_ptr, G_ptr, ROW_ptr, BLOCK_ADAPTER_ptr,
        M, N, K, R, num_pid_m, scaling,
        stride_dym, stride_dyn,
        stride_wn, stride_wk,
        stride_at, stride_ar, stride_ak,
        stride_bt, stride_bn, stride_br,
        stride_dxm, stride_dxk,
        stride_gm, stride_gr,
        COMPUTE_DX: tl.constexpr, STORE_G: tl.constexpr, MULTI: tl.constexpr,
        R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """dX = dY W + s (dY B) A for one (BM, BN) tile of dX, eq. (2); also stores G = dY B.

        dY (M, N), W (N, K), A (T, R, K), B (T, N, R), dX (M, K), G (M, R) fp32. Here BLOCK_N
        tiles dX's columns (the K = ``in`` features) and BLOCK_K tiles the reduction over N.
        """
        pid = tl.program_id(0)
        if COMPUTE_DX:
            pid_m, pid_k = _swizzle(pid, num_pid_m, tl.cdiv(K, BLOCK_N), GROUP_M)
        else:
            pid_m = pid
            pid_k = 0
        aid = _block_adapter(pid_m, BLOCK_ADAPTER_ptr, MULTI)
        if aid < -1:
            return
        rows, row_mask = _block_rows(pid_m, ROW_ptr, M, BLOCK_M, MULTI)  # (BM,)
        r_eff = tl.where(aid >= 0, R, 0)  # rank of this block's update: 0 for "no adapter" rows
        aid_safe = tl.maximum(aid, 0).to(tl.int64)

        offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) columns of dX
        offs_n = tl.arange(0, BLOCK_K)  # (BK,) reduction over out features
        offs_r = tl.arange(0, R_PAD)
        k_mask = offs_k < K
        r_mask = offs_r < r_eff

        dy_ptrs = DY_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn  # (BM, BK)
        w_ptrs = W_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # (BK, BN)
        b_ptrs = B_ptr + aid_safe * stride_bt + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br  # (BK, R_PAD)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # dY W
        g = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)  # dY B
        for n0 in range(0, N, BLOCK_K):
            n_mask = (n0 + offs_n) < N
            dy = tl.load(dy_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            g = _mma(dy, b, g, PRECISION, INTERP_BF16)
            if COMPUTE_DX:
                w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                acc = _mma(dy, w, acc, PRECISION, INTERP_BF16)
            dy_ptrs += BLOCK_K * stride_dyn
            w_ptrs += BLOCK_K * stride_wn
            b_ptrs += BLOCK_K * stride_bn

        if COMPUTE_DX:
            # epilogue: + s (dY B) A, then the only store of dX
            a_ptrs = A_ptr + aid_safe * stride_at + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
            a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # (R_PAD, BN)
            acc = _mma(_cast(g * scaling, a.dtype, INTERP_BF16), a, acc, PRECISION, INTERP_BF16)
            dx_ptrs = DX_ptr + rows[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
            dx = _cast(acc, DX_ptr.dtype.element_ty, INTERP_BF16)
            tl.store(dx_ptrs, dx, mask=row_mask[:, None] & k_mask[None, :])
        if STORE_G:
            if pid_k == 0:
                g_ptrs = G_ptr + rows[:, None] * stride_gm + offs_r[None, :] * stride_gr
                tl.store(g_ptrs, g, mask=row_mask[:, None] & (offs_r < R)[None, :])

    @triton.jit
    def _lora_bwd_ab_kernel(
        P_ptr, Q_ptr, OUT_ptr, ROW_ptr, GROUP_START_ptr, GROUP_END_ptr,
        M, D, R, n_split, scaling,
        stride_pm, stride_pr,
        stride_qm, stride_qd,
        stride_os, stride_ot, stride_or, stride_od,
        MULTI: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """OUT[split, t] = s P_t^T Q_t over a strided share of adapter t's row blocks, eq. (3)/(4).

        P (M, R) fp32 (G or XA), Q (M, D) (X or dY), OUT (SPLIT, T, R, D) through strides, so
        dB's (T, out, r) layout is written directly. Grid: (D tiles, T, SPLIT).
        """
        pid_d = tl.program_id(0)
        t = tl.program_id(1)
        split = tl.program_id(2)
        if MULTI:
            blk_start = tl.load(GROUP_START_ptr + t)
            blk_end = tl.load(GROUP_END_ptr + t)
        else:
            blk_start = 0
            blk_end = tl.cdiv(M, BLOCK_M)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
        offs_r = tl.arange(0, R_PAD)
        d_mask = offs_d < D
        r_mask = offs_r < R

        acc = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
        for blk in range(blk_start + split, blk_end, n_split):
            rows, row_mask = _block_rows(blk, ROW_ptr, M, BLOCK_M, MULTI)  # (BM,)
            p_ptrs = P_ptr + rows[None, :] * stride_pm + offs_r[:, None] * stride_pr  # (R_PAD, BM) = P^T
            q_ptrs = Q_ptr + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd  # (BM, BD)
            p = tl.load(p_ptrs, mask=r_mask[:, None] & row_mask[None, :], other=0.0)
            q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            acc = _mma(_cast(p, q.dtype, INTERP_BF16), q, acc, PRECISION, INTERP_BF16)

        acc = acc * scaling
        out_ptrs = (OUT_ptr + split.to(tl.int64) * stride_os + t.to(tl.int64) * stride_ot
                    + offs_r[:, None] * stride_or + offs_d[None, :] * stride_od)
        tl.store(out_ptrs, _cast(acc, OUT_ptr.dtype.element_ty, INTERP_BF16), mask=r_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launchers (launch configuration, strides, the three kernel launches)
# --------------------------------------------------------------------------------------------
def _r_pad(r: int) -> int:
    return max(16, 1 << (max(r, 1) - 1).bit_length())


def _config(device: torch.device, dtype: torch.dtype) -> dict:
    """Tile sizes. CUDA: Hopper/Ampere-friendly defaults; CPU (interpreter): fewer, larger programs."""
    if device.type == "cuda":
        block_k = 32 if dtype == torch.float32 else 64
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=3, BLOCK_D=128)
    return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1, BLOCK_D=64)


def _precision(x: torch.Tensor) -> Optional[str]:
    """``tl.dot`` input precision: for float32, TF32 exactly when torch's matmuls use it; fp16/bf16
    keep Triton's default (None; the setting only concerns float32 operands)."""
    if x.dtype == torch.float32:
        return "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return None


@functools.lru_cache(maxsize=None)
def _split_target(device: torch.device) -> int:
    """About how many programs the dA/dB reduction should have (split-K over rows)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _a3(a: torch.Tensor) -> Tuple[int, int, int]:
    """(stride_t, stride_r, stride_k) of A given as (r, in) or (T, r, in)."""
    return (0,) + tuple(a.stride()) if a.dim() == 2 else tuple(a.stride())


def _b3(b: torch.Tensor) -> Tuple[int, int, int]:
    """(stride_t, stride_n, stride_r) of B given as (out, r) or (T, out, r)."""
    return (0,) + tuple(b.stride()) if b.dim() == 2 else tuple(b.stride())


def _row_args(layout: Optional[Layout], x2: torch.Tensor, block_m: int):
    if layout is None:
        dummy = x2.new_empty(0, dtype=torch.int32)
        return dummy, dummy, -(-x2.shape[0] // block_m)
    return layout.rows, layout.block_adapter, layout.num_blocks


def _lora_forward(x2, weight, bias, lora_a, lora_b, scaling, layout, store_xa):
    """Launch the fused forward. x2 (N, in) -> y (N, out), xa (N, r) fp32 or None."""
    n_rows, k = x2.shape
    n_out = weight.shape[0]
    r = lora_a.shape[-2]
    cfg = _config(x2.device, x2.dtype)
    y = _empty((n_rows, n_out), x2.dtype, x2.device)
    xa = _empty((n_rows, r), torch.float32, x2.device) if store_xa else None
    if n_rows == 0:
        return y, xa
    rows, block_adapter, num_pid_m = _row_args(layout, x2, cfg["BLOCK_M"])
    grid = (num_pid_m * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    xa_arg = xa if xa is not None else y
    _lora_fwd_kernel[grid](
        x2, weight, bias if bias is not None else y, lora_a, lora_b, y, xa_arg, rows, block_adapter,
        n_rows, n_out, k, r, num_pid_m, float(scaling),
        x2.stride(0), x2.stride(1),
        weight.stride(0), weight.stride(1),
        *_a3(lora_a), *_b3(lora_b),
        y.stride(0), y.stride(1),
        xa_arg.stride(0), xa_arg.stride(1),
        HAS_BIAS=bias is not None, MULTI=layout is not None, STORE_XA=store_xa,
        R_PAD=_r_pad(r), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], PRECISION=_precision(x2), INTERP_BF16=_interp_bf16(x2),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y, xa


def _lora_backward_dx(dy2, weight, lora_a, lora_b, scaling, layout, compute_dx, store_g):
    """Launch the fused dX kernel. Returns dx (N, in) or None, g = dY B (N, r) fp32 or None."""
    n_rows, n_out = dy2.shape
    k = weight.shape[1]
    r = lora_a.shape[-2]
    cfg = _config(dy2.device, dy2.dtype)
    dx = _empty((n_rows, k), dy2.dtype, dy2.device) if compute_dx else None
    g = _empty((n_rows, r), torch.float32, dy2.device) if store_g else None
    if n_rows == 0 or not (compute_dx or store_g):
        return dx, g
    rows, block_adapter, num_pid_m = _row_args(layout, dy2, cfg["BLOCK_M"])
    grid = (num_pid_m * (triton.cdiv(k, cfg["BLOCK_N"]) if compute_dx else 1),)
    dx_arg = dx if dx is not None else dy2
    g_arg = g if g is not None else dy2
    _lora_bwd_dx_kernel[grid](
        dy2, weight, lora_a, lora_b, dx_arg, g_arg, rows, block_adapter,
        n_rows, n_out, k, r, num_pid_m, float(scaling),
        dy2.stride(0), dy2.stride(1),
        weight.stride(0), weight.stride(1),
        *_a3(lora_a), *_b3(lora_b),
        dx_arg.stride(0), dx_arg.stride(1),
        g_arg.stride(0), g_arg.stride(1),
        COMPUTE_DX=compute_dx, STORE_G=store_g, MULTI=layout is not None,
        R_PAD=_r_pad(r), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], PRECISION=_precision(dy2), INTERP_BF16=_interp_bf16(dy2),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dx, g


def _n_split(n_rows: int, d_tiles: int, num_adapters: int, block_m: int, device: torch.device) -> int:
    """Split-K factor of the dA/dB reduction: enough programs to fill the device, and no more
    splits than an adapter has row blocks on average."""
    blocks_per_adapter = max(1, -(-n_rows // block_m) // num_adapters)
    return max(1, min(blocks_per_adapter, _split_target(device) // (d_tiles * num_adapters)))


def _lora_backward_ab(p, q, scaling, layout, num_adapters, out_dtype, transpose_out):
    """s P_t^T Q_t per adapter (eq. 3/4). p (N, r) fp32, q (N, D).

    Returns (T, r, D), or (T, D, r) when ``transpose_out`` (dB's layout), in ``out_dtype``.
    """
    n_rows, r = p.shape
    d = q.shape[1]
    cfg = _config(q.device, q.dtype)
    block_m, block_d = cfg["BLOCK_M"], cfg["BLOCK_D"]
    d_tiles = triton.cdiv(d, block_d)
    n_split = _n_split(n_rows, d_tiles, num_adapters, block_m, q.device)
    shape = (num_adapters, d, r) if transpose_out else (num_adapters, r, d)
    if n_split == 1:
        out = _empty(shape, out_dtype, q.device).unsqueeze(0)
    else:
        out = _empty((n_split,) + shape, torch.float32, q.device)
    if transpose_out:
        s_s, s_t, s_d, s_r = out.stride()
    else:
        s_s, s_t, s_r, s_d = out.stride()
    if layout is None:
        rows = starts = ends = q.new_empty(0, dtype=torch.int32)
    else:
        rows, starts, ends = layout.rows, layout.group_start, layout.group_end
    grid = (d_tiles, num_adapters, n_split)
    _lora_bwd_ab_kernel[grid](
        p, q, out, rows, starts, ends,
        n_rows, d, r, n_split, float(scaling),
        p.stride(0), p.stride(1),
        q.stride(0), q.stride(1),
        s_s, s_t, s_r, s_d,
        MULTI=layout is not None, R_PAD=_r_pad(r), BLOCK_M=block_m, BLOCK_D=block_d,
        PRECISION=_precision(q), INTERP_BF16=_interp_bf16(q),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if n_split == 1:
        return out[0]
    return out.sum(0).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------
class LoRALinearFunction(torch.autograd.Function):
    """Fused LoRA linear; see the module docstring for what each kernel computes."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, adapter_ids, layout, grad_enabled):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        # X A^T is kept for dB only when a backward can follow (needs_input_grad ignores no_grad)
        store_xa = grad_enabled and ctx.needs_input_grad[4]
        y, xa = _lora_forward(x2, weight, bias, lora_a, lora_b, scaling, layout, store_xa=store_xa)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa)
        ctx.scaling = scaling
        ctx.layout = layout
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, weight.shape[0])  # (N, out)
        layout, scaling = ctx.layout, ctx.scaling
        multi = lora_a.dim() == 3
        num_adapters = lora_a.shape[0] if multi else 1
        dx = dw = db = da = dbb = None
        g = None
        if need_x or need_a:  # one kernel: dX (eq. 2) and/or G = dY B
            dx, g = _lora_backward_dx(dy2, weight, lora_a, lora_b, scaling, layout,
                                      compute_dx=need_x, store_g=need_a)
        if need_a:  # eq. (3)
            da = _lora_backward_ab(g, x2, scaling, layout, num_adapters, lora_a.dtype, transpose_out=False)
            da = da if multi else da[0]
        if need_bb:  # eq. (4), written in B's (out, r) layout
            dbb = _lora_backward_ab(xa, dy2, scaling, layout, num_adapters, lora_b.dtype, transpose_out=True)
            dbb = dbb if multi else dbb[0]
        if need_w:
            dw = dy2.t().mm(x2)  # (out, in)
        if need_b:
            db = dy2.sum(0, dtype=torch.float32).to(dy2.dtype)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, db, da, dbb, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public functional (argument checks first)
# --------------------------------------------------------------------------------------------
def _validate(x, weight, bias, lora_a, lora_b, scaling, adapter_ids):
    """Check every argument but the id range; return (rows per id: None for a single adapter,
    1 for per-row ids, L for per-sequence ids; number of adapters T)."""
    check_tensor(x, "x", OP, floating=True)
    if x.dim() < 1:
        raise ValueError(f"{OP}: argument 'x' must have shape (..., in) with at least 1 dimension, got a scalar")
    in_features = x.shape[-1]
    check_tensor(weight, "weight", OP, shape=(None, in_features), dims="(out, in)", floating=True)
    out_features = weight.shape[0]
    if bias is not None:
        check_tensor(bias, "bias", OP, shape=(out_features,), dims="(out,)", floating=True)
    check_tensor(lora_a, "lora_a", OP, floating=True)
    check_tensor(lora_b, "lora_b", OP, floating=True)
    if lora_a.dim() not in (2, 3):
        raise ValueError(
            f"{OP}: argument 'lora_a' must have shape (r, in) or (T, r, in), got shape {tuple(lora_a.shape)}"
        )
    multi = lora_a.dim() == 3
    if multi:
        num_adapters, rank = lora_a.shape[0], lora_a.shape[1]
        check_tensor(lora_a, "lora_a", OP, shape=(None, None, in_features), dims="(T, r, in)")
        check_tensor(lora_b, "lora_b", OP, shape=(num_adapters, out_features, rank), dims="(T, out, r)")
    else:
        num_adapters, rank = 1, lora_a.shape[0]
        check_tensor(lora_a, "lora_a", OP, shape=(None, in_features), dims="(r, in)")
        check_tensor(lora_b, "lora_b", OP, shape=(out_features, rank), dims="(out, r)")
    if rank < 1 or num_adapters < 1:
        raise ValueError(f"{OP}: LoRA rank r and adapter count T must be >= 1, got lora_a shape {tuple(lora_a.shape)}")
    check_same_dtype(OP, x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    check_same_device(OP, x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    if isinstance(scaling, torch.Tensor) or isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"{OP}: argument 'scaling' must be a Python float (alpha / r), got {type(scaling).__name__}")
    if not math.isfinite(scaling) or scaling < 0:
        raise ValueError(f"{OP}: argument 'scaling' must be a finite number >= 0, got {scaling!r}")

    if not multi:
        if adapter_ids is not None:
            raise ValueError(
                f"{OP}: argument 'adapter_ids' was given but lora_a has shape (r, in) = {tuple(lora_a.shape)}; "
                "pass lora_a (T, r, in) and lora_b (T, out, r) for one adapter per task"
            )
        return None, 1
    if adapter_ids is None:
        raise ValueError(
            f"{OP}: lora_a has shape (T, r, in) = {tuple(lora_a.shape)} (multi-adapter form) so argument "
            "'adapter_ids' is required: (N,) ids for the N rows of x, or (x.shape[0],) ids per sequence"
        )
    check_tensor(adapter_ids, "adapter_ids", OP, ndim=1, dims="(N,) or (x.shape[0],)",
                 dtypes=(torch.int64, torch.int32), device=x.device)
    n_rows = math.prod(x.shape[:-1])
    if adapter_ids.numel() == n_rows:
        return 1, num_adapters
    if x.dim() >= 3 and adapter_ids.numel() == x.shape[0]:
        return n_rows // x.shape[0], num_adapters
    raise ValueError(
        f"{OP}: argument 'adapter_ids' must have shape (N,) = ({n_rows},) (one id per row of x flattened to "
        f"(N, in)) or, for x with >= 3 dims, ({x.shape[0]},) (one id per sequence); got {tuple(adapter_ids.shape)} "
        f"for x of shape {tuple(x.shape)}"
    )


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    adapter_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """LoRA linear layer ``y = x W^T + b + scaling * (x A^T) B^T`` with fused Triton kernels.

    Args:
        x: (..., in) floating input, CPU or CUDA (the kernels take float32 / float16 / bfloat16).
            Without autocast every floating argument below shares x's dtype, and all share its device.
        weight: (out, in) base weight, usually frozen. dW is computed only if it requires grad.
        bias: (out,) or None. db is computed only if it requires grad.
        lora_a: (r, in) (peft's ``lora_A.weight``), or (T, r, in) for T adapters.
        lora_b: (out, r) (peft's ``lora_B.weight``), or (T, out, r).
        scaling: alpha / r, a finite Python float >= 0.
        adapter_ids: only with the (T, ...) form, int64 or int32 on x's device, values in [-1, T), -1 = base
            layer only for that row. Shape rule: (N,) gives one id per row of x flattened to
            (N, in) = x.reshape(-1, in); or, when x has >= 3 dims, (x.shape[0],) gives one id per
            sequence, expanded to all rows of x[i]. (If both readings fit, i.e. x.shape[0] == N,
            they agree.)

    Returns:
        (..., out) tensor in x's dtype. Gradients flow to x, lora_a, lora_b (and weight / bias
        when they require grad); adapters with no rows get zero gradient. When lora_a and lora_b
        do not require grad, the backward computes dx alone.

    Dispatch (``_dispatch.use_triton``): CUDA -> Triton, CPU with ``TRITON_INTERPRET=1`` -> Triton
    interpreter, else :func:`lora_linear_reference`. float64 inputs always use the reference.
    """
    if isinstance(x, torch.Tensor) and autocast_dtype(x.device.type) is not None:  # as F.linear under autocast
        x, weight, bias, lora_a, lora_b = autocast_inputs(x.device.type, x, weight, bias, lora_a, lora_b)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return lora_linear(x, weight, bias, lora_a, lora_b, scaling, adapter_ids)
    rows_per_id, num_adapters = _validate(x, weight, bias, lora_a, lora_b, scaling, adapter_ids)
    if x.dtype not in _KERNEL_DTYPES or triton is None or not use_triton(x, op=OP):
        return _reference(x, weight, bias, lora_a, lora_b, scaling, adapter_ids, rows_per_id, num_adapters)
    layout = None
    if rows_per_id is not None:
        layout = layout_for(adapter_ids, rows_per_id, num_adapters, _config(x.device, x.dtype)["BLOCK_M"])
    return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, float(scaling), adapter_ids, layout,
                                    torch.is_grad_enabled())


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _reference(x, weight, bias, lora_a, lora_b, scaling, adapter_ids, rows_per_id, num_adapters):
    y = F.linear(x, weight, bias)  # (..., out)
    if rows_per_id is None:
        return y + scaling * F.linear(F.linear(x, lora_a), lora_b)
    check_id_range(adapter_ids, num_adapters)
    row_ids = per_row_ids(adapter_ids, rows_per_id)  # (N,)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    delta = torch.zeros(x2.shape[0], weight.shape[0], dtype=y.dtype, device=y.device)  # (N, out)
    for t in range(num_adapters):
        idx = (row_ids == t).nonzero(as_tuple=True)[0]
        low = F.linear(x2.index_select(0, idx), lora_a[t])  # (N_t, r)
        delta = delta.index_add(0, idx, F.linear(low, lora_b[t]))  # (N_t, out)
    return y + scaling * delta.reshape(y.shape)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    adapter_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain-torch :func:`lora_linear` (same arguments and checks): the CPU fallback and test oracle.

    Unfused: F.linear for the base layer, then per adapter the two small matmuls on that
    adapter's rows (index_select / index_add), so autograd gives every gradient, including zero
    gradients for adapters that have no rows.
    """
    if isinstance(x, torch.Tensor) and autocast_dtype(x.device.type) is not None:
        x, weight, bias, lora_a, lora_b = autocast_inputs(x.device.type, x, weight, bias, lora_a, lora_b)
    rows_per_id, num_adapters = _validate(x, weight, bias, lora_a, lora_b, scaling, adapter_ids)
    return _reference(x, weight, bias, lora_a, lora_b, scaling, adapter_ids, rows_per_id, num_adapters)
