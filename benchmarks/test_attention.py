"""Attention with padding and dropout 0.1: the Triton kernel vs torch SDPA vs plain torch math.

Run: ``pytest benchmarks/test_attention.py --benchmark-only`` (add ``--benchmark-json=out.json``).
Providers run side by side in one session:

* ``triton``: :func:`minbert.kernels.attention.attention` (CUDA only; skipped on CPU with a reason),
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the boolean key mask; on
  CUDA forced to the memory-efficient backend (the flash backend rejects masks),
* ``math``: :func:`minbert.kernels.attention_reference` (explicit softmax(QK^T) V).

Modes: ``fwd`` (no autograd) and ``fwd+bwd`` (gradients of q, k, v). Shapes: bert-base
(32, 12, 128, 64), long (8, 12, 512, 64), MiniLM (32, 12, 128, 32), with key lengths drawn
uniformly from 30-100% of L (right padding). bf16 on CUDA, fp32 on CPU.

On CUDA each result also reports TFLOP/s in ``extra_info`` (and prints it): ``tflops_nominal``
counts 4*B*H*L^2*D flops for the forward (x3.5 for forward+backward: the backward does 2.5x the
forward's matmul work); ``tflops_effective`` counts only real keys, 4*H*D*L*sum(lengths) (x3.5),
i.e. the work left after padded key blocks are skipped.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from minbert.kernels import _dispatch
from minbert.kernels.attention import attention, attention_reference

SHAPES = {
    "bert-base": (32, 12, 128, 64),
    "long": (8, 12, 512, 64),
    "minilm": (32, 12, 128, 32),
}
PROVIDERS = ["triton", "sdpa", "math"]
MODES = ["fwd", "fwd+bwd"]
DROPOUT = 0.1
CUDA = torch.cuda.is_available()


def _inputs(shape, device, dtype, grad):
    B, H, L, D = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
               for _ in range(3)]
    lengths = torch.randint(math.ceil(0.3 * L), L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None, :] < lengths[:, None]).to(device)  # (B, L) True = real token
    do = torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v, mask, do, lengths


def _forward(provider, q, k, v, mask):
    if provider == "triton":
        return attention(q, k, v, key_padding_mask=mask, dropout_p=DROPOUT)
    if provider == "sdpa":
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L) True = attend
        if CUDA:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=DROPOUT)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=DROPOUT)
    return attention_reference(q, k, v, key_padding_mask=mask, dropout_p=DROPOUT)


def _step(provider, mode, q, k, v, mask, do):
    if mode == "fwd":
        with torch.no_grad():
            _forward(provider, q, k, v, mask)
    else:
        o = _forward(provider, q, k, v, mask)
        torch.autograd.grad(o, (q, k, v), do)
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention(benchmark, monkeypatch, device, provider, shape_name, mode):
    if provider == "triton":
        if device.type != "cuda":
            pytest.skip("triton provider needs a CUDA GPU; on CPU the kernel only runs in Triton's "
                        "interpreter, which is a correctness tool, not a benchmark")
        if not _dispatch.triton_available():
            pytest.skip("Triton cannot be imported on this machine")
        monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")
    shape = SHAPES[shape_name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v, mask, do, lengths = _inputs(shape, device, dtype, grad=(mode == "fwd+bwd"))
    B, H, L, D = shape

    benchmark.group = f"attention {shape_name} {tuple(shape)} {mode} p={DROPOUT} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(provider=provider, shape=list(shape), mode=mode, dropout_p=DROPOUT,
                                dtype=str(dtype), device=str(device), mean_length=float(lengths.float().mean()),
                                threads=torch.get_num_threads())
    rounds, warmup = (20, 3) if device.type == "cuda" else (3, 1)
    benchmark.pedantic(_step, args=(provider, mode, q, k, v, mask, do), rounds=rounds,
                       warmup_rounds=warmup, iterations=1)

    if device.type == "cuda":
        factor = 1.0 if mode == "fwd" else 3.5
        nominal = factor * 4 * B * H * L * L * D
        effective = factor * 4 * H * D * L * int(lengths.sum())
        seconds = benchmark.stats.stats.min
        benchmark.extra_info.update(tflops_nominal=nominal / seconds / 1e12, tflops_effective=effective / seconds / 1e12)
        print(f"\n{provider:>6} {shape_name:>9} {mode:>7}: {seconds * 1e3:8.3f} ms  "
              f"{nominal / seconds / 1e12:7.1f} TFLOP/s nominal  {effective / seconds / 1e12:7.1f} TFLOP/s effective")
