"""Running a study's training jobs: worker processes, progress, results on disk.

Training these models is a long chain of tiny tensor ops, which one thread does faster
than two (thread hand-off costs more than the work), so every job runs single-threaded
and a machine's cores are used by running jobs side by side in worker processes.
Workers are spawned, not forked: a fork of a process whose OpenMP pool has run can hang.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

__all__ = ["default_jobs", "finite_or_none", "parallel_map", "progress", "worker_pool", "write_json"]

_pool: list[ProcessPoolExecutor | None] = [None]


def default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _init_worker() -> None:
    torch.set_num_threads(1)


@contextlib.contextmanager
def worker_pool(jobs: int | None = None) -> Iterator[None]:
    """Share one pool of ``jobs`` worker processes among every ``parallel_map`` inside
    the block (a worker keeps its generated datasets between jobs). ``jobs=1`` runs
    everything in this process."""
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    previous = _pool[0]
    if jobs == 1:
        _pool[0] = None
        try:
            yield
        finally:
            _pool[0] = previous
        return
    executor = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker)
    _pool[0] = executor
    try:
        yield
    finally:
        _pool[0] = previous
        executor.shutdown(cancel_futures=True)


def progress(total: int, desc: str):
    """A progress bar on stderr (quiet when stderr is not a terminal, or without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the experiments extra
        return contextlib.nullcontext(_NoBar())
    return tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty(), file=sys.stderr)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def parallel_map(fn: Callable[..., dict], tasks: Sequence[dict], desc: str = "runs") -> list[dict]:
    """``[fn(**task) for task in tasks]``, in the shared worker pool when one is open
    (see ``worker_pool``), else in this process single-threaded; results in task order.

    Longest tasks should come first (the caller orders them) so the pool ends together.
    """
    executor = _pool[0]
    results: list[dict | None] = [None] * len(tasks)
    with progress(len(tasks), desc) as bar:
        if executor is None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for i, task in enumerate(tasks):
                    results[i] = fn(**task)
                    bar.update(1)
            finally:
                torch.set_num_threads(threads)
        else:
            futures: dict[Future, int] = {executor.submit(fn, **task): i for i, task in enumerate(tasks)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except Exception as err:
                    raise RuntimeError(f"{desc}: job {tasks[i]} failed: {err}") from err
                bar.update(1)
    return results  # type: ignore[return-value]


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: a diverged number is written as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def _clean(value):
    """NaN and ±inf (a diverged run, an empty mean) become null: JSON has neither."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` as strict JSON (non-finite numbers as null), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=2, allow_nan=False, default=_default))
    os.replace(tmp, path)
    return path


def _default(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
