"""Fixtures of the kernel tests, and the loading of their shared helpers (``kernel_checks.py``).

Test modules are imported by file path (``--import-mode=importlib``), so a sibling module is not
importable by name; it is registered here, before any test module of this folder is imported.
"""
import importlib.util
import pathlib
import sys

import pytest


def _load_checks():
    path = pathlib.Path(__file__).with_name("kernel_checks.py")
    spec = importlib.util.spec_from_file_location("kernel_checks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_load_checks()


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs start as NaN (``MINBERT_KERNEL_POISON=1``), so an element a kernel forgets to
    write fails the comparison."""
    from minbert.kernels._triton import POISON_ENV

    monkeypatch.setenv(POISON_ENV, "1")
    yield


@pytest.fixture(params=["triton", "reference"])
def any_backend(request):
    request.getfixturevalue(f"{request.param}_backend")
    return request.param
