"""Benchmarks share the test suite's environment set-up (interpreter flag before any kernel import)
and one way of timing a function against its baseline (the ``paired`` fixture)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable, List, NamedTuple, Optional, Tuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Timing(NamedTuple):
    """One call: wall-clock seconds and this process's CPU seconds."""
    wall: float
    cpu: float


class PairedTimer:
    """Times ``fn`` in pytest-benchmark's rounds with ``baseline`` run just before each round.

    ``benchmark.pedantic`` times ``fn`` (its statistics are ``fn``'s); ``baseline`` runs as the round's
    ``setup``, so candidate and baseline alternate call by call. Each call's time is taken here too,
    after ``torch.cuda.synchronize()`` on a CUDA device, and the warm-up rounds are dropped."""

    @staticmethod
    def ratio(numerator: List[Timing], denominator: List[Timing], clock: str = "wall") -> float:
        """Median over paired rounds of ``numerator[i].clock / denominator[i].clock``.

        A ratio per round, then the median: both sides of a round ran back to back, so a slow spell of
        this noisy machine touches both and cancels out of the ratio."""
        if len(numerator) != len(denominator) or not numerator:
            raise ValueError(f"ratio: need paired rounds, got {len(numerator)} and {len(denominator)}")
        return statistics.median(getattr(n, clock) / getattr(d, clock) for n, d in zip(numerator, denominator))

    def __init__(self, benchmark, device: torch.device) -> None:
        self.benchmark, self.device = benchmark, torch.device(device)

    def _timed(self, fn: Callable[[], object], log: List[Timing]) -> Callable[[], None]:
        def run() -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            log.append(Timing(time.perf_counter() - wall, time.process_time() - cpu))
        return run

    def __call__(self, fn: Callable[[], object], baseline: Optional[Callable[[], object]] = None, *,
                 rounds: int, warmup: int) -> Tuple[List[Timing], List[Timing]]:
        """``(fn's timings, baseline's timings)``, ``rounds`` of each (the baseline's list is empty
        when there is none)."""
        fn_log: List[Timing] = []
        base_log: List[Timing] = []
        setup = None if baseline is None else self._timed(baseline, base_log)
        self.benchmark.pedantic(self._timed(fn, fn_log), setup=setup, rounds=rounds, warmup_rounds=warmup,
                                iterations=1)
        return fn_log[-rounds:], base_log[-rounds:]  # the warm-up rounds come first


@pytest.fixture
def paired(benchmark, device) -> PairedTimer:
    """``paired(fn, baseline, rounds=R, warmup=W)`` and ``paired.ratio(a, b, clock)``: see :class:`PairedTimer`."""
    return PairedTimer(benchmark, device)
