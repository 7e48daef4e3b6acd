"""One training step with SMART and its relatives, as a ratio to the plain step (minbert/smart.py).

Run: ``pytest benchmarks/test_smart.py --benchmark-only -s`` (``-s`` prints the ratio table).

Each provider times one full step -- forward, task loss, regularizer terms, backward, AdamW step
(and the teacher EMA for MBPP) -- of an SST-style batch (5 classes) on the embedded checkpoint
(MiniLM-L6-H384, 6 layers), batch 32, length 48, token ids drawn at random with realistic padding
(lengths uniform in [16, 48]). Providers, all in one run:

* ``plain``: the task loss only;
* ``smart``: SMART's smoothness term, K = 1 ascent step, embedding-level perturbation (layer 0),
  default options (projection, ∞-norm, ``dropout="eval"``);
* ``smart+mbpp``: the same plus the Bregman term against the momentum teacher;
* ``r3f``: R3F (random noise, no ascent step); ``r3f+mbpp``: with the Bregman term (the
  ``smarter-hybrid`` recipe's regularizer);
* ``smart@layer3``, ``smart@layer5``: SMART perturbing the input of encoder layer k (layer 0 is
  ``smart``);
* ``smart:shared``, ``smart+mbpp:shared``: with ``dropout="shared"`` (the clean pass's dropout
  masks replayed in the extra passes), for information.

Targets (CPU): smart <= 2.7x, smart+mbpp <= 3.1x, r3f <= 2.05x, layer-k ratios falling with k.

Measurement. A plain step runs on its own model before each timed round of a provider (in the
benchmark's untimed ``setup``), so every round yields a plain/provider pair taken under the same
conditions; ``ratio`` is the median of the per-round ratios. On the CPU the ratio uses the
process's CPU time (``time.process_time``) and the benchmark runs single-threaded by default
(``MINBERT_BENCH_THREADS`` overrides): on a shared machine the wall time of a multi-threaded step
swings several-fold with other load, while the CPU time of one thread measures the work itself.
Wall-time ratios are reported beside it (``wall ratio``). On CUDA the step ends with a
synchronize, ratios use wall time, and the SMART kernels take their Triton path.
"""
import os
import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F

from minbert import BertModel
from minbert.data import Batch
from minbert.multitask import MultitaskModel
from minbert.smart import SMART
from minbert.evaluate import autocast_context
from minbert.train_config import TaskConfig

BATCH, LENGTH = 32, 48
# A CUDA step takes milliseconds and its time swings with launch jitter: more rounds there.
ROUNDS, WARMUP = (25, 5) if torch.cuda.is_available() else (5, 1)

PROVIDERS = {
    "plain": None,
    "smart": dict(lambda_s=1.0, mu=0.0),
    "smart+mbpp": dict(lambda_s=1.0, mu=1.0),
    "r3f": dict(lambda_s=1.0, mu=0.0, noise="r3f"),
    "r3f+mbpp": dict(lambda_s=1.0, mu=1.0, noise="r3f"),
    "smart@layer3": dict(lambda_s=1.0, mu=0.0, layer=3),
    "smart@layer5": dict(lambda_s=1.0, mu=0.0, layer=5),
    "smart:shared": dict(lambda_s=1.0, mu=0.0, dropout="shared"),
    "smart+mbpp:shared": dict(lambda_s=1.0, mu=1.0, dropout="shared"),
}
TARGETS = {"smart": 2.7, "smart+mbpp": 3.1, "r3f": 2.05}

_RESULTS = {}  # provider -> summary (for the table printed after each provider)


def _batch(vocab: int, device) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (BATCH, LENGTH), generator=g)
    lengths = torch.randint(LENGTH // 3, LENGTH + 1, (BATCH,), generator=g)
    lengths[0] = LENGTH
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(BATCH), lengths - 1] = 102  # [SEP]
    ids = ids * mask
    labels = torch.randint(0, 5, (BATCH,), generator=g)
    return Batch(task="sst", input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                 labels=labels).to(device)


def _trainer_step(provider, device, autocast=None):
    """A model, its optimizer and a closure running one full training step for ``provider``
    (forward and losses under ``autocast_context(autocast)``, as the trainer runs them)."""
    torch.manual_seed(0)
    bert = BertModel.from_pretrained()
    model = MultitaskModel(bert, [TaskConfig(name="sst", pooling="mean")]).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    batch = _batch(bert.config.vocab_size, device)
    options = PROVIDERS[provider]
    regs = [] if options is None else [SMART(task="sst", kind="single_label_classification", **options)]

    def step():
        with autocast_context(autocast, device):
            for reg in regs:
                reg.before_forward(model, batch)
            output = model(batch)
            loss = F.cross_entropy(output, batch.labels)
            for reg in regs:
                for term in reg(model, batch, output).values():
                    loss = loss + term
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for reg in regs:
            reg.after_step(model)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, regs


def _table():
    lines = [f"{'provider':<18} {'wall min s':>10} {'cpu med s':>10} {'ratio':>6} {'wall ratio':>10} {'target':>8}"]
    for name, r in _RESULTS.items():
        target = TARGETS.get(name)
        lines.append(f"{name:<18} {r['wall_min']:10.3f} {r['cpu_median']:10.3f} {r['ratio']:6.2f} "
                     f"{r['wall_ratio']:10.2f} {('<= %.2f' % target) if target else '':>8}")
    return "\n".join(lines)


@pytest.fixture
def threads(device):
    """One intra-op thread on the CPU unless MINBERT_BENCH_THREADS says otherwise (see the docstring)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("MINBERT_BENCH_THREADS", "1")))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_smart_training_step(benchmark, paired, device, threads, provider):
    step, regs = _trainer_step(provider, device)
    baseline = None if provider == "plain" else _trainer_step("plain", device)[0]

    benchmark.group = f"SMART training step B={BATCH} L={LENGTH} ({device.type}, {threads} threads)"
    rounds, plain = paired(step, baseline, rounds=ROUNDS, warmup=WARMUP)
    plain = rounds if provider == "plain" else plain
    clock = "cpu" if device.type == "cpu" else "wall"  # CPU time on the CPU, wall time on CUDA
    ratio = paired.ratio(rounds, plain, clock)
    wall_ratio = paired.ratio(rounds, plain)
    _RESULTS[provider] = dict(wall_min=min(r.wall for r in rounds), cpu_median=statistics.median(r.cpu for r in rounds),
                              ratio=ratio, wall_ratio=wall_ratio)
    benchmark.extra_info.update(
        provider=provider, device=str(device), threads=threads, ratio_to_plain=ratio, wall_ratio_to_plain=wall_ratio,
        ratio_clock="process CPU time" if clock == "cpu" else "wall", rounds_wall_cpu_s=rounds, plain_rounds_wall_cpu_s=plain,
        target_ratio=TARGETS.get(provider), smart_skipped=sum(reg.skipped for reg in regs))
    assert all(reg.skipped == 0 for reg in regs)
    print("\n" + _table())


_AUTOCAST = {}  # provider -> summary of the bf16/fp32 comparison


@pytest.mark.parametrize("provider", ["plain", "smart+mbpp", "r3f+mbpp"])
def test_autocast_training_step(benchmark, paired, device, provider):
    """``autocast: bf16`` against fp32: the same step (model, batch, provider), paired rounds.

    Runs with the trainer's threads (all cores: what a training run gets). On a CPU with AMX or
    AVX512-BF16 oneDNN runs the bf16 matmuls; elsewhere bf16 may be slower than fp32. The ratio is
    fp32 time / bf16 time (> 1: bf16 is faster), the median of per-round wall-time ratios."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    step, _ = _trainer_step(provider, device, autocast="bf16")
    fp32_step, _ = _trainer_step(provider, device)
    benchmark.group = f"autocast bf16 vs fp32, training step B={BATCH} L={LENGTH} ({device.type}, " \
                      f"{torch.get_num_threads()} threads)"
    with warnings.catch_warnings():  # SMART's "δ below bf16 resolution" warning: known, see minbert/smart.py
        warnings.simplefilter("ignore")
        rounds, fp32_rounds = paired(step, fp32_step, rounds=ROUNDS, warmup=WARMUP)
    speedup = paired.ratio(fp32_rounds, rounds)
    _AUTOCAST[provider] = dict(fp32=statistics.median(f.wall for f in fp32_rounds),
                               bf16=statistics.median(r.wall for r in rounds), speedup=speedup)
    benchmark.extra_info.update(provider=provider, device=str(device), threads=torch.get_num_threads(),
                                fp32_over_bf16=speedup, rounds_wall_cpu_s=rounds, fp32_rounds_wall_cpu_s=fp32_rounds)
    print("\n" + "\n".join([f"{'provider':<12} {'fp32 med s':>10} {'bf16 med s':>10} {'fp32/bf16':>9}"] + [
        f"{k:<12} {v['fp32']:10.3f} {v['bf16']:10.3f} {v['speedup']:9.2f}" for k, v in _AUTOCAST.items()]))
