"""Backend choice (Triton or torch reference) and input validation shared by all kernels.

Dispatch rule
-------------
* ``MINBERT_KERNEL_BACKEND=reference``: always the plain-torch reference.
* ``MINBERT_KERNEL_BACKEND=triton``: always Triton; a CPU tensor then needs the interpreter
  (``TRITON_INTERPRET=1`` set before any module with ``@triton.jit`` is imported).
* ``MINBERT_KERNEL_BACKEND=auto`` (default): CUDA tensor -> Triton; CPU tensor with the
  interpreter on -> Triton (interpreted); anything else -> the reference.

The variable is read at call time, so tests and users can switch paths in one process.
"""
from __future__ import annotations

import functools
import math
import operator
import os
from typing import Optional, Sequence

import torch

BACKEND_ENV = "MINBERT_KERNEL_BACKEND"
_BACKENDS = ("auto", "triton", "reference")


def interpreter_on() -> bool:
    """True when Triton's CPU interpreter is enabled (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` succeeds."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def backend() -> str:
    """The requested backend: ``auto``, ``triton`` or ``reference``."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not valid; expected one of {', '.join(_BACKENDS)}")
    return value


def use_triton(*tensors: torch.Tensor, op: str = "kernel") -> bool:
    """Decide whether ``op`` runs its Triton kernel for these tensors (see module docstring)."""
    mode = backend()
    if mode == "reference":
        return False
    device = tensors[0].device
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: {BACKEND_ENV}=triton but Triton cannot be imported on this machine")
        if device.type == "cpu" and not interpreter_on():
            raise RuntimeError(
                f"{op}: {BACKEND_ENV}=triton with a CPU tensor needs Triton's interpreter; "
                "set TRITON_INTERPRET=1 before importing minbert.kernels"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"{op}: Triton does not support tensors on device {device}")
        return True
    if device.type == "cuda":
        return triton_available()
    if device.type == "cpu":
        return interpreter_on() and triton_available()
    return False


def _fmt_shape(shape: Sequence) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def check_tensor(
    t,
    name: str,
    op: str,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dims: Optional[str] = None,
    floating: bool = False,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> None:
    """Raise a ``ValueError``/``TypeError`` naming ``op``, the argument and what was expected.

    ``shape`` may contain ``None`` for free dimensions; ``dims`` names them for the message,
    e.g. ``"(B, H, L, D)"``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    want_ndim = len(shape) if shape is not None else ndim
    if want_ndim is not None and t.dim() != want_ndim:
        label = dims or (_fmt_shape(shape) if shape is not None else f"{want_ndim} dims")
        raise ValueError(f"{op}: argument '{name}' must have {want_ndim} dimensions {label}, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                label = dims or _fmt_shape(shape)
                raise ValueError(
                    f"{op}: argument '{name}' must have shape {label} = {_fmt_shape(shape)}, "
                    f"got {tuple(t.shape)} (dimension {i} is {got}, expected {want})"
                )
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: argument '{name}' must be a floating-point tensor, got dtype {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: argument '{name}' must have dtype in ({allowed}), got {t.dtype}")
    if device is not None and t.device != canonical_device(device):
        raise ValueError(f"{op}: argument '{name}' is on {t.device} but must be on {device} like the other inputs")


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` casts matmul inputs to on ``device_type`` ("cpu", "cuda"), or None
    when autocast is off there."""
    try:  # torch >= 2.4
        enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch 2.3
        if device_type == "cpu":
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        else:
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return dtype if enabled else None


def autocast_inputs(device_type: str, *tensors: Optional[torch.Tensor]):
    """``tensors`` cast as autocast casts a matmul's inputs (float16/32 and bfloat16 to the autocast
    dtype; float64, integer tensors and None untouched), or unchanged when autocast is off.

    For ops whose ``autograd.Function`` autocast cannot see (a Triton kernel): call with the cast
    tensors under ``torch.autocast(device_type, enabled=False)``. The casts are differentiable, so
    fp32 parameters get fp32 gradients, as with ``F.linear`` under autocast."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
                 for t in tensors)


def canonical_device(device) -> torch.device:
    """``device`` with its index filled in: "cuda" means the current CUDA device, so it compares
    equal to the ``cuda:N`` that tensors report."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    """All named tensors must share one dtype."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: argument '{name}' has dtype {t.dtype} but '{first_name}' has {first.dtype}; they must match")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    """All named tensors must live on one device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: argument '{name}' is on {t.device} but '{first_name}' is on {first.device}; they must match")


def check_nonnegative(op: str, **values: float) -> None:
    """Scalar hyper-parameters that must be >= 0 (and finite)."""
    for name, value in values.items():
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{op}: argument '{name}' must be a finite number >= 0, got {value!r}")


def check_choice(op: str, name: str, value, allowed: Sequence) -> None:
    """A string option that must be one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{op}: argument '{name}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_token_mask(op: str, token_mask: Optional[torch.Tensor], B: int, L: int, device: torch.device) -> None:
    """An optional (B, L) token mask (bool, integer or float 0/1) on ``device``: the other inputs' device,
    with its index (a tensor's ``.device``, or :func:`canonical_device`)."""
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


def check_number(op: str, name: str, value, lo: float, hi: Optional[float], hi_open: bool) -> float:
    """A finite Python number in [lo, hi) (``hi_open``), [lo, hi], or >= lo (``hi`` None); returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{op}: argument '{name}' must be a finite number, got {value!r}")
    if value < lo or (hi is not None and (value >= hi if hi_open else value > hi)):
        bound = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{op}: argument '{name}' must be in {bound}, got {value!r}")
    return float(value)


def check_seed(op: str, seed) -> Optional[int]:
    """None, or an int (anything with ``__index__``, not bool) in [0, 2**63); returned as int."""
    if seed is None:
        return None
    if isinstance(seed, bool):
        raise TypeError(f"{op}: argument 'seed' must be an int or None, got {seed!r}")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"{op}: argument 'seed' must be an int or None, got {type(seed).__name__}") from None
    if not 0 <= seed < 2**63:
        raise ValueError(f"{op}: argument 'seed' must be in [0, 2**63), got {seed}")
    return seed
