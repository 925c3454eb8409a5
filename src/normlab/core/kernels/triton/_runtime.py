"""What the Triton kernels need from their surroundings: the ``triton`` import, whether the
kernels run compiled (CUDA) or interpreted (``TRITON_INTERPRET=1``, CPU tensors through
NumPy), operator registration, the per-device semaphores of the finishing programs, and a
launch counter.

Importing this module imports ``triton``; :func:`normlab.core.kernels.triton.available`
says beforehand whether that can work.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import triton  # noqa: F401  (the package needs it; fail here, early, without it)
from torch._subclasses.fake_tensor import FakeTensor

if TYPE_CHECKING:
    from torch._library.custom_ops import CustomOpDef

__all__ = ["INTERPRETED", "count_launches", "launch", "observe", "register_op", "semaphore"]

#: ``@triton.jit`` returned interpreter functions: the kernels take CPU tensors (and only
#: those). Triton reads the variable when a kernel is decorated, so it must be set before
#: this package is first imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class LaunchObserver(Protocol):
    """What :func:`observe` calls around each launch, with the launch's positional arguments."""

    def before(self, args: tuple[object, ...]) -> None: ...

    def after(self, args: tuple[object, ...]) -> None: ...


_observers: list[LaunchObserver] = []


def launch(kernel: Any, grid: tuple[int, ...], *args: object, **kwargs: object) -> None:
    """Run ``kernel`` over ``grid`` — the one place the package launches a kernel, so
    :func:`count_launches` (and any :func:`observe` r) sees every launch. ``wrap_triton`` makes
    the launch visible to torch.compile, which then sees (and may fuse around) the kernel.
    (``kernel`` is a ``@triton.jit`` function: triton ships no types.)

    Nothing runs on tensors that hold no data — FakeTensors and the meta device, where the
    launcher serves as its operator's fake (see :func:`register_op`): the outputs it
    allocated before the launch already have their shapes, dtypes and strides."""
    if _without_data(args[0]):
        return
    for observer in _observers:
        observer.before(args)
    try:
        if INTERPRETED:
            # torch 2.13's wrap_triton hands interpreter functions back unwrapped: launch them directly
            kernel[grid](*args, **kwargs)
        else:
            torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    except BaseException:
        # a launch stopped part-way may have left a semaphore counted up, and the next kernel's
        # finishing program would then never run: start every counter afresh
        for counter in _semaphores.values():
            counter.zero_()
        raise
    for observer in _observers:
        observer.after(args)


def _without_data(first: object) -> bool:
    # every launcher passes its input tensor first; a FunctionalTensor (torch.compile's
    # decomposition of a triton_op) is no FakeTensor, so its launch reaches wrap_triton
    return isinstance(first, torch.Tensor) and (first.device.type == "meta" or isinstance(first, FakeTensor))


@contextlib.contextmanager
def observe(observer: LaunchObserver) -> Iterator[None]:
    """Call ``observer.before(args)`` and ``observer.after(args)`` around every launch in the block."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


class _Counter:
    def __init__(self) -> None:
        self.counts = [0]

    def before(self, args: tuple[object, ...]) -> None:
        self.counts[0] += 1

    def after(self, args: tuple[object, ...]) -> None:
        pass


@contextlib.contextmanager
def count_launches() -> Iterator[list[int]]:
    """``with count_launches() as n: ...`` — ``n[0]`` is the number of Triton kernel launches
    inside the block (eager calls; a compiled graph launches what its code says)."""
    counter = _Counter()
    with observe(counter):
        yield counter.counts


def register_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable[..., object]], CustomOpDef]:
    """Register ``normlab::name`` around a launcher function.

    Compiled, with ``torch.library.triton_op``: under torch.compile the operator decomposes
    into its ``wrap_triton`` launches, so inductor sees the Triton kernels themselves.
    Interpreted, with ``torch.library.custom_op``: torch 2.13 cannot trace an interpreter
    launch (it runs eagerly, on FakeTensors, and fails), so there the operator stays one
    opaque node of the compiled graph, run eagerly on real tensors.

    The launcher is its own fake implementation, as ``triton_op`` makes it: run on FakeTensors
    or meta tensors it allocates its outputs and launches nothing (:func:`launch`), so the
    shapes a tracer sees are the ones a real call returns."""

    def register(fn: Callable[..., object]) -> CustomOpDef:
        if INTERPRETED:
            op = torch.library.custom_op(f"normlab::{name}", mutates_args=mutates_args)(fn)
            op.register_fake(fn)
            return op
        # a CustomOpDef too: torch annotates triton_op's result only as a Callable
        return cast("CustomOpDef", torch.library.triton_op(f"normlab::{name}", mutates_args=mutates_args)(fn))

    return register


_semaphores: dict[tuple[torch.device, int], torch.Tensor] = {}
_semaphore_lock = threading.Lock()


def semaphore(like: torch.Tensor) -> torch.Tensor:
    """A zeroed int32 counter for a kernel's finishing program (the last program to arrive
    reduces what the others left; see ``channel.py``), on ``like``'s device.

    Eager calls share one persistent counter per device and stream: the finishing program
    resets it to 0, so it needs no fill launch per call. Under a tracer (FakeTensors,
    functional tensors, meta) a fresh ``torch.zeros`` is traced instead, which the graph
    allocates itself."""
    if type(like) is not torch.Tensor or like.device.type == "meta":
        return torch.zeros(1, dtype=torch.int32, device=like.device)
    stream = torch.cuda.current_stream(like.device).cuda_stream if like.device.type == "cuda" else 0
    key = (like.device, stream)
    counter = _semaphores.get(key)
    if counter is None:
        with _semaphore_lock:
            counter = _semaphores.setdefault(key, torch.zeros(1, dtype=torch.int32, device=like.device))
    return counter
