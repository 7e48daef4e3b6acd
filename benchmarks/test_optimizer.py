"""AdamW step over the embedded MiniLM's parameters: torch's per-parameter loop vs its fused kernel.

Run: ``pytest benchmarks/test_optimizer.py --benchmark-only -s``

``minbert.engine.build_adamw`` picks ``fused=True`` where torch has the kernel (CUDA; the CPU since
torch 2.4). Every round of the fused step is paired with a round of the default step (in the
benchmark's untimed ``setup``); the printed ratio is the median of default / fused per pair.
"""
import statistics

import pytest
import torch

from minbert import BertModel
from minbert.engine import build_adamw, fused_adamw_supported

ROUNDS, WARMUP = 20, 3


def _optimizer(fused: bool, device):
    torch.manual_seed(0)
    params = [p for p in BertModel.from_pretrained().to(device).parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    groups = [{"params": params, "weight_decay": 0.01}]
    opt = build_adamw(groups, 2e-5, (0.9, 0.999), 1e-8, fused=fused)

    return opt.step, sum(p.numel() for p in params)


def test_adamw_step_fused_vs_default(benchmark, paired, device):
    if not fused_adamw_supported([torch.zeros(1, device=device)]):
        pytest.skip(f"torch {torch.__version__} has no fused AdamW on {device.type}")
    fused, n = _optimizer(True, device)
    default, _ = _optimizer(False, device)
    benchmark.group = f"AdamW step, {n / 1e6:.1f}M parameters ({device.type}, {torch.get_num_threads()} threads)"
    fused_t, default_t = paired(fused, default, rounds=ROUNDS, warmup=WARMUP)
    fused_s, default_s = [t.wall for t in fused_t], [t.wall for t in default_t]
    ratio = paired.ratio(default_t, fused_t)
    benchmark.extra_info.update(parameters=n, default_median_s=statistics.median(default_s),
                                fused_median_s=statistics.median(fused_s), default_over_fused=ratio)
    print(f"\nAdamW over {n / 1e6:.1f}M parameters: default {statistics.median(default_s) * 1e3:.1f} ms, "
          f"fused {statistics.median(fused_s) * 1e3:.1f} ms, default / fused {ratio:.2f}")
