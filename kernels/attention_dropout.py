"""The attention kernels' dropout keep-mask Z, materialised (for the reference, tests and debugging).

    Z[b, h, i, j] = rand(seed, ((b·H + h)·L + i)·L + j) >= p

with rand Triton's ``tl.rand`` (Philox4x32-10, first output word, uniform in [0, 1)). The attention
kernels (``attention.py``) draw these values in-kernel, forward and backward, and never store Z.
This module holds that counter layout, a small kernel writing Z with exactly those counters, and
the torch replica (``_philox.py``) used where Triton cannot run; both give identical masks.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _philox
from ._dispatch import backend, check_number, check_seed, interpreter_on, triton_available
from ._triton import POISON_ENV, new_output as _new_output, tl, triton  # noqa: F401
from ._triton import device_ctx

_TORCH_CHUNK = 1 << 22  # counters per Philox pass of the torch replica (bounds its int64 temporaries)


def needs_int64_counters(B: int, H: int, L: int) -> bool:
    """Whether the largest counter B·H·L·L - 1 needs int64 arithmetic in a kernel (the random stream is
    the same either way)."""
    return B * H * L * L >= 2**31


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(
    Keep_ptr, L, p_drop, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OFFSET_64: tl.constexpr,
):
    """Materialise Z (B, H, L, L) with exactly the counters and comparison the attention kernels use."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if OFFSET_64:
        row_base = (pid_bh.to(tl.int64) * L + offs_m) * L
    else:
        row_base = (pid_bh * L + offs_m) * L
    counter = row_base[:, None] + offs_n[None, :]
    keep = tl.rand(seed, counter) >= p_drop
    tl.store(Keep_ptr + counter, keep.to(tl.int8), mask=(offs_m[:, None] < L) & (offs_n[None, :] < L))


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _dropout_mask_triton(seed: int, shape: Tuple[int, int, int, int], p: float, device) -> torch.Tensor:
    """The kernels' keep-mask Z, computed by a Triton kernel that shares their counters."""
    B, H, L, _ = shape
    keep = _new_output(shape, torch.int8, device)
    if keep.numel() == 0:
        return keep == 1
    block = 64
    grid = (triton.cdiv(L, block), triton.cdiv(L, block), B * H)
    with device_ctx(torch.device(device)):
        _dropout_mask_kernel[grid](keep, L, float(p), int(seed), BLOCK_M=block, BLOCK_N=block,
                                   OFFSET_64=needs_int64_counters(B, H, L))
    return keep == 1


# --------------------------------------------------------------------------------------------
# Public functional
# --------------------------------------------------------------------------------------------
def attention_dropout_mask(
    seed: int,
    shape: Sequence[int],
    p: float,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The attention kernels' dropout keep-mask Z for ``seed`` and probability ``p``.

    Args:
        seed: Python int in [0, 2**63), the ``seed`` given to (or drawn by) ``attention``.
        shape: (B, H, L, L), four non-negative Python ints.
        p: dropout probability in [0, 1).
        device: where Z is made (default: the CPU).

    Returns:
        (B, H, L, L) bool tensor on ``device``, True = kept: ``Z[b, h, i, j] = tl.rand(seed,
        ((b*H + h)*L + i)*L + j) >= p``. Computed by a small Triton kernel when Triton can run on
        ``device`` (CUDA, or CPU under the interpreter), otherwise by a bit-exact torch replica of
        Triton's Philox; both give identical masks.
    """
    op = "attention_dropout_mask"
    seed = check_seed(op, seed)
    if seed is None:
        raise TypeError(f"{op}: argument 'seed' must be an int, got None")
    p = check_number(op, "p", p, 0.0, 1.0, hi_open=True)
    shape = tuple(shape)
    if len(shape) != 4 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape) \
            or shape[2] != shape[3]:
        raise ValueError(f"{op}: argument 'shape' must be (B, H, L, L) of non-negative ints, got {shape}")
    device = torch.device("cpu" if device is None else device)
    runnable = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreter_on()))
    if runnable and backend() != "reference":
        return _dropout_mask_triton(seed, shape, p, device)
    return _dropout_mask_torch(seed, shape, p, device)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _dropout_mask_torch(seed: int, shape: Tuple[int, int, int, int], p: float, device) -> torch.Tensor:
    """Bit-exact torch replica of ``tl.rand(seed, counter) >= p`` (``_philox.rand``). Works without
    Triton; processed in chunks to bound memory."""
    B, H, L, _ = shape
    device = torch.device(device)
    p32 = torch.tensor(p, dtype=torch.float32, device=device)
    out = torch.empty(B * H * L * L, dtype=torch.bool, device=device)
    return _philox.fill(out, lambda counter: _philox.rand(seed, counter) >= p32, _TORCH_CHUNK).view(shape)
