"""Fused attention kernel vs the plain-torch reference (kernels/attention.py).

Every kernel test runs with ``MINBERT_KERNEL_POISON=1`` (outputs, LSE, Delta and gradients start
as NaN), so an element a kernel forgets to write fails the comparison. Tolerance rule: the
kernel's max error against the float64 reference must be <= 2x plain torch's (the reference run
in the kernel's precision) plus a tiny floor. On CPU the kernels run in Triton's interpreter.
"""
import importlib
import math
import zlib

import pytest
import torch

from minbert.kernels import _dispatch
from minbert.kernels.attention import attention, attention_reference
from minbert.kernels.attention_dropout import attention_dropout_mask

attn_mod = importlib.import_module("minbert.kernels.attention")
dropout_mod = importlib.import_module("minbert.kernels.attention_dropout")

FLOOR = 1e-6  # relative to the reference's magnitude

# (B, H, L, D, mask kind, dropout_p): a cross of the grid where every value appears
CASES = [
    (1, 1, 1, 16, "none", 0.0),
    (2, 3, 1, 32, "full", 0.1),
    (2, 3, 7, 32, "pad", 0.1),
    (2, 2, 7, 64, "none", 0.0),
    (2, 2, 64, 64, "none", 0.1),
    (1, 3, 64, 16, "full", 0.0),
    (2, 3, 100, 16, "pad", 0.0),
    (2, 1, 100, 32, "full", 0.1),
    (1, 2, 130, 32, "holes", 0.1),
    (2, 3, 130, 64, "pad", 0.1),
    (2, 2, 130, 16, "none", 0.0),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv(attn_mod.POISON_ENV, "1")
    yield


def _mask(kind, B, L, device, gen):
    """(B, L) key mask. pad: random right padding (row 0) and an arbitrary mask (row 1) as 0/1 int;
    full: row 0 all padding; holes: a run of padding that empties whole interior key blocks."""
    if kind == "none":
        return None
    if kind == "holes":
        m = torch.zeros(B, L, dtype=torch.bool)
        m[:, :5] = True
        m[:, L - 2:] = True
        return m.to(device)
    lengths = torch.randint(1, L + 1, (B,), generator=gen)
    m = torch.arange(L)[None, :] < lengths[:, None]
    if B > 1:
        m[1] = torch.rand(L, generator=gen) < 0.6
        m[1, torch.randint(0, L, (1,), generator=gen)] = True
    if kind == "full":
        m[0] = False
        return m.to(device)
    return m.long().to(device)  # 0/1 integer masks are accepted too


def _inputs(B, H, L, D, device, dtype, gen, transposed):
    """q, k, v (B, H, L, D); 'transposed' builds them as (B, L, H, D).transpose(1, 2) like the model."""
    out = []
    for _ in range(3):
        if transposed:
            t = torch.randn(B, L, H, D, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype)
        out.append(t.requires_grad_())
    return out


def _fwd_bwd(fn, q, k, v, do, **kw):
    o = fn(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _check_2x(name, got, ref64, plain):
    err = (got.double() - ref64).abs().max().item()
    base = (plain.double() - ref64).abs().max().item()
    tol = 2.0 * base + FLOOR * max(1.0, ref64.abs().max().item())
    assert err <= tol, f"{name}: kernel error {err:.3e} > 2 x plain torch {base:.3e} (+ floor) = {tol:.3e}"


def _compare_case(B, H, L, D, kind, p, device, dtype=torch.float32, transposed=False, seed=1234):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((B, H, L, D, kind, p)).encode()))
    q, k, v = _inputs(B, H, L, D, device, dtype, gen, transposed)
    mask = _mask(kind, B, L, device, gen)
    do = torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype)
    got = _fwd_bwd(attention, q, k, v, do, key_padding_mask=mask, dropout_p=p, seed=seed)

    dmask = attention_dropout_mask(seed, (B, H, L, L), p, device) if p > 0 else None
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _fwd_bwd(attention_reference, *leaves64, do.double(), key_padding_mask=mask, dropout_p=p, dropout_mask=dmask)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    plain = _fwd_bwd(attention_reference, *leaves, do, key_padding_mask=mask, dropout_p=p, dropout_mask=dmask)
    for name, g, r, pl in zip(("out", "dq", "dk", "dv"), got, ref, plain):
        assert g.dtype == dtype and g.shape == (B, H, L, D)
        _check_2x(name, g, r, pl)
    if mask is not None:
        empty = ~(mask != 0).any(1)  # batches whose keys are all padding
        for name, g in zip(("out", "dq", "dk", "dv"), got):
            assert torch.all(g[empty] == 0), f"{name} not zero for a fully padded row"
    return got


@pytest.mark.parametrize("B,H,L,D,kind,p", CASES, ids=[f"B{c[0]}H{c[1]}L{c[2]}D{c[3]}-{c[4]}-p{c[5]}" for c in CASES])
def test_forward_and_grads_match_reference(triton_backend, device, B, H, L, D, kind, p):
    _compare_case(B, H, L, D, kind, p, device, transposed=(L % 2 == 0))


# the device fixture's choice: the GPU when there is one, else the CPU interpreter (slow: small cases)
HALF_CASES = ([(2, 3, 130, 64, "pad", 0.1), (2, 2, 100, 32, "full", 0.0), (2, 4, 257, 128, "pad", 0.1),
               (2, 2, 7, 16, "none", 0.1)] if torch.cuda.is_available() else
              [(2, 2, 37, 32, "pad", 0.1), (1, 2, 7, 16, "none", 0.0)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,L,D,kind,p", HALF_CASES)
def test_half_precision(triton_backend, device, B, H, L, D, kind, p, dtype):
    """fp16/bf16 (what autocast hands the kernel). Under the CPU interpreter, bf16 dots and casts go
    through the INTERP_BF16 helpers of kernels/_triton.py, which compute what the GPU computes."""
    _compare_case(B, H, L, D, kind, p, device, dtype=dtype)


def test_reference_seed_reproduces_kernel_dropout(triton_backend, device):
    """attention_reference(seed=s) draws the kernel's mask itself; custom softmax_scale too."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = [torch.randn(2, 2, 33, 32, generator=gen).to(device) for _ in range(3)]
    mask = _mask("pad", 2, 33, device, gen)
    got = attention(q, k, v, mask, dropout_p=0.25, softmax_scale=0.3, seed=99)
    ref = attention_reference(q.double(), k.double(), v.double(), mask, dropout_p=0.25, softmax_scale=0.3, seed=99)
    plain = attention_reference(q, k, v, mask, dropout_p=0.25, softmax_scale=0.3, seed=99)
    _check_2x("out", got, ref, plain)


def test_padded_keys_never_read(triton_backend, device):
    """NaN in padded K/V positions (including whole dead key blocks) must not reach O or the grads."""
    B, H, L, D = 2, 2, 130, 32
    gen = torch.Generator().manual_seed(2)
    q, k, v = [torch.randn(B, H, L, D, generator=gen).to(device) for _ in range(3)]
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    mask[0, :3] = True
    mask[0, 129] = True
    mask[1, :70] = True
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k.masked_fill_(~mask[:, None, :, None], float("nan"))
    dirty_v.masked_fill_(~mask[:, None, :, None], float("nan"))
    do = torch.randn(B, H, L, D, generator=gen).to(device)
    clean = _fwd_bwd(attention, *[t.requires_grad_() for t in (q, k, v)], do, key_padding_mask=mask, dropout_p=0.1, seed=5)
    dirty = _fwd_bwd(attention, *[t.clone().requires_grad_() for t in (q, dirty_k, dirty_v)], do,
                     key_padding_mask=mask, dropout_p=0.1, seed=5)
    for name, c, d in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.equal(c, d), name
    for g in clean[2:]:
        assert torch.all(g.masked_select(~mask[:, None, :, None]) == 0)


def test_key_block_table_is_exact():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(5, 300, generator=gen) < 0.02
    mask[0] = False
    mask[1, 100:] = False
    live, table, count = attn_mod._key_block_table(mask.view(torch.uint8), 32)
    nb = math.ceil(300 / 32)
    for b in range(5):
        want = [j for j in range(nb) if mask[b, j * 32:(j + 1) * 32].any()]
        assert live[b].tolist() == [int(j in want) for j in range(nb)]
        assert count[b].item() == len(want)
        assert table[b, : len(want)].tolist() == want


def test_same_seed_is_bitwise_reproducible_and_backward_deterministic(triton_backend, device):
    gen = torch.Generator().manual_seed(4)
    q, k, v = [torch.randn(2, 3, 100, 32, generator=gen).to(device).requires_grad_() for _ in range(3)]
    mask = _mask("pad", 2, 100, device, gen)
    do = torch.randn(2, 3, 100, 32, generator=gen).to(device)
    for p in (0.0, 0.1):
        first = _fwd_bwd(attention, q, k, v, do, key_padding_mask=mask, dropout_p=p, seed=77)
        second = _fwd_bwd(attention, q, k, v, do, key_padding_mask=mask, dropout_p=p, seed=77)
        for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
            assert torch.equal(a, b), f"{name} differs between two identical runs (p={p})"
    other = _fwd_bwd(attention, q, k, v, do, key_padding_mask=mask, dropout_p=0.1, seed=78)
    assert not torch.equal(first[0], other[0])


def test_seed_none_follows_torch_manual_seed(triton_backend, device):
    q, k, v = [torch.randn(1, 2, 40, 16).to(device) for _ in range(3)]
    torch.manual_seed(11)
    a = attention(q, k, v, dropout_p=0.2)
    b = attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(11)
    c = attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_kernel_dropout_equals_mask_helper(triton_backend, device):
    """With Q = K = 0 every kept probability is 1/L, and V = I reads Z out: O = Z / (L (1 - p))."""
    B, H, L, p = 2, 2, 64, 0.3
    q = torch.zeros(B, H, L, L, device=device)
    v = torch.eye(L, device=device).expand(B, H, L, L).contiguous()
    o = attention(q, q, v, dropout_p=p, seed=2024)
    z = attention_dropout_mask(2024, (B, H, L, L), p, device)
    assert torch.equal((o * L * (1 - p)).round().bool(), z)
    assert abs(z.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / z.numel())


def test_int64_dropout_counters_give_the_same_stream(triton_backend, device, monkeypatch):
    """B*H*L*L >= 2**31 switches counters to int64; the random stream must not change."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = [torch.randn(2, 2, 70, 16, generator=gen).to(device).requires_grad_() for _ in range(3)]
    mask = _mask("pad", 2, 70, device, gen)
    do = torch.randn(2, 2, 70, 16, generator=gen).to(device)
    narrow = _fwd_bwd(attention, q, k, v, do, key_padding_mask=mask, dropout_p=0.1, seed=31)
    monkeypatch.setattr(attn_mod, "needs_int64_counters", lambda *a: True)
    monkeypatch.setattr(dropout_mod, "needs_int64_counters", lambda *a: True)
    wide = _fwd_bwd(attention, q, k, v, do, key_padding_mask=mask, dropout_p=0.1, seed=31)
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)
    wide_mask = dropout_mod._dropout_mask_triton(31, (2, 2, 70, 70), 0.1, device)
    assert torch.equal(wide_mask, attention_dropout_mask(31, (2, 2, 70, 70), 0.1, device))
    assert torch.equal(wide_mask, dropout_mod._dropout_mask_torch(31, (2, 2, 70, 70), 0.1, device))


def test_poisoned_buffers_are_nan(monkeypatch):
    """The launchers' buffers start as NaN under MINBERT_KERNEL_POISON=1 (so the tests above see gaps)."""
    buf = attn_mod._new_output((2, 3), torch.float32, "cpu")
    assert torch.isnan(buf).all()
    monkeypatch.setenv(attn_mod.POISON_ENV, "0")
    assert attn_mod._new_output((2, 3), torch.float32, "cpu").shape == (2, 3)


def test_reference_backend_dispatches_to_reference(reference_backend):
    gen = torch.Generator().manual_seed(7)
    q, k, v = [torch.randn(2, 2, 9, 24, generator=gen) for _ in range(3)]  # D=24: fine for the reference
    mask = _mask("full", 2, 9, "cpu", gen)
    assert not _dispatch.use_triton(q, op="attention")
    assert torch.equal(attention(q, k, v, mask), attention_reference(q, k, v, mask))
    assert torch.equal(attention(q, k, v, mask, dropout_p=0.1, seed=3),
                       attention_reference(q, k, v, mask, dropout_p=0.1, seed=3))


def test_reference_fully_padded_row_is_zero_with_zero_grads():
    q, k, v = [torch.randn(2, 1, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    mask = torch.tensor([[0] * 5, [1, 1, 0, 1, 0]])
    o = attention_reference(q, k, v, mask)
    o.sum().backward()
    assert torch.all(o[0] == 0) and torch.isfinite(o).all()
    for t in (q, k, v):
        assert torch.all(t.grad[0] == 0) and torch.isfinite(t.grad).all()
    assert torch.all(k.grad[1, :, [2, 4]] == 0) and torch.all(v.grad[1, :, [2, 4]] == 0)


def _args(**over):
    q = torch.randn(2, 2, 5, 16)
    base = dict(q=q, k=torch.randn(2, 2, 5, 16), v=torch.randn(2, 2, 5, 16), key_padding_mask=None,
                dropout_p=0.0, softmax_scale=None, seed=None)
    base.update(over)
    return base


BAD_INPUTS = [
    ("rank", dict(q=torch.randn(2, 5, 16)), ValueError, "'q' must have 4 dimensions"),
    ("shape", dict(k=torch.randn(2, 2, 6, 16)), ValueError, "'k' must have shape"),
    ("dtype_mismatch", dict(v=torch.randn(2, 2, 5, 16, dtype=torch.float64)), TypeError, "'v' has dtype"),
    ("device_mismatch", dict(k=torch.randn(2, 2, 5, 16, device="meta")), ValueError, "'k' is on meta"),
    ("non_floating", dict(q=torch.ones(2, 2, 5, 16, dtype=torch.int32)), TypeError, "'q' must be a floating-point"),
    ("dropout_high", dict(dropout_p=1.0), ValueError, "'dropout_p' must be in"),
    ("dropout_negative", dict(dropout_p=-0.1), ValueError, "'dropout_p' must be in"),
    ("dropout_nan", dict(dropout_p=float("nan")), TypeError, "'dropout_p' must be a finite number"),
    ("mask_shape", dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "'key_padding_mask' must have shape"),
    ("mask_dtype", dict(key_padding_mask=torch.ones(2, 5)), TypeError, "'key_padding_mask' must be bool or integer"),
    ("scale", dict(softmax_scale=0.0), ValueError, "'softmax_scale' must be > 0"),
    ("seed_negative", dict(seed=-1), ValueError, "'seed' must be in"),
    ("seed_float", dict(seed=1.5), TypeError, "'seed' must be an int"),
]


@pytest.mark.parametrize("name,over,exc,msg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("fn", [attention, attention_reference], ids=["attention", "reference"])
def test_validation_errors(triton_backend, fn, name, over, exc, msg):
    op = "attention_reference" if fn is attention_reference else "attention"
    with pytest.raises(exc, match=f"{op}: .*{msg}"):
        fn(**_args(**over))


def test_kernel_only_validation_errors(triton_backend, device):
    qkv24 = [torch.randn(2, 2, 5, 24, device=device) for _ in range(3)]
    with pytest.raises(ValueError, match=r"attention: head dim D = 24 .*supported: 16, 32, 64, 128"):
        attention(*qkv24)
    qkv64 = [torch.randn(2, 2, 5, 16, dtype=torch.float64, device=device) for _ in range(3)]
    with pytest.raises(TypeError, match=r"attention: the Triton kernel needs .* got torch.float64"):
        attention(*qkv64)


def test_reference_dropout_mask_validation():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="'dropout_mask' must have shape"):
        attention_reference(q, q, q, dropout_p=0.1, dropout_mask=torch.ones(1, 1, 4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="'dropout_mask' must have dtype"):
        attention_reference(q, q, q, dropout_p=0.1, dropout_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="'dropout_mask' was given but dropout_p is 0"):
        attention_reference(q, q, q, dropout_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
