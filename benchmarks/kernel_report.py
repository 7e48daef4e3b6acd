"""What the H100 will be asked to do: the project's Triton kernels compiled for sm_90a on a CPU.

    python benchmarks/kernel_report.py                      # every workload, text report
    python benchmarks/kernel_report.py --json out.json --markdown > table.md
    python benchmarks/kernel_report.py --only "attn fwd" -v --dump /tmp/sass   # a subset, all loops, IR files
    python benchmarks/kernel_report.py --list

(from the repository root, with ``PYTHONPATH`` at the checkout; ``TRITON_INTERPRET`` must be unset or 0.)

What it measures, per kernel launch and configuration
------------------------------------------------------
* MMA kind: ``wgmma`` (Hopper warpgroup MMA, SASS ``HGMMA``), ``mma.sync`` (SASS ``HMMA``) or none,
  with the TTGIR MMA version and instruction shapes;
* registers per thread and spill bytes (stores / loads), from ``ptxas -v``, plus the stack frame;
* shared memory per CTA (Triton's dynamic allocation; the 1 KB the driver reserves per CTA is added
  for occupancy) and the multi-buffer depth of the software pipeline (TTGIR ``ttg.local_alloc`` of
  ``S x tile`` buffers, cp.async / TMA copies);
* occupancy bound on sm_90: CTAs and warps per SM from registers (64K per SM, 256-register warp
  allocation unit), shared memory (228 KB per SM, 227 KB at most per CTA, 128 B unit), 64 warps and
  32 CTAs per SM; and the grid in waves over an H100 SXM's 132 SMs;
* the SASS of every loop (a backward branch closes one): instructions per iteration per warp of the
  hot loop (the innermost loop with the most MMAs, then the longest), and its instruction mix by
  opcode and by group (``GROUPS``: MMA, MUFU, integer, select/compare, LDGSTS = cp.async, sync ...).
  These are static counts of the loop body: one iteration issues at most that many per warp.

How
---
Triton's JIT asks the active driver for its target. A stand-in driver answers
``GPUTarget("cuda", 90, 32)``; nothing else of a GPU is needed to compile. The launches are not
retyped here: each workload in ``WORKLOADS`` runs the project's public op (forward and backward)
on CPU tensors of the real shapes and dtypes, while in the kernel modules the dispatch
(``use_triton``) picks Triton, the launch sites record ``kernel[grid](*args, **kwargs)`` instead
of launching, and the device-dependent helpers (``_config``, ``_split_target``) answer as on an
H100. So the grid, constexprs, block sizes, ``num_warps`` / ``num_stages`` and argument dtypes /
strides are exactly the launchers' own. Each recorded launch is compiled with
``JITFunction.warmup(*args, grid=..., **kwargs)``, so with the JIT's own specialisation (16-byte
alignment, ``== 1`` and divisible-by-16 integers). The PTX is assembled
again with the wheel's ``ptxas -v`` and the flags Triton's ``make_cubin`` passes (Triton 3.9 adds
``--regAllocOptLevel=2``, which moves register counts by a few): the cubin comes out byte-identical
to Triton's (``cubin_identical``) and its ``REG`` (``cuobjdump -res-usage``) is checked against the
count. The cubin is disassembled with the wheel's ``cuobjdump -sass``; the TTGIR is read for the MMA
kind and the pipelining. Static figures predict what the GPU will do; they do not time it.

Adding a kernel: one ``Workload`` in ``WORKLOADS`` whose step calls the op (list its module), and
a ``LABELS`` entry for a readable name. Cross-check: ``/work/shared/tools/triton_sm90_probe.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

# ----------------------------------------------------------------------------------------------
# The target: H100 SXM (sm_90a)
# ----------------------------------------------------------------------------------------------
ARCH = 90
SM_COUNT = 132  # H100 SXM5
REGS_PER_SM = 65536
REG_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA_MAX = 227 * 1024  # dynamic shared memory a CTA may opt into
SMEM_RESERVED_PER_CTA = 1024  # the driver's share of every CTA
SMEM_UNIT = 128
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32

# SASS opcode (mnemonic before the first '.') -> group shown in the tables
GROUPS = {
    "mma": ("HGMMA", "HMMA"),
    "mufu": ("MUFU",),
    "int": ("IMAD", "IADD3", "IADD", "IMUL", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "IMNMX", "VIMNMX",
            "IABS", "PRMT", "POPC", "FLO", "BMSK", "SGXT", "BREV", "VIADD", "UIMAD", "UIADD3", "ULOP3", "USHF",
            "ULEA", "UPRMT", "UIMNMX", "UFLO", "UPOPC", "UBMSK", "USGXT"),
    "sel/setp": ("SEL", "FSEL", "ISETP", "FSETP", "PLOP3", "USEL", "UISETP", "UPLOP3", "P2R", "R2P"),
    "fp": ("FADD", "FMUL", "FFMA", "FMNMX", "FCHK", "HADD2", "HMUL2", "HFMA2", "HMNMX2", "FSWZADD"),
    "cvt": ("F2F", "F2FP", "I2F", "I2FP", "F2I", "F2IP", "I2I", "I2IP", "FRND"),
    "ldgsts": ("LDGSTS",),
    "gmem": ("LDG", "STG", "RED", "ATOM", "ATOMG", "UTMALDG", "UTMASTG", "UBLKCP"),
    "smem": ("LDS", "STS", "LDSM", "STSM", "ATOMS"),
    "sync": ("BAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "SYNCS", "WARPSYNC", "MEMBAR", "ARRIVES", "ERRBAR"),
}
_GROUP_OF = {op: g for g, ops in GROUPS.items() for op in ops}


# ----------------------------------------------------------------------------------------------
# The spec table: what runs (the project's ops, as the GPU benchmarks call them)
# ----------------------------------------------------------------------------------------------
@dataclass
class Workload:
    family: str  # "attention", "lora", ...
    config: str  # shown in every row, e.g. "bert-base B32 H12 L128 D64 bf16 p=0.1"
    modules: Tuple[str, ...]  # kernel modules whose launches are recorded
    step: Callable[[], None]  # runs the op (forward + backward) on CPU tensors
    gpu_helpers: Tuple[str, ...] = ("_config", "_split_target")  # module functions that branch on the device


# Readable names; a tuple names successive launches of one kernel within a step.
LABELS = {
    "_attn_fwd_kernel": "attn fwd",
    "_attn_bwd_preprocess_kernel": "attn bwd pre",
    "_attn_bwd_dkdv_kernel": "attn bwd dK/dV",
    "_attn_bwd_dq_kernel": "attn bwd dQ",
    "_lora_fwd_kernel": "lora fwd",
    "_lora_bwd_dx_kernel": "lora dX",
    "_lora_bwd_ab_kernel": ("lora dA", "lora dB"),  # dA = s G^T X first, then dB = s dY^T XA
}


def _dt(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def attention_workload(name: str, B: int, H: int, L: int, D: int, p: float, dtype=torch.bfloat16) -> Workload:
    """``attention(q, k, v, key_padding_mask, dropout_p=p)`` forward + backward, as benchmarks/test_attention.py."""
    def step():
        from minbert.kernels.attention import attention
        q, k, v = (torch.empty(B, H, L, D, dtype=dtype, requires_grad=True) for _ in range(3))
        lengths = torch.full((B,), L)
        lengths[1:] = max(1, (3 * L) // 4)  # right padding, as the model calls it
        mask = torch.arange(L)[None, :] < lengths[:, None]
        o = attention(q, k, v, key_padding_mask=mask, dropout_p=p)
        torch.autograd.grad(o, (q, k, v), torch.empty_like(o))
    return Workload("attention", f"{name} B{B} H{H} L{L} D{D} {_dt(dtype)} p={p:g}", ("minbert.kernels.attention",),
                    step)


def lora_workload(rows: int, n_in: int, n_out: int, rank: int, adapters: int, dtype=torch.bfloat16) -> Workload:
    """``lora_linear`` forward + backward with W frozen (grads for x, A, B), as benchmarks/test_lora.py."""
    def step():
        from minbert.kernels.lora import lora_linear
        lead = (adapters,) if adapters > 1 else ()
        x = torch.empty(rows, n_in, dtype=dtype, requires_grad=True)
        w, b = torch.empty(n_out, n_in, dtype=dtype), torch.empty(n_out, dtype=dtype)
        a = torch.empty(*lead, rank, n_in, dtype=dtype, requires_grad=True)
        bb = torch.empty(*lead, n_out, rank, dtype=dtype, requires_grad=True)
        ids = None
        if adapters > 1:  # each task's rows together, some rows without an adapter
            ids = torch.arange(rows) * adapters // rows
            ids[::97] = -1
        y = lora_linear(x, w, b, a, bb, 2.0, ids)
        torch.autograd.grad(y, (x, a, bb), torch.empty_like(y))
    return Workload("lora", f"{rows}x{n_in}->{n_out} r{rank} T{adapters} {_dt(dtype)}", ("minbert.kernels.lora",), step)


WORKLOADS: List[Workload] = [
    *(attention_workload(name, *shape, p) for name, shape in (("bert-base", (32, 12, 128, 64)),
                                                               ("long", (8, 12, 512, 64)))
      for p in (0.1, 0.0)),
    *(lora_workload(4096, 768, n_out, 8, t) for n_out in (3072, 768) for t in (1, 3)),
]


# ----------------------------------------------------------------------------------------------
# Compiling for sm_90a without a GPU
# ----------------------------------------------------------------------------------------------
def stand_in_driver(arch: int = ARCH):
    """A driver that answers the JIT's questions as an sm_<arch> GPU would; it launches nothing."""
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", arch, 32)
    return types.SimpleNamespace(get_current_target=lambda: target, get_current_device=lambda: 0,
                                 get_current_stream=lambda device=None: 0,
                                 get_active_torch_device=lambda: torch.device("cpu"))


@contextlib.contextmanager
def sm90_target():
    from triton.runtime.driver import driver
    previous = driver._active
    driver.set_active(stand_in_driver())
    try:
        yield
    finally:
        driver._active = previous


@dataclass
class Launch:
    kernel: object  # the JITFunction
    name: str
    label: str
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JITFunction at its launch site: ``kernel[grid](...)`` is written down."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.kernel, grid, args, kwargs))


def _on_cuda(fn):
    fn = getattr(fn, "__wrapped__", fn)  # bypass an lru_cache: its CPU answer must not leak in or out
    cuda = torch.device("cuda")
    swap = lambda v: cuda if isinstance(v, torch.device) and v.type == "cpu" else v  # noqa: E731
    return lambda *a, **kw: fn(*map(swap, a), **{k: swap(v) for k, v in kw.items()})


def capture(workload: Workload) -> List[Launch]:
    """Run ``workload.step`` with every Triton kernel of its modules recorded instead of launched."""
    from triton.runtime.jit import JITFunction
    log, saved = [], []
    mods = [importlib.import_module(m) for m in workload.modules]
    for mod in mods:
        for attr, obj in list(vars(mod).items()):
            if type(obj).__name__ == "InterpretedFunction":
                raise RuntimeError(f"{mod.__name__} was imported under TRITON_INTERPRET=1; run with TRITON_INTERPRET=0")
            if isinstance(obj, JITFunction) and obj.module == mod.__name__:
                saved.append((mod, attr, obj))
                setattr(mod, attr, _Recorder(obj, log))
            elif attr == "use_triton" or (attr in workload.gpu_helpers and callable(obj)):
                saved.append((mod, attr, obj))
                setattr(mod, attr, (lambda *t, **kw: True) if attr == "use_triton" else _on_cuda(obj))
    real_props = torch.cuda.get_device_properties  # answers for an H100 (e.g. the SM count of a split-K)
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
        name="NVIDIA H100 (stand-in)", major=9, minor=0, multi_processor_count=SM_COUNT, total_memory=80 * 2**30)
    try:
        workload.step()
    finally:
        torch.cuda.get_device_properties = real_props
        for mod, attr, obj in reversed(saved):
            setattr(mod, attr, obj)
    launches, seen = [], Counter()
    for kernel, grid, args, kwargs in log:
        name = kernel.fn.__name__
        label = LABELS.get(name, name)
        if isinstance(label, tuple):
            label = label[seen[name]] if seen[name] < len(label) else f"{label[-1]} #{seen[name] + 1}"
        seen[name] += 1
        launches.append(Launch(kernel, name, label, tuple(grid) if not callable(grid) else grid, args, kwargs))
    return launches


# ----------------------------------------------------------------------------------------------
# Reading what the compiler produced
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def tools() -> Dict[str, str]:
    """The wheel's ptxas (the one Triton uses for sm_90) and cuobjdump; raises if either is missing."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        found = dict(ptxas=get_ptxas(ARCH), cuobjdump=knobs.nvidia.cuobjdump)
    except RuntimeError as exc:  # the knobs raise "Cannot find <tool>"
        raise FileNotFoundError(f"{exc} in the Triton wheel") from None
    for name, tool in found.items():
        if tool is None or not os.path.exists(tool.path):
            raise FileNotFoundError(f"{name} not found in the Triton wheel")
    return {name: tool.path for name, tool in found.items()}


def run_ptxas(ptx: str, cubin: bytes, metadata) -> dict:
    """``ptxas -v`` with the flags Triton's make_cubin passes: registers, stack, spills."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(ARCH)}"]
    if not metadata.enable_fp_fusion:
        flags.insert(0, "--fmad=false")
    if metadata.ptx_options:
        flags += metadata.ptx_options.split(" ")
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([tools()["ptxas"], *flags, src, "-o", out], capture_output=True, text=True, check=True)
        with open(out, "rb") as f:
            identical = f.read() == cubin
    log = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack, st, ld = map(int, frame.groups()) if frame else (None, None, None)
    return dict(registers=int(regs.group(1)) if regs else None, stack_bytes=stack, spill_store_bytes=st,
                spill_load_bytes=ld, cubin_identical=identical)


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tools()["cuobjdump"], flag, path], capture_output=True, text=True, check=True).stdout


_SASS = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)([^;]*);")


def parse_sass(sass: str) -> List[Tuple[int, str, str]]:
    """(address, opcode, operands) of each instruction (cuobjdump prints each once, then its encoding).
    The opcode is the mnemonic, except that IMAD.HI / IMAD.WIDE / IMAD.MOV (Philox's mul-hi, address
    arithmetic, moves) stay apart from plain IMAD."""
    out = []
    for m in _SASS.finditer(sass):
        op, mods = m.group(2), m.group(3).split(".")
        if op == "IMAD" and len(mods) > 1 and mods[1] in ("HI", "WIDE", "MOV"):
            op = f"IMAD.{mods[1]}"
        out.append((int(m.group(1), 16), op, m.group(4)))
    return out


def _mix(ops: Sequence[str]) -> Tuple[dict, dict]:
    by_op = Counter(ops)
    by_group = Counter(_GROUP_OF.get(op.split(".")[0], "other") for op in ops)
    return dict(by_op.most_common()), {g: by_group.get(g, 0) for g in (*GROUPS, "other")}


def sass_loops(ins: List[Tuple[int, str, str]]) -> List[dict]:
    """Loops closed by backward branches (the body runs from the branch target to the branch)."""
    index = {addr: i for i, (addr, _, _) in enumerate(ins)}
    ends: Dict[int, int] = {}
    for i, (addr, op, operands) in enumerate(ins):
        target = re.findall(r"0x([0-9a-f]+)", operands) if op in ("BRA", "JMP") else []
        if target and int(target[-1], 16) < addr and int(target[-1], 16) in index:  # 'BRA self' after EXIT is no loop
            ends[index[int(target[-1], 16)]] = max(ends.get(index[int(target[-1], 16)], 0), i)
    loops = []
    for start, end in sorted(ends.items()):
        by_op, by_group = _mix([op for _, op, _ in ins[start:end + 1]])
        loops.append(dict(start=hex(ins[start][0]), end=hex(ins[end][0]), instructions=end - start + 1,
                          innermost=not any(s != start and start <= s and e <= end for s, e in ends.items()),
                          mix=by_op, groups=by_group))
    return loops


def hot_loop(loops: List[dict]) -> Optional[dict]:
    inner = [lp for lp in loops if lp["innermost"]]
    return max(inner, key=lambda lp: (lp["groups"]["mma"], lp["instructions"]), default=None)


def read_ttgir(ttgir: str) -> dict:
    versions = sorted(set(map(int, re.findall(r"nvidia_mma<\{versionMajor = (\d+)", ttgir))))
    buffers = re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<([0-9x]+x[a-zA-Z][\w]*)", ttgir)
    depth = [int(b.split("x")[0]) for b in buffers if b.count("x") >= 3]  # S x (2-D tile) x dtype
    return dict(mma_versions=versions, mma_shapes=sorted(set(s.replace(" ", "") for s in
                                                             re.findall(r"instrShape = \[([0-9, ]+)\]", ttgir))),
                warp_group_dots=len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
                plain_dots=len(re.findall(r"\btt\.dot ", ttgir)),
                cp_async=len(re.findall(r"ttg\.async_copy_global_to_local", ttgir)),
                tma=len(re.findall(r"async_tma_copy_global_to_local|tt\.descriptor_load", ttgir)),
                shared_buffers=sorted(set(buffers)), pipeline_depth=max(depth, default=1))


def occupancy(registers: int, shared: int, num_warps: int) -> dict:
    """CTAs and warps per SM that registers, shared memory and the SM's limits allow on sm_90."""
    warp_regs = math.ceil(registers * 32 / REG_UNIT) * REG_UNIT
    by_regs = (REGS_PER_SM // warp_regs) // num_warps
    cta_smem = math.ceil((shared + SMEM_RESERVED_PER_CTA) / SMEM_UNIT) * SMEM_UNIT
    by_smem = SMEM_PER_SM // cta_smem if shared <= SMEM_PER_CTA_MAX else 0
    limits = dict(registers=by_regs, shared=by_smem, warps=MAX_WARPS_PER_SM // num_warps, ctas=MAX_CTAS_PER_SM)
    ctas = min(limits.values())
    return dict(ctas_per_sm=ctas, warps_per_sm=ctas * num_warps, limited_by=min(limits, key=limits.get),
                by_registers=by_regs, by_shared=by_smem, fits=shared <= SMEM_PER_CTA_MAX)


_ANALYSED: Dict[str, dict] = {}  # compile hash -> figures (one kernel launched twice is read once)


def measure(launch: Launch, dump: Optional[str] = None) -> dict:
    """Compile one recorded launch for sm_90a and return its figures."""
    import triton
    with sm90_target():
        compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    md, asm = compiled.metadata, compiled.asm
    fig = _ANALYSED.get(md.hash)
    if fig is None:
        sass = cuobjdump(asm["cubin"], "-sass")
        ins = parse_sass(sass)
        loops = sass_loops(ins)
        ptxas = run_ptxas(asm["ptx"], asm["cubin"], md)
        res = re.search(r"REG:(\d+)", cuobjdump(asm["cubin"], "-res-usage"))
        ptxas["cubin_registers"] = int(res.group(1)) if res else None
        ttgir = read_ttgir(asm["ttgir"])
        ops = Counter(op for _, op, _ in ins)
        mma = [k for k, op in (("wgmma", "HGMMA"), ("mma.sync", "HMMA")) if ops[op]]
        fig = dict(kernel=md.name, hash=md.hash, num_warps=md.num_warps, num_stages=md.num_stages,
                   shared_bytes=md.shared, mma="+".join(mma) or "none", sass_hgmma=ops["HGMMA"],
                   sass_hmma=ops["HMMA"], **ptxas, **ttgir, sass_instructions=len(ins), loops=loops,
                   hot_loop=hot_loop(loops),
                   occupancy=occupancy(ptxas["cubin_registers"] or ptxas["registers"], md.shared, md.num_warps))
        _ANALYSED[md.hash] = fig
        if dump:
            os.makedirs(dump, exist_ok=True)
            for ext, text in (("ttgir", asm["ttgir"]), ("ptx", asm["ptx"]), ("sass", sass)):
                with open(os.path.join(dump, f"{md.name}-{md.hash[:10]}.{ext}"), "w") as f:
                    f.write(text)
    grid = launch.grid if isinstance(launch.grid, tuple) else ()
    ctas = math.prod(grid) if grid else None
    per_wave = fig["occupancy"]["ctas_per_sm"] * SM_COUNT
    consts = {k: v for k, v in launch.kwargs.items() if k.startswith("BLOCK") or k in ("GROUP_M", "R_PAD")}
    return dict(fig, label=launch.label, grid=list(grid), grid_ctas=ctas, triton=triton.__version__,
                waves=round(ctas / per_wave, 2) if ctas and per_wave else None, constexprs=consts,
                launch_kwargs={k: v for k, v in launch.kwargs.items() if isinstance(v, (bool, int, float, str))})


def run(workloads: Sequence[Workload], only: Sequence[str] = (), dump: Optional[str] = None,
        progress=None) -> List[dict]:
    """Measure every launch of ``workloads`` whose family, config or kernel label contains one of ``only``."""
    rows = []
    for wl in workloads:
        for launch in capture(wl):
            text = f"{wl.family} {wl.config} {launch.label} {launch.name}"
            if only and not any(s.lower() in text.lower() for s in only):
                continue
            t0 = time.perf_counter()
            try:
                row = dict(family=wl.family, config=wl.config, **measure(launch, dump))
            except Exception as exc:  # one kernel that does not compile is reported, not fatal
                row = dict(family=wl.family, config=wl.config, label=launch.label, kernel=launch.name,
                           error=f"{type(exc).__name__}: {str(exc)[-2000:]}")
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            if progress:
                progress(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _launch_text(row: dict) -> str:
    blocks = " ".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in row["constexprs"].items() if k.startswith("BLOCK"))
    return f"{blocks} w{row['num_warps']} s{row['num_stages']}".strip()


def text_report(row: dict, verbose: bool = False) -> str:
    if "error" in row:
        return f"=== {row['label']}  [{row['config']}]  FAILED: {row['error']}"
    r, occ, hot = row, row["occupancy"], row["hot_loop"]
    lines = [f"=== {r['label']}  [{r['config']}]  {_launch_text(r)}  grid {r['grid']} ({r['kernel']})",
             f"  MMA {r['mma']} (HGMMA {r['sass_hgmma']}, HMMA {r['sass_hmma']}; TTGIR mma v{r['mma_versions']} "
             f"{r['mma_shapes']}); {r['registers']} registers; spills {r['spill_store_bytes']}/"
             f"{r['spill_load_bytes']} B (stack {r['stack_bytes']} B); shared {r['shared_bytes']} B",
             f"  occupancy {occ['ctas_per_sm']} CTAs/SM = {occ['warps_per_sm']} warps/SM (limited by "
             f"{occ['limited_by']}; registers allow {occ['by_registers']}, shared memory {occ['by_shared']}); "
             f"{r['waves']} waves on {SM_COUNT} SMs",
             f"  pipeline depth {r['pipeline_depth']} (buffers {r['shared_buffers']}; cp.async {r['cp_async']}, "
             f"TMA {r['tma']}); {r['sass_instructions']} SASS instructions, {len(r['loops'])} loop(s)"]
    for lp in (r["loops"] if verbose else [hot] if hot else []):
        top = ", ".join(f"{k} {v}" for k, v in list(lp["mix"].items())[:12])
        lines.append(f"  {'hot loop' if lp is hot else 'loop'} {lp['start']}..{lp['end']}: {lp['instructions']} "
                     f"instr/iteration/warp; groups { {k: v for k, v in lp['groups'].items() if v} }; top {top}")
    if not r["cubin_identical"] or r["cubin_registers"] != r["registers"]:
        lines.append(f"  WARNING: ptxas rerun differs from Triton's cubin (cubin REG {r['cubin_registers']})")
    return "\n".join(lines)


_SHORT = dict(registers="regs", shared="smem", warps="warps", ctas="ctas")
MD_COLUMNS = ["kernel", "config", "launch", "MMA", "regs", "spill st/ld B", "smem KB", "CTAs/SM (warps)",
              "waves", "pipe", "loop instr/iter/warp", "MMA ops", "MUFU", "int", "sel/setp", "LDGSTS", "sync"]


def markdown(rows: Sequence[dict]) -> str:
    import triton
    out = [f"Compiled for sm_90a with Triton {triton.__version__} on a CPU (`benchmarks/kernel_report.py`, "
           f"{datetime.date.today()}). Loop = the hot (innermost) loop of the SASS, static instructions per "
           f"iteration per warp, and its mix by group; CTAs/SM from registers and shared memory (the limiter "
           f"named); waves on {SM_COUNT} SMs; pipe = multi-buffer depth.", "",
           "| " + " | ".join(MD_COLUMNS) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(MD_COLUMNS) - 4)) + "|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['label']} | {r['config']} | compile failed: {r['error'].splitlines()[0][:80]} |")
            continue
        occ, hot = r["occupancy"], r["hot_loop"]
        g = hot["groups"] if hot else {}
        cells = [r["label"], r["config"], _launch_text(r), r["mma"], r["registers"],
                 f"{r['spill_store_bytes']}/{r['spill_load_bytes']}", f"{r['shared_bytes'] / 1024:.1f}",
                 f"{occ['ctas_per_sm']} ({occ['warps_per_sm']}) {_SHORT[occ['limited_by']]}",
                 r["waves"], r["pipeline_depth"], hot["instructions"] if hot else "–",
                 *((g[k] for k in ("mma", "mufu", "int", "sel/setp", "ldgsts", "sync")) if hot else ["–"] * 6)]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=(), help="keep rows whose family/config/kernel contains one of these")
    ap.add_argument("--json", help="write every figure (all loops, full mixes) to this file")
    ap.add_argument("--markdown", action="store_true", help="print a table for benchmarks/RESULTS.md (text to stderr)")
    ap.add_argument("--dump", help="folder for each kernel's TTGIR, PTX and SASS")
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every loop, not only the hot one")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(f"{w.family}: {w.config}" for w in WORKLOADS))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        ap.error("TRITON_INTERPRET is set: the interpreter does not compile; run with TRITON_INTERPRET=0")
    tools()
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")  # the default (fusion on) is kept
    log = sys.stderr if a.markdown else sys.stdout
    t0 = time.perf_counter()
    rows = run(WORKLOADS, a.only, a.dump, progress=lambda r: print(text_report(r, a.verbose), file=log, flush=True))
    elapsed = time.perf_counter() - t0
    print(f"{len(rows)} launches, {len(_ANALYSED)} distinct kernels, {elapsed:.0f} s", file=log)
    if a.json:
        import triton
        meta = dict(target=f"sm_{ARCH}a", sm_count=SM_COUNT, triton=triton.__version__, torch=torch.__version__,
                    date=str(datetime.date.today()), seconds=round(elapsed, 1), tools=tools())
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    if a.markdown:
        print(markdown(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
