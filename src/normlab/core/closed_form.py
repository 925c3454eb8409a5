"""What the closed-form autograd Functions of the norms beyond the classic five share.

Each such Function (EvoNorm-B0 and -S0, SwitchableNorm) writes its first derivative by hand
and keeps the formula it differentiates as plain differentiable torch ops beside it — the path
rule's composed route for export, ``jit.trace``, ``torch.func`` and forward AD. A second
derivative (``create_graph=True``) differentiates that formula again: the backward then
recomputes it and asks autograd, which :func:`recomputed_grads` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

__all__ = ["recomputed_grads"]


def recomputed_grads(
    ctx: Any,
    reference: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[object],
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``reference(*inputs)`` (its first output, if a tuple) against
    ``grad_output`` through differentiable ops, graph kept: what a backward returns when
    autograd records it (``create_graph=True``), so that it can be differentiated again.

    Args:
        ctx: the Function's context (its ``needs_input_grad`` says which inputs get one).
        reference: the forward in differentiable torch ops.
        inputs: the forward's arguments, tensors as saved, in the forward's order.
        grad_output: the gradient of the first output.

    Returns:
        One gradient per input (None where none is needed or the input is not a tensor).
    """
    wanted = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[i] and isinstance(t, torch.Tensor)]
    with torch.enable_grad():
        out = reference(*inputs)
        first = out[0] if isinstance(out, tuple) else out
        sources = [cast(torch.Tensor, inputs[i]) for i in wanted]  # tensors: the filter above
        grads = torch.autograd.grad(first, sources, grad_output, create_graph=True, allow_unused=True)
    result: list[torch.Tensor | None] = [None] * len(inputs)
    for i, source, grad in zip(wanted, sources, grads):
        # an input the formula does not reach (a zero-element one) still gets its zeros
        result[i] = grad if grad is not None else torch.zeros_like(source)
    return tuple(result)
