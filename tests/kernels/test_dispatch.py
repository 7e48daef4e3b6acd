"""What the kernel modules share: one dispatch rule (``_dispatch.py``), the poisoning allocator
(``_triton.py``), and a working import, with every op on its reference, where Triton is missing."""
import importlib

import pytest
import torch
from kernel_checks import assert_runs_without_triton

from minbert.kernels import _dispatch

triton_mod = importlib.import_module("minbert.kernels._triton")

OP_MODULES = ["attention", "lora", "smart_noise", "smart_perturb", "symmetric_kl"]


@pytest.mark.parametrize("name", OP_MODULES)
def test_dispatch_module_is_shared(name):
    assert importlib.import_module(f"minbert.kernels.{name}").use_triton is _dispatch.use_triton


def test_poison_flag_fills_outputs_with_nan(poison, monkeypatch):
    """The launchers' allocator really poisons (so the op tests would see unwritten
    elements), and does not when the flag is off."""
    poisoned = triton_mod.new_output((3, 4), torch.float32, "cpu")
    assert torch.isnan(poisoned).all()
    monkeypatch.setenv(triton_mod.POISON_ENV, "0")
    calls = []
    real_full = torch.full
    monkeypatch.setattr(torch, "full", lambda *a, **k: calls.append(a) or real_full(*a, **k))
    triton_mod.new_output((3, 4), torch.float32, "cpu")
    assert not calls


def test_modules_work_without_triton():
    """Without Triton the modules still import and every op runs its reference."""
    assert_runs_without_triton(
        "from minbert.kernels import smart_noise, smart_perturb, symmetric_kl\n"
        "from minbert.kernels.attention_dropout import _dropout_mask_torch, attention_dropout_mask\n"
        "d = torch.randn(2, 3, 8); g = torch.randn(2, 3, 8)\n"
        "ref = smart_perturb.smart_perturb_step_reference(d, g, 0.1, 0.2)\n"
        "assert torch.equal(smart_perturb.smart_perturb_step(d, g, 0.1, 0.2), ref)\n"
        "p = torch.randn(4, 5, requires_grad=True)\n"
        "symmetric_kl.symmetric_kl(p, torch.randn(4, 5)).backward()\n"
        "assert smart_noise.smart_noise((2, 3, 8), 1.0, 3).shape == (2, 3, 8)\n"
        "mask = attention_dropout_mask(3, (1, 2, 5, 5), 0.5)\n"
        "assert torch.equal(mask, _dropout_mask_torch(3, (1, 2, 5, 5), 0.5, 'cpu'))\n"
    )
