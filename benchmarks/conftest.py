"""Benchmarks share the test suite's environment set-up (interpreter flag before any kernel import)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
