"""What every kernel file shares: Triton itself (or a stand-in when it is missing), output poisoning,
the bf16 helpers for Triton's CPU interpreter, and small launch helpers (compute dtype, token masks,
the launch device).

``from ._triton import triton, tl`` works without Triton installed: ``@triton.jit`` then leaves the
function as it is and the kernels are never launched (dispatch runs the torch references).

``MINBERT_KERNEL_POISON=1`` makes :func:`new_output` fill kernel output buffers with NaN (-1 for
integer buffers) instead of leaving them uninitialised, so a test sees any element a kernel forgot
to write.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is Linux-only; the references still work

    class _NoTriton:
        """Stand-in so kernel modules import without Triton (their kernels are then never launched)."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()

POISON_ENV = "MINBERT_KERNEL_POISON"


def poison_enabled() -> bool:
    return os.environ.get(POISON_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def new_output(shape, dtype, device) -> torch.Tensor:
    """A kernel output buffer: uninitialised, or poisoned (NaN / -1) when ``MINBERT_KERNEL_POISON=1``."""
    if poison_enabled():
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype: float64 stays float64, every other float type computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    """:func:`acc_dtype` as a Triton dtype (a kernel's ``ACC`` constexpr)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def token_mask_u8(token_mask, n_tokens: int, device) -> torch.Tensor:
    """(B, L) token mask as a flat (B*L,) uint8 tensor of 0/1 (True / non-zero = real token); without a
    mask a 1-element placeholder that a kernel compiled with ``HAS_MASK=False`` never reads."""
    if token_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=device)
    m = token_mask if token_mask.dtype == torch.bool else token_mask != 0
    return m.reshape(n_tokens).contiguous().view(torch.uint8)


class device_ctx:
    """Launch on the tensors' GPU (Triton uses the current device)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# Triton's CPU interpreter mishandles bfloat16: ``tl.dot`` on bf16 operands returns garbage and
# fp32 -> bf16 casts truncate instead of rounding to nearest even. Kernels take an ``INTERP_BF16``
# constexpr (``interp_bf16(x)``: set only for bf16 under the interpreter) and route their dots and
# casts through the helpers below, which then compute what the GPU computes. When compiling,
# INTERP_BF16 is False and each helper is exactly ``tl.dot`` / ``.to``.


def interp_bf16(x: torch.Tensor) -> bool:
    """bfloat16 under Triton's interpreter; never set when compiling."""
    from ._dispatch import interpreter_on

    return x.dtype == torch.bfloat16 and interpreter_on()


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """a @ b in fp32. Under INTERP_BF16 the bf16 operands are multiplied in fp32 (bf16 products
    are exact in fp32, so only the summation order differs from the GPU's)."""
    if INTERP_BF16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """acc + a @ b, fp32 accumulation (see :func:`dot`)."""
    if INTERP_BF16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def cast(v, DTYPE: tl.constexpr, INTERP_BF16: tl.constexpr):
    """v.to(DTYPE); under INTERP_BF16 with round-to-nearest-even done on the fp32 bits."""
    if INTERP_BF16 and DTYPE == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True).to(DTYPE)
    else:
        out = v.to(DTYPE)
    return out
