"""LoRA linear layer: fused Triton kernel vs unfused torch vs the base layer alone.

Run: ``pytest benchmarks/test_lora.py --benchmark-only`` (add ``-s`` to also see the table).

Providers, compared side by side in one run (same group = same shape, pass and adapter count):
* ``base``: ``F.linear(x, W, b)`` with W frozen, no LoRA (the floor LoRA's overhead is measured
  against).
* ``torch``: unfused LoRA, ``F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)`` (peft's way).
  3-adapter form: the T adapters are stacked, ``x @ [A_0; A_1; A_2]^T`` (N, T*r) is masked so each
  row keeps only its own adapter's r columns, then multiplied by ``[B_0 B_1 B_2]^T``. This is
  sync-free and matmul-shaped (no per-adapter index_select, no (N, r, in) gather), the fastest
  plain-torch form we know, at T times the low-rank FLOPs.
* ``triton``: ``minbert.kernels.lora.lora_linear`` (fused; see kernels/lora.py). GPU only: on CPU it
  is skipped, because the Triton interpreter is a correctness tool, not a fast path.

Shapes: bert-base (768 -> 768 and 768 -> 3072) and MiniLM (384 -> 384 and 384 -> 1536), 4096 rows,
r = 8, scaling 2. Passes: forward, and forward+backward with W frozen (dx, dA, dB). bf16 on CUDA,
fp32 on CPU. Each non-base benchmark stores its median time over the base layer's in
``extra_info["overhead_vs_base"]`` (and 3-adapter ones over the single adapter's in
``extra_info["vs_single_adapter"]``); a summary table is printed at the end of the module.
Issue targets (H100, bf16): fused forward+backward <= 1.10x base; 3-adapter <= 1.15x single.
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

ROWS = 4096
RANK = 8
SCALING = 2.0
SHAPES = {
    "bert-768x768": (768, 768),  # bert-base attention projections (in x out)
    "bert-768x3072": (768, 3072),  # bert-base intermediate dense
    "minilm-384x384": (384, 384),  # MiniLM-L6-H384 attention projections
    "minilm-384x1536": (384, 1536),  # MiniLM intermediate dense
}
PROVIDERS = ["base", "torch", "triton"]  # base first: the others report their overhead over it
_MEDIANS = {}  # (shape, pass, adapters, provider) -> median seconds


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _setup(shape, adapters, device, backward):
    in_f, out_f = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x = rnd(ROWS, in_f).requires_grad_(backward)
    w = rnd(out_f, in_f) / math.sqrt(in_f)
    b = rnd(out_f)
    lead = (adapters,) if adapters > 1 else ()
    a = (rnd(*lead, RANK, in_f) / math.sqrt(in_f)).requires_grad_(backward)
    bb = (rnd(*lead, out_f, RANK) / math.sqrt(RANK)).requires_grad_(backward)
    ids = None
    if adapters > 1:  # a realistic multi-task batch: each task's sequences together, some rows unassigned
        ids = torch.arange(ROWS, device=device) * adapters // ROWS
        ids[::97] = -1
    dy = rnd(ROWS, out_f)
    return x, w, b, a, bb, ids, dy


def _torch_unfused(x, w, b, a, bb, ids):
    y = F.linear(x, w, b)
    if ids is None:
        return y + SCALING * F.linear(F.linear(x, a), bb)
    t, r, in_f = a.shape
    low = F.linear(x, a.reshape(t * r, in_f))  # (N, T*r): every adapter for every row
    keep = (ids[:, None] == torch.arange(t, device=x.device)[None, :]).to(low.dtype)  # (N, T)
    low = (low.view(-1, t, r) * keep[:, :, None]).view(-1, t * r)  # only the row's own adapter
    return y + SCALING * F.linear(low, bb.permute(1, 0, 2).reshape(bb.shape[1], t * r))


def _provider_fn(provider):
    if provider == "base":
        return lambda x, w, b, a, bb, ids: F.linear(x, w, b)
    if provider == "torch":
        return _torch_unfused
    from minbert.kernels.lora import lora_linear

    return lambda x, w, b, a, bb, ids: lora_linear(x, w, b, a, bb, SCALING, ids)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if not _MEDIANS:
        return
    lines = ["", "LoRA overhead over the base layer (median time / base median time):"]
    for (shape, mode, adapters, provider), median in sorted(_MEDIANS.items()):
        base = _MEDIANS.get((shape, mode, adapters, "base"))
        if provider != "base" and base:
            single = _MEDIANS.get((shape, mode, 1, provider))
            vs_single = f"  {median / single:5.2f}x single adapter" if adapters > 1 and single else ""
            lines.append(f"  {shape:16s} {mode:8s} T={adapters} {provider:7s} {median * 1e3:9.3f} ms  "
                         f"{median / base:5.2f}x base{vs_single}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("adapters", [1, 3])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_lora_linear(benchmark, device, shape, mode, adapters, provider):
    if provider == "triton" and device.type != "cuda":
        pytest.skip("Triton provider needs CUDA: on CPU the kernels only run in Triton's interpreter (a "
                    "correctness tool, far slower than torch), so a timing would be meaningless")
    backward = mode == "fwd+bwd"
    x, w, b, a, bb, ids, dy = _setup(shape, adapters, device, backward)
    fn = _provider_fn(provider)
    inputs = [x] if provider == "base" else [x, a, bb]

    def step():
        if backward:
            y = fn(x, w, b, a, bb, ids)
            torch.autograd.grad(y, inputs, dy)
        else:
            with torch.no_grad():
                fn(x, w, b, a, bb, ids)
        _sync(device)

    benchmark.group = f"lora {shape} {mode} T={adapters} rows={ROWS} r={RANK}"
    benchmark.extra_info.update(provider=provider, dtype=str(x.dtype), threads=torch.get_num_threads())
    if device.type == "cuda":
        benchmark.pedantic(step, rounds=30, warmup_rounds=5, iterations=5)
    else:
        benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    median = benchmark.stats.stats.median
    _MEDIANS[(shape, mode, adapters, provider)] = median
    base = _MEDIANS.get((shape, mode, adapters, "base"))
    if provider != "base" and base:
        benchmark.extra_info["overhead_vs_base"] = round(median / base, 3)
    single = _MEDIANS.get((shape, mode, 1, provider))
    if adapters > 1 and single:
        benchmark.extra_info["vs_single_adapter"] = round(median / single, 3)
