"""Test-wide set-up.

TRITON_INTERPRET must be set before any module defining ``@triton.jit`` kernels is imported,
so it is set here, first. The default kernel backend for the suite is the torch reference
(model-level tests stay fast); kernel tests ask for the Triton path with the
``triton_backend`` fixture, which uses the interpreter on CPU and the real compiler on CUDA.

MKL_CBWR=AUTO,STRICT (before torch loads MKL): by default MKL may pick a code path by the
alignment of each buffer, so the same matmul on a copy of the same weights can differ in the last
bit, and where buffers land depends on what else the process allocated (installed packages,
test order). Tests that compare two computations bit for bit (SMART's teacher pass, the golden
per-step losses) need MKL's conditional numerical reproducibility, alignment-independent.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("MINBERT_KERNEL_BACKEND", "reference")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA_DIR = pathlib.Path(os.environ.get("MINBERT_DATA", REPO.parent / "shared" / "data" / "cs224n"))
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    """The device kernels are tested on: CUDA when present, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton path for the duration of one test (interpreted on CPU)."""
    from minbert.kernels import _dispatch

    if not _dispatch.triton_available():
        pytest.skip("Triton cannot be imported on this machine")
    if not torch.cuda.is_available() and not _dispatch.interpreter_on():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    monkeypatch.setenv("MINBERT_KERNEL_BACKEND", "triton")
    yield


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("MINBERT_KERNEL_BACKEND", "reference")
    yield


@pytest.fixture
def data_dir():
    """The real CS224N data, or a skip naming where it was looked for."""
    if not (DATA_DIR / "ids-sst-train.csv").exists():
        pytest.skip(f"real data not found at {DATA_DIR} (set MINBERT_DATA to its folder)")
    return DATA_DIR
