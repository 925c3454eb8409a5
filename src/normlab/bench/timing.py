"""Interleaved median timing: the one measuring primitive every benchmark uses."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["interleaved_medians"]


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin.

    Each round calls every function once, in turn, so slow phases of a shared machine
    fall on all of them alike; the median discards the outlier rounds. For
    single-threaded work ``clock=time.process_time`` (this process's CPU time) also
    ignores time stolen by other tenants of a virtual machine.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {name: statistics.median(times) for name, times in samples.items()}
