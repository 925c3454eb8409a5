"""Running a study's training jobs: worker processes and progress.

Training these models is a long chain of tiny tensor ops, which one thread does faster
than two (thread hand-off costs more than the work), so every job runs single-threaded
and a machine's cores are used by running jobs side by side in worker processes.
Workers are spawned, not forked: a fork of a process whose OpenMP pool has run can hang.

Every job's wall time is measured where it runs and added to the :func:`job_clock` of the
thread that mapped it: what a study cost in worker time, whatever else shared the pool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

import torch

__all__ = [
    "JobClock",
    "call",
    "default_jobs",
    "grid",
    "job_clock",
    "parallel_map",
    "pool_is_open",
    "progress",
    "worker_pool",
]

_pool: list[ProcessPoolExecutor | None] = [None]
#: The shared jobs of the open ``worker_pool`` block (see ``parallel_map``'s ``share``): each
#: job's key → its Future (in the pool) or its result (without one); None outside a block.
_shared: list[dict | None] = [None]
_shared_lock = threading.Lock()
_clocks = threading.local()  # the open JobClocks of each thread (a stack)


def default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _init_worker() -> None:
    torch.set_num_threads(1)
    # Ctrl-C in a terminal reaches every process of the group; only the parent acts on
    # it (it stops the workers), so a worker does not print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()


@contextlib.contextmanager
def _spawning_without_sigint() -> Iterator[None]:
    """Start workers (``submit`` spawns them) with SIGINT ignored from their first
    instruction: a spawned worker imports torch for seconds before its initializer can
    ignore SIGINT, and a Ctrl-C in that window printed its KeyboardInterrupt traceback.
    An ignored disposition survives exec, and Python keeps an ignored SIGINT ignored.
    In this process SIGINT is blocked meanwhile, so a Ctrl-C stays pending (Linux keeps a
    blocked signal pending even while ignored) and is delivered once the handler is back."""
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when its parent dies, however it dies (even
    SIGKILL, when no clean-up of ours runs), so no worker outlives the run. (Strictly,
    when the parent's thread that started it ends: the thread running the
    ``worker_pool`` block, which outlives the pool.)"""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the parent's clean-up still applies
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os._exit(1)


def _stop_workers(executor: ProcessPoolExecutor) -> None:
    """Stop at once: cancel queued jobs and terminate the workers instead of waiting
    for the jobs they are running (which can take minutes)."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():  # pragma: no cover - a worker stuck where SIGTERM cannot reach it
            process.kill()
            process.join(timeout=5)
    executor.shutdown(wait=True)  # the pool's manager thread notices the dead workers and ends


@contextlib.contextmanager
def worker_pool(jobs: int | None = None) -> Iterator[None]:
    """Share one pool of ``jobs`` worker processes among every ``parallel_map`` inside
    the block (a worker keeps its generated datasets between jobs). ``jobs=1`` runs
    everything in this process.

    Leaving the block normally waits for the pool to finish; leaving it by an exception
    (Ctrl-C, a signal turned into an exception, an error) terminates the workers at once.
    Workers ignore SIGINT (the parent handles it) and, on Linux, are terminated by the
    kernel if the parent dies without cleaning up."""
    jobs = default_jobs() if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be >= 1 (a positive int), got {jobs!r}")
    previous, previous_shared = _pool[0], _shared[0]
    if jobs == 1:
        _pool[0], _shared[0] = None, {}
        try:
            yield
        finally:
            _pool[0], _shared[0] = previous, previous_shared
        return
    executor = ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
    )
    _pool[0], _shared[0] = executor, {}
    try:
        # Start every worker now, from this thread: they import torch while the caller sets
        # up, and a worker's death signal is tied to the thread that started it (see
        # _die_with_parent), which must be this one, not a thread that maps a study's jobs
        # and ends. ``submit`` starts one more worker per call while none is idle.
        with _spawning_without_sigint():
            for _ in range(jobs):
                executor.submit(_ready)
        yield
    except BaseException:
        _stop_workers(executor)
        raise
    else:
        executor.shutdown(cancel_futures=True)
    finally:
        _pool[0], _shared[0] = previous, previous_shared


def pool_is_open() -> bool:
    """Whether a :func:`worker_pool` of processes is open: ``parallel_map`` may then be
    called from several threads at once (their jobs share the pool, first come first served)."""
    return _pool[0] is not None


class JobClock:
    """The wall seconds of the jobs ``parallel_map`` ran for one thread (see :func:`job_clock`)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.jobs = 0


@contextlib.contextmanager
def job_clock() -> Iterator[JobClock]:
    """Add up the wall time of every job this thread maps inside the block, each measured
    where it ran (in a worker, or here with ``jobs=1``): a study's cost in worker time,
    not counting the time its jobs waited for a free worker."""
    clock = JobClock()
    stack = _clocks.__dict__.setdefault("stack", [])
    stack.append(clock)
    try:
        yield clock
    finally:
        stack.remove(clock)


def _count(seconds: float) -> None:
    for clock in getattr(_clocks, "stack", ()):
        clock.seconds += seconds
        clock.jobs += 1


def _ready() -> None:
    """The job that starts a worker (see worker_pool)."""


def _timed(fn: Callable[..., dict], task: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    result = fn(**task)
    return result, time.perf_counter() - start


def progress(total: int, desc: str):
    """A progress bar on stderr (quiet when stderr is not a terminal, without tqdm, or off
    the main thread: studies measured side by side would draw over each other's bars)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the experiments extra
        return contextlib.nullcontext(_NoBar())
    quiet = not sys.stderr.isatty() or threading.current_thread() is not threading.main_thread()
    return tqdm(total=total, desc=desc, leave=False, disable=quiet, file=sys.stderr)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def grid(fixed: dict, **axes: Iterable) -> list[dict]:
    """A study's tasks: ``fixed`` with every combination of ``axes``, the first axis
    varying slowest (the order of nested for-loops written in that order, which is the
    order the runs are started and listed in)."""
    names = list(axes)
    return [{**fixed, **dict(zip(names, values))} for values in itertools.product(*axes.values())]


def call(fn: Callable[..., dict], **task: object) -> dict:
    """``fn(**task)``: for one ``parallel_map`` of jobs of several functions (each task names
    its ``fn``). A shared job's key is the same whether mapped through ``call`` or not."""
    return fn(**task)


def _freeze(value: object) -> object:
    """A hashable stand-in for a task's value, equal for equal arguments: a function by its
    qualified name, a dataclass by its class and fields, containers element by element.
    A float keeps its sign (-0.0 is not 0.0); a dict's keys are compared by type and value
    (1 is not "1"). A function that its name does not identify (a lambda, a function defined
    inside another, a bound method) is refused: two of them may differ in what they capture."""
    if isinstance(value, float):
        return (type(value).__name__, value, math.copysign(1.0, value))
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return (type(value).__name__, value)
    if callable(value) and hasattr(value, "__qualname__") and not isinstance(value, type):
        if inspect.ismethod(value) or "<" in value.__qualname__:
            raise TypeError(f"a shared job's function must be a module-level function; got {value!r}")
        return ("fn", value.__module__, value.__qualname__)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [(f.name, _freeze(getattr(value, f.name))) for f in dataclasses.fields(value)]
        return ("dataclass", type(value).__module__, type(value).__qualname__, tuple(fields))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((_freeze(k), _freeze(v)) for k, v in value.items()), key=repr)))
    raise TypeError(f"a shared job's argument must be plain data, a function or a dataclass; got {type(value)}")


def _job_key(fn: Callable[..., dict], task: dict) -> object:
    if fn is call:
        task = dict(task)
        fn = task.pop("fn")  # type: ignore[assignment]
    return _freeze((fn, task))


def parallel_map(
    fn: Callable[..., dict], tasks: Sequence[dict], desc: str = "runs", *, share: bool = False
) -> list[dict]:
    """``[fn(**task) for task in tasks]``, in the shared worker pool when one is open
    (see ``worker_pool``), else in this process single-threaded; results in task order.

    Longest tasks should come first (the caller orders them) so the pool ends together.

    ``share``: a task whose function and arguments (every one, compared by value) are those
    of a job already mapped with ``share`` inside the same ``worker_pool`` block, by this or
    another study, is not run again: it gets that job's result (the same object: copy before
    changing it) and adds nothing to this thread's :func:`job_clock`. For deterministic jobs
    only (seeded from their arguments), whose result does not depend on where they run.
    """
    executor = _pool[0]
    shared = _shared[0] if share else None
    results: list[dict | None] = [None] * len(tasks)
    with progress(len(tasks), desc) as bar:
        if executor is None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for i, task in enumerate(tasks):
                    key = _job_key(fn, task) if shared is not None else None
                    if shared is not None and key in shared:
                        results[i] = shared[key]
                    else:
                        results[i], seconds = _timed(fn, task)
                        _count(seconds)
                        if shared is not None:
                            shared[key] = results[i]
                    bar.update(1)
            finally:
                torch.set_num_threads(threads)
        else:
            futures: dict[Future, int] = {}
            reused: list[tuple[Future, int]] = []
            with _spawning_without_sigint(), _shared_lock:
                for i, task in enumerate(tasks):
                    key = _job_key(fn, task) if shared is not None else None
                    if shared is not None and key in shared:
                        reused.append((shared[key], i))
                        continue
                    future = executor.submit(_timed, fn, task)
                    futures[future] = i
                    if shared is not None:
                        shared[key] = future
            remaining = dict(futures)
            while remaining:
                # Not as_completed: a job the pool's shutdown cancels (an interrupted run) never
                # wakes it, and a study measured in a thread of its own would wait forever.
                wait(remaining, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in [f for f in remaining if f.done()]:
                    i = remaining.pop(future)
                    try:
                        results[i], seconds = future.result()
                    except Exception as err:
                        raise RuntimeError(f"{desc}: job {tasks[i]} failed: {err}") from err
                    _count(seconds)
                    bar.update(1)
            pending = list(reused)
            while pending:  # another study's jobs: waited for, not counted on this thread's clock
                wait([f for f, _ in pending], timeout=0.5, return_when=FIRST_COMPLETED)
                for future, i in [(f, i) for f, i in pending if f.done()]:
                    pending.remove((future, i))
                    try:
                        results[i], _ = future.result()
                    except Exception as err:
                        raise RuntimeError(f"{desc}: job {tasks[i]} failed: {err}") from err
                    bar.update(1)
    return results  # type: ignore[return-value]
