"""Interleaved median timing: the one measuring primitive every benchmark uses."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

__all__ = ["interleaved_medians"]


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
    shuffle: bool = False,
) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin.

    Each round calls every function once, in turn, so slow phases of a shared machine
    fall on all of them alike; the median discards the outlier rounds. For
    single-threaded work ``clock=time.process_time`` (this process's CPU time) also
    ignores time stolen by other tenants of a virtual machine.

    ``shuffle``: each round calls the functions in a fresh order (seeded, so runs repeat),
    so none of them always runs right after the same other one. For tensors that fit in
    the last-level cache the predecessor matters: a function run right after a copy finds
    the cache full of the copy's dirty lines and pays for writing them back (measured: 1.3x
    against 0.9x a copy for the same eval BatchNorm, depending only on whether it ran right
    after the copy). A fixed order — rotated or not — keeps the same neighbours.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    order = random.Random(0)
    for _ in range(repeats):
        if shuffle:
            order.shuffle(names)
        for name in names:
            start = clock()
            fns[name]()
            samples[name].append(clock() - start)
    return {name: statistics.median(times) for name, times in samples.items()}
