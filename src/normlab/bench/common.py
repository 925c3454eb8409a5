"""What the benchmarks share besides the timing loop: the allocator setting, the device
check and clock, and the relative difference every correctness check reports."""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Callable, Iterable, Iterator

import torch

__all__ = ["check_device", "device_clock", "max_rel_diff", "threads_kept", "tune_malloc"]


@contextlib.contextmanager
def threads_kept(threads: int | None = None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (unchanged when None) and give the
    caller its own number back afterwards, whatever the block did."""
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(previous)


def tune_malloc() -> bool:
    """Keep freed memory in the process; False if unavailable.

    Without it glibc maps every fresh activation-sized tensor anew and it page-faults on
    first touch, a cost that lands on whichever side allocates and swamps the kernels
    being compared; jemalloc or tcmalloc in a training job keep the memory, as this does.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


def check_device(device: str) -> torch.device:
    """``cpu`` or ``cuda``/``cuda:N``, refused with a clear message where it cannot run."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                "run on a machine with a GPU and a CUDA build of torch, or use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def device_clock(device: torch.device) -> Callable[[], float]:
    """A clock for :func:`interleaved_medians` that waits for the device's queued work, so a
    timed call on CUDA counts its kernels, not only their launch."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to max |b| (float64, so the check adds no rounding of its own)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


def text_table(header: str, lines: Iterable[str]) -> str:
    """A benchmark's text table: the header, a rule as wide, then one line per row."""
    return "\n".join([header, "-" * len(header), *lines])
