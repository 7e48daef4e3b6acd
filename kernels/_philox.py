"""Triton's counter-based random streams (``tl.randint4x``, ``tl.rand``, ``tl.randn``) in plain torch.

For a key ``seed`` < 2⁶⁴ and an element offset ``i`` (int64), Triton runs Philox4x32-10 (Salmon et
al., SC'11) on the counter (c0, c1, c2, c3) = (i mod 2³², ⌊i / 2³²⌋, 0, 0) with the key
(k0, k1) = (seed mod 2³², ⌊seed / 2³²⌋), ten rounds of::

    c0, c1, c2, c3 <- hi(B·c2) ^ c1 ^ k0,  lo(B·c2),  hi(A·c0) ^ c3 ^ k1,  lo(A·c0)
    k0, k1         <- k0 + KEY_A,  k1 + KEY_B                                  (mod 2³²)

``tl.rand`` maps the first output word x to float32 u = int32(x)' · 4.6566127342e-10 in [0, 1), where
int32(x)' is x read as int32 and complemented (~) when negative. ``tl.randn`` applies Box-Muller to
the uniforms of the first two words.

The integers and :func:`rand` are bit-exact replicas of the kernels' values; :func:`randn` matches to
a few float32 ulp (log, sqrt and cos differ between torch and GPU math libraries). Values live in
int64 tensors holding uint32 numbers, so this runs on any device and without Triton: it is the
reference behind attention's dropout mask and SMART's noise.
"""
from __future__ import annotations

from typing import Callable

import torch

# Philox4x32-10 constants, as in triton.language.random
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
ROUNDS = 10
M32 = 0xFFFFFFFF
UNIFORM_SCALE = 4.6566127342e-10  # the largest s with (2**31 - 1) * s < 1 in float32

_WRAPS = {}


def int64_mul_wraps(device: torch.device) -> bool:
    """Whether int64 products wrap modulo 2**64 on this device (checked once per device type)."""
    key = device.type
    if key not in _WRAPS:
        x = torch.tensor([M32], dtype=torch.int64, device=device) * M32  # 0xFFFFFFFE00000001 mod 2**64
        _WRAPS[key] = bool(((x >> 32) & M32).item() == 0xFFFFFFFE and (x & M32).item() == 1)
    return _WRAPS[key]


def mulhilo32(a: int, x: torch.Tensor):
    """(high, low) 32-bit halves of a * x for a < 2**32 and an int64 tensor x of values < 2**32.

    The 64-bit product is taken modulo 2**64 by int64 wrap-around where the device does that
    (checked by :func:`int64_mul_wraps`); otherwise a is split into 16-bit halves so every partial
    product stays below 2**63."""
    if int64_mul_wraps(x.device):
        prod = x * a
        return (prod >> 32) & M32, prod & M32
    t_lo = x * (a & 0xFFFF)  # < 2**48
    t_hi = x * (a >> 16)  # < 2**48
    mid = t_lo + ((t_hi & 0xFFFF) << 16)  # < 2**49
    return (t_hi >> 16) + (mid >> 32), mid & M32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 counters, with a 64-bit key (k0 low, k1 high)."""
    for _ in range(rounds):
        hi_b, lo_b = mulhilo32(ROUND_B, c2)
        hi_a, lo_a = mulhilo32(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & M32
        k1 = (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def randint4x(seed: int, offsets: torch.Tensor):
    """``tl.randint4x(seed, offsets)``: four uint32 words (int64 tensors) per int64 offset."""
    zero = torch.zeros_like(offsets)
    return philox4x32(offsets & M32, offsets >> 32, zero, zero, seed & M32, (seed >> 32) & M32)


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """``triton.language.random.uint_to_uniform_float`` for uint32 values in int64: float32 in [0, 1)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def rand(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)``: float32 U[0, 1), bit for bit."""
    return uint32_to_uniform(randint4x(seed, offsets)[0])


def randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randn(seed, offsets)``: float32 N(0, 1) by Box-Muller on the first two words (to a few ulp)."""
    r0, r1, _, _ = randint4x(seed, offsets)
    f32, device = torch.float32, offsets.device
    u1 = torch.maximum(uint32_to_uniform(r0), torch.tensor(1.0e-7, dtype=f32, device=device))
    th = torch.tensor(6.283185307179586, dtype=f32, device=device) * uint32_to_uniform(r1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(th)


def fill(out: torch.Tensor, values: Callable[[torch.Tensor], torch.Tensor], chunk: int) -> torch.Tensor:
    """Flat ``out`` (n,) with ``out[i] = values(offsets)[i - start]`` over chunks of ``chunk``
    consecutive int64 offsets in [0, n): bounds the int64 temporaries of the Philox rounds."""
    n = out.numel()
    for start in range(0, n, chunk):
        offsets = torch.arange(start, min(n, start + chunk), dtype=torch.int64, device=out.device)
        out[start:start + offsets.numel()] = values(offsets)
    return out
