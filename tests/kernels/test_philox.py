"""The plain-torch Philox4x32-10 (kernels/_philox.py): known-answer vectors, and bit-for-bit
agreement with Triton's ``tl.randint4x`` / ``tl.rand`` streams and with the two kernels that draw
from them (attention's dropout mask, SMART's noise)."""
import pytest
import torch

from minbert.kernels import _philox
from minbert.kernels._triton import tl, triton
from minbert.kernels.attention_dropout import attention_dropout_mask
from minbert.kernels.smart_noise import smart_noise

# (seed, offsets): a 64-bit key and int64 offsets beyond 2**32 use both halves of key and counter
STREAMS = [(0, (0, 1, 2, 1023)), (1234, (5, 77, 2**31 - 1)), (2**40 + 7, (0, 2**32 + 3, 2**40 + 11))]


@pytest.mark.parametrize("wraps", [True, False], ids=["int64-wrap", "16-bit-split"])
def test_philox_reference_matches_known_answer_vectors(monkeypatch, wraps):
    """Random123's Philox4x32-10 known-answer tests for the plain-torch generator, through both
    of its 32x32-bit multiplication paths."""
    if wraps and not _philox.int64_mul_wraps(torch.device("cpu")):
        pytest.skip("int64 products do not wrap on this CPU build")
    monkeypatch.setitem(_philox._WRAPS, "cpu", wraps)
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for ctr, key, want in kat:
        got = _philox.philox4x32(*[torch.tensor([c]) for c in ctr], key[0], key[1])
        assert [int(x) for x in got] == list(want)


@triton.jit
def _randint4x_kernel(OFFS_ptr, OUT_ptr, seed, N: tl.constexpr):
    """OUT (4, N) int64 = the four uint32 words of tl.randint4x(seed, OFFS)."""
    i = tl.arange(0, N)
    r0, r1, r2, r3 = tl.randint4x(seed, tl.load(OFFS_ptr + i))
    tl.store(OUT_ptr + i, r0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(OUT_ptr + N + i, r1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(OUT_ptr + 2 * N + i, r2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(OUT_ptr + 3 * N + i, r3.to(tl.int64) & 0xFFFFFFFF)


@pytest.mark.parametrize("seed,offsets", STREAMS)
def test_randint4x_matches_triton(triton_backend, device, seed, offsets):
    n = 4
    offs = torch.tensor(offsets + (0,) * (n - len(offsets)), dtype=torch.int64, device=device)
    out = torch.empty(4, n, dtype=torch.int64, device=device)
    _randint4x_kernel[(1,)](offs, out, seed, N=n)
    want = torch.stack(_philox.randint4x(seed, offs.cpu()))
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("seed", [0, 31, 2**40 + 7])
def test_rand_matches_the_attention_dropout_mask_kernel(triton_backend, device, seed):
    """Z[b, h, i, j] = rand(seed, ((b*H + h)*L + i)*L + j) >= p, from the mask kernel."""
    shape, p = (2, 3, 17, 17), 0.3
    counters = torch.arange(2 * 3 * 17 * 17, dtype=torch.int64)
    want = (_philox.rand(seed, counters) >= torch.tensor(p, dtype=torch.float32)).view(shape)
    assert torch.equal(attention_dropout_mask(seed, shape, p, device).cpu(), want)


@pytest.mark.parametrize("seed", [0, 1234, 2**40 + 7])
def test_rand_and_randn_match_the_noise_kernel(triton_backend, device, seed):
    """Element i of the noise is σ(2·rand(seed, i) - 1) bit for bit, or σ·randn(seed, i) to a few ulp."""
    shape, sigma = (2, 5, 33), 0.5
    offs = torch.arange(2 * 5 * 33, dtype=torch.int64)
    uniform = smart_noise(shape, sigma, seed, distribution="uniform", device=device).cpu()
    assert torch.equal(uniform, ((_philox.rand(seed, offs) * 2.0 - 1.0) * sigma).view(shape))
    normal = smart_noise(shape, sigma, seed, distribution="normal", device=device).cpu()
    atol = 1e-6 if device.type == "cpu" else 1e-4
    torch.testing.assert_close(normal, (_philox.randn(seed, offs) * sigma).view(shape), rtol=1e-5, atol=atol * sigma)


def test_fill_is_independent_of_the_chunk_size():
    values = lambda offs: _philox.rand(99, offs)  # noqa: E731
    whole = _philox.fill(torch.empty(1000), values, 1000)
    assert torch.equal(_philox.fill(torch.empty(1000), values, 64), whole)
    assert torch.equal(whole, _philox.rand(99, torch.arange(1000)))
