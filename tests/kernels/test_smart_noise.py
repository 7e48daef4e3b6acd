"""smart_noise (kernels/smart_noise.py) vs its plain-torch reference (the same Philox stream), and
the noise's statistics, dtypes and argument checks."""
import importlib
import math

import pytest
import torch
from kernel_checks import assert_raises_named, seeded, token_mask, via_cuda

from minbert.kernels.smart_noise import smart_noise_reference

noise_mod = importlib.import_module("minbert.kernels.smart_noise")

# the Triton entry point under test (validation-error tests below call the original)
smart_noise = via_cuda(noise_mod.smart_noise)

pytestmark = pytest.mark.usefixtures("poison")


NOISE_CASES = [
    # (shape, seed, mask kind)
    ((3, 13, 37), 0, "pad"),
    ((2, 7, 64), 1234, "holes"),
    ((1, 5, 33), 2**40 + 7, "none"),
]


@pytest.mark.parametrize("shape,seed,mask_kind", NOISE_CASES)
@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_noise_matches_reference(triton_backend, device, shape, seed, mask_kind, distribution):
    gen = seeded(seed % 1000)
    mask = token_mask(mask_kind, shape[0], shape[1], gen)
    mask = mask.to(device) if mask is not None else None
    out = smart_noise(shape, 0.25, seed, token_mask=mask, distribution=distribution, device=device)
    ref = smart_noise_reference(shape, 0.25, seed, token_mask=mask, distribution=distribution, device=device)
    assert out.shape == shape and out.dtype == torch.float32 and out.device.type == device.type
    assert not torch.isnan(out).any()
    if distribution == "uniform":
        assert torch.equal(out, ref)  # bit-identical: integer Philox + exact float32 ops
    else:
        # Box-Muller's log/sqrt/cos may differ by a few ulp (GPU fast math: a little more)
        atol = 1e-6 if device.type == "cpu" else 1e-4
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol * 0.25)
    if mask is not None:
        assert (out[mask.bool() == 0] == 0).all()


def test_noise_reference_chunking(triton_backend, monkeypatch):
    """The CPU reference runs Philox in chunks; chunk borders must not change a single value."""
    mask = token_mask("pad", 3, 7, seeded(1))
    out = smart_noise((3, 7, 37), 0.5, 77, token_mask=mask, distribution="uniform")
    monkeypatch.setattr(noise_mod, "_CPU_CHUNK", 100)  # 777 elements -> 8 chunks, the last partial
    assert torch.equal(smart_noise_reference((3, 7, 37), 0.5, 77, token_mask=mask, distribution="uniform"), out)


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_noise_statistics_and_determinism(triton_backend, distribution):
    shape, sigma = (4, 16, 512), 0.5
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[1, 9:] = False
    a = smart_noise(shape, sigma, 99, token_mask=mask, distribution=distribution)
    real = a[mask]  # (n_real, H)
    n = real.numel()
    std = sigma if distribution == "normal" else sigma / math.sqrt(3)
    assert abs(real.mean().item()) < 5 * std / math.sqrt(n)
    assert abs(real.std().item() / std - 1) < 0.02
    assert (real != 0).float().mean() > 0.999
    assert (a[~mask] == 0).all()
    if distribution == "uniform":
        assert real.min() >= -sigma and real.max() < sigma
        assert real.min() < -0.99 * sigma and real.max() > 0.99 * sigma
    else:
        kurt = ((real - real.mean()) ** 4).mean() / real.var() ** 2
        assert abs(kurt.item() - 3) < 0.15
    assert torch.equal(a, smart_noise(shape, sigma, 99, token_mask=mask, distribution=distribution))
    b = smart_noise(shape, sigma, 100, token_mask=mask, distribution=distribution)
    assert (a[mask] == b[mask]).float().mean() < 1e-3
    assert abs(torch.corrcoef(torch.stack([a[mask].flatten(), b[mask].flatten()]))[0, 1].item()) < 0.03
    # linear in σ (a power of two: exact in float32)
    assert torch.equal(smart_noise(shape, 2 * sigma, 99, token_mask=mask, distribution=distribution), 2 * a)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_noise_dtypes(triton_backend, dtype):
    out = smart_noise((2, 3, 40), 1e-5, 7, dtype=dtype, distribution="uniform")
    ref = smart_noise_reference((2, 3, 40), 1e-5, 7, dtype=dtype, distribution="uniform")
    assert out.dtype == dtype and torch.equal(out, ref)
    assert smart_noise((0, 3, 40), 1.0, 7).shape == (0, 3, 40)
    assert (smart_noise((2, 3, 40), 0.0, 7) == 0).all()


def test_poisoned_outputs_are_fully_written(triton_backend):
    """With poisoned buffers the noise, including padding and the tail of the last block, comes back NaN-free."""
    mask = token_mask("holes", 3, 5, seeded(47))
    assert not torch.isnan(smart_noise((3, 5, 37), 1.0, 3, token_mask=mask)).any()


def test_dispatch_reference_backend_never_launches_kernels(reference_backend, monkeypatch):
    monkeypatch.setattr(noise_mod, "_noise_kernel", None)
    noise = noise_mod.smart_noise((2, 3, 8), 1.0, 5, distribution="uniform")
    assert torch.equal(noise, smart_noise_reference((2, 3, 8), 1.0, 5, distribution="uniform"))


def test_dispatch_triton_backend_never_uses_torch_path(triton_backend, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch path used under MINBERT_KERNEL_BACKEND=triton")

    monkeypatch.setattr(noise_mod, "_noise_torch", boom)
    assert smart_noise((2, 3, 8), 1.0, 5).shape == (2, 3, 8)


NOISE_ERRORS = [
    (((2, 3, 4), -1e-5, 0), {}, ValueError, r"'sigma' must be a finite number >= 0"),
    (((2, 3, 4), float("nan"), 0), {}, ValueError, r"'sigma' must be a finite"),
    (((2, 3, 4), 0.1, -1), {}, ValueError, r"'seed' must be an int in \[0, 2\*\*63\)"),
    (((2, 3, 4), 0.1, 1.5), {}, ValueError, r"'seed' must be an int"),
    (((2, 3, 4), 0.1, True), {}, ValueError, r"'seed' must be an int"),
    (((2, 3, 4), 0.1, 2**63), {}, ValueError, r"'seed' must be an int"),
    (((2, 3), 0.1, 0), {}, ValueError, r"'shape' must be 3 non-negative ints"),
    (((2, -3, 4), 0.1, 0), {}, ValueError, r"'shape' must be 3 non-negative ints"),
    ((5, 0.1, 0), {}, TypeError, r"'shape' must be a sequence"),
    (((2, 3, 4), 0.1, 0), {"distribution": "laplace"}, ValueError, r"'distribution' must be one of"),
    (((2, 3, 4), 0.1, 0), {"dtype": torch.int32}, TypeError, r"'dtype' must be a floating-point"),
    (((2, 3, 4), 0.1, 0), {"token_mask": torch.ones(3, 2)}, ValueError, r"'token_mask' must have shape \(B, L\)"),
    (((2, 3, 4), 0.1, 0), {"token_mask": torch.ones(2, 3), "device": "meta"}, ValueError, r"'token_mask' is on cpu"),
]


@pytest.mark.parametrize("case", range(len(NOISE_ERRORS)))
@pytest.mark.parametrize("fn", [noise_mod.smart_noise, smart_noise_reference])
def test_noise_validation_errors(any_backend, fn, case):
    args, kwargs, exc, pattern = NOISE_ERRORS[case]
    assert_raises_named(fn, exc, pattern, args, kwargs)
