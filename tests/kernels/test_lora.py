"""Fused LoRA linear (kernels/lora.py) against its plain-torch reference.

Oracle: ``lora_linear_reference`` in float64 on the same (fresh random) inputs. Tolerance rule
(``_check``): the kernel's RMS error vs the oracle must be <= 2x that of plain torch (the
reference run in the kernel's dtype), plus a floor of half an ulp; max errors within 4x + 1 ulp.
On CPU the kernels run under Triton's interpreter (``triton_backend``), so row counts stay small;
they are never a multiple of the row block (32 on CPU, 64 on CUDA).
"""
import math

import pytest
import torch

from minbert.kernels import _lora_layout as layout_mod
from minbert.kernels import lora as lora_mod
from minbert.kernels.lora import lora_linear, lora_linear_reference

SCALING = 2.0  # alpha / r


def _inputs(m, k, n, r, *, adapters=None, bias=True, dtype=torch.float32, device="cpu",
            weight_grad=False, bias_grad=False, ab_grad=True, x_grad=True, ids=None, x_shape=None):
    """Fresh random LoRA inputs. B is random (not zero as at init) so the LoRA term matters."""
    shape = x_shape or (m, k)
    x = torch.randn(shape, device=device)
    w = torch.randn(n, k, device=device) / math.sqrt(k)
    b = torch.randn(n, device=device) if bias else None
    lead = () if adapters is None else (adapters,)
    a = torch.randn(lead + (r, k), device=device) / math.sqrt(k)
    bb = torch.randn(lead + (n, r), device=device) / math.sqrt(r)
    if adapters is not None and ids is None:
        ids = torch.randint(-1, adapters, (m,), device=device)
        ids[:3] = torch.tensor([-1, 0, adapters - 1], device=device)  # mixed, including -1
    t = dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb)
    t = {name: None if v is None else v.to(dtype) for name, v in t.items()}
    flags = dict(x=x_grad, weight=weight_grad, bias=bias_grad, lora_a=ab_grad, lora_b=ab_grad)
    for name, v in t.items():
        if v is not None and flags[name]:
            v.requires_grad_(True)
    return t, ids


def _run(fn, t, ids, dy):
    """Forward + backward; returns (y, {name: grad or None}) for tensors that require grad."""
    y = fn(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING, ids)
    names = [k for k, v in t.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, [t[k] for k in names], dy.to(y.dtype)) if names else ()
    return y.detach(), dict(zip(names, grads))


def _as(t, dtype):
    return {k: None if v is None else v.detach().to(dtype).requires_grad_(v.requires_grad) for k, v in t.items()}


def _errors(got, ref):
    """(RMS, max) absolute error of ``got`` against the float64 ``ref``."""
    if ref.numel() == 0:
        return 0.0, 0.0
    diff = got.double() - ref
    return diff.pow(2).mean().sqrt().item(), diff.abs().max().item()


# cuBLAS on CUDA splits K for skinny float32 products, which cuts its rounding error 2-3x below any
# single-pass float32 dot. Measured on an H100 (2026-11-25), RMS error vs float64 of y = x W^T:
# (70 x 384) @ (384 x 1536): cuBLAS 1.65e-7, a plain Triton fp32 dot 3.53e-7 (2.14x), lora_linear with
# B = 0 3.53e-7; (33 x 1536) @ (1536 x 384): 2.42e-7, 7.06e-7 (2.92x), 7.06e-7; at 4096 rows all
# three equal. The fused kernel adds no error of its own, so against cuBLAS the float32 RMS factor is
# 4 (the bf16/fp16 and CPU comparisons keep 2).
def _rms_factor(got, dtype):
    return 4.0 if got.device.type == "cuda" and dtype == torch.float32 else 2.0


def _check(name, got, plain, oracle, dtype):
    """Tolerance rule: kernel error <= 2 x plain torch's error (same dtype) vs the float64 oracle
    (4 x for float32 on CUDA: see ``_rms_factor``).

    The error is the RMS over elements, plus a floor of half an ulp at the oracle's RMS magnitude
    (the rounding of the output itself, which no implementation avoids). The max error, which a
    single unlucky rounding dominates at the ulp level, must stay within 4 x torch's plus one ulp
    at the largest magnitude, so one wrong element still fails.
    """
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    eps = torch.finfo(dtype).eps
    (err, err_max), (base, base_max) = _errors(got, oracle), _errors(plain, oracle)
    rms_scale = oracle.pow(2).mean().sqrt().item() if oracle.numel() else 0.0
    max_scale = oracle.abs().max().item() if oracle.numel() else 0.0
    floor = 0.5 * eps * max(rms_scale, 1e-6)
    k = _rms_factor(got, dtype)
    assert err <= k * base + floor, f"{name}: kernel RMS error {err:.3e} > {k:g} x torch's {base:.3e} + {floor:.1e}"
    floor_max = eps * max(max_scale, 1e-6)
    assert err_max <= 2 * k * base_max + floor_max, (
        f"{name}: kernel max error {err_max:.3e} > {2 * k:g} x torch's {base_max:.3e} + {floor_max:.1e}")


def _compare(t, ids, dtype=torch.float32):
    """Kernel (dtype) vs plain torch (dtype) vs float64 oracle, forward and all gradients."""
    dy = torch.randn(t["x"].shape[:-1] + (t["weight"].shape[0],), device=t["x"].device)
    y, grads = _run(lora_linear, t, ids, dy)
    y_plain, grads_plain = _run(lora_linear_reference, _as(t, dtype), ids, dy)
    y_ref, grads_ref = _run(lora_linear_reference, _as(t, torch.float64), ids, dy.double())
    assert y.dtype == dtype
    _check("y", y, y_plain, y_ref, dtype)
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert grads[name].dtype == dtype
        _check(f"d{name}", grads[name], grads_plain[name], grads_ref[name], dtype)
    return y, grads


# ---------------------------------------------------------------------------------------------
# forward and all gradients
# ---------------------------------------------------------------------------------------------
SINGLE_CASES = [
    # (rows, in, out, r, bias)
    (70, 384, 1536, 8, True),
    (33, 1536, 384, 16, False),
    (45, 384, 384, 4, True),
    (70, 100, 100, 1, False),
    (41, 37, 130, 4, True),
    (19, 130, 37, 16, False),
]


@pytest.mark.parametrize("m,k,n,r,bias", SINGLE_CASES)
def test_single_adapter_matches_reference(triton_backend, device, m, k, n, r, bias):
    t, _ = _inputs(m, k, n, r, bias=bias, device=device)
    _compare(t, None)


MULTI_CASES = [
    # (rows, in, out, r, bias)
    (70, 384, 100, 4, True),
    (61, 100, 1536, 8, False),
    (50, 37, 130, 16, True),
    (67, 130, 37, 1, False),
]


@pytest.mark.parametrize("m,k,n,r,bias", MULTI_CASES)
def test_multi_adapter_matches_reference(triton_backend, device, m, k, n, r, bias):
    t, ids = _inputs(m, k, n, r, adapters=3, bias=bias, device=device)
    _compare(t, ids)


def test_multi_adapter_unused_adapter_gets_zero_grad(triton_backend, device):
    ids = torch.tensor([0, 2, -1, 2, 0] * 9, device=device)  # adapter 1 has no rows
    t, ids = _inputs(45, 100, 37, 4, adapters=3, device=device, ids=ids)
    _, grads = _compare(t, ids)
    assert torch.equal(grads["lora_a"][1], torch.zeros_like(grads["lora_a"][1]))
    assert torch.equal(grads["lora_b"][1], torch.zeros_like(grads["lora_b"][1]))
    assert grads["lora_a"][0].abs().sum() > 0 and grads["lora_b"][2].abs().sum() > 0


def test_multi_adapter_all_rows_without_adapter_is_base_layer(triton_backend, device):
    ids = torch.full((40,), -1, device=device)
    t, ids = _inputs(40, 37, 100, 8, adapters=3, device=device, ids=ids)
    y, grads = _compare(t, ids)
    base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
    torch.testing.assert_close(y, base.detach(), rtol=1e-5, atol=1e-5)
    assert not grads["lora_a"].any() and not grads["lora_b"].any()


def test_single_adapter_in_multi_form_equals_single_form(triton_backend, device):
    t, _ = _inputs(50, 130, 100, 4, device=device)
    y1, g1 = _run(lora_linear, t, None, torch.ones(50, 100, device=device))
    t3 = dict(t, lora_a=t["lora_a"].detach()[None].requires_grad_(), lora_b=t["lora_b"].detach()[None].requires_grad_())
    ids = torch.zeros(50, dtype=torch.int32, device=device)
    y3, g3 = _run(lora_linear, t3, ids, torch.ones(50, 100, device=device))
    torch.testing.assert_close(y3, y1, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g3["x"], g1["x"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g3["lora_a"][0], g1["lora_a"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g3["lora_b"][0], g1["lora_b"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("per", ["sequence", "row"])
def test_3d_input_adapter_ids_per_sequence_or_row(triton_backend, device, per):
    batch, length = 5, 9  # 45 rows
    seq_ids = torch.tensor([2, -1, 0, 0, 1], device=device)
    ids = seq_ids if per == "sequence" else seq_ids.repeat_interleave(length)
    t, _ = _inputs(batch * length, 100, 37, 8, adapters=3, device=device, ids=ids, x_shape=(batch, length, 100))
    y, grads = _compare(t, ids)
    assert y.shape == (batch, length, 37) and grads["x"].shape == (batch, length, 100)
    # the per-sequence rule: sequence i's rows all use adapter ids[i]
    expanded = seq_ids.repeat_interleave(length)
    y_rows = lora_linear_reference(t["x"].reshape(-1, 100), t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                                   SCALING, expanded)
    torch.testing.assert_close(y.reshape(-1, 37), y_rows.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(triton_backend, device, dtype):
    t, _ = _inputs(37, 130, 100, 8, device=device, dtype=dtype)
    _compare(t, None, dtype=dtype)
    t, ids = _inputs(37, 100, 130, 4, adapters=3, device=device, dtype=dtype)
    _compare(t, ids, dtype=dtype)


@pytest.mark.parametrize("fn", [lora_linear, lora_linear_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("adapters", [None, 3])
def test_autocast_casts_inputs_like_f_linear(triton_backend, device, fn, adapters):
    """Under torch.autocast(bf16), fp32 inputs (x, and the fp32 weight/adapters of a model) are cast
    to bf16 as F.linear's are: the result is bf16 and equals the call on bf16 copies without
    autocast, bit for bit; gradients reach the fp32 leaves in fp32 (the bf16 gradients, cast)."""
    t, ids = _inputs(37, 70, 50, 4, adapters=adapters, device=device, bias_grad=True)
    dy = torch.randn(37, 50, device=device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        y, grads = _run(fn, t, ids, dy)
    want_y, want_grads = _run(fn, _as(t, torch.bfloat16), ids, dy)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want_y)
    assert set(grads) == set(want_grads) == {"x", "bias", "lora_a", "lora_b"}
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, want_grads[name].float(), rtol=0, atol=0, msg=name)
    # outside autocast fp32 and bf16 still do not mix: that is a caller's mistake
    with pytest.raises(TypeError, match="argument 'weight' has dtype torch.float32 but 'x' has torch.bfloat16"):
        fn(t["x"].detach().bfloat16(), t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING, ids)


def test_bfloat16_rounding_is_round_to_nearest_even(triton_backend, device):
    """Integer inputs make every fp32 accumulation exact, so the only rounding is the bf16 casts
    (X A^T before the epilogue dot, Y on store): the kernel must match torch's RNE bit for bit."""
    ints = lambda *shape: torch.randint(-16, 17, shape, device=device).to(torch.bfloat16)
    x, w, a, b = ints(45, 130), ints(37, 130), ints(3, 4, 130), ints(3, 37, 4)
    ids = torch.tensor([0, 1, 2, -1, 1] * 9, device=device)
    y = lora_linear(x, w, None, a, b, 1.0, ids).float()
    f = lambda t: t.float()
    xa = torch.einsum("nk,nrk->nr", f(x), f(a)[ids.clamp(min=0)]).bfloat16().float()  # exact, then RNE
    low = torch.einsum("nr,nor->no", xa, f(b)[ids.clamp(min=0)]) * (ids >= 0)[:, None]
    expected = (f(x) @ f(w).T + low).bfloat16().float()
    assert (expected.abs() > 512).any()  # values that need rounding in bf16
    assert torch.equal(y, expected)


# ---------------------------------------------------------------------------------------------
# which gradients are computed
# ---------------------------------------------------------------------------------------------
class _Spy:
    def __init__(self, monkeypatch, name):
        self.calls = []
        real = getattr(lora_mod, name)

        def wrapper(*args, **kwargs):
            self.calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(lora_mod, name, wrapper)


@pytest.mark.parametrize("adapters", [None, 3])
def test_dx_only_backward(triton_backend, device, monkeypatch, adapters):
    """A, B and W frozen (e.g. SMART's inner step): dx alone, no dA/dB or xA^T / dY B work."""
    fwd, dx_spy, ab_spy = (_Spy(monkeypatch, n) for n in ("_lora_forward", "_lora_backward_dx", "_lora_backward_ab"))
    t, ids = _inputs(50, 130, 100, 4, adapters=adapters, device=device, ab_grad=False)
    _, grads = _compare(t, ids)
    assert set(grads) == {"x"}
    assert fwd.calls[0]["store_xa"] is False
    assert dx_spy.calls == [dict(compute_dx=True, store_g=False)]
    assert ab_spy.calls == []
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING, ids)
    y.sum().backward()
    assert t["lora_a"].grad is None and t["lora_b"].grad is None and t["weight"].grad is None
    assert t["x"].grad is not None


def test_no_grad_forward_keeps_nothing_for_backward(triton_backend, device, monkeypatch):
    fwd = _Spy(monkeypatch, "_lora_forward")
    t, ids = _inputs(20, 37, 16, 4, adapters=3, device=device)
    with torch.no_grad():
        y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING, ids)
    assert not y.requires_grad and fwd.calls[0]["store_xa"] is False


@pytest.mark.parametrize("adapters", [None, 3])
def test_weight_and_bias_grads_only_when_required(triton_backend, device, adapters):
    t, ids = _inputs(45, 100, 37, 8, adapters=adapters, device=device, weight_grad=True, bias_grad=True)
    _, grads = _compare(t, ids)
    assert {"weight", "bias"} <= set(grads)
    t, ids = _inputs(45, 100, 37, 8, adapters=adapters, device=device)
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING, ids)
    y.square().sum().backward()
    assert t["weight"].grad is None and t["bias"].grad is None
    assert t["x"].grad is not None and t["lora_a"].grad is not None and t["lora_b"].grad is not None


@pytest.mark.parametrize("adapters", [None, 3])
def test_adapter_grads_without_input_grad(triton_backend, device, monkeypatch, adapters):
    """x without grad (e.g. frozen embeddings below the first LoRA layer): no dx, still dA/dB."""
    dx_spy = _Spy(monkeypatch, "_lora_backward_dx")
    t, ids = _inputs(70, 130, 37, 4, adapters=adapters, device=device, x_grad=False)
    _, grads = _compare(t, ids)
    assert set(grads) == {"lora_a", "lora_b"}
    assert dx_spy.calls == [dict(compute_dx=False, store_g=True)]


def test_only_lora_b_trainable(triton_backend, device):
    t, ids = _inputs(45, 100, 37, 4, adapters=3, device=device, x_grad=False)
    t["lora_a"].requires_grad_(False)
    _, grads = _compare(t, ids)
    assert set(grads) == {"lora_b"}


def test_empty_input(triton_backend, device):
    t, _ = _inputs(0, 37, 100, 4, device=device)
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING)
    assert y.shape == (0, 100)
    gx, ga, gb = torch.autograd.grad(y.sum(), (t["x"], t["lora_a"], t["lora_b"]))
    assert gx.shape == (0, 37) and not ga.any() and not gb.any()


# ---------------------------------------------------------------------------------------------
# poisoned outputs, layout, dispatch
# ---------------------------------------------------------------------------------------------
def test_poisoned_outputs_are_fully_written(triton_backend, device, monkeypatch):
    """Every output buffer starts as NaN; a kernel that skipped an element would leave a NaN."""
    monkeypatch.setenv(lora_mod.POISON_ENV, "1")
    assert torch.isnan(lora_mod._empty((3,), torch.float32, device)).all()
    for adapters, m, x_grad, w_grad in [(None, 70, True, True), (3, 61, True, False), (3, 45, False, False)]:
        t, ids = _inputs(m, 130, 100, 8, adapters=adapters, device=device, x_grad=x_grad, weight_grad=w_grad)
        _compare(t, ids)  # checks every output and gradient is finite and within tolerance


@pytest.mark.parametrize("adapters", [None, 3])
def test_split_k_reduction_of_adapter_grads(triton_backend, device, monkeypatch, adapters):
    """dA/dB split over row blocks (as on a GPU with many SMs): fp32 partials, then summed."""
    monkeypatch.setenv(lora_mod.POISON_ENV, "1")
    monkeypatch.setattr(lora_mod, "_split_target", lambda device: 64)
    splits = []
    real = lora_mod._n_split
    monkeypatch.setattr(lora_mod, "_n_split", lambda *a: splits.append(real(*a)) or splits[-1])
    rows = 300 if device.type == "cpu" else 700  # >= 3 row blocks per adapter at either block size
    t, ids = _inputs(rows, 37, 100, 4, adapters=adapters, device=device)
    _compare(t, ids)
    assert len(splits) == 2 and min(splits) > 1


def test_poison_detects_unwritten_rows(triton_backend, device, monkeypatch):
    """The poison check can fail: a layout that drops a row leaves NaN in that row of y."""
    monkeypatch.setenv(lora_mod.POISON_ENV, "1")
    t, ids = _inputs(40, 37, 37, 4, adapters=3, device=device)
    layout = layout_mod.Layout(ids, 3, lora_mod._config(t["x"].device, t["x"].dtype)["BLOCK_M"])
    layout.rows[layout.rows == 5] = -1
    y, _ = lora_mod._lora_forward(t["x"].detach(), t["weight"], t["bias"], t["lora_a"].detach(),
                                  t["lora_b"].detach(), SCALING, layout, store_xa=False)
    nan_rows = torch.isnan(y).any(1).nonzero().flatten().tolist()
    assert nan_rows == [5]


@pytest.mark.parametrize("block_m", [4, 32])
def test_segment_layout(device, block_m):
    ids = torch.tensor([2, -1, 0, 2, 2, -1, 0, 2, 1, 2, 2, 2, 0], device=device)
    lay = layout_mod.Layout(ids, 4, block_m)  # adapter 3 has no rows
    rows = lay.rows.cpu()
    assert sorted(rows[rows >= 0].tolist()) == list(range(len(ids)))  # every row exactly once
    for blk in range(lay.num_blocks):
        block_rows = rows[blk * block_m:(blk + 1) * block_m]
        real = block_rows[block_rows >= 0]
        adapter = int(lay.block_adapter[blk])
        if adapter == -2:
            assert real.numel() == 0
        elif real.numel():
            assert (ids.cpu()[real.long()] == adapter).all()  # one adapter per block
    for a in range(4):
        start, end = int(lay.group_start[a]), int(lay.group_end[a])
        covered = rows[start * block_m:end * block_m]
        assert sorted(covered[covered >= 0].tolist()) == (ids.cpu() == a).nonzero().flatten().tolist()


def test_reference_backend_dispatch(reference_backend, device, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("Triton launcher called under MINBERT_KERNEL_BACKEND=reference")

    monkeypatch.setattr(lora_mod, "_lora_forward", boom)
    t, ids = _inputs(20, 37, 16, 4, adapters=3, device=device)
    args = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING, ids)
    assert torch.equal(lora_linear(*args), lora_linear_reference(*args))


def test_float64_uses_reference(triton_backend, device, monkeypatch):
    monkeypatch.setattr(lora_mod, "_lora_forward", lambda *a, **k: pytest.fail("float64 must use the reference"))
    t, _ = _inputs(10, 37, 16, 4, device=device, dtype=torch.float64)
    args = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING)
    assert torch.equal(lora_linear(*args), lora_linear_reference(*args))


def test_layout_cache_reused_and_invalidated(triton_backend, device):
    t, ids = _inputs(40, 37, 16, 4, adapters=3, device=device)
    args = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING)
    lora_linear(*args, ids)
    first = layout_mod._LAST_LAYOUT[0][3]
    lora_linear(*args, ids)
    assert layout_mod._LAST_LAYOUT[0][3] is first
    ids[:10] = 1 - ids[:10].clamp(max=1)  # in-place change must not reuse the stale layout
    y = lora_linear(*args, ids)
    assert layout_mod._LAST_LAYOUT[0][3] is not first
    torch.testing.assert_close(y, lora_linear_reference(*args, ids), rtol=1e-5, atol=1e-5)
    ids[3] = 3  # ... nor skip the range check
    with pytest.raises(ValueError, match=r"must lie in \[-1, 3\)"):
        lora_linear(*args, ids)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _good(device="cpu", adapters=None):
    t, ids = _inputs(6, 8, 5, 2, adapters=adapters, device=device, x_grad=False, ab_grad=False)
    return dict(t, scaling=1.0, adapter_ids=ids)


def _bad_cases():
    f16 = torch.float16
    return [
        ("x 0-d", None, dict(x=torch.tensor(1.0)), ValueError, "at least 1 dimension"),
        ("x int", None, dict(x=torch.ones(6, 8, dtype=torch.long)), TypeError, "'x' must be a floating-point"),
        ("weight in", None, dict(weight=torch.randn(5, 7)), ValueError, r"'weight' must have shape \(out, in\)"),
        ("weight 1d", None, dict(weight=torch.randn(5)), ValueError, "'weight' must have 2 dimensions"),
        ("bias shape", None, dict(bias=torch.randn(4)), ValueError, r"'bias' must have shape \(out,\)"),
        ("a rank 4", None, dict(lora_a=torch.randn(1, 1, 2, 8)), ValueError, r"'lora_a' must have shape \(r, in\) or"),
        ("a in", None, dict(lora_a=torch.randn(2, 7)), ValueError, r"'lora_a' must have shape \(r, in\)"),
        ("b r", None, dict(lora_b=torch.randn(5, 3)), ValueError, r"'lora_b' must have shape \(out, r\)"),
        ("b out", None, dict(lora_b=torch.randn(4, 2)), ValueError, r"'lora_b' must have shape \(out, r\)"),
        ("b 3d for 2d a", None, dict(lora_b=torch.randn(1, 5, 2)), ValueError, "'lora_b' must have 2 dimensions"),
        ("dtype", None, dict(lora_a=torch.randn(2, 8, dtype=f16)), TypeError, "'lora_a' has dtype torch.float16"),
        ("bias dtype", None, dict(bias=torch.randn(5, dtype=f16)), TypeError, "'bias' has dtype"),
        ("scaling neg", None, dict(scaling=-1.0), ValueError, "'scaling' must be a finite number >= 0"),
        ("scaling nan", None, dict(scaling=float("nan")), ValueError, "'scaling' must be a finite"),
        ("scaling inf", None, dict(scaling=float("inf")), ValueError, "'scaling' must be a finite"),
        ("scaling tensor", None, dict(scaling=torch.tensor(1.0)), TypeError, "'scaling' must be a Python float"),
        ("ids single", None, dict(adapter_ids=torch.zeros(6, dtype=torch.long)), ValueError,
         "'adapter_ids' was given but lora_a has shape"),
        ("ids missing", 3, dict(adapter_ids=None), ValueError, "'adapter_ids' is required"),
        ("ids float", 3, dict(adapter_ids=torch.zeros(6)), TypeError, "'adapter_ids' must have dtype"),
        ("ids bool", 3, dict(adapter_ids=torch.zeros(6, dtype=torch.bool)), TypeError, "'adapter_ids' must have dtype"),
        ("ids 2d", 3, dict(adapter_ids=torch.zeros(6, 1, dtype=torch.long)), ValueError, "'adapter_ids' must have 1"),
        ("ids len", 3, dict(adapter_ids=torch.zeros(5, dtype=torch.long)), ValueError,
         r"'adapter_ids' must have shape \(N,\) = \(6,\)"),
        ("ids high", 3, dict(adapter_ids=torch.tensor([0, 1, 2, 3, 0, 0])), ValueError,
         r"must lie in \[-1, 3\).*\[0, 3\]"),
        ("ids low", 3, dict(adapter_ids=torch.tensor([0, -2, 0, 0, 0, 0])), ValueError, r"must lie in \[-1, 3\)"),
        ("multi b T", 3, dict(lora_b=torch.randn(2, 5, 2)), ValueError, r"'lora_b' must have shape \(T, out, r\)"),
        ("multi b r", 3, dict(lora_b=torch.randn(3, 5, 4)), ValueError, r"'lora_b' must have shape \(T, out, r\)"),
        ("multi a in", 3, dict(lora_a=torch.randn(3, 2, 9)), ValueError, r"'lora_a' must have shape \(T, r, in\)"),
        ("rank 0", None, dict(lora_a=torch.randn(0, 8), lora_b=torch.randn(5, 0)), ValueError, "rank r"),
        ("x list", None, dict(x=[[1.0] * 8]), TypeError, "'x' must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("fn", [lora_linear, lora_linear_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_validation_errors(triton_backend, device, fn, case):
    _, adapters, change, error, match = case
    kwargs = _good(device, adapters=adapters)
    kwargs.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(error, match=match) as info:
        fn(**kwargs)
    assert "lora_linear" in str(info.value)


def test_per_sequence_ids_need_3d_input(triton_backend, device):
    kwargs = _good(device, adapters=3)
    kwargs["x"] = torch.randn(2, 3, 8, device=device)  # 6 rows, 2 sequences
    kwargs["adapter_ids"] = torch.tensor([0, 1], device=device)
    assert lora_linear(**kwargs).shape == (2, 3, 5)
    kwargs["x"] = torch.randn(6, 8, device=device)  # 2-D: only per-row ids
    with pytest.raises(ValueError, match=r"\(N,\) = \(6,\)"):
        lora_linear(**kwargs)


@pytest.mark.parametrize("name,adapters", [("lora_b", None), ("weight", None), ("bias", None), ("adapter_ids", 3)])
def test_device_mismatch(triton_backend, name, adapters):
    """A tensor on another device (the meta device stands in for a second GPU) is rejected by name."""
    kwargs = _good(adapters=adapters)
    kwargs[name] = kwargs[name].to("meta")
    with pytest.raises(ValueError, match=f"'{name}' is on meta"):
        lora_linear(**kwargs)
