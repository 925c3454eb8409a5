"""The kernels as PyTorch operators, ``torch.ops.normlab.*``, for everything that must see an
operator: ``torch.compile``, FakeTensor and the meta device, TorchFunctionMode and
TorchDispatchMode, tensor subclasses, compiled autograd.

Each kernel is registered with ``torch.library.custom_op`` together with a fake (meta)
implementation and its autograd formula, so ``torch.compile`` sees an ordinary operator (no
graph break), the meta device and FakeTensor propagate shapes, and autograd runs the
closed-form C++ backward:

    normlab::channel_norm            BatchNorm / InstanceNorm / GroupNorm (+ activation)
    normlab::channel_norm_backward   its backward (dx, dγ, dβ, dPReLU)
    normlab::row_norm                LayerNorm / RMSNorm over the trailing k elements
    normlab::row_norm_backward       its backward (dx, dγ, dβ)
    normlab::add_row_norm            residual add + LayerNorm / RMSNorm
    normlab::add_row_norm_backward   its backward (d_sum, dγ, dβ)

Their bodies are entries.cpp's (the same kernels, the layout handled there); which calls run
them is the path rule's decision (:mod:`normlab.core.paths`). Eager calls outside any tracer
skip the operator dispatch, which costs more than the kernel on small tensors: they take the
families' direct entries (entries.cpp), whose C++ autograd nodes record the same formulas.
Per-group statistics come back in float64 for the channel norms, float32 per row for rows.

Notation: a *group* is what one (mean, variance) is taken over — a channel for BatchNorm or
given statistics, a (sample, group of channels) for GroupNorm/InstanceNorm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from ...activation import ACTIVATIONS
from . import build, double_backward

if TYPE_CHECKING:
    from .build import KernelsModule

__all__ = ["add_row_norm", "channel_norm", "row_norm"]

_PRELU = ACTIVATIONS["prelu"].code


def _channel_groups(x: torch.Tensor, groups: int, given: bool) -> int:
    """Number of statistics groups: C for BatchNorm or given statistics, N·G otherwise."""
    return x.shape[1] if (groups < 0 or given) else x.shape[0] * groups


# --- normlab::channel_norm -----------------------------------------------------------------


@torch.library.custom_op("normlab::channel_norm", mutates_args=(), device_types="cpu")
def channel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    groups: int,
    eps: float,
    act: int,
    param: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, shift, offset, rstd, mean, var): y = act(γ·(x − shift − offset)·rstd + β).

    Statistics come from ``x`` (groups = -1: per channel over N and space; G > 0: per
    sample and group of C/G channels) unless ``running_mean``/``running_var`` are given.
    ``shift, offset, rstd`` (float64, one per group) are what the backward needs;
    ``mean, var`` (float64, biased variance) feed running estimates — empty when given.
    """
    return cast(
        "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]",
        tuple(
            cast("KernelsModule", build.module).channel_forward(
                x, weight, bias, running_mean, running_var, prelu_weight, groups, eps, act, param, False
            )
        ),
    )  # the lengths entries.cpp returns


@channel_norm.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    groups: int,
    eps: float,
    act: int,
    param: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    given = running_mean is not None
    k = _channel_groups(x, groups, given)
    stat = x.new_empty(k, dtype=torch.float64)
    empty = x.new_empty(0 if given else k, dtype=torch.float64)
    return torch.empty_like(x), stat, stat.clone(), stat.clone(), empty, empty.clone()


@torch.library.custom_op("normlab::channel_norm_backward", mutates_args=(), device_types="cpu")
def channel_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    shift: torch.Tensor,
    offset: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    given: bool,
    act: int,
    param: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dγ, dβ, dPReLU) of :func:`channel_norm`; the parameter gradients in float64 (C,)."""
    return cast(
        "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]",
        tuple(
            cast("KernelsModule", build.module).channel_backward(
                dy, x, weight, bias, prelu_weight, shift, offset, rstd, groups, given, False, act, param
            )
        ),
    )  # the lengths entries.cpp returns


@channel_norm_backward.register_fake
def _(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    shift: torch.Tensor,
    offset: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    given: bool,
    act: int,
    param: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    per_channel = x.new_empty(x.shape[1], dtype=torch.float64)
    return torch.empty_like(x), per_channel, per_channel.clone(), per_channel.clone()


def _channel_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, running_mean, _, prelu_weight, groups, eps, act, param = inputs
    _, shift, offset, rstd, _, _ = output
    ctx.save_for_backward(x, weight, bias, prelu_weight, shift, offset, rstd)
    ctx.groups, ctx.eps, ctx.act, ctx.param = groups, eps, act, param
    ctx.given = running_mean is not None


def _channel_backward(
    ctx: Any, dy: torch.Tensor, *_unused_stat_grads: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    x, weight, bias, prelu, shift, offset, rstd = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,) * 10
    if torch.is_grad_enabled():  # create_graph=True: the kernel's result carries no graph
        dx, dw, db, dp = double_backward.channel(
            dy, x, weight, bias, prelu, shift, rstd, ctx.groups, ctx.given, ctx.eps, ctx.act, ctx.param, needs
        )
    else:
        dx, dw, db, dp = torch.ops.normlab.channel_norm_backward(
            dy, x, weight, bias, prelu, shift, offset, rstd, ctx.groups, ctx.given, ctx.act, ctx.param
        )
        dw = dw.to(weight.dtype) if weight is not None and needs[1] else None
        db = db.to(bias.dtype) if bias is not None and needs[2] else None
        if ctx.act == _PRELU and prelu is not None and needs[5]:
            dp = dp.to(prelu.dtype)
            dp = dp.sum().reshape(prelu.shape) if prelu.numel() == 1 else dp
        else:
            dp = None
    return (dx if needs[0] else None), dw, db, None, None, dp, None, None, None, None


channel_norm.register_autograd(_channel_backward, setup_context=_channel_setup)


# --- normlab::row_norm: LayerNorm and RMSNorm ------------------------------------------------


@torch.library.custom_op("normlab::row_norm", mutates_args=(), device_types="cpu")
def row_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, k: int, eps: float, centered: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, shift, rstd, offr) over the trailing ``k`` elements of contiguous ``x``;
    x̂ = (x − shift)·rstd − offr per row (float32 row statistics)."""
    return cast(
        "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]",
        tuple(cast("KernelsModule", build.module).row_forward(x, weight, bias, k, eps, centered)),
    )  # the lengths entries.cpp returns


@row_norm.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, k: int, eps: float, centered: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = x.new_empty(x.numel() // k)
    return torch.empty_like(x), rows, rows.clone(), rows.clone()


@torch.library.custom_op("normlab::row_norm_backward", mutates_args=(), device_types="cpu")
def row_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    shift: torch.Tensor,
    rstd: torch.Tensor,
    offr: torch.Tensor,
    k: int,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dγ, dβ) of :func:`row_norm`; dγ, dβ float64 over the k normalized elements."""
    return cast(
        "tuple[torch.Tensor, torch.Tensor, torch.Tensor]",
        tuple(cast("KernelsModule", build.module).row_backward(dy, x, weight, shift, rstd, offr, k, centered)),
    )  # the lengths entries.cpp returns


@row_norm_backward.register_fake
def _(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    shift: torch.Tensor,
    rstd: torch.Tensor,
    offr: torch.Tensor,
    k: int,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_element = x.new_empty(k, dtype=torch.float64)
    return torch.empty_like(x), per_element, per_element.clone()


def _row_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, k, eps, centered = inputs
    _, shift, rstd, offr = output
    ctx.save_for_backward(x, weight, bias, shift, rstd, offr)
    ctx.k, ctx.eps, ctx.centered = k, eps, centered


def _row_backward(
    ctx: Any, dy: torch.Tensor, *_unused_stat_grads: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    x, weight, bias, shift, rstd, offr = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: differentiate the composed reference
        return (*double_backward.row(dy, x, weight, bias, ctx.k, ctx.eps, ctx.centered, needs), None, None, None)
    dx, dw, db = torch.ops.normlab.row_norm_backward(dy, x, weight, shift, rstd, offr, ctx.k, ctx.centered)
    dw = dw.to(weight.dtype).view(weight.shape) if weight is not None and needs[1] else None
    db = db.to(bias.dtype).view(bias.shape) if bias is not None and needs[2] else None
    return (dx if needs[0] else None), dw, db, None, None, None


row_norm.register_autograd(_row_backward, setup_context=_row_setup)


# --- normlab::add_row_norm: residual add + LayerNorm / RMSNorm -------------------------------
#
# The pre-norm transformer step s = x + r, y = norm(s) in one pass. What backward keeps is s
# (an output the caller holds anyway, the residual stream) and three floats per row — the
# same as the unfused ops, which keep s for their norm. Both x and r receive the same
# gradient, ds + norm_backward(dy).


@torch.library.custom_op("normlab::add_row_norm", mutates_args=(), device_types="cpu")
def add_row_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    eps: float,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, shift, rstd, offr): s = x + residual and y = norm(s) over the trailing ``k``
    elements of contiguous, same-shaped ``x`` and ``residual``; statistics as :func:`row_norm`."""
    return cast(
        "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]",
        tuple(cast("KernelsModule", build.module).add_row_forward(x, residual, weight, bias, k, eps, centered)),
    )  # the lengths entries.cpp returns


@add_row_norm.register_fake
def _(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    eps: float,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = x.new_empty(x.numel() // k)
    return torch.empty_like(x), torch.empty_like(x), rows, rows.clone(), rows.clone()


@torch.library.custom_op("normlab::add_row_norm_backward", mutates_args=(), device_types="cpu")
def add_row_norm_backward(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    shift: torch.Tensor,
    rstd: torch.Tensor,
    offr: torch.Tensor,
    k: int,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_sum, dγ, dβ) of :func:`add_row_norm`: d_sum = ds + norm_backward(dy) is the gradient
    of x and of the residual; dγ, dβ float64 over the k normalized elements."""
    return cast(
        "tuple[torch.Tensor, torch.Tensor, torch.Tensor]",
        tuple(cast("KernelsModule", build.module).add_row_backward(dy, ds, s, weight, shift, rstd, offr, k, centered)),
    )  # the lengths entries.cpp returns


@add_row_norm_backward.register_fake
def _(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    shift: torch.Tensor,
    rstd: torch.Tensor,
    offr: torch.Tensor,
    k: int,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_element = s.new_empty(k, dtype=torch.float64)
    return torch.empty_like(s), per_element, per_element.clone()


def _add_row_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    _, _, weight, bias, k, eps, centered = inputs
    _, s, shift, rstd, offr = output
    ctx.save_for_backward(s, weight, bias, shift, rstd, offr)
    ctx.k, ctx.eps, ctx.centered = k, eps, centered


def _add_row_backward(
    ctx: Any, dy: torch.Tensor | None, ds: torch.Tensor | None, *_unused_stat_grads: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    s, weight, bias, shift, rstd, offr = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if dy is None:  # only s was differentiated (a caller that does not materialize zeros)
        d_sum = ds
        dw = torch.zeros_like(weight) if weight is not None and needs[2] else None
        db = torch.zeros_like(bias) if bias is not None and needs[3] else None
    elif torch.is_grad_enabled():  # create_graph=True: differentiate the composed reference
        d_sum, dw, db = double_backward.add_row(dy, ds, s, weight, bias, ctx.k, ctx.eps, ctx.centered, needs[2:4])
    else:
        d_sum, dw, db = torch.ops.normlab.add_row_norm_backward(
            dy, ds, s, weight, shift, rstd, offr, ctx.k, ctx.centered
        )
        dw = dw.to(weight.dtype).view(weight.shape) if weight is not None and needs[2] else None
        db = db.to(bias.dtype).view(bias.shape) if bias is not None and needs[3] else None
    if d_sum is None:
        d_sum = torch.zeros_like(s)
    return (d_sum if needs[0] else None), (d_sum if needs[1] else None), dw, db, None, None, None


add_row_norm.register_autograd(_add_row_backward, setup_context=_add_row_setup)
