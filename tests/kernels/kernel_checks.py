"""Helpers shared by the kernel tests: running the Triton entry points on the GPU when there is one,
the tolerance rules, inputs, error checks and the no-Triton subprocess check.

The op tests run with ``MINBERT_KERNEL_POISON=1`` (the ``poison`` fixture: kernel outputs start as
NaN), so an element a kernel forgets to write fails the comparison. Tolerance rule
(:func:`assert_2x`): the kernel's max error against the float64 reference must be <= 2x plain
torch's (the reference run in the kernel's precision) plus a tiny floor relative to the magnitude;
float64 kernels match float64 references to 1e-12 (:func:`assert_close64`). On CPU the kernels run
in Triton's interpreter.

Loaded by ``conftest.py`` as the module ``kernel_checks``, so the test modules ``import kernel_checks``.
"""
import functools
import os
import subprocess
import sys

import pytest
import torch

FLOOR = 1e-6  # relative to the reference's magnitude (float32/16 comparisons)
FLOOR64 = 1e-12  # float64 kernel vs float64 reference


def via_cuda(fn):
    """On a CUDA machine the tests' CPU inputs run through the compiled kernels on the GPU.

    CPU tensors go to the GPU (autograd follows the copies back to the CPU leaves), the result
    comes back to the device the inputs were on, and the references stay on the CPU. ``smart_noise``
    without a device argument (or with the CPU) draws on the GPU. Elsewhere ``fn`` is returned
    as is: the kernels then run in Triton's interpreter on the CPU tensors themselves.
    """
    if not torch.cuda.is_available():
        return fn

    def to_gpu(x):
        return x.to("cuda") if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x

    @functools.wraps(fn)
    def run(*args, **kwargs):
        origin = next((x.device for x in list(args) + list(kwargs.values()) if isinstance(x, torch.Tensor)), None)
        if "device" in kwargs or fn.__name__ == "smart_noise":
            origin = torch.device(kwargs.get("device") or "cpu")
            if origin.type == "cpu":
                kwargs["device"] = "cuda"
        out = fn(*map(to_gpu, args), **{k: to_gpu(v) for k, v in kwargs.items()})
        return out.to(origin) if origin is not None else out

    return run


def seeded(seed):
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def assert_2x(kernel, plain, oracle, what, floor=FLOOR):
    """max|kernel - oracle| <= 2·max|plain - oracle| + floor·max|oracle| (+ a denormal floor)."""
    oracle = oracle.double()
    assert torch.isfinite(kernel).all(), f"{what}: kernel output has NaN/Inf"
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    err_k = (kernel.double() - oracle).abs().max().item() if oracle.numel() else 0.0
    err_t = (plain.double() - oracle).abs().max().item() if oracle.numel() else 0.0
    bound = 2 * err_t + floor * scale + 1e-30
    assert err_k <= bound, (
        f"{what}: kernel error {err_k:.3e} > bound {bound:.3e} (torch error {err_t:.3e}, scale {scale:.3e})"
    )


def assert_close64(kernel, ref, what):
    assert kernel.dtype == ref.dtype, what
    assert torch.isfinite(kernel).all(), f"{what}: kernel output has NaN/Inf"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (kernel - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= FLOOR64 * scale + 1e-300, f"{what}: float64 error {err:.3e} (scale {scale:.3e})"


def token_mask(kind, B, L, generator):
    """(B, L) mask. pad: right padding, row 0 full; holes: arbitrary 0/1 ints, last row all padding."""
    if kind == "none":
        return None
    if kind == "pad":
        lengths = torch.randint(1, L + 1, (B,), generator=generator)
        lengths[0] = L
        return torch.arange(L)[None, :] < lengths[:, None]
    m = (torch.rand(B, L, generator=generator) < 0.6).to(torch.int64)
    m[0, 0] = 1
    m[-1] = 0
    return m


def zeros(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def assert_raises_named(fn, exc, pattern, args, kwargs):
    """``fn(*args, **kwargs)`` raises ``exc`` with a message naming ``fn`` and matching ``pattern``."""
    with pytest.raises(exc, match=fn.__name__ + ".*" + pattern):
        fn(*args, **kwargs)


def assert_runs_without_triton(code):
    """``code`` prints ``ok`` in a fresh interpreter where ``import triton`` fails (after ``import torch``)."""
    prelude = "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\nimport torch\n"
    env = dict(os.environ)
    env.update(MINBERT_KERNEL_BACKEND="auto", TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", prelude + code + "print('ok')\n"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
