"""smart_perturb_step (kernels/smart_perturb.py) vs its plain-torch reference: every rule, norm and
norm level, float64 to 1e-12 and low precision by the 2x rule (kernel_checks.py), padding, guards."""
import importlib

import pytest
import torch
from kernel_checks import assert_2x, assert_close64, assert_raises_named, seeded, token_mask, via_cuda
from kernel_checks import zeros as _d

from minbert.kernels.smart_perturb import smart_perturb_step_reference

perturb_mod = importlib.import_module("minbert.kernels.smart_perturb")

# the Triton entry point under test (validation-error tests below call the original)
smart_perturb_step = via_cuda(perturb_mod.smart_perturb_step)

pytestmark = pytest.mark.usefixtures("poison")


def _perturb_inputs(B, L, H, dtype, gen):
    """δ with per-token scales in [0.1, 2] and g with per-token scales over 6 decades."""
    f64 = torch.float64
    d = torch.randn(B, L, H, generator=gen, dtype=f64) * (0.1 + 1.9 * torch.rand(B, L, 1, generator=gen, dtype=f64))
    g = torch.randn(B, L, H, generator=gen, dtype=f64) * 10.0 ** (6 * torch.rand(B, L, 1, generator=gen, dtype=f64) - 3)
    return d.to(dtype), g.to(dtype)


def _epsilon(rule, norm, level, d, eta):
    """ε that puts the boundary in the middle of the data, so both sides of Π are exercised."""
    if rule == "mtdnn":
        return 1e-5
    if norm == "inf":
        return 0.8
    dims = (-1,) if level == "token" else (-2, -1)
    return torch.linalg.vector_norm(d.double(), dim=dims).median().item() + 0.5 * eta


PERTURB_CASES = [
    # (B, L, H, mask kind)
    (3, 7, 37, "pad"),
    (2, 13, 384, "holes"),
    (3, 13, 37, "none"),
    (1, 1, 1, "none"),
]
RULE_NORM_LEVEL = [(r, n, lv) for r in ("projection", "mtdnn") for n in ("inf", "l2") for lv in ("token", "sequence")]


@pytest.mark.parametrize("B,L,H,mask_kind", PERTURB_CASES)
@pytest.mark.parametrize("rule,norm,level", RULE_NORM_LEVEL)
def test_perturb_float64_matches_reference(triton_backend, B, L, H, mask_kind, rule, norm, level):
    gen = seeded(B * 1000 + L * 10 + H)
    d, g = _perturb_inputs(B, L, H, torch.float64, gen)
    mask = token_mask(mask_kind, B, L, gen)
    eta = 0.7
    eps = _epsilon(rule, norm, level, d, eta)
    out = smart_perturb_step(d, g, eta, eps, norm=norm, rule=rule, token_mask=mask, norm_level=level)
    ref = smart_perturb_step_reference(d, g, eta, eps, norm=norm, rule=rule, token_mask=mask, norm_level=level)
    assert_close64(out, ref, f"{rule}/{norm}/{level}")
    if mask is not None:
        assert (out[mask == 0] == 0).all()
    # the data really exercises the rule: projection clamps/rescales some tokens but not all
    if rule == "projection" and norm == "inf" and H > 1:
        assert (out.abs() == eps).any() and (out.abs() < eps).any()
    if rule == "projection" and norm == "l2" and level == "token" and H > 1:
        n = torch.linalg.vector_norm(out, dim=-1)
        assert (n > eps * (1 - 1e-9)).any() and (n[n > 0] < eps * (1 - 1e-3)).any()


@pytest.mark.parametrize("rule,norm,level", RULE_NORM_LEVEL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_low_precision_within_2x_torch(triton_backend, rule, norm, level, dtype):
    B, L, H = 3, 7, 37
    gen = seeded(7)
    d, g = _perturb_inputs(B, L, H, dtype, gen)
    mask = token_mask("pad", B, L, gen)
    eta = 0.7
    eps = _epsilon(rule, norm, level, d, eta)
    out = smart_perturb_step(d, g, eta, eps, norm=norm, rule=rule, token_mask=mask, norm_level=level)
    assert out.dtype == dtype and out.shape == d.shape
    plain = smart_perturb_step_reference(d, g, eta, eps, norm=norm, rule=rule, token_mask=mask, norm_level=level)
    oracle = smart_perturb_step_reference(
        d.double(), g.double(), eta, eps, norm=norm, rule=rule, token_mask=mask, norm_level=level
    )
    assert_2x(out, plain, oracle, f"{dtype} {rule}/{norm}/{level}")


@pytest.mark.parametrize("norm", ["inf", "l2"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_perturb_projection_is_scale_invariant_in_g(triton_backend, norm, level):
    """g/‖g‖ is the same for g and 1e-30·g: float32 squares of 1e-30 underflow, the scaled norms don't."""
    gen = seeded(3)
    d, g = _perturb_inputs(2, 5, 37, torch.float32, gen)
    g = g / g.abs().amax(dim=-1, keepdim=True)  # 1e-30 · g stays a normal float32
    eps = 0.8 if norm == "inf" else 2.0
    for fn in (smart_perturb_step, smart_perturb_step_reference):
        big = fn(d, g, 0.5, eps, norm=norm, token_mask=None, norm_level=level)
        tiny = fn(d, g * 1e-30, 0.5, eps, norm=norm, token_mask=None, norm_level=level)
        assert torch.isfinite(tiny).all()
        torch.testing.assert_close(tiny, big, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule,norm,level", RULE_NORM_LEVEL)
def test_perturb_zero_gradient_and_zero_epsilon_are_finite(triton_backend, rule, norm, level):
    """‖g‖ = 0 (projection: direction 0) and ‖δ'‖ + ε = 0 (mtdnn with ε = 0) give no NaN."""
    gen = seeded(5)
    d, g = _perturb_inputs(2, 4, 9, torch.float64, gen)
    g[0] = 0.0  # a whole sequence with zero gradient
    g[1, 1] = 0.0  # one token
    d[1, 1] = 0.0
    for eps in (0.0, 0.5):
        out = smart_perturb_step(d, g, 0.3, eps, norm=norm, rule=rule, norm_level=level)
        ref = smart_perturb_step_reference(d, g, 0.3, eps, norm=norm, rule=rule, norm_level=level)
        assert_close64(out, ref, f"{rule}/{norm}/{level} eps={eps}")
    if rule == "projection" and norm == "inf":
        torch.testing.assert_close(out[0], d[0].clamp(-0.5, 0.5), rtol=0, atol=0)  # zero step: just Π(δ)
    if rule == "mtdnn":
        zero_d = torch.zeros_like(d)
        out = smart_perturb_step(zero_d, torch.zeros_like(g), 0.3, 0.0, norm=norm, rule=rule, norm_level=level)
        assert torch.equal(out, zero_d)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("rule", ["projection", "mtdnn"])
def test_perturb_padded_tokens_are_ignored(triton_backend, rule, level):
    """Padding is zero in the output and never read: NaN or huge values there change nothing."""
    gen = seeded(11)
    d, g = _perturb_inputs(3, 6, 37, torch.float32, gen)
    mask = token_mask("pad", 3, 6, gen)
    mask[1, 3:] = False
    clean = smart_perturb_step(d, g, 0.4, 1.0, norm="l2", rule=rule, token_mask=mask, norm_level=level)
    d2, g2 = d.clone(), g.clone()
    d2[~mask] = float("nan")
    g2[~mask] = 1e30
    dirty = smart_perturb_step(d2, g2, 0.4, 1.0, norm="l2", rule=rule, token_mask=mask, norm_level=level)
    assert torch.equal(clean, dirty)
    assert (dirty[~mask] == 0).all()
    ref = smart_perturb_step_reference(d2, g2, 0.4, 1.0, norm="l2", rule=rule, token_mask=mask, norm_level=level)
    assert torch.isfinite(ref).all() and (ref[~mask] == 0).all()


def test_perturb_rules_semantics(triton_backend):
    """projection stays in the ε-ball; mtdnn's output has unit norm per token (up to ε)."""
    gen = seeded(13)
    d, g = _perturb_inputs(2, 5, 37, torch.float64, gen)
    eps = 0.3
    inf_out = smart_perturb_step(d, g, 1.0, eps, norm="inf")
    assert inf_out.abs().max() <= eps
    l2_out = smart_perturb_step(d, g, 1.0, eps, norm="l2")
    assert torch.linalg.vector_norm(l2_out, dim=-1).max() <= eps * (1 + 1e-12)
    seq_out = smart_perturb_step(d, g, 1.0, eps, norm="l2", norm_level="sequence")
    assert torch.linalg.vector_norm(seq_out, dim=(-2, -1)).max() <= eps * (1 + 1e-12)
    m_inf = smart_perturb_step(d, g, 0.1, 1e-12, norm="inf", rule="mtdnn")
    torch.testing.assert_close(m_inf.abs().amax(-1), torch.ones(2, 5, dtype=torch.float64))
    m_l2 = smart_perturb_step(d, g, 0.1, 1e-12, norm="l2", rule="mtdnn", norm_level="sequence")
    torch.testing.assert_close(torch.linalg.vector_norm(m_l2, dim=(-2, -1)), torch.ones(2, dtype=torch.float64))
    # projection with a tiny step and large ε is the plain normalised ascent step
    small = smart_perturb_step(d, g, 1e-3, 1e9, norm="l2")
    torch.testing.assert_close(small, d + 1e-3 * g / torch.linalg.vector_norm(g, dim=-1, keepdim=True))


def test_perturb_non_contiguous_and_grad_inputs(triton_backend):
    gen = seeded(17)
    d, g = _perturb_inputs(2, 37, 5, torch.float32, gen)
    d_t = d.transpose(1, 2)  # (2, 5, 37) non-contiguous
    g_t = g.transpose(1, 2).requires_grad_(True)
    for level in ("token", "sequence"):
        out = smart_perturb_step(d_t, g_t, 0.5, 0.7, norm_level=level)
        assert not out.requires_grad and out.is_contiguous()
        same = smart_perturb_step(d_t.contiguous(), g_t.detach().contiguous(), 0.5, 0.7, norm_level=level)
        assert torch.equal(out, same)


def test_poisoned_outputs_are_fully_written(triton_backend):
    """With poisoned buffers the output, including padding and the column/row tails of the last
    block, comes back NaN-free."""
    gen = seeded(47)
    d, g = _perturb_inputs(3, 5, 37, torch.float32, gen)
    mask = token_mask("holes", 3, 5, gen)
    for level in ("token", "sequence"):
        assert not torch.isnan(smart_perturb_step(d, g, 0.1, 0.2, token_mask=mask, norm_level=level)).any()


def test_dispatch_reference_backend_never_launches_kernels(reference_backend, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton path used under MINBERT_KERNEL_BACKEND=reference")

    monkeypatch.setattr(perturb_mod, "_perturb_step_triton", boom)
    d, g = _perturb_inputs(2, 3, 8, torch.float64, seeded(53))
    assert torch.equal(perturb_mod.smart_perturb_step(d, g, 0.1, 0.2), smart_perturb_step_reference(d, g, 0.1, 0.2))


def test_dispatch_triton_backend_never_uses_torch_path(triton_backend, monkeypatch):
    d, g = _perturb_inputs(2, 3, 8, torch.float64, seeded(59))
    ref_step = smart_perturb_step_reference(d, g, 0.1, 0.2)

    def boom(*a, **k):
        raise AssertionError("torch path used under MINBERT_KERNEL_BACKEND=triton")

    monkeypatch.setattr(perturb_mod, "_perturb_step_torch", boom)
    assert_close64(smart_perturb_step(d, g, 0.1, 0.2), ref_step, "step")


_OK = (2, 3, 4)  # a valid (B, L, H)

PERTURB_ERRORS = [
    (lambda: ((_d(2, 3), _d(2, 3), 0.1, 0.1), {}), ValueError, r"'delta' must have 3 dimensions \(B, L, H\)"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 5), 0.1, 0.1), {}), ValueError, r"'grad' must have shape \(B, L, H\)"),
    (lambda: ((_d(*_OK, dtype=torch.int64), _d(*_OK), 0.1, 0.1), {}), TypeError, r"'delta' must be a floating-point"),
    (lambda: ((_d(*_OK), _d(*_OK, dtype=torch.float64), 0.1, 0.1), {}), TypeError, r"'grad' has dtype torch.float64"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 4, device="meta"), 0.1, 0.1), {}), ValueError, r"'grad' is on meta"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 4), -0.1, 0.1), {}), ValueError, r"'step_size' must be a finite number >= 0"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 4), 0.1, -1e-5), {}), ValueError, r"'epsilon' must be a finite number >= 0"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 4), float("nan"), 0.1), {}), ValueError, r"'step_size' must be a finite"),
    (lambda: ((_d(2, 3, 4), _d(2, 3, 4), 0.1, float("inf")), {}), ValueError, r"'epsilon' must be a finite"),
    (lambda: ((_d(*_OK), _d(*_OK), 0.1, 0.1), {"norm": "l1"}), ValueError, r"'norm' must be one of 'inf', 'l2'"),
    (lambda: ((_d(*_OK), _d(*_OK), 0.1, 0.1), {"rule": "pgd"}), ValueError, r"'rule' must be one of"),
    (lambda: ((_d(*_OK), _d(*_OK), 0.1, 0.1), {"norm_level": "batch"}), ValueError, r"'norm_level' must be one of"),
    (lambda: ((_d(*_OK), _d(*_OK), 0.1, 0.1), {"token_mask": _d(2, 4)}), ValueError, r"'token_mask' must have shape"),
    (lambda: ((_d(*_OK), _d(*_OK), 0.1, 0.1), {"token_mask": _d(2, 3, device="meta")}), ValueError, "'token_mask' is"),
    (lambda: ((_d(2, 3, 4), "g", 0.1, 0.1), {}), TypeError, r"'grad' must be a torch.Tensor"),
]


@pytest.mark.parametrize("case", range(len(PERTURB_ERRORS)))
@pytest.mark.parametrize("fn", [perturb_mod.smart_perturb_step, smart_perturb_step_reference])
def test_perturb_validation_errors(any_backend, fn, case):
    make, exc, pattern = PERTURB_ERRORS[case]
    assert_raises_named(fn, exc, pattern, *make())


def test_triton_path_rejects_too_wide_hidden_size(triton_backend, monkeypatch):
    monkeypatch.setattr(perturb_mod, "_MAX_FUSED_H", 16)
    with pytest.raises(ValueError, match=r"smart_perturb_step: hidden size H=37 exceeds"):
        smart_perturb_step(_d(1, 2, 37), _d(1, 2, 37), 0.1, 0.1)
