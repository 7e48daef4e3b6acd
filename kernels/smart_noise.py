"""Random perturbation δ₀ (B, L, H) for SMART and R3F, drawn in-kernel with Triton's Philox generator.

    δ₀[b, l, h] = σ · z_i · m[b, l],   i = (b·L + l)·H + h,
    z_i = randn(seed, i)  ("normal", SMART's δ₀ ~ N(0, σ²I))   or   2·rand(seed, i) - 1  ("uniform")

where m is the token mask (0 on padding) and randn / rand are Triton's ``tl.randn`` / ``tl.rand``
(Philox4x32-10 at counter i, key ``seed``). Each element is a pure function of (seed, i): nothing
is drawn from torch's generator, and the reference (``_philox.py``) replays the same stream.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _philox
from ._dispatch import canonical_device, check_choice, check_nonnegative, check_token_mask, use_triton
from ._triton import POISON_ENV, new_output as _empty, tl, triton  # noqa: F401
from ._triton import cast, interp_bf16, token_mask_u8

DISTRIBUTIONS = ("normal", "uniform")

_MAX_SEED = 2**63
_BLOCK = 1024
_CPU_CHUNK = 1 << 16  # elements per Philox pass on the CPU (keeps the int64 temporaries in cache)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(
    OUT_ptr, M_ptr, n_elements, H, seed, sigma,
    HAS_MASK: tl.constexpr, UNIFORM: tl.constexpr, OFFSETS_64: tl.constexpr, INTERP_BF16: tl.constexpr,
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
    tl.store(OUT_ptr + offs, cast(z, OUT_ptr.dtype.element_ty, INTERP_BF16), mask=ok)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _noise_triton(out: torch.Tensor, sigma: float, seed: int, token_mask, distribution: str) -> torch.Tensor:
    """Fill ``out`` (B, L, H), contiguous, with the kernel's noise. Inputs are validated."""
    B, L, H = out.shape
    n = out.numel()
    if n == 0:
        return out
    mask = token_mask_u8(token_mask, B * L, out.device)
    _noise_kernel[(triton.cdiv(n, _BLOCK),)](
        out, mask, n, H, seed, sigma,
        HAS_MASK=token_mask is not None, UNIFORM=distribution == "uniform",
        OFFSETS_64=n + _BLOCK >= 2**31, INTERP_BF16=interp_bf16(out), BLOCK=_BLOCK, num_warps=4,
    )
    return out


# --------------------------------------------------------------------------------------------
# Public functional (no autograd.Function: noise has no inputs to differentiate)
# --------------------------------------------------------------------------------------------
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
    check_choice(op, "distribution", distribution, DISTRIBUTIONS)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{op}: argument 'dtype' must be a floating-point torch.dtype, got {dtype!r}")
    if device is None:
        device = token_mask.device if isinstance(token_mask, torch.Tensor) else torch.empty(0).device
    device = canonical_device(device)
    check_token_mask(op, token_mask, dims[0], dims[1], device)
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
        shape: (B, L, H), three non-negative Python ints.
        sigma: σ >= 0, a Python number.
        seed: Python int in [0, 2**63).
        token_mask: optional (B, L) bool / integer / float mask on ``device``, True / non-zero =
            real token.
        distribution: ``"normal"`` or ``"uniform"``.
        device: output device (default: ``token_mask``'s device, else torch's default device).
        dtype: floating output dtype.

    Returns:
        (B, L, H) tensor of ``dtype`` on ``device``. Runs the Triton kernel on CUDA (or on CPU under
        ``TRITON_INTERPRET=1``), else :func:`smart_noise_reference` (see ``_dispatch.py``).
    """
    op = "smart_noise"
    (B, L, H), device = _check_noise_args(op, shape, sigma, seed, token_mask, distribution, device, dtype)
    out = _empty((B, L, H), dtype, device)
    if not use_triton(out, op=op):
        return _noise_torch((B, L, H), float(sigma), seed, token_mask, distribution, device, dtype)
    return _noise_triton(out, float(sigma), seed, token_mask, distribution)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _noise_values(offs: torch.Tensor, seed: int, distribution: str) -> torch.Tensor:
    """float32 N(0, 1) or U(-1, 1) values for the element indices ``offs`` (int64), as the kernel."""
    if distribution == "uniform":
        return _philox.rand(seed, offs) * 2.0 - 1.0
    return _philox.randn(seed, offs)


def _noise_torch(shape, sigma, seed, token_mask, distribution, device, dtype):
    B, L, H = shape
    n = B * L * H
    chunk = _CPU_CHUNK if device.type == "cpu" else max(n, 1)
    z = torch.empty(n, dtype=torch.float32, device=device)
    z = _philox.fill(z, lambda offs: _noise_values(offs, seed, distribution), chunk)
    z = (z * torch.tensor(sigma, dtype=torch.float32, device=device)).reshape(B, L, H)
    if token_mask is not None:
        z = z.masked_fill_(~(token_mask != 0)[..., None], 0.0)
    return z.to(dtype)


def smart_noise_reference(shape: Sequence[int], sigma: float, seed: int, token_mask: Optional[torch.Tensor] = None,
                          distribution: str = "normal", device=None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain-torch :func:`smart_noise`: the same Philox4x32-10 stream in int64 tensor arithmetic.

    Bit-identical to the kernel for ``"uniform"``; for ``"normal"`` equal up to a few float32 ulp
    of the Box-Muller transcendentals (see :func:`smart_noise`).
    """
    op = "smart_noise_reference"
    (B, L, H), device = _check_noise_args(op, shape, sigma, seed, token_mask, distribution, device, dtype)
    return _noise_torch((B, L, H), float(sigma), seed, token_mask, distribution, device, dtype)
