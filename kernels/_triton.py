"""What every kernel file shares: Triton itself (or a stand-in when it is missing) and output poisoning.

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
