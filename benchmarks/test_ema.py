"""Moving average of the weights (``ema: β``) over the embedded MiniLM: one update per training step.

Run: ``pytest benchmarks/test_ema.py --benchmark-only -s``

``minbert.ema.ParameterEMA.update`` (θ̄ ← (1 − β) θ + β θ̄ into one flat fp32 shard, with its layout
checks) is paired round by round with a bare ``torch._foreach_lerp_`` over the same tensors (in the
benchmark's untimed ``setup``); the printed ratio is the median of update / bare per pair, and the
update's median is what ``ema`` adds to every step of a run.
"""
import statistics

import torch

from minbert import BertModel
from minbert.ema import ParameterEMA

ROUNDS, WARMUP = 30, 3


def test_ema_update_vs_bare_lerp(benchmark, paired, device):
    torch.manual_seed(0)
    model = BertModel.from_pretrained().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = ParameterEMA(0.995, warmup=True, dtype=torch.float32)
    ema.ensure(model)
    copies = [p.detach().clone() for p in params]
    sources = [p.detach() for p in params]
    n = sum(p.numel() for p in params)

    benchmark.group = f"EMA update, {n / 1e6:.1f}M parameters ({device.type}, {torch.get_num_threads()} threads)"
    with torch.no_grad():
        update, bare = paired(lambda: ema.update(model), lambda: torch._foreach_lerp_(copies, sources, 0.005),
                              rounds=ROUNDS, warmup=WARMUP)
    update_s, bare_s = [t.wall for t in update], [t.wall for t in bare]
    ratio = paired.ratio(update, bare)
    assert ema.updates == ROUNDS + WARMUP
    benchmark.extra_info.update(parameters=n, tensors=len(params), update_median_s=statistics.median(update_s),
                                bare_lerp_median_s=statistics.median(bare_s), update_over_bare=ratio)
    print(f"\nEMA over {n / 1e6:.1f}M parameters in {len(params)} tensors: update "
          f"{statistics.median(update_s) * 1e3:.1f} ms, bare foreach lerp {statistics.median(bare_s) * 1e3:.1f} ms, "
          f"update / bare {ratio:.2f}")
