"""GPU time of each kernel, from torch.profiler: the device side of the pytest benchmarks.

    python benchmarks/gpu_profile.py --out results.json [--sweep]

The pytest benchmarks time whole calls on the host clock. At this project's sizes (a MiniLM batch,
a 38 MB perturbation) one call's GPU work takes microseconds, so those wall times mostly measure
Python and launch overhead. This script reports, per call and side by side:

* ``device_us``: the summed duration of every GPU kernel the call launched (CUPTI, through
  torch.profiler), with the L2 cache flushed before each call by a ``bitwise_not_`` over a 256 MB
  buffer whose kernels are left out of the sum;
* ``host_us``: wall time per call of back-to-back calls with one synchronize at the end (what a
  training loop sees when the GPU waits on Python);
* for memory-bound ops the bandwidth from ``device_us`` against the HBM peak (datasheet, or
  ``MINBERT_HBM_GBPS``) and against a measured device-to-device copy; for attention, TFLOP/s.

``--sweep`` also times the perturbation-step kernel and the attention forward over a grid of block
shapes and warp counts (the numbers behind the defaults in kernels/smart_perturb.py and
kernels/attention.py).
"""
import argparse
import importlib
import json
import math
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")
os.environ.pop("MINBERT_KERNEL_BACKEND", None)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLUSH_BYTES = 256 * 2**20
_flush_buf = None
ROWS = []


def _flush():
    _flush_buf.bitwise_not_()


def _kernel_events(prof):
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            yield e.name, e.time_range.elapsed_us()


def time_call(fn, iters=20, warmup=3):
    """(device µs per call, host µs per call, {kernel name: µs per call})."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    n = max(iters, 50)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    host = (time.perf_counter() - t0) / n * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            _flush()
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for name, us in _kernel_events(prof):
        if "bitwise_not" in name:
            continue
        kernels[name] = kernels.get(name, 0.0) + us / iters
    return sum(kernels.values()), host, kernels


def record(group, provider, fn, n_bytes=None, flops=None, **extra):
    dev, host, kernels = time_call(fn)
    row = dict(group=group, provider=provider, device_us=dev, host_us=host, kernels=len(kernels), **extra)
    line = f"{group:<44} {provider:<26} device {dev:9.1f} us  host {host:9.1f} us"
    if n_bytes:
        gbps = n_bytes / (dev * 1e-6) / 1e9
        row.update(bytes=n_bytes, GBps=gbps, hbm_peak_GBps=PEAK, copy_GBps=COPY,
                   fraction_of_peak=gbps / PEAK if PEAK else None, fraction_of_copy=gbps / COPY)
        line += f"  {gbps:7.0f} GB/s = {gbps / COPY:4.0%} of copy" + (f", {gbps / PEAK:4.0%} of peak" if PEAK else "")
    if flops:
        row.update(flops=flops, TFLOPs=flops / (dev * 1e-6) / 1e12)
        line += f"  {row['TFLOPs']:6.1f} TFLOP/s"
    print(line, flush=True)
    ROWS.append(row)
    return row


def measured_copy_gbps():
    src = torch.randn(512 * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    dev, _, _ = time_call(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (dev * 1e-6) / 1e9


# ----------------------------------------------------------------------------- SMART kernels

def smart(sweep):
    perturb_mod = importlib.import_module("minbert.kernels.smart_perturb")
    kl_mod = importlib.import_module("minbert.kernels.symmetric_kl")
    noise_mod = importlib.import_module("minbert.kernels.smart_noise")
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(32, 128, 768), (32, 128, 384)]:
        delta = torch.randn(*shape, generator=g, device="cuda") * 1e-5
        grad = torch.randn(*shape, generator=g, device="cuda") * 1e-3
        mask = torch.rand(shape[:2], generator=g, device="cuda") < 0.8
        out = torch.empty_like(delta)
        n_bytes = 3 * delta.numel() * 4
        name = "x".join(map(str, shape))
        for norm in ("inf", "l2"):
            group = f"smart_perturb_step {name} fp32 {norm}"
            record(group, "triton", lambda: perturb_mod.smart_perturb_step(delta, grad, 1e-3, 1e-5, norm=norm), n_bytes)
            record(group, "triton, token mask", lambda: perturb_mod.smart_perturb_step(
                delta, grad, 1e-3, 1e-5, norm=norm, token_mask=mask), n_bytes + mask.numel())
            record(group, "triton, per sequence", lambda: perturb_mod.smart_perturb_step(
                delta, grad, 1e-3, 1e-5, norm=norm, norm_level="sequence"), n_bytes + 2 * delta.numel() * 4)
            record(group, "torch reference", lambda: perturb_mod.smart_perturb_step_reference(
                delta, grad, 1e-3, 1e-5, norm=norm), n_bytes)
        record(f"smart_perturb_step {name} fp32 inf", "torch.add (same bytes)",
               lambda: torch.add(delta, grad, out=out), n_bytes)
        if sweep:
            real = perturb_mod._perturb_blocks
            H = shape[-1]
            bh = 1 << (H - 1).bit_length()
            for bt in (1, 2, 4, 8, 16):
                for nw in (1, 2, 4, 8):
                    if bt * bh > 16384 or bt * bh < 32 * nw:
                        continue
                    perturb_mod._perturb_blocks = lambda H, bt=bt, nw=nw: (bt, 1 << (H - 1).bit_length(), nw)
                    try:
                        record(f"sweep perturb {name} inf", f"BLOCK_T={bt} warps={nw}",
                               lambda: perturb_mod.smart_perturb_step(delta, grad, 1e-3, 1e-5), n_bytes,
                               block_t=bt, warps=nw)
                    finally:
                        perturb_mod._perturb_blocks = real
    for shape in [(32768, 5), (4096, 2)]:
        p = (torch.randn(*shape, generator=g, device="cuda") * 3).requires_grad_(True)
        q = (p.detach() + 1e-3 * torch.randn(*shape, generator=g, device="cuda")).requires_grad_(True)
        for provider, op in (("triton", kl_mod.symmetric_kl), ("torch reference", kl_mod.symmetric_kl_reference)):
            record(f"symmetric_kl fwd+bwd {shape[0]}x{shape[1]} fp32", provider,
                   lambda: torch.autograd.grad(op(p, q), (p, q)), 6 * p.numel() * 4)
    shape = (32, 128, 768)
    for provider, fn in (("triton", lambda: noise_mod.smart_noise(shape, 1e-5, 1234, device="cuda")),
                         ("torch reference (same Philox)", lambda: noise_mod.smart_noise_reference(
                             shape, 1e-5, 1234, device="cuda")),
                         ("torch.randn (other numbers)", lambda: torch.randn(shape, device="cuda") * 1e-5)):
        record("smart_noise 32x128x768 fp32", provider, fn, 4 * math.prod(shape))


# ----------------------------------------------------------------------------- attention

def attention(sweep):
    bench = importlib.import_module("test_attention")
    attn_mod = importlib.import_module("minbert.kernels.attention")
    for shape_name, shape in bench.SHAPES.items():
        B, H, L, D = shape
        q, k, v, mask, do, lengths = bench._inputs(shape, torch.device("cuda"), torch.bfloat16, True)
        nominal = 4 * B * H * L * L * D
        effective = 4 * H * D * L * int(lengths.sum())
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            for provider in ("triton", "sdpa"):
                def fn(provider=provider, mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            bench._forward(provider, q, k, v, mask)
                    else:
                        o = bench._forward(provider, q, k, v, mask)
                        torch.autograd.grad(o, (q, k, v), do)
                record(f"attention {shape_name} {mode} bf16 p=0.1", provider, fn,
                       flops=mult * effective, nominal_flops=mult * nominal)
        if sweep and shape_name in ("bert-base", "long"):
            real = attn_mod._config
            base = real(L, D, torch.bfloat16, q.device)
            for bm, bn, warps, stages in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                                          (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 4, 3), (64, 32, 4, 3)]:
                cfg = dict(base, BLOCK_M=min(bm, max(16, L)), BLOCK_N=min(bn, max(16, L)), fwd_warps=warps,
                           fwd_stages=stages)
                attn_mod._config = lambda *a, cfg=cfg: cfg
                try:
                    def fwd():
                        with torch.no_grad():
                            bench._forward("triton", q, k, v, mask)
                    record(f"sweep attention fwd {shape_name}", f"M{bm} N{bn} w{warps} s{stages}", fwd,
                           flops=effective)
                except Exception as exc:  # a config that does not fit is reported, not fatal
                    print(f"sweep attention {shape_name} M{bm} N{bn} w{warps} s{stages}: {type(exc).__name__}: {exc}")
                finally:
                    attn_mod._config = real


# ----------------------------------------------------------------------------- LoRA

def lora(sweep):
    bench = importlib.import_module("test_lora")
    for shape in bench.SHAPES:
        in_f, out_f = bench.SHAPES[shape]
        for adapters in (1, 3):
            x, w, b, a, bb, ids, dy = bench._setup(shape, adapters, torch.device("cuda"), True)
            for provider in bench.PROVIDERS:
                fn_ = bench._provider_fn(provider)
                inputs = [x] if provider == "base" else [x, a, bb]
                record(f"lora {shape} fwd+bwd T={adapters} bf16", provider,
                       lambda: torch.autograd.grad(fn_(x, w, b, a, bb, ids), inputs, dy),
                       flops=2 * 2 * bench.ROWS * in_f * out_f)  # forward + dx (W frozen)


def main():
    global _flush_buf, PEAK, COPY
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    parser.add_argument("--only", nargs="*", default=["smart", "attention", "lora"])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_profile.py needs a CUDA device")
    from test_smart_kernels import _hbm_peak

    _flush_buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    PEAK = _hbm_peak(torch.device("cuda"))
    COPY = measured_copy_gbps()
    name = torch.cuda.get_device_name()
    print(f"{name}: device-to-device copy {COPY:.0f} GB/s (read + write), HBM peak {PEAK} GB/s", flush=True)
    for part in args.only:
        globals()[part](args.sweep)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=name, date=time.strftime("%F"), copy_GBps=COPY, hbm_peak_GBps=PEAK,
                           torch=torch.__version__, rows=ROWS), f, indent=1)


PEAK = COPY = None

if __name__ == "__main__":
    main()
