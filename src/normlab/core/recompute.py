"""Activation checkpointing's recompute, told apart from any other forward run during a
backward pass (for :func:`normlab.core.paths.recomputing`, which also asks whether a graph
is being compiled): the forward that ``torch.utils.checkpoint`` runs a second time inside
backward (reentrant or not, nested, and the wrappers built on it) sees the step's batch a
second time, so the running estimates are not updated again — once per real step, in every
segment shape (see conventions.md). Any other forward run during a backward — in a backward
hook, an autograd Function's backward, a gradient penalty — is a batch of its own and
updates them, as torch.nn's does."""

from __future__ import annotations

import functools
import sys
import types

__all__ = ["checkpoint_recompute_on_stack"]


def checkpoint_recompute_on_stack() -> bool:
    """The second half of :func:`normlab.core.paths.recomputing`, asked only inside a backward pass (the kernels'
    direct entries, never compiled, ask ``_graph_task_id() != -1`` first themselves, so that an
    ordinary forward pays one C call): the recompute is told apart by its frame on the stack —
    the reentrant checkpoint's ``CheckpointFunction.backward`` or the non-reentrant one's
    ``recompute_fn`` (called from its saved-tensor unpack hook). torch marks it no other way."""
    codes = _recompute_codes()
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


@functools.cache
def _recompute_codes() -> frozenset[types.CodeType]:
    """The code of torch.utils.checkpoint's two recomputes (imported here, on the first call
    made inside a backward pass, not with normlab)."""
    from torch.utils import checkpoint

    # recompute_fn is a closure of the non-reentrant generator, whose name differs between torch
    # versions (…_generator in 2.13, …_generator_impl in 2.14): looked for in all the module's
    codes = {checkpoint.CheckpointFunction.backward.__code__}
    pending = [f.__code__ for f in vars(checkpoint).values() if isinstance(f, types.FunctionType)]
    while pending:
        code = pending.pop()
        nested = [const for const in code.co_consts if isinstance(const, types.CodeType)]
        codes.update(const for const in nested if const.co_name == "recompute_fn")
        pending.extend(nested)
    return frozenset(codes)
