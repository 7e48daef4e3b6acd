"""attention_dropout_mask (kernels/attention_dropout.py): the mask kernel vs the torch Philox replica,
the masks' statistics, and argument checks. The attention kernels' own dropout is tested against
this mask in test_attention.py. Kernel outputs start poisoned (-1), so an unwritten element shows up.
"""
import importlib
import math

import pytest
import torch

from minbert.kernels.attention_dropout import attention_dropout_mask

dropout_mod = importlib.import_module("minbert.kernels.attention_dropout")

pytestmark = pytest.mark.usefixtures("poison")


def test_dropout_masks_differ_by_seed_and_keep_rate():
    shape = (2, 3, 130, 130)
    n = math.prod(shape)
    for p in (0.1, 0.5):
        m1 = attention_dropout_mask(1, shape, p)
        m2 = attention_dropout_mask(2, shape, p)
        assert m1.dtype == torch.bool and m1.shape == shape
        assert not torch.equal(m1, m2)
        assert (m1 != m2).float().mean().item() > 0.5 * 2 * p * (1 - p)  # independent masks disagree often
        sigma = math.sqrt(p * (1 - p) / n)
        for m in (m1, m2):
            assert abs(m.float().mean().item() - (1 - p)) < 5 * sigma
    assert torch.equal(attention_dropout_mask(3, shape, 0.1), attention_dropout_mask(3, shape, 0.1))
    assert attention_dropout_mask(3, (1, 1, 5, 5), 0.0).all()


def test_triton_mask_kernel_matches_torch_philox_replica(triton_backend, device):
    for seed, shape, p in [(0, (2, 3, 33, 33), 0.1), (2**40 + 7, (1, 2, 70, 70), 0.5), (12345, (1, 1, 1, 1), 0.1)]:
        a = dropout_mod._dropout_mask_triton(seed, shape, p, device)
        b = dropout_mod._dropout_mask_torch(seed, shape, p, device)
        assert torch.equal(a, b), (seed, shape, p)


def test_validation():
    with pytest.raises(ValueError, match=r"attention_dropout_mask: argument 'shape' must be \(B, H, L, L\)"):
        attention_dropout_mask(1, (1, 1, 4, 5), 0.1)
    with pytest.raises(TypeError, match="attention_dropout_mask: argument 'seed' must be an int"):
        attention_dropout_mask(None, (1, 1, 4, 4), 0.1)
    with pytest.raises(ValueError, match="attention_dropout_mask: argument 'p' must be in"):
        attention_dropout_mask(1, (1, 1, 4, 4), 1.5)
