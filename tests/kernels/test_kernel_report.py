"""benchmarks/kernel_report.py: one small kernel compiled for sm_90a on a CPU reads back sane figures.

Compile-only (no GPU, no interpreter). The suite runs with TRITON_INTERPRET=1 (tests/conftest.py),
under which ``@triton.jit`` builds interpreter functions that cannot be compiled, so the report runs
in a subprocess with TRITON_INTERPRET=0.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
REPORT = REPO / "benchmarks" / "kernel_report.py"

SCRIPT = f"""
import json, sys
sys.path.insert(0, {str(REPORT.parent)!r})
import kernel_report as kr
rows = kr.run([kr.attention_workload("small", 2, 2, 64, 64, 0.0)], only=["attn fwd"])
print("ROWS=" + json.dumps(rows, default=str))
"""


def _report_module():
    spec = importlib.util.spec_from_file_location("_minbert_kernel_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fwd_row():
    pytest.importorskip("triton", reason="Triton is not installed")
    try:
        _report_module().tools()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"ptxas/cuobjdump not available from the Triton wheel: {exc}")
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROWS=")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(lines[-1][len("ROWS="):])
    assert len(rows) == 1, rows
    return rows[0]


def test_attention_forward_figures_are_sane(fwd_row):
    r = fwd_row
    assert r["label"] == "attn fwd" and r["kernel"] == "_attn_fwd_kernel"
    assert r["grid"] == [1, 4]  # the launcher's grid: cdiv(L=64, BLOCK_M) x B*H
    assert r["mma"] == "wgmma" and r["sass_hgmma"] > 0 and 3 in r["mma_versions"]  # bf16 on sm_90
    assert 0 < r["registers"] <= 255
    assert r["cubin_registers"] == r["registers"] and r["cubin_identical"]  # ptxas rerun == Triton's cubin
    assert r["spill_store_bytes"] >= 0 and r["spill_load_bytes"] >= 0
    assert 0 < r["shared_bytes"] <= 227 * 1024
    occ = r["occupancy"]
    assert occ["ctas_per_sm"] >= 1 and occ["warps_per_sm"] == occ["ctas_per_sm"] * r["num_warps"]
    hot = r["hot_loop"]
    assert r["loops"] and hot is not None and hot["innermost"]
    assert 0 < hot["instructions"] < r["sass_instructions"]
    assert hot["groups"]["mma"] > 0 and hot["groups"]["mufu"] > 0  # the QK^T / PV dots and exp2 sit in the loop
    assert sum(hot["mix"].values()) == hot["instructions"] == sum(hot["groups"].values())
